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
"""Wanda (Sun et al. 2023): prune by ``|W| * ||X||`` inside every output row, no weight update.

Conventions of every one-shot method (:mod:`elsa_jax.oneshot.registry`): a
kernel is Flax's ``[in, out]``; ``gram`` is ``X^T X`` of the map's input
activations ``X [tokens, in]`` (any positive scale: the methods are invariant
to it). "Per output row" (Wanda's comparison group, PyTorch's row of
``weight [out, in]``) is a column of the kernel, i.e. ``axis=0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elsa_jax.sparsity import topk as _projection


def activation_norms(gram: jax.Array) -> jax.Array:
  """``||X_j||_2`` of every input feature, from ``X^T X`` (its diagonal)."""
  return jnp.sqrt(jnp.maximum(jnp.diagonal(gram).astype(jnp.float32), 0.0))


def wanda_score(kernel: jax.Array, norms: jax.Array) -> jax.Array:
  """Wanda's importance ``|W_ij| * ||X_j||`` of a kernel ``[in, out]`` (Sun et al. 2023)."""
  return jnp.abs(kernel.astype(jnp.float32)) * norms.astype(jnp.float32)[:, None]


def wanda_prune(kernel: jax.Array, gram: jax.Array, sparsity=None, *, n_m: tuple[int, int] | None = None
                ) -> jax.Array:
  """Wanda: zero the lowest ``|W| * ||X||`` inside every output row (or N:M group).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))
    >>> pruned = wanda_prune(w, x.T @ x, 0.5)
    >>> int((pruned == 0).sum(axis=0).min())  # 8 of 16 inputs zeroed for every output
    8

  Args:
    kernel: ``[in, out]`` weights.
    gram: ``[in, in]`` input second moments ``X^T X`` (only the diagonal is read).
    sparsity: fraction of every output row's weights zeroed (unstructured).
    n_m: ``(n, m)``: instead keep ``n`` of every ``m`` consecutive inputs.

  Returns:
    The pruned kernel, in the kernel's dtype.
  """
  score = wanda_score(kernel, activation_norms(gram))
  if n_m is not None:
    keep = _projection.nm_mask(score, *n_m, axis=0)
  else:
    keep = _projection.row_mask(score, sparsity, axis=0)
  return jnp.where(keep, kernel, jnp.zeros_like(kernel))


__all__ = ["activation_norms", "wanda_score", "wanda_prune"]
