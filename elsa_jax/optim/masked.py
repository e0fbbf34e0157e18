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
"""Masked recovery: train the surviving weights of a pruned model with its mask frozen.

:func:`keep_mask` wraps any optax transformation so that it sees, and moves,
only the weights that are non-zero when the state is initialised: the
gradient is zeroed on the pruned entries before the inner transformation
(so clipping and the moments see the surviving weights alone) and the update
is zeroed there after it (so a pruned weight stays exactly ``0.0`` through any
number of steps). The mask lives in the state, placed like the params, and is
checkpointed with it.

Example:
  >>> import jax.numpy as jnp, optax
  >>> params = {"layers": {"0": {"kernel": jnp.array([[0.0, 2.0], [3.0, 0.0]])}}}
  >>> tx = keep_mask(optax.adam(0.1))
  >>> state = tx.init(params)
  >>> grads = {"layers": {"0": {"kernel": jnp.ones((2, 2))}}}
  >>> updates, state = tx.update(grads, state, params)
  >>> (optax.apply_updates(params, updates)["layers"]["0"]["kernel"] == 0).tolist()
  [[True, False], [False, True]]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from elsa_jax.sparsity import prunable as prunable_lib


class KeepMaskState(NamedTuple):
  """State of :func:`keep_mask`.

  Attributes:
    mask: params-shaped: a bool array per prunable matrix (True = trained),
      an empty placeholder for every other leaf (always trained).
    inner: the wrapped transformation's state.
  """

  mask: Any
  inner: Any


def _placeholder() -> jax.Array:
  return jnp.zeros((0,), bool)


def _apply(mask: Any, tree: Any) -> Any:
  return jax.tree.map(lambda m, x: x if m.size == 0 else jnp.where(m, x, jnp.zeros_like(x)), mask, tree)


def keep_mask(inner: optax.GradientTransformation, *, prunable=None) -> optax.GradientTransformationExtraArgs:
  """``inner`` on the surviving weights only: the prunable matrices' zeros stay exactly zero.

  Args:
    inner: the optimizer of the surviving weights (e.g. clip then Adam).
    prunable: which leaves carry a mask (see :func:`elsa_jax.prunable_mask`);
      their entries that are ``0`` at :meth:`init` are frozen at ``0``.
      Other leaves are trained by ``inner`` unmasked.

  Returns:
    An optax transformation; ``update`` needs ``params`` only through ``inner``.
  """
  inner = optax.with_extra_args_support(inner)
  predicate = prunable_lib.as_predicate(prunable)

  def init_fn(params):
    mask = jax.tree_util.tree_map_with_path(
        lambda path, p: p != 0 if predicate(path, p) else _placeholder(), params)
    return KeepMaskState(mask, inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    updates, inner_state = inner.update(_apply(state.mask, updates), state.inner, params, **extra_args)
    return _apply(state.mask, updates), KeepMaskState(state.mask, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_keep_mask(opt_state: Any) -> KeepMaskState | None:
  """The :class:`KeepMaskState` inside an optimizer state (through chains and wrappers), or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, KeepMaskState))
           if isinstance(s, KeepMaskState)]
  return found[0] if found else None


__all__ = ["KeepMaskState", "keep_mask", "find_keep_mask"]
