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
"""Projections onto sparse sets: scores, exact-count thresholds and masks.

Pure array functions, no optimizer state. They work on one array at a time and
are safe under ``jax.jit`` and on sharded arrays:

* the threshold of an unstructured or per-row mask is found by bisection on
  the 32-bit pattern of the scores (32 counting passes, no sort, flat memory),
  and ties at the threshold are broken by position, so that the number of kept
  entries is exact;
* N:M masks sort only inside the groups of ``m`` entries.

Counting convention: a sparsity ``s`` over ``n`` entries prunes exactly
``round(s * n)`` of them (round half to even), i.e. keeps ``n - round(s * n)``.
For a Python float ``s`` the count is computed exactly on the host; for a traced
``s`` it is computed in float32.

Axis convention: Flax ``Dense`` kernels are ``[in, out]``. ``axis`` always names
the axis along which entries compete; for a kernel ``axis=0`` (input features)
gives one group per output unit, i.e. per PyTorch output row.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from elsa_jax.lowp.ordering import leaf_groups

Pattern = Literal["unstructured", "row", "nm"]

_SIGN_BIT = 0x80000000


def magnitude_score(y: jax.Array) -> jax.Array:
  """The magnitude score ``|y|`` (plain magnitude projection).

  Args:
    y: the array to project.

  Returns:
    ``|y|`` in float32.
  """
  return jnp.abs(y.astype(jnp.float32))


def objective_aware_score(y: jax.Array, v: jax.Array) -> jax.Array:
  """The objective-aware score ``v * y**2`` of ELSA.

  Keeping the top entries of this score minimises ``sum_i v_i (z_i - y_i)**2``
  over the sparse set: a projection weighted by a diagonal curvature estimate
  ``v`` (a second moment of the gradient). Any positive per-matrix factor of
  ``v`` (such as Adam's bias correction) leaves the ranking unchanged.

  Args:
    y: the array to project.
    v: non-negative weights of the same shape, e.g. an EMA of squared gradients.

  Returns:
    ``v * y**2`` in float32.
  """
  y = y.astype(jnp.float32)
  return v.astype(jnp.float32) * y * y


def num_pruned(n: int, sparsity) -> jax.Array | int:
  """The number of entries a sparsity prunes among ``n``: ``round(sparsity * n)``.

  Args:
    n: the number of entries that compete.
    sparsity: the fraction to prune, a Python number or a scalar array.

  Returns:
    An ``int`` for a Python ``sparsity``, otherwise an int32 scalar array.
  """
  if isinstance(sparsity, (int, float)):
    # Python's round is exact on the host and rounds half to even, as jnp does.
    return int(round(float(sparsity) * n))
  sparsity = jnp.asarray(sparsity, jnp.float32)
  return jnp.round(sparsity * n).astype(jnp.int32)


def _sortable_key(score: jax.Array) -> jax.Array:
  """Maps float32 values to uint32 keys with the same order (NaN above +inf)."""
  bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32), jnp.uint32)
  sign = jnp.uint32(_SIGN_BIT)
  negative = (bits & sign) != 0
  return jnp.where(negative, ~bits, bits | sign)


def _competing_axes(ndim: int, axis) -> tuple[int, ...]:
  """The axes along which entries compete: all (None), one (int) or several (tuple)."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, int):
    return (axis % ndim,)
  return tuple(a % ndim for a in axis)


def _reduced_shape(shape: tuple[int, ...], axis) -> tuple[int, ...]:
  axes = _competing_axes(len(shape), axis)
  return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _positions(shape: tuple[int, ...], axis) -> jax.Array:
  """Row-major index over the competing axes (the flat index for None), as int32."""
  axes = _competing_axes(len(shape), axis)
  if len(axes) == 1:
    return jax.lax.broadcasted_iota(jnp.int32, shape, axes[0])
  position = jnp.zeros(shape, jnp.int32)
  stride = 1
  for dim in reversed(sorted(axes)):
    position = position + jax.lax.broadcasted_iota(jnp.int32, shape, dim) * stride
    stride *= shape[dim]
  return position


def _topk_cuts(scores, ks, axes):
  """Finds ``(t, p)`` per array: keep ``key > t``, and ``key == t`` at positions ``< p``.

  One loop of counting passes shared by all arrays. Steps ``0..31`` bisect
  the uint32 key for the largest ``t`` with ``count(key >= t) >= k`` (the
  invariant holds at ``t = 0``; each step halves ``[lo, hi]``, so 32 steps
  reach one value). When exactly ``k`` entries then have ``key >= t`` (no tie
  straddles the cut, the common case for trained float scores), ``p`` is the
  length and the array is done. Otherwise further steps bisect the position
  for the smallest ``p`` with ``count(key > t) + count(key == t, position <
  p) >= k``, at most ``ceil(log2(n + 1))`` of them; the loop stops as soon as
  every array is done. ``(t, p)`` is thus the k-th entry in the order (key
  descending, position ascending): exactly ``k`` entries rank at or above it.
  Keys and positions are recomputed inside the loop, so nothing but the
  bounds is stored.
  """
  lengths = [
      math.prod(s.shape[d] for d in _competing_axes(s.ndim, a)) for s, a in zip(scores, axes)
  ]
  value_steps = 32
  position_steps = max(1, max(math.ceil(math.log2(n + 1)) for n in lengths))
  bounds = tuple(
      (
          jnp.zeros(_reduced_shape(s.shape, a), jnp.uint32),  # lo_t
          jnp.full(_reduced_shape(s.shape, a), jnp.iinfo(jnp.uint32).max, jnp.uint32),  # hi_t
          jnp.zeros(_reduced_shape(s.shape, a), jnp.int32),  # lo_p
          jnp.full(_reduced_shape(s.shape, a), n, jnp.int32),  # hi_p
          jnp.full(_reduced_shape(s.shape, a), n, jnp.int32),  # count(key >= lo_t)
      )
      for s, a, n in zip(scores, axes, lengths)
  )

  def step(i, score, k, axis, length, lo_t, hi_t, lo_p, hi_p, at_lo):
    on_value = i < value_steps
    width = hi_t - lo_t
    mid_t = lo_t + (width >> 1) + (width & 1)  # upper middle, no overflow
    mid_p = lo_p + (hi_p - lo_p) // 2
    t = jnp.where(on_value, mid_t, lo_t)
    p = jnp.where(on_value, length, mid_p)
    keys = _sortable_key(score)
    ranked = (keys > t) | ((keys == t) & (_positions(score.shape, axis) < p))
    count = jnp.sum(ranked, axis=_competing_axes(score.ndim, axis), keepdims=True, dtype=jnp.int32)
    enough = count >= k
    at_lo = jnp.where(on_value & enough, count, at_lo)
    lo_p = jnp.where(~on_value & ~enough, mid_p + 1, lo_p)
    # At the end of the value steps: no tie straddles the cut -> done.
    lo_p = jnp.where((i == value_steps - 1) & (at_lo == k), length, lo_p)
    return (
        jnp.where(on_value & enough, mid_t, lo_t),
        jnp.where(on_value & ~enough, mid_t - 1, hi_t),
        lo_p,
        jnp.where(~on_value & enough, mid_p, hi_p),
        at_lo,
    )

  def cond(carry):
    i, bounds = carry
    pending = functools.reduce(jnp.logical_or, [jnp.any(b[2] < b[3]) for b in bounds])
    return (i < value_steps) | ((i < value_steps + position_steps) & pending)

  def body(carry):
    i, bounds = carry
    return i + 1, tuple(
        step(i, s, k, a, n, *b) for s, k, a, n, b in zip(scores, ks, axes, lengths, bounds)
    )

  _, bounds = jax.lax.while_loop(cond, body, (jnp.zeros([], jnp.int32), bounds))
  return [(b[0], b[3]) for b in bounds]


@functools.partial(jax.jit, static_argnames="axes")
def topk_masks(scores, ks, axes) -> list[jax.Array]:
  """:func:`topk_mask` for several arrays at once, in one bisection loop.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import topk_masks
    >>> a, b = topk_masks([jnp.array([1., 3., 2.]), jnp.array([[5.], [4.]])], [1, 1], (None, 0))
    >>> a.tolist(), b.tolist()
    ([False, True, False], [[True], [False]])

  Args:
    scores: a sequence of float arrays.
    ks: how many entries to keep in each (per slice when its axis is set).
    axes: a tuple with, per array, None (all entries compete), the axis, or
      a tuple of the axes along which entries compete (independently for
      every index of the other axes).

  Returns:
    A list of boolean masks.
  """
  scores = [jnp.asarray(s) for s in scores]
  ks = [jnp.asarray(k, jnp.int32) for k in ks]
  cuts = _topk_cuts(scores, ks, axes)
  masks = []
  for score, axis, (t, p) in zip(scores, axes, cuts):
    keys = _sortable_key(score)
    masks.append((keys > t) | ((keys == t) & (_positions(score.shape, axis) < p)))
  return masks


def topk_mask(score: jax.Array, k, *, axis: int | None = None) -> jax.Array:
  """Boolean mask of exactly ``k`` largest scores, without sorting.

  Bisection with counting passes only (no sort, no cumsum, so a sharded
  array is never gathered): 32 steps on the 32-bit pattern find the k-th
  largest value ``t``, then ``log2(n)`` steps on the position keep, among
  entries equal to ``t``, those with the lowest position (flat row-major
  index, or index along ``axis``). The count is exact even with heavy ties.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import topk_mask
    >>> topk_mask(jnp.array([1., 3., 3., 2.]), 2)
    Array([False,  True,  True, False], dtype=bool)

  Args:
    score: a float array (any shape); larger means more important.
    k: how many entries to keep: over the whole array when ``axis`` is None,
      otherwise in every slice along ``axis`` (a Python int or an int array).
    axis: None for one count over the whole array, or the axis along which
      entries compete (independently for every index of the other axes).

  Returns:
    A boolean array of the shape of ``score``.
  """
  return topk_masks([score], [k], (axis,))[0]


def unstructured_mask(score: jax.Array, sparsity) -> jax.Array:
  """Keeps the top ``n - round(sparsity * n)`` scores of the whole array.

  Args:
    score: a float array; larger means more important.
    sparsity: the fraction to prune, in ``[0, 1)``.

  Returns:
    A boolean mask (True = kept).
  """
  n = math.prod(score.shape)
  return topk_mask(score, n - num_pruned(n, sparsity), axis=None)


def row_mask(score: jax.Array, sparsity, *, axis: int = 0) -> jax.Array:
  """Keeps the top scores in every slice along ``axis``, the same count in each.

  For a Flax kernel ``[in, out]``, ``axis=0`` prunes ``round(sparsity * in)``
  inputs of every output unit (a PyTorch "per output row" mask).

  Args:
    score: a float array; larger means more important.
    sparsity: the fraction to prune in every slice, in ``[0, 1)``.
    axis: the axis along which entries compete.

  Returns:
    A boolean mask (True = kept).
  """
  length = score.shape[axis]
  return topk_mask(score, length - num_pruned(length, sparsity), axis=axis)


def nm_mask(score: jax.Array, n: int, m: int, *, axis: int = 0) -> jax.Array:
  """N:M mask: in every group of ``m`` consecutive entries along ``axis``, keep ``n``.

  For a Flax kernel ``[in, out]``, ``axis=0`` groups ``m`` consecutive input
  features of each output unit, the layout sparse tensor cores expect. Ties
  keep the lower index.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import nm_mask
    >>> nm_mask(jnp.array([[4.], [1.], [3.], [2.]]), 2, 4)[:, 0]
    Array([ True, False,  True, False], dtype=bool)

  Args:
    score: a float array; larger means more important.
    n: entries kept per group.
    m: group size; must divide ``score.shape[axis]``.
    axis: the axis along which the groups run.

  Returns:
    A boolean mask (True = kept).

  Raises:
    ValueError: when ``m`` does not divide the axis or ``0 <= n <= m`` fails.
  """
  check_nm(score.shape, n, m, axis)
  return _nm_mask(score, n, m, axis % score.ndim)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_mask(score: jax.Array, n: int, m: int, axis: int) -> jax.Array:
  moved = jnp.moveaxis(score, axis, -1)
  groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
  # Descending order of the sortable key; the stable sort keeps ties in order.
  order = jnp.argsort(~_sortable_key(groups), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  keep = (rank < n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, axis)


def check_nm(shape: tuple[int, ...], n: int, m: int, axis: int = 0) -> None:
  """Raises a ValueError when an N:M pattern does not fit an array's shape."""
  if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m > 0):
    raise ValueError(
        f"N:M needs integers with 0 <= N <= M and M > 0, got N={n}, M={m}; "
        "use e.g. n_m=(2, 4)."
    )
  if not shape or not -len(shape) <= axis < len(shape):
    raise ValueError(f"axis {axis} does not exist in an array of shape {shape}.")
  if shape[axis] % m:
    raise ValueError(
        f"N:M groups of M={m} do not divide axis {axis} of length "
        f"{shape[axis]} (shape {shape}); pick M dividing it or exclude this "
        "leaf from the prunable set."
    )


# Arrays projected together share one bisection loop (fewer loops to compile
# and run); groups are capped so that their transients (the scores, stacked,
# and the integer keys XLA hoists out of the loop) stay a small, bounded share
# of device memory: 2**22 entries are ~16 MiB per float32 copy.


def sparsity_masks(
    scores,
    sparsities,
    *,
    pattern: Pattern = "unstructured",
    n_m: tuple[int, int] = (2, 4),
    axis: int = 0,
    max_joint_entries: int | None = None,
    pruned=None,
) -> list[jax.Array]:
  """The masks of a sparsity pattern for several arrays (see :func:`sparsity_mask`).

  Unstructured and per-row masks of consecutive arrays share one bisection
  loop, in groups of at most ``max_joint_entries`` entries.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import sparsity_masks
    >>> a, b = sparsity_masks([jnp.arange(4.), jnp.arange(6.)], [0.5, 0.5])
    >>> a.tolist(), b.tolist()
    ([False, False, True, True], [False, False, False, True, True, True])

  Args:
    scores: a sequence of float arrays; larger means more important.
    sparsities: the fraction to prune in each (ignored for ``"nm"``).
    pattern: ``"unstructured"``, ``"row"`` or ``"nm"``.
    n_m: ``(n, m)`` for the N:M pattern.
    axis: the axis along which entries compete (``"row"`` and ``"nm"``).
    max_joint_entries: the largest number of entries bisected together
      (None: :data:`elsa_jax.lowp.ordering.GROUP_ENTRIES`, the package's one group size).
    pruned: per array, the number of entries to prune (ints or int32 scalars) in
      place of ``sparsities``; unstructured only (e.g. the counts of
      :func:`elsa_jax.sparsity.global_topk.global_pruned_counts`).

  Returns:
    A list of boolean masks (True = kept).
  """
  scores = list(scores)
  if pattern == "nm":
    return [nm_mask(score, *n_m, axis=axis) for score in scores]
  if pattern not in ("unstructured", "row"):
    raise ValueError(
        f"unknown sparsity pattern {pattern!r}; use 'unstructured', 'row' or 'nm'."
    )
  if pruned is not None and pattern != "unstructured":
    raise ValueError(f"pruned counts are for the unstructured pattern, not {pattern!r}.")
  ks, axes = [], []
  for i, (score, sparsity) in enumerate(zip(scores, sparsities, strict=True)):
    if pattern == "unstructured":
      n, a = math.prod(score.shape), None
    else:
      a = axis % score.ndim
      n = score.shape[a]
    ks.append(n - (num_pruned(n, sparsity) if pruned is None else pruned[i]))
    axes.append(a)
  masks = []
  for group in leaf_groups([s.size for s in scores], max_joint_entries):
    masks.extend(_stacked_topk_masks(
        [scores[i] for i in group], [ks[i] for i in group], [axes[i] for i in group]
    ))
  return masks


def _stacked_topk_masks(scores, ks, axes) -> list[jax.Array]:
  """:func:`topk_masks` with the arrays of one shape stacked into one.

  A transformer's prunable matrices come in a few shapes, repeated once per
  layer: stacked as ``[layers, ...]`` with their own counts, each bisection
  pass runs a few large kernels instead of one small kernel per matrix. An
  array's flat (or along-axis) positions are unchanged by the stacking, so
  the masks are exactly those of :func:`topk_masks`.
  """
  groups: dict[tuple, list[int]] = {}
  for i, (score, axis) in enumerate(zip(scores, axes)):
    groups.setdefault((score.shape, axis), []).append(i)
  stacked, stacked_ks, stacked_axes = [], [], []
  for (shape, axis), idx in groups.items():
    # No reshape: the stacked array keeps each matrix's sharding on its own axes.
    stacked.append(jnp.stack([scores[i] for i in idx]))
    k = jnp.stack([jnp.asarray(ks[i], jnp.int32) for i in idx])
    stacked_ks.append(k.reshape((len(idx),) + (1,) * len(shape)))
    stacked_axes.append(tuple(a + 1 for a in _competing_axes(len(shape), axis)))
  out = [None] * len(scores)
  for ((shape, _), idx), masks in zip(
      groups.items(), topk_masks(stacked, stacked_ks, tuple(stacked_axes))
  ):
    for j, i in enumerate(idx):
      out[i] = masks[j]
  return out


def sparsity_mask(
    score: jax.Array,
    sparsity=0.0,
    *,
    pattern: Pattern = "unstructured",
    n_m: tuple[int, int] = (2, 4),
    axis: int = 0,
) -> jax.Array:
  """The mask of a sparsity pattern.

  Args:
    score: a float array; larger means more important.
    sparsity: the fraction to prune (ignored for ``"nm"``, which prunes
      ``1 - n / m``).
    pattern: ``"unstructured"`` (one count per array), ``"row"`` (one count
      per slice along ``axis``) or ``"nm"``.
    n_m: ``(n, m)`` for the N:M pattern.
    axis: the axis along which entries compete (``"row"`` and ``"nm"``).

  Returns:
    A boolean mask (True = kept).
  """
  return sparsity_masks([score], [sparsity], pattern=pattern, n_m=n_m, axis=axis)[0]


def project(
    y: jax.Array,
    sparsity=0.0,
    *,
    v: jax.Array | None = None,
    pattern: Pattern = "unstructured",
    n_m: tuple[int, int] = (2, 4),
    axis: int = 0,
) -> jax.Array:
  """Projects ``y`` onto the sparse set: magnitude, or objective-aware with ``v``.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import project
    >>> project(jnp.array([0.1, -2.0, 0.5, 1.0]), 0.5)
    Array([ 0., -2.,  0.,  1.], dtype=float32)

  Args:
    y: the array to project.
    sparsity: the fraction to prune (see :func:`sparsity_mask`).
    v: None for the magnitude score ``|y|``, or weights for ``v * y**2``.
    pattern: ``"unstructured"``, ``"row"`` or ``"nm"``.
    n_m: ``(n, m)`` for the N:M pattern.
    axis: the axis along which entries compete.

  Returns:
    ``y`` with the pruned entries set to zero, in ``y``'s dtype.
  """
  score = magnitude_score(y) if v is None else objective_aware_score(y, v)
  mask = sparsity_mask(score, sparsity, pattern=pattern, n_m=n_m, axis=axis)
  return jnp.where(mask, y, jnp.zeros_like(y))
