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
"""Storage codecs for low-precision optimizer state (pure functions).

Two families:

* scaled floating point (bfloat16, float8 e4m3fn / e5m2): ``q = x / scale``
  cast to the storage dtype, with a float32 scale per tensor or per row,
  ``scale = amax * (1 + margin) / dtype_max``. Used for the ADMM variables
  ``z`` and ``u`` of ELSA-L. bfloat16 has float32's range and needs no scale.
* block-wise absmax 8-bit integers: the row-major flattened array (so the
  last axis first) is cut into blocks of ``block_size`` entries, each block
  stores its absmax in float32 and its
  entries as ``round(x / absmax * 127)`` (int8) or ``round(x / absmax * 255)``
  (uint8, for non-negative data). Used for Adam's moments.

Every function returns arrays of fixed shapes and dtypes, so state built from
them keeps its structure through an update.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)

DEFAULT_MARGIN = 2.0**-5
DEFAULT_BLOCK_SIZE = 256


def canonical_dtype(dtype) -> jnp.dtype:
  """Accepts a dtype or its name, e.g. ``"float8_e4m3fn"``, ``"bfloat16"``, ``"int8"``."""
  if isinstance(dtype, str):
    aliases = {"fp32": "float32", "bf16": "bfloat16", "e4m3": "float8_e4m3fn",
               "fp8_e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn",
               "e5m2": "float8_e5m2", "fp8_e5m2": "float8_e5m2"}
    dtype = aliases.get(dtype, dtype)
  try:
    return jnp.dtype(dtype)
  except TypeError:
    raise ValueError(
        f"unknown dtype {dtype!r}; use float32, bfloat16, float8_e4m3fn, "
        "float8_e5m2 or int8."
    ) from None


def is_fp8(dtype) -> bool:
  """Whether ``dtype`` is one of the float8 storage types."""
  return jnp.dtype(dtype) in tuple(jnp.dtype(d) for d in FP8_DTYPES)


def is_zero(x: jax.Array) -> jax.Array:
  """``x == 0`` (either sign), read off the bits of 8- and 16-bit floats.

  XLA:CPU compares float8 values through a float32 copy of the array; on the
  bits, all but the sign bit clear means +-0 in every IEEE-like format.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax.lowp import codecs as quant
    >>> quant.is_zero(jnp.array([0.0, -0.0, 0.5], jnp.float8_e4m3fn)).tolist()
    [True, True, False]
  """
  if x.dtype.itemsize >= 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    return x == 0
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize])
  return (bits & ((1 << (8 * x.dtype.itemsize - 1)) - 1)) == 0


def scale_shape(shape: tuple[int, ...], axis=None) -> tuple[int, ...]:
  """Shape of the scale of :func:`quantize_scaled`: ``()`` per tensor, else keepdims."""
  if axis is None:
    return ()
  axes = {a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis)}
  return tuple(1 if i in axes else d for i, d in enumerate(shape))


def scaled_zeros(shape: tuple[int, ...], dtype, *, axis=None) -> tuple[jax.Array, jax.Array]:
  """``quantize_scaled(jnp.zeros(shape), dtype, axis=axis)``, built without computing it.

  Initial optimizer states are zeros; quantising a large constant makes XLA
  fold it at compile time (seconds per matrix).
  """
  return jnp.zeros(shape, dtype), jnp.ones(scale_shape(shape, axis), jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype", "axis", "margin"))
def quantize_scaled(
    x: jax.Array,
    dtype,
    *,
    axis: int | tuple[int, ...] | None = None,
    margin: float = DEFAULT_MARGIN,
) -> tuple[jax.Array, jax.Array]:
  """Quantises to a (float8) dtype with a fresh float32 scale.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import quantize_scaled, dequantize_scaled
    >>> q, s = quantize_scaled(jnp.array([1.0, -3.0, 0.25]), jnp.float8_e4m3fn)
    >>> q.dtype, s.shape
    (dtype(float8_e4m3fn), ())
    >>> [round(x, 2) for x in dequantize_scaled(q, s).tolist()]
    [0.99, -3.09, 0.25]

  Args:
    x: the array to store.
    dtype: the storage dtype, e.g. ``jnp.float8_e4m3fn``, ``jnp.float8_e5m2``.
    axis: the axes that share one scale: None for one scale per tensor (a
      scalar), or e.g. ``0`` for one scale per column of a ``[in, out]``
      kernel (per output unit), kept as a broadcastable ``[1, out]``.
    margin: the scale maps the largest magnitude to ``max / (1 + margin)``,
      so rounding can never overflow.

  Returns:
    ``(q, scale)``: ``q`` in ``dtype`` with ``x``'s shape, ``scale`` float32.
  """
  dtype = jnp.dtype(dtype)
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None)
  dmax = float(jnp.finfo(dtype).max)
  scale = jnp.where(amax > 0, amax * (1.0 + margin) / dmax, 1.0).astype(jnp.float32)
  q = jnp.clip(x / scale, -dmax, dmax).astype(dtype)
  return q, scale


@jax.jit
def dequantize_scaled(q: jax.Array, scale: jax.Array) -> jax.Array:
  """Inverse of :func:`quantize_scaled`: ``q * scale`` in float32."""
  return q.astype(jnp.float32) * scale


def _row_blocks(shape: tuple[int, ...], block_size: int) -> bool:
  """Whether blocks can be cut along the last axis without flattening."""
  return len(shape) >= 1 and shape[-1] % block_size == 0 and shape[-1] > 0


def block_scale_shape(shape: tuple[int, ...], block_size: int = DEFAULT_BLOCK_SIZE):
  """Shape of the absmax array of :func:`quantize_blockwise` for ``shape``.

  ``shape[:-1] + (shape[-1] // block_size,)`` when the last axis is a multiple
  of ``block_size`` (so the leading axes keep their sharding), otherwise
  ``(ceil(size / block_size),)``. Either way each block is ``block_size``
  consecutive entries of the row-major flattened array.
  """
  if _row_blocks(shape, block_size):
    return tuple(shape[:-1]) + (shape[-1] // block_size,)
  return (math.ceil(math.prod(shape) / block_size),)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``[..., nblocks, block_size]``: along the last axis, or of the zero-padded flattening."""
  if _row_blocks(x.shape, block_size):
    return x.reshape(x.shape[:-1] + (x.shape[-1] // block_size, block_size))
  flat = x.reshape(-1)
  nblocks = math.ceil(flat.shape[0] / block_size)
  pad = nblocks * block_size - flat.shape[0]
  if pad:
    flat = jnp.pad(flat, (0, pad))
  return flat.reshape(nblocks, block_size)


def _unblocks(b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if b.size == math.prod(shape):  # no padding: blocks are row-major pieces
    return b.reshape(shape)
  return b.reshape(-1)[: math.prod(shape)].reshape(shape)


def blockwise_zeros(
    shape: tuple[int, ...], *, block_size: int = DEFAULT_BLOCK_SIZE, signed: bool = True
) -> tuple[jax.Array, jax.Array]:
  """``quantize_blockwise(jnp.zeros(shape))``, built without computing it (see :func:`scaled_zeros`)."""
  return (
      jnp.zeros(shape, jnp.int8 if signed else jnp.uint8),
      jnp.zeros(block_scale_shape(shape, block_size), jnp.float32),
  )


@functools.partial(jax.jit, static_argnames=("block_size", "signed", "keep_nonzero"))
def quantize_blockwise(
    x: jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    signed: bool = True,
    keep_nonzero: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Block-wise absmax 8-bit quantisation of the flattened array.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import quantize_blockwise, dequantize_blockwise
    >>> q, absmax = quantize_blockwise(jnp.array([0.5, -1.0, 0.25]))
    >>> q, absmax
    (Array([  64, -127,   32], dtype=int8), Array([1.], dtype=float32))
    >>> [round(x, 3) for x in dequantize_blockwise(q, absmax).tolist()]
    [0.504, -1.0, 0.252]

  Args:
    x: the array to store; any shape. Blocks are ``block_size`` consecutive
      entries of the row-major flattening; when the last axis is a multiple
      of ``block_size`` they are cut along it without flattening, so a
      sharded array stays sharded (see :func:`block_scale_shape`).
    block_size: entries per block (the last block may be shorter).
    signed: int8 codes in ``[-127, 127]``; otherwise uint8 codes in
      ``[0, 255]`` for non-negative data (negative values clip to zero).
    keep_nonzero: round positive values that would round to code 0 up to
      code 1 instead, so a non-zero entry never becomes zero (for second
      moments, which divide).

  Returns:
    ``(q, absmax)``: ``q`` int8 or uint8 with ``x``'s shape, ``absmax``
    float32 of shape :func:`block_scale_shape`.
  """
  levels = 127.0 if signed else 255.0
  b = _blocks(x.astype(jnp.float32), block_size)
  absmax = jnp.max(jnp.abs(b), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
  code = jnp.round(b / safe * levels)
  if keep_nonzero:
    code = jnp.where((b > 0) & (code < 1), 1.0, code)
  lo = -levels if signed else 0.0
  code = jnp.clip(code, lo, levels).astype(jnp.int8 if signed else jnp.uint8)
  return _unblocks(code, x.shape), absmax.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="block_size")
def dequantize_blockwise(
    q: jax.Array, absmax: jax.Array, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> jax.Array:
  """Inverse of :func:`quantize_blockwise` in float32 (dtype of ``q`` picks the range)."""
  levels = 127.0 if q.dtype == jnp.int8 else 255.0
  b = _blocks(q.astype(jnp.float32), block_size)
  return _unblocks(b * (absmax[..., None] / levels), q.shape)


# ----------------------------------------------------------------------------
# Storage codecs of optimizer state: ``(stored, scale)`` pairs, float32 in and out.
# Every low-precision state of the package (ELSA-L's z and u, the grad-EMA
# score, Adam's moments) is written and read through these functions.

#: The shape of the placeholder that stands for "no state" in a params-shaped tree.
EMPTY_SHAPE = (0,)


def empty(dtype=jnp.float32) -> jax.Array:
  """The placeholder of a leaf that holds no state (a ``(0,)`` array)."""
  return jnp.zeros(EMPTY_SHAPE, dtype)


def is_empty(x) -> bool:
  """Whether ``x`` is the :func:`empty` placeholder."""
  return tuple(x.shape) == EMPTY_SHAPE


def encode_scaled(x: jax.Array, dtype, axis=None) -> tuple[jax.Array, jax.Array]:
  """float32 -> ``(stored, scale)``: float8 with a fresh float32 scale, else a cast (no scale)."""
  if is_fp8(dtype):
    return quantize_scaled(x, dtype, axis=axis)
  return x.astype(dtype), empty()


def decode_scaled(q: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 value of :func:`encode_scaled`'s ``(stored, scale)``."""
  if is_fp8(q.dtype):
    return dequantize_scaled(q, scale)
  return q.astype(jnp.float32)


def rescale_scaled(q: jax.Array, scale: jax.Array, ratio: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:func:`encode_scaled`'s value times ``ratio``: float8 rescales its float32 scale only."""
  if is_fp8(q.dtype):
    return q, scale * ratio
  return (q.astype(jnp.float32) * ratio).astype(q.dtype), scale


def zeros_scaled(shape: tuple[int, ...], dtype, axis=None) -> tuple[jax.Array, jax.Array]:
  """``encode_scaled(zeros)`` without quantising a constant (slow to compile)."""
  if is_fp8(dtype):
    return scaled_zeros(shape, dtype, axis=axis)
  return jnp.zeros(shape, dtype), empty()


def encode_moment(x: jax.Array, dtype, *, square: bool = False,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[jax.Array, jax.Array]:
  """float32 -> ``(stored, block absmax)`` for int8, else a cast (no scale).

  ``square=True`` is for non-negative second moments (Adam's ``nu``, the
  grad-EMA score): int8 storage keeps ``sqrt(x)`` in uint8, which halves the
  dynamic range that 8 bits must cover, and never rounds a positive entry to 0.
  """
  if canonical_dtype(dtype) == jnp.int8:
    if square:
      return quantize_blockwise(jnp.sqrt(x), block_size=block_size, signed=False, keep_nonzero=True)
    return quantize_blockwise(x, block_size=block_size, signed=True)
  return x.astype(dtype), empty()


def decode_moment(q: jax.Array, scale: jax.Array, *, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """The float32 value of :func:`encode_moment`'s ``(stored, scale)`` (uint8 means square storage)."""
  if q.dtype == jnp.uint8:
    return jnp.square(dequantize_blockwise(q, scale, block_size=block_size))
  if q.dtype == jnp.int8:
    return dequantize_blockwise(q, scale, block_size=block_size)
  return q.astype(jnp.float32)


def zeros_moment(shape: tuple[int, ...], dtype, *, square: bool = False,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[jax.Array, jax.Array]:
  """``encode_moment(zeros)`` without quantising a constant."""
  if canonical_dtype(dtype) == jnp.int8:
    return blockwise_zeros(shape, block_size=block_size, signed=not square)
  return jnp.zeros(shape, dtype), empty()
