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
"""One threshold over many arrays: the pruned count of each under a model-wide budget.

``--allocation global``: ELSA's objective-aware score ``v * y**2`` estimates
the loss change of pruning an entry, so scores of different matrices compare,
and pruning the globally lowest ones is the exact projection onto the
model-wide budget. :func:`global_pruned_counts` finds, for arrays ``i`` with
bounds ``[low_i, high_i]`` on their pruned counts, the counts ``k_i`` that

* add up to exactly ``sum(targets)`` (the uniform allocation's count, so the
  overall sparsity is the same entry for entry);
* come from one threshold ``t`` on the sortable 32-bit keys of the scores:
  ``k_i = clip(count(key_i < t), low_i, high_i)``, plus, for ties at ``t``,
  what is left of the budget, given out in array order.

Like :mod:`elsa_jax.sparsity.topk`, it bisects the uint32 key with counting
passes only (no sort, nothing gathered), so it is safe under ``jax.jit`` on
sharded arrays; arrays of one shape are stacked so that each pass runs a few
large reductions. A model's total count can pass ``2**31`` (7B weights at 70%),
so sums are kept as two int32 limbs (:func:`wide_sum`); every per-array count
stays an int32.

Example:
  >>> import jax.numpy as jnp
  >>> a, b = jnp.array([1., 2., 3., 4.]), jnp.array([10., 20., 30., 40.])
  >>> [int(k) for k in global_pruned_counts([a, b], [2, 2], [0, 0], [4, 4])]
  [4, 0]
  >>> [int(k) for k in global_pruned_counts([a, b], [2, 2], [1, 1], [3, 3])]
  [3, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from elsa_jax.sparsity import topk

_LIMB = 16  # a wide number is hi * 2**16 + lo, with lo in [0, 2**16)
_LOW = (1 << _LIMB) - 1


def wide_sum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The sum of the non-negative int32 vector ``x`` as two int32 limbs ``(hi, lo)``, exact below ``2**46``."""
  x = jnp.asarray(x, jnp.int32)
  hi, lo = jnp.sum(x >> _LIMB), jnp.sum(x & _LOW)
  return hi + (lo >> _LIMB), lo & _LOW


def wide_le(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> jax.Array:
  """``a <= b`` for normalised wide numbers."""
  return (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] <= b[1]))


def wide_sub(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``a - b`` for normalised wide numbers with ``a >= b``."""
  hi, lo = a[0] - b[0], a[1] - b[1]
  borrow = (lo < 0).astype(jnp.int32)
  return hi - borrow, lo + (borrow << _LIMB)


def wide_min(a: tuple[jax.Array, jax.Array], c: jax.Array) -> jax.Array:
  """``min(a, c)`` as an int32, for a wide ``a >= 0`` and an int32 ``c >= 0``."""
  fits = a[0] < (1 << (31 - _LIMB))
  value = jnp.where(fits, a[0], 0) * (1 << _LIMB) + a[1]
  return jnp.where(fits, jnp.minimum(value, c), c)


def _stacked_keys(scores: Sequence[jax.Array]) -> tuple[list[jax.Array], list[int]]:
  """The scores' sortable keys, stacked by shape, and the order of the arrays in the stacks."""
  groups: dict[tuple, list[int]] = {}
  for i, score in enumerate(scores):
    groups.setdefault(tuple(score.shape), []).append(i)
  stacks = [topk._sortable_key(jnp.stack([scores[i] for i in idx])) for idx in groups.values()]  # noqa: SLF001
  return stacks, [i for idx in groups.values() for i in idx]


def _counts_below(stacks: Sequence[jax.Array], t: jax.Array, inclusive: bool) -> jax.Array:
  """Per array (in stack order), the number of keys ``< t`` (``<= t`` when ``inclusive``), as int32."""
  def count(keys):
    below = keys <= t if inclusive else keys < t
    return jnp.sum(below, axis=tuple(range(1, keys.ndim)), dtype=jnp.int32)

  return jnp.concatenate([count(keys) for keys in stacks])


def _threshold(stacks, budget, low, high) -> jax.Array:
  """The largest uint32 ``t`` whose clipped counts below it fit in ``budget`` (32 bisection steps)."""
  def body(_, bounds):
    lo, hi = bounds
    width = hi - lo
    mid = lo + (width >> 1) + (width & 1)  # upper middle, no overflow
    fits = wide_le(wide_sum(jnp.clip(_counts_below(stacks, mid, False), low, high)), budget)
    return jnp.where(fits, mid, lo), jnp.where(fits, hi, mid - 1)

  start = (jnp.zeros([], jnp.uint32), jnp.full([], jnp.iinfo(jnp.uint32).max, jnp.uint32))
  return jax.lax.fori_loop(0, 32, body, start)[0]


def global_pruned_counts(scores: Sequence[jax.Array], targets: Sequence, low: Sequence,
                         high: Sequence) -> list[jax.Array]:
  """The pruned count of each array under one threshold on all the scores together.

  Args:
    scores: float arrays (any shapes); larger means more important.
    targets: per array, its pruned count under the uniform allocation; the
      counts returned add up to ``sum(targets)`` exactly.
    low: per array, the fewest entries it may have pruned (``low <= targets``).
    high: per array, the most (``targets <= high <= size``).

  Returns:
    One int32 scalar per array: how many of its lowest-scored entries to prune
    (ties broken by position, as :func:`elsa_jax.sparsity.topk.topk_masks` does
    when it keeps ``size - k``).
  """
  scores = [jnp.asarray(s) for s in scores]
  stacks, order = _stacked_keys(scores)
  vector = lambda xs: jnp.stack([jnp.asarray(xs[i], jnp.int32) for i in order])  # noqa: E731
  targets, low, high = vector(targets), vector(low), vector(high)
  budget = wide_sum(targets)
  t = _threshold(stacks, budget, low, high)
  base = jnp.clip(_counts_below(stacks, t, False), low, high)
  ties = jnp.clip(_counts_below(stacks, t, True), low, high) - base

  def give(rest, tied):  # the budget left after the threshold goes to the ties, in array order
    take = wide_min(rest, tied)
    return wide_sub(rest, wide_sum(take[None])), take

  _, extra = jax.lax.scan(give, wide_sub(budget, wide_sum(base)), ties)
  counts = jnp.zeros(len(order), jnp.int32).at[jnp.asarray(order)].set(base + extra)
  return [counts[i] for i in range(len(order))]


__all__ = ["global_pruned_counts", "wide_sum", "wide_le", "wide_sub", "wide_min"]
