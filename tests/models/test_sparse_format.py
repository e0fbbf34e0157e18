"""The compact sparse codecs: bitmask and N:M round trips, their sizes and counts, and damaged parts refused."""

import chex
import ml_dtypes
import numpy as np
import pytest

from elsa_jax.models import sparse_format as sf

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}


def _bits(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
  assert got.dtype == want.dtype
  chex.assert_shape(got, want.shape)
  chex.assert_trees_all_equal(_bits(got), _bits(want))


def _sparse(rng, shape, sparsity, dtype):
  x = rng.normal(size=shape).astype(dtype)
  x[rng.random(shape) < sparsity] = 0
  return x


def _nm(rng, shape, n, m, dtype, extra_zeros=0.1):
  """Random ``n:m`` matrix (groups along the columns), some groups with fewer than ``n`` nonzeros."""
  rows, cols = shape
  x = rng.normal(size=shape).astype(dtype)
  keep = np.argsort(rng.random((rows, cols // m, m)), axis=-1)[..., :n]
  mask = np.zeros((rows, cols // m, m), bool)
  np.put_along_axis(mask, keep, True, axis=-1)
  mask &= rng.random(mask.shape) >= extra_zeros
  return np.where(mask.reshape(shape), x, np.zeros_like(x))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("cols", [64, 13])  # 13: each row's last byte is padded
def test_bitmask_round_trip_is_bit_exact(dtype, sparsity, cols):
  rng = np.random.default_rng()
  x = _sparse(rng, (23, cols), sparsity, DTYPES[dtype])
  packed, values = sf.encode_bitmask(x)
  nnz = int((x != 0).sum())
  chex.assert_shape(packed, (23, -(-cols // 8)))
  assert packed.dtype == np.uint8 and values.dtype == x.dtype and values.size == nnz
  chex.assert_trees_all_equal(sf.row_counts(packed, cols), (x != 0).sum(axis=1))
  assert_bit_exact(sf.decode_bitmask(packed, values, cols), x)
  entry, parts = sf.encode(x, sf.Encoding("bitmask", 0))
  assert entry == {"format": "bitmask", "shape": [23, cols], "dtype": x.dtype.name, "nnz": nnz}
  assert_bit_exact(sf.decode(entry, parts), x)
  assert sf.bitmask_nbytes(x.shape, nnz, x.dtype.itemsize) == packed.nbytes + values.nbytes


def test_negative_zero_is_a_value():
  x = np.array([[0.0, -0.0, 1.0, 0.0]], np.float32)
  packed, values = sf.encode_bitmask(x)
  assert values.size == 2 and np.signbit(values[0])
  assert_bit_exact(sf.decode_bitmask(packed, values, 4), x)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (2, 8), (4, 8), (3, 16)])
def test_nm_round_trip_is_bit_exact(dtype, n, m):
  rng = np.random.default_rng()
  x = _nm(rng, (19, 4 * m), n, m, DTYPES[dtype])
  values, index = sf.encode_nm(x, n, m)
  bits = sf.nm_index_bits(n, m)
  chex.assert_shape(values, (19, 4 * n))
  chex.assert_shape(index, (19, -(-4 * bits // 8)))
  assert values.dtype == x.dtype and index.dtype == np.uint8
  assert int((values != 0).sum()) == int((x != 0).sum())  # every nonzero kept, the padding zeros only
  assert_bit_exact(sf.decode_nm(values, index, n, m, 4 * m), x)
  assert sf.nm_nbytes(x.shape, n, m, x.dtype.itemsize) == values.nbytes + index.nbytes


def test_nm_index_bits_are_the_rank_of_the_pattern():
  assert [sf.nm_index_bits(*nm) for nm in [(2, 4), (1, 4), (4, 8), (1, 2), (8, 16)]] == [3, 2, 7, 1, 14]
  patterns = sf.nm_patterns(2, 4)
  assert len(patterns) == 6 and (patterns.sum(axis=1) == 2).all()
  assert len({tuple(p) for p in patterns}) == 6


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 14])
def test_uint_packing_round_trips(bits):
  rng = np.random.default_rng()
  ints = rng.integers(0, 1 << bits, size=(5, 11))
  packed = sf.pack_uints(ints, bits)
  chex.assert_shape(packed, (5, -(-11 * bits // 8)))
  chex.assert_trees_all_equal(sf.unpack_uints(packed, bits, 11), ints)


def test_choose_encoding_picks_the_fewest_bytes():
  rng = np.random.default_rng()
  bf16 = ml_dtypes.bfloat16
  assert sf.choose_encoding(rng.normal(size=(32, 64)).astype(bf16)).format == "dense"
  assert sf.choose_encoding(rng.normal(size=(64,)).astype(bf16)).format == "dense"  # not a matrix
  x70 = _sparse(rng, (32, 64), 0.7, bf16)
  chosen = sf.choose_encoding(x70)
  assert chosen.format == "bitmask"
  assert chosen.nbytes == sf.bitmask_nbytes(x70.shape, int((x70 != 0).sum()), 2) < 0.4 * x70.nbytes
  x24 = _nm(rng, (32, 64), 2, 4, bf16, extra_zeros=0.0)
  assert sf.choose_encoding(x24) == sf.Encoding("nm", sf.nm_nbytes((32, 64), 2, 4, 2), 2, 4)
  assert sf.choose_encoding(x24).nbytes < sf.bitmask_nbytes((32, 64), 32 * 32, 2)  # 3 bits a group, not 4
  assert sf.choose_encoding(np.zeros((8, 8), np.float32)).format == "bitmask"  # nothing but the mask


def test_damaged_parts_are_refused():
  rng = np.random.default_rng()
  x = _sparse(rng, (6, 13), 0.5, np.float32)
  packed, values = sf.encode_bitmask(x)
  with pytest.raises(sf.SparseFormatError, match=f"{values.size} set bits but there are {values.size - 1} values"):
    sf.decode_bitmask(packed, values[:-1], 13)
  with pytest.raises(sf.SparseFormatError, match=r"not uint8\[rows, 2\]"):
    sf.decode_bitmask(packed[:, :1], values, 13)
  padded = packed.copy()
  padded[0, -1] |= 1
  with pytest.raises(sf.SparseFormatError, match="padding"):
    sf.decode_bitmask(padded, values, 13)
  entry, parts = sf.encode(x, sf.Encoding("bitmask", 0))
  with pytest.raises(sf.SparseFormatError, match="float64 but the layout says float32"):
    sf.decode(entry, {**parts, "values": parts["values"].astype(np.float64)})
  with pytest.raises(sf.SparseFormatError, match="missing"):
    sf.decode(entry, {"values": parts["values"]})
  y = _nm(rng, (4, 16), 2, 4, np.float32)
  entry, parts = sf.encode(y, sf.Encoding("nm", 0, 2, 4))
  bad = np.full_like(parts["nm_index"], 0xFF)  # rank 7 > the 6 patterns of 2:4
  with pytest.raises(sf.SparseFormatError, match="beyond the 6 patterns"):
    sf.decode(entry, {**parts, "nm_index": bad})
  with pytest.raises(sf.SparseFormatError, match="nm_values has shape"):
    sf.decode(entry, {**parts, "nm_values": parts["nm_values"][:, 1:]})
  with pytest.raises(ValueError, match="not 2:4 sparse"):
    sf.encode_nm(rng.normal(size=(4, 16)).astype(np.float32), 2, 4)
