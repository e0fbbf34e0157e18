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
"""Adam with moments stored in reduced precision (the base optimizer of ELSA-L).

``moment_dtype``:

* ``"float32"``: plain Adam (same numbers as :func:`optax.adam`);
* ``"bfloat16"``: both moments stored as bfloat16;
* ``"int8"``: block-wise absmax 8-bit moments (blocks of 256 consecutive
  entries of the row-major flattened array, a float32 absmax per block). The first moment is signed int8. The
  second moment is stored in the square-root domain (``sqrt(nu)`` as uint8),
  which halves its dynamic range in log scale, and a non-zero entry is never
  rounded to zero, so ``m / sqrt(nu)`` cannot blow up through quantisation.

The arithmetic runs in float32; moments are dequantised, updated and
requantised with fresh block scales at every step. With int8 moments the step
``m / (sqrt(v) + eps)`` is taken with the requantised moments (the values the
state stores), which lets XLA update the params and moments in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import jax.numpy as jnp
import optax

from elsa_jax.lowp import codecs as quant
from elsa_jax.lowp import ordering as _scheduling

class ScaleByAdamLowpState(NamedTuple):
  """State of :func:`scale_by_adam_lowp`.

  ``mu`` and ``nu`` have the params' structure and shapes, in the storage
  dtype; ``mu_scale``/``nu_scale`` hold the float32 block absmax of int8
  moments (empty arrays otherwise). ``nu`` of int8 storage holds
  ``sqrt(nu)``: read it through :func:`second_moment`.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32.
  mu: optax.Updates
  nu: optax.Updates
  mu_scale: optax.Updates
  nu_scale: optax.Updates


def unzip(tree: Any, like: Any, n: int) -> tuple[Any, ...]:
  """Splits a tree of ``n``-tuples (one per leaf of ``like``) into ``n`` trees."""
  outer = jax.tree.structure(like)
  rows = outer.flatten_up_to(tree)
  return tuple(outer.unflatten([row[i] for row in rows]) for i in range(n))


def _check_moment_dtype(moment_dtype: str) -> str:
  if moment_dtype not in ("float32", "bfloat16", "int8"):
    raise ValueError(
        f"unknown moment_dtype {moment_dtype!r}; use 'float32', 'bfloat16' or 'int8'."
    )
  return moment_dtype


def _check_block_size(block_size: int | None) -> int:
  if block_size is None:
    return quant.DEFAULT_BLOCK_SIZE
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise TypeError(
        f"block_size must be a positive Python int (a shape, not a hyperparameter), got {block_size!r}; "
        "with optax.inject_hyperparams pass static_args=('block_size',) to set it"
    )
  return int(block_size)


def second_moment(
    state: ScaleByAdamLowpState, block_size: int = quant.DEFAULT_BLOCK_SIZE
) -> optax.Updates:
  """The float32 second moment (raw, not bias-corrected) held in the state."""
  return jax.tree.map(
      lambda q, s: quant.decode_moment(q, s, block_size=block_size), state.nu, state.nu_scale
  )


