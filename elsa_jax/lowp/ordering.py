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
"""Ordering independent per-leaf work inside one XLA program, to bound its memory.

An optimizer update over many matrices is a set of independent computations.
XLA's scheduler may start all of them before it finishes any (the CPU's
default, concurrency-optimised scheduler does: it decodes the low-precision
state of every matrix first), so that the float32 temporaries of every matrix
are alive at once. JAX exposes no control dependencies, and
``jax.lax.optimization_barrier`` did not survive XLA:CPU's passes, so the order
is made a data dependency: the inputs of the next group of matrices
(:func:`leaf_groups`) get a float32 zero computed from small results of the
previous group (its new scales, its sums). XLA does not fold ``x * 0.0`` for
floats (it is NaN for infinite ``x``), so the dependency stays; the values do
not change. Their effect is measured on XLA:CPU (BENCHMARKS.md), not yet on a
GPU or TPU, whose schedulers differ.

:func:`materialize` is the other tool: it keeps XLA from recomputing an
array inside each of its consumers, which for an in-place update of donated
state otherwise costs a copy of the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Entries per group of matrices whose work runs between two ordering points
#: (~16 MiB per float32 copy): the matrices of one group may run concurrently.
GROUP_ENTRIES = 2**22


def zero_after(*xs: jax.Array) -> jax.Array:
  """A float32 zero that XLA can only compute once all of ``xs`` exist.

  It reads every entry of ``xs``: pass small arrays (scales, sums).

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax.lowp import ordering as _scheduling
    >>> float(_scheduling.zero_after(jnp.array([1.0, jnp.inf]), jnp.ones(3)))
    0.0
  """
  total = sum((jnp.sum(x, dtype=jnp.float32) for x in xs), jnp.zeros([], jnp.float32))
  return jnp.where(jnp.isfinite(total), total * 0.0, 0.0)


def after(x: jax.Array, *deps: jax.Array) -> jax.Array:
  """``x`` unchanged, but available to XLA only once all of ``deps`` exist.

  For arrays of any dtype (float8 included, whose conversions XLA:CPU does not
  fuse into their consumers): the zero of :func:`zero_after` added to ``x``,
  or to its bits for 8- and 16-bit floats. It reads ``deps`` once: pass small
  arrays.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax.lowp import ordering as _scheduling
    >>> _scheduling.after(jnp.arange(3), jnp.ones(2)).tolist()
    [0, 1, 2]
  """
  zero = zero_after(*deps)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize >= 4:
    return x + zero.astype(x.dtype)
  # 8- and 16-bit floats: add the zero to their bits (integer arithmetic fuses
  # everywhere; float8 arithmetic goes through float32 on the CPU).
  bits = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, bits) + zero.astype(bits), x.dtype)


def materialize(x: jax.Array, *deps: jax.Array) -> jax.Array:
  """``x`` unchanged, computed once into a buffer that all its consumers read.

  XLA fuses a cheap elementwise producer into each of its consumers and
  recomputes it there from its inputs. When one of those consumers overwrites
  an input in place (a donated param or optimizer state), the others must run
  first, and when no data dependency orders them XLA copies the input at the
  start of the program instead. An integer division is an operation XLA does
  not duplicate into consumers (it counts as expensive), so ``x`` is divided
  by a one that XLA cannot fold (computed from ``deps``, small arrays that
  exist when ``x`` does), four 8-bit entries at a time as one uint32 word.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax.lowp import ordering as _scheduling
    >>> _scheduling.materialize(jnp.arange(-4, 4, dtype=jnp.int8), jnp.ones(2)).tolist()
    [-4, -3, -2, -1, 0, 1, 2, 3]

  Args:
    x: an integer array.
    *deps: small arrays (read once).

  Returns:
    ``x``.
  """
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"materialize takes integer arrays, got {x.dtype}.")
  words = x.dtype.itemsize == 1 and x.ndim > 0 and x.shape[-1] % 4 == 0
  word_dtype = jnp.uint32 if words else x.dtype
  one = (zero_after(*deps) + 1.0).astype(word_dtype)
  if not words:
    return jax.lax.div(x, one)
  packed = jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 4, 4), jnp.uint32)
  return jax.lax.bitcast_convert_type(jax.lax.div(packed, one), x.dtype).reshape(x.shape)


def in_groups(fn, sizes, *, first_after: jax.Array | None = None) -> list:
  """``[fn(group, after)[0] for group in leaf_groups(sizes)]``, one group after the other.

  The one group loop of the package. ``fn(group, after)`` returns ``(result,
  deps)``: ``after`` is a float32 zero computed from the previous group's
  ``deps`` (small arrays), which ``fn`` adds to its inputs so that XLA
  finishes a group before it starts the next. ``deps=None`` keeps the previous
  ``after`` (no new ordering point). The first group gets ``first_after``
  (default: a constant zero).

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax.lowp import ordering
    >>> out = ordering.in_groups(lambda g, after: ([i + after for i in g], (after,)), [2, 3])
    >>> [[float(x) for x in group] for group in out]
    [[0.0, 1.0]]
  """
  after = jnp.zeros([], jnp.float32) if first_after is None else first_after
  results = []
  for group in leaf_groups(sizes):
    result, deps = fn(group, after)
    results.append(result)
    if deps is not None:
      after = zero_after(*deps)
  return results


def map_in_groups(fn, rows, sizes, deps=None) -> list:
  """``[fn(*row, after) for row in rows]``, group after group (:func:`in_groups` of ``sizes``).

  ``after`` is a float32 zero computed from ``deps(i, out)`` (small arrays)
  of every output of the previous group, so XLA finishes a group before it
  starts the next; ``deps=None`` passes a constant zero (no ordering).

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax.lowp import ordering as _scheduling
    >>> rows = [(jnp.ones(2),), (jnp.ones(3),)]
    >>> out = _scheduling.map_in_groups(lambda x, after: x + after, rows, [2, 3], deps=lambda i, o: (o,))
    >>> [o.tolist() for o in out]
    [[1.0, 1.0], [1.0, 1.0, 1.0]]
  """
  out = [None] * len(rows)

  def group_fn(group, after):
    for i in group:
      out[i] = fn(*rows[i], after)
    return None, None if deps is None else tuple(d for i in group for d in deps(i, out[i]))

  in_groups(group_fn, sizes)
  return out


def leaf_groups(sizes, max_joint_entries: int | None = None) -> list[list[int]]:
  """Splits consecutive arrays into groups of at most ``max_joint_entries`` entries.

  An array larger than the cap forms a group of its own.

  Example:
    >>> from elsa_jax.lowp.ordering import leaf_groups
    >>> leaf_groups([4, 4, 4, 10, 1], max_joint_entries=8)
    [[0, 1], [2], [3], [4]]

  Args:
    sizes: the number of entries of each array.
    max_joint_entries: the cap (None: :data:`GROUP_ENTRIES`).

  Returns:
    Lists of indices into ``sizes``, in order.
  """
  max_joint_entries = GROUP_ENTRIES if max_joint_entries is None else max_joint_entries
  groups, size = [], 0
  for i, n in enumerate(sizes):
    if not groups or (size and size + n > max_joint_entries):
      groups.append([])
      size = 0
    groups[-1].append(i)
    size += n
  return groups
