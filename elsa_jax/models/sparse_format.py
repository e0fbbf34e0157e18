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
"""The codecs of compact sparse checkpoints: a matrix as its nonzeros plus where they are (numpy only).

Two layouts of a 2-D matrix ``x [rows, cols]`` (HF's ``[out, in]``), both
bit-exact in any dtype ("zero" means an all-zero bit pattern, so ``-0.0``
is kept as a value):

* ``bitmask``: ``bitmask`` uint8 ``[rows, ceil(cols / 8)]``, each row's
  nonzero flags packed by :func:`numpy.packbits` (most significant bit
  first, the row padded with zero bits), and ``values [nnz]`` in ``x``'s
  dtype, row-major.
* ``nm`` (``n`` of every ``m`` consecutive columns): ``nm_values [rows,
  cols / m * n]`` in ``x``'s dtype, the kept entries of each group in
  order, and ``nm_index`` uint8 ``[rows, ceil(groups * bits / 8)]``: each
  group's kept positions as the rank of its ``m``-bit pattern among the
  patterns with ``n`` bits set (in increasing integer order, bit ``j`` for
  column ``j`` of the group), ``bits = ceil(log2(C(m, n)))`` bits per
  group, most significant first, each row padded to a byte. 2:4 takes 3
  bits a group where the bitmask takes 4. A group with fewer than ``n``
  nonzeros keeps some zeros as values.

:func:`choose_encoding` picks, per matrix, the fewest bytes among dense,
bitmask and the ``nm`` layouts that fit it. Every decoder checks the sizes
it is given and raises :class:`SparseFormatError` for a damaged file.

Example:
  >>> import numpy as np
  >>> x = np.array([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
  >>> packed, values = encode_bitmask(x)
  >>> packed[:, 0].tolist(), values.tolist()  # 0b0101_0000, 0b1000_0000
  ([80, 128], [1.5, -2.0, 3.0])
  >>> bool((decode_bitmask(packed, values, cols=4) == x).all())
  True
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

#: Group sizes ``m`` that :func:`choose_encoding` tries for the ``nm`` layout.
NM_GROUP_SIZES = (2, 4, 8, 16)
#: The tensor names' suffixes of each layout's components (``<name>.<suffix>``).
COMPONENTS = {"bitmask": ("bitmask", "values"), "nm": ("nm_values", "nm_index")}

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


class SparseFormatError(ValueError):
  """A compact sparse tensor whose parts do not fit together (a damaged or truncated file)."""


class Encoding(NamedTuple):
  """How one matrix is stored: ``format`` "dense", "bitmask" or "nm" (with ``n`` of every ``m``), in ``nbytes``."""

  format: str
  nbytes: int
  n: int = 0
  m: int = 0


def nonzero_mask(x: np.ndarray) -> np.ndarray:
  """Where ``x``'s bit pattern is not all zeros (so ``-0.0`` counts as a value and round-trips)."""
  return np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}")) != 0


def pack_bitmask(mask: np.ndarray) -> np.ndarray:
  """Bool ``[rows, cols]`` -> uint8 ``[rows, ceil(cols / 8)]``, each row packed MSB first."""
  return np.packbits(np.asarray(mask, bool), axis=-1)


def unpack_bitmask(packed: np.ndarray, cols: int) -> np.ndarray:
  """The inverse of :func:`pack_bitmask`: bool ``[rows, cols]``."""
  return np.unpackbits(packed, axis=-1, count=cols).astype(bool)