def scale_by_adam_lowp(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    moment_dtype: str = "int8",
    block_size: int | None = None,
) -> optax.GradientTransformation:
  """Rescales updates by Adam with moments stored in reduced precision.

  Same update as :func:`optax.scale_by_adam` (bias-corrected), computed in
  float32 from dequantised moments; with ``"int8"`` the step reads the new
  moments as stored (after requantisation).

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import scale_by_adam_lowp
    >>> tx = scale_by_adam_lowp(moment_dtype="int8")
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> state.mu["w"].dtype, state.nu["w"].dtype
    (dtype('int8'), dtype('uint8'))

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    moment_dtype: ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise).
    block_size: entries per block of the flattened array for ``"int8"``; None
      means ``lowp.codecs.DEFAULT_BLOCK_SIZE`` (256). A shape, not a
      hyperparameter: the None default keeps ``optax.inject_hyperparams`` from
      turning it into an array.

  Returns:
    A :class:`optax.GradientTransformation`.
  """
  moment_dtype = _check_moment_dtype(moment_dtype)
  block_size = _check_block_size(block_size)

  def init_fn(params):
    mu, mu_scale = unzip(
        jax.tree.map(lambda p: quant.zeros_moment(p.shape, moment_dtype, block_size=block_size), params),
        params, 2
    )
    nu, nu_scale = unzip(
        jax.tree.map(lambda p: quant.zeros_moment(p.shape, moment_dtype, square=True, block_size=block_size),
                     params),
        params, 2
    )
    return ScaleByAdamLowpState(
        count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, mu_scale=mu_scale, nu_scale=nu_scale
    )

  def update_fn(updates, state, params=None):
    del params
    count_inc = optax.safe_increment(state.count)
    c1 = 1 - jnp.asarray(b1, jnp.float32) ** count_inc
    c2 = 1 - jnp.asarray(b2, jnp.float32) ** count_inc

    def leaf(g, mq, ms, vq, vs, after):
      g32 = g.astype(jnp.float32) + after
      m = b1 * quant.decode_moment(mq, ms, block_size=block_size) + (1 - b1) * g32
      v = b2 * quant.decode_moment(vq, vs, block_size=block_size) + (1 - b2) * jnp.square(g32)
      m_q, m_s = quant.encode_moment(m, moment_dtype, block_size=block_size)
      v_q, v_s = quant.encode_moment(v, moment_dtype, square=True, block_size=block_size)
      if moment_dtype == "int8":
        # The step is taken with the moments as stored (decoded), read from
        # their new int8 buffers. Otherwise XLA recomputes the float32
        # moments (from the old moments and, through the penalised gradient,
        # the old params) both where it encodes them and where it updates
        # the params, and so copies every param and first moment at the start
        # of the step to keep the old values: 5 bytes per parameter of
        # temporaries, live through the backward pass.
        m_q = _scheduling.materialize(m_q, m_s, v_s)
        v_q = _scheduling.materialize(v_q, m_s, v_s)
        m = quant.decode_moment(m_q, m_s, block_size=block_size)
        v = quant.decode_moment(v_q, v_s, block_size=block_size)
      step = (m / c1) / (jnp.sqrt(v / c2 + eps_root) + eps)
      return step.astype(g.dtype), m_q, v_q, m_s, v_s

    # Group after group: with int8 moments each group of leaves waits for the
    # previous group's new block scales, so that XLA does not decode the
    # moments of every leaf before it re-encodes any (:mod:`elsa_jax.lowp.ordering`).
    flat, treedef = jax.tree.flatten(updates)
    rows = list(zip(flat, *(treedef.flatten_up_to(t) for t in (state.mu, state.mu_scale, state.nu, state.nu_scale))))
    out = _scheduling.map_in_groups(leaf, rows, [g.size for g in flat],
                                    deps=(lambda i, o: o[3:]) if moment_dtype == "int8" else None)
    new_updates, mu, nu, mu_scale, nu_scale = unzip(treedef.unflatten(out), updates, 5)
    return new_updates, ScaleByAdamLowpState(
        count=count_inc, mu=mu, nu=nu, mu_scale=mu_scale, nu_scale=nu_scale
    )

  return optax.GradientTransformation(init_fn, update_fn)


def adam_lowp(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    moment_dtype: str = "int8",
    block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam with moments in bfloat16 or block-wise 8-bit (ELSA-L's base optimizer).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from elsa_jax import adam_lowp
    >>> params = {"w": jnp.ones((2, 3))}
    >>> tx = adam_lowp(1e-2, moment_dtype="int8")
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a scalar or an :class:`optax.Schedule`.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    moment_dtype: ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise).
    block_size: entries per block of the flattened array for ``"int8"``; None
      means 256 (see :func:`scale_by_adam_lowp`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.
  """
  return optax.chain(
      scale_by_adam_lowp(b1, b2, eps, eps_root, moment_dtype=moment_dtype, block_size=block_size),
      optax.scale_by_learning_rate(learning_rate),
  )


def find_second_moment(state: Any) -> tuple[bool, Any]:
  """Finds the Adam-family second moment ``nu`` inside an optimizer state.

  Looks up, with :func:`optax.tree_utils.tree_get`, a
  :class:`ScaleByAdamLowpState` (whose ``nu`` is decoded to float32), else a
  field named ``nu`` (``optax.scale_by_adam`` and its relatives), through
  chained, ``inject_hyperparams`` and ``MultiSteps`` states.

  Args:
    state: any optax state.

  Returns:
    ``(found, nu)``; ``nu`` is None when nothing was found.
  """
  lowp = optax.tree_utils.tree_get(state, "ScaleByAdamLowpState")
  if lowp is not None:
    return True, lowp.nu if isinstance(lowp.nu, optax.MaskedNode) else second_moment(lowp)
  nu = optax.tree_utils.tree_get(state, "nu")
  return nu is not None, nu
