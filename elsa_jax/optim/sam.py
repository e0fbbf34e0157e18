# Copyright 2026 The elsa_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
"""Sharpness-aware gradients (SAM, Foret et al. 2021) for SAFE's x-update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def sam_gradient(value_and_grad_fn: Callable[..., tuple[jax.Array, Any]], rho: float
                 ) -> Callable[..., tuple[jax.Array, Any]]:
  """Wraps ``value_and_grad_fn`` so that its gradient is SAM's.

  The returned function computes ``g = grad f(w)``, then returns
  ``(f(w), grad f(w + rho * g / ||g||))``: the gradient at the worst point of
  a ``rho``-ball to first order, which steers the descent towards flat
  minima. SAFE (arXiv 2506.06866) uses it as the x-update of ADMM; with
  :func:`elsa_jax.admm` chained after, the ADMM penalty is added to the
  sharpness-aware loss gradient. Costs two gradient evaluations.

  This is the same step as :func:`optax.contrib.sam` in its opaque mode, taken
  in the loss function so that it composes with gradient accumulation and any
  optax chain without doubling the optimizer's step count.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = lambda w: jnp.sum(w ** 4)
    >>> vg = sam_gradient(jax.value_and_grad(f), rho=0.1)
    >>> loss, g = vg(jnp.array([1.0, 0.0]))
    >>> float(loss), [round(float(x), 3) for x in g]  # gradient at w = [1.1, 0]
    (1.0, [5.324, 0.0])

  Args:
    value_and_grad_fn: ``(params, *args) -> (loss, grads)``.
    rho: the radius of the perturbation (a global L2 norm over all params).

  Returns:
    A function with the same signature.
  """

  def wrapped(params, *args, **kwargs):
    loss, grads = value_and_grad_fn(params, *args, **kwargs)
    norm = optax.tree.norm(grads)
    scale = rho / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
    perturbed = jax.tree.map(lambda p, g: p + (scale * g).astype(p.dtype), params, grads)
    _, sam_grads = value_and_grad_fn(perturbed, *args, **kwargs)
    return loss, sam_grads

  return wrapped