def row_counts(packed: np.ndarray, cols: int) -> np.ndarray:
  """The set bits of each row of a packed bitmask, int64 ``[rows]``.

  Raises:
    SparseFormatError: a bitmask not ``[rows, ceil(cols / 8)]`` uint8, or with bits set in a row's padding.
  """
  packed = np.asarray(packed)
  if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != -(-cols // 8):
    raise SparseFormatError(f"bitmask is {packed.dtype}{list(packed.shape)}, not uint8[rows, {-(-cols // 8)}] "
                            f"for {cols} columns")
  if cols % 8 and packed.size and (packed[:, -1] & ((1 << (8 - cols % 8)) - 1)).any():
    raise SparseFormatError(f"bitmask has bits set beyond column {cols} (in a row's padding)")
  return _POPCOUNT[packed].sum(axis=1)


def encode_bitmask(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(bitmask, values)`` of a 2-D ``x``: its packed nonzero flags and its nonzeros, row-major."""
  mask = nonzero_mask(x)
  return pack_bitmask(mask), np.ascontiguousarray(x[mask])


def scatter(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
  """A ``mask``-shaped array of ``values``' dtype: ``values`` where ``mask`` (row-major), zero bits elsewhere.

  Raises:
    SparseFormatError: ``values`` are not exactly as many as the set bits of ``mask``.
  """
  count = int(mask.sum())
  if values.ndim != 1 or values.size != count:
    raise SparseFormatError(f"the mask has {count} set bits but there are {values.size} values "
                            f"(shape {list(values.shape)})")
  out = np.zeros(mask.shape, values.dtype)
  out[mask] = values
  return out


def decode_bitmask(packed: np.ndarray, values: np.ndarray, cols: int) -> np.ndarray:
  """The matrix ``[rows, cols]`` of :func:`encode_bitmask`'s ``(bitmask, values)``.

  Raises:
    SparseFormatError: sizes that do not fit (see :func:`row_counts`, :func:`scatter`).
  """
  row_counts(packed, cols)
  return scatter(unpack_bitmask(packed, cols), values)


@functools.lru_cache(maxsize=None)
def nm_patterns(n: int, m: int) -> np.ndarray:
  """Bool ``[C(m, n), m]``: every group pattern with ``n`` of ``m`` set, in increasing integer order."""
  if not 0 < n < m <= 16:
    raise ValueError(f"an n:m layout needs 0 < n < m <= 16, got {n}:{m}")
  codes = np.array([c for c in range(1 << m) if bin(c).count("1") == n])
  return (codes[:, None] >> np.arange(m)) & 1 == 1


def nm_index_bits(n: int, m: int) -> int:
  """Bits of one group's index in the ``nm`` layout: ``ceil(log2(C(m, n)))`` (at least 1)."""
  return max(1, math.ceil(math.log2(math.comb(m, n))))


def pack_uints(ints: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned ``[rows, k]`` (each < ``2**bits``) -> uint8 ``[rows, ceil(k * bits / 8)]``, MSB first."""
  ints = np.asarray(ints, np.int64)
  planes = (ints[..., None] >> np.arange(bits - 1, -1, -1)) & 1
  return np.packbits(planes.reshape(ints.shape[0], -1).astype(np.uint8), axis=-1)


def unpack_uints(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
  """The inverse of :func:`pack_uints`: int64 ``[rows, k]``."""
  planes = np.unpackbits(packed, axis=-1, count=k * bits).reshape(packed.shape[0], k, bits)
  return planes.astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1))


def max_group_count(x: np.ndarray, m: int) -> int:
  """The most nonzeros in any group of ``m`` consecutive columns of ``x`` (``cols % m == 0``)."""
  mask = nonzero_mask(x)
  return int(mask.reshape(mask.shape[0], -1, m).sum(axis=-1, dtype=np.int8).max(initial=0))


def _group_codes(groups: np.ndarray) -> np.ndarray:
  """Bool ``[..., m]`` -> int64 ``[...]``, bit ``j`` for position ``j`` of the group."""
  packed = np.packbits(groups, axis=-1, bitorder="little").astype(np.int64)
  return (packed << (8 * np.arange(packed.shape[-1]))).sum(axis=-1)


def encode_nm(x: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """``(nm_values, nm_index)`` of a 2-D ``x`` with at most ``n`` nonzeros in every ``m`` consecutive columns.

  Raises:
    ValueError: ``m`` does not divide the columns, or a group has more than ``n`` nonzeros.
  """
  rows, cols = x.shape
  if cols % m:
    raise ValueError(f"an {n}:{m} layout needs columns divisible by {m}, got {cols}")
  nonzero = nonzero_mask(x).reshape(rows, cols // m, m)
  if nonzero.sum(axis=-1, dtype=np.int8).max(initial=0) > n:
    raise ValueError(f"the matrix has a group of {m} with more than {n} nonzeros; it is not {n}:{m} sparse")
  deficit = n - nonzero.sum(axis=-1, keepdims=True, dtype=np.int8)  # such groups keep their first zeros
  chosen = nonzero if not deficit.any() else nonzero | (~nonzero & (np.cumsum(~nonzero, axis=-1) <= deficit))
  rank = np.full(1 << m, -1, np.int64)
  patterns = nm_patterns(n, m)
  rank[_group_codes(patterns)] = np.arange(len(patterns))
  index = rank[_group_codes(chosen)]
  values = x.reshape(rows, cols // m, m)[chosen].reshape(rows, cols // m * n)
  return np.ascontiguousarray(values), pack_uints(index, nm_index_bits(n, m))


def decode_nm(values: np.ndarray, index: np.ndarray, n: int, m: int, cols: int) -> np.ndarray:
  """The matrix ``[rows, cols]`` of :func:`encode_nm`'s ``(nm_values, nm_index)``.

  Raises:
    SparseFormatError: parts of the wrong shape or dtype, or a group index beyond ``C(m, n)``.
  """
  groups, bits = cols // m, nm_index_bits(n, m)
  rows = values.shape[0] if values.ndim == 2 else -1
  if values.ndim != 2 or values.shape[1] != groups * n:
    raise SparseFormatError(f"nm_values has shape {list(values.shape)}, not [rows, {groups * n}] for "
                            f"{n}:{m} of {cols} columns")
  if index.dtype != np.uint8 or index.shape != (rows, -(-groups * bits // 8)):
    raise SparseFormatError(f"nm_index is {index.dtype}{list(index.shape)}, not uint8"
                            f"{[rows, -(-groups * bits // 8)]} for {n}:{m} of {cols} columns")
  ranks = unpack_uints(index, bits, groups)
  patterns = nm_patterns(n, m)
  if ranks.size and ranks.max() >= len(patterns):
    raise SparseFormatError(f"nm_index holds group index {int(ranks.max())}, beyond the {len(patterns)} "
                            f"patterns of {n}:{m}")
  mask = patterns[ranks].reshape(rows, cols)
  return scatter(mask, values.reshape(-1))


def dense_nbytes(shape, itemsize: int) -> int:
  return math.prod(shape) * itemsize


def bitmask_nbytes(shape, nnz: int, itemsize: int) -> int:
  rows, cols = shape
  return rows * -(-cols // 8) + nnz * itemsize


def nm_nbytes(shape, n: int, m: int, itemsize: int) -> int:
  rows, cols = shape
  groups = cols // m
  return rows * groups * n * itemsize + rows * -(-groups * nm_index_bits(n, m) // 8)


def choose_encoding(x: np.ndarray) -> Encoding:
  """The smallest layout of ``x``: dense (not 2-D, or nothing smaller), bitmask, or the best ``nm``.

  Example:
    >>> import numpy as np
    >>> x = np.zeros((8, 16), np.float32); x[:, ::2] = 1.0  # 1:2 (so also 2:4, 4:8 ...)
    >>> choose_encoding(x)  # 64 values of 4 bytes, 1 bit a group: 8 bits a row
    Encoding(format='nm', nbytes=264, n=1, m=2)
  """
  shape, itemsize = x.shape, x.dtype.itemsize
  best = Encoding("dense", dense_nbytes(shape, itemsize))
  if x.ndim != 2 or x.size == 0:
    return best
  candidates = [Encoding("bitmask", bitmask_nbytes(shape, int(nonzero_mask(x).sum()), itemsize))]
  for m in NM_GROUP_SIZES:
    if shape[1] % m == 0:
      n = max_group_count(x, m)
      if 0 < n < m:
        candidates.append(Encoding("nm", nm_nbytes(shape, n, m, itemsize), n, m))
  for candidate in candidates:
    if candidate.nbytes < best.nbytes:
      best = candidate
  return best


def encode(x: np.ndarray, encoding: Encoding | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(entry, parts)`` of a matrix in ``encoding`` (default :func:`choose_encoding`'s).

  ``entry`` is the JSON description (``format``, ``shape``, ``dtype``, and
  ``nnz`` or ``n``/``m``); ``parts`` maps each suffix of
  :data:`COMPONENTS` to its array. A dense encoding has no parts.
  """
  encoding = encoding or choose_encoding(x)
  entry: dict[str, Any] = {"format": encoding.format, "shape": list(x.shape), "dtype": x.dtype.name}
  if encoding.format == "bitmask":
    packed, values = encode_bitmask(x)
    entry["nnz"] = int(values.size)
    return entry, {"bitmask": packed, "values": values}
  if encoding.format == "nm":
    values, index = encode_nm(x, encoding.n, encoding.m)
    entry.update(n=encoding.n, m=encoding.m)
    return entry, {"nm_values": values, "nm_index": index}
  return entry, {}


def decode(entry: dict[str, Any], parts: dict[str, np.ndarray]) -> np.ndarray:
  """The dense matrix of :func:`encode`'s ``(entry, parts)``, checked against ``entry``'s shape and dtype.

  Raises:
    SparseFormatError: an unknown format, a missing part, or parts that do not fit ``entry``.
  """
  fmt = entry.get("format")
  if fmt not in COMPONENTS:
    raise SparseFormatError(f"unknown compact format {fmt!r} (this version reads {', '.join(COMPONENTS)})")
  missing = [s for s in COMPONENTS[fmt] if s not in parts]
  if missing:
    raise SparseFormatError(f"the {fmt} part(s) {missing} are missing")
  rows, cols = entry["shape"]
  values = parts["values" if fmt == "bitmask" else "nm_values"]
  if values.dtype.name != entry["dtype"]:
    raise SparseFormatError(f"values are {values.dtype.name} but the layout says {entry['dtype']}")
  if fmt == "bitmask":
    if parts["bitmask"].shape[:1] != (rows,):
      raise SparseFormatError(f"bitmask has {parts['bitmask'].shape[:1]} rows, the layout says {rows}")
    return decode_bitmask(parts["bitmask"], values, cols)
  if values.shape[:1] != (rows,):
    raise SparseFormatError(f"nm_values has {values.shape[:1]} rows, the layout says {rows}")
  return decode_nm(values, parts["nm_index"], entry["n"], entry["m"], cols)
