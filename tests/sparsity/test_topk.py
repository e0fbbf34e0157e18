"""Tests of the pure projections: exact counts by bisection, per-row and N:M masks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elsa_jax
from elsa_jax.sparsity import topk as _projection


def _sort_reference(score, k, axis=None):
  """Keeps the k largest, ties to the lower position: a stable sort of -score."""
  score = np.asarray(score, np.float64)
  if axis is None:
    order = np.argsort(-score.reshape(-1), kind="stable")
    mask = np.zeros(score.size, bool)
    mask[order[:k]] = True
    return mask.reshape(score.shape)
  moved = np.moveaxis(score, axis, -1)
  order = np.argsort(-moved, axis=-1, kind="stable")
  rank = np.argsort(order, axis=-1, kind="stable")
  return np.moveaxis(rank < k, -1, axis)


@pytest.mark.parametrize("levels", [4, 0])
def test_topk_matches_sort_reference_with_ties(levels):
  rng = np.random.default_rng(levels)
  topk = _projection.topk_mask  # jitted; k is dynamic, so one compile per shape
  for trial in range(12):
    shape = [(37, 13), (3, 4, 6)][trial % 2]
    if levels:  # heavy ties: 4 distinct values (negative ones included)
      score = rng.integers(-2, levels - 2, size=shape).astype(np.float32)
    else:
      score = rng.normal(size=shape).astype(np.float32)
    k = int(rng.integers(0, score.size + 1))
    mask = np.asarray(topk(jnp.asarray(score), k))
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, _sort_reference(score, k))
    axis = score.ndim - 1
    k_row = int(rng.integers(0, score.shape[axis] + 1))
    mask = np.asarray(topk(jnp.asarray(score), k_row, axis=axis))
    np.testing.assert_array_equal(mask.sum(axis), np.full(mask.sum(axis).shape, k_row))
    np.testing.assert_array_equal(mask, _sort_reference(score, k_row, axis))


def test_joint_bisection_mixes_arrays_with_and_without_ties_at_the_cut():
  """Arrays that finish after the value steps and arrays that need the position steps share one loop."""
  rng = np.random.default_rng()
  distinct = rng.normal(size=(40, 24)).astype(np.float32)  # no tie at any cut
  tied = rng.integers(0, 3, size=(24, 40)).astype(np.float32)  # ties straddle the cut
  rows = np.where(np.arange(40)[None, :] < 20, rng.integers(0, 2, size=(16, 40)),
                  rng.normal(size=(16, 40))).astype(np.float32).T  # some columns tied, some not
  ks = [int(rng.integers(1, distinct.size)), int(rng.integers(1, tied.size)), 5]
  masks = jax.jit(lambda s, k: elsa_jax.topk_masks(s, k, (None, None, 0)))(
      [jnp.asarray(distinct), jnp.asarray(tied), jnp.asarray(rows)], ks)
  np.testing.assert_array_equal(masks[0], _sort_reference(distinct, ks[0]))
  np.testing.assert_array_equal(masks[1], _sort_reference(tied, ks[1]))
  np.testing.assert_array_equal(masks[2], _sort_reference(rows, 5, axis=0))


def test_topk_orders_special_values():
  x = jnp.array([-jnp.inf, -1.0, -0.0, 0.0, 1e-45, 2.0, jnp.inf, -1e-45])
  # Float order: -inf < -1 < -1e-45 < -0 < 0 < 1e-45 < 2 < inf.
  assert elsa_jax.topk_mask(x, 3).tolist() == [False, False, False, False, True, True, True, False]
  assert elsa_jax.topk_mask(x, 5).tolist() == [False, False, True, True, True, True, True, False]
  assert not elsa_jax.topk_mask(x, 0).any()
  assert elsa_jax.topk_mask(x, 8).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.57, 0.9, 0.95, 0.999])
def test_unstructured_count_is_round_of_sparsity(sparsity):
  score = jax.random.normal(jax.random.key(0), (100, 30))
  mask = elsa_jax.unstructured_mask(score, sparsity)
  assert int((~mask).sum()) == round(sparsity * 3000)
  # A traced sparsity gives the same count (float32 arithmetic, exact here).
  traced = jax.jit(elsa_jax.unstructured_mask)(score, jnp.float32(sparsity))
  assert int((~traced).sum()) == round(sparsity * 3000)


def test_row_mask_counts_per_output_unit():
  score = jax.random.uniform(jax.random.key(1), (48, 10))
  mask = elsa_jax.row_mask(score, 0.75, axis=0)  # Flax [in, out]: per output unit
  np.testing.assert_array_equal(mask.sum(0), np.full(10, 12))
  mask = elsa_jax.row_mask(score.T, 0.75, axis=1)
  np.testing.assert_array_equal(mask.sum(1), np.full(10, 12))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_group_sort(n, m):
  rng = np.random.default_rng(m)
  score = rng.integers(0, 3, size=(32, 6)).astype(np.float32)  # ties inside groups
  mask = np.asarray(elsa_jax.nm_mask(jnp.asarray(score), n, m, axis=0))
  groups = mask.reshape(32 // m, m, 6)
  np.testing.assert_array_equal(groups.sum(1), np.full((32 // m, 6), n))
  ref = _sort_reference(score.reshape(32 // m, m, 6), n, axis=1).reshape(32, 6)
  np.testing.assert_array_equal(mask, ref)
  # Along the last axis as well.
  mask = np.asarray(elsa_jax.nm_mask(jnp.asarray(score.T), n, m, axis=1))
  np.testing.assert_array_equal(mask, ref.T)


def test_nm_errors_name_problem_and_fix():
  with pytest.raises(ValueError, match="do not divide axis 0 of length 10"):
    elsa_jax.nm_mask(jnp.ones((10, 4)), 2, 4)
  with pytest.raises(ValueError, match="0 <= N <= M"):
    elsa_jax.nm_mask(jnp.ones((8, 4)), 5, 4)


def test_project_magnitude_and_objective_aware():
  y = jnp.array([[3.0], [-1.0], [0.5], [-2.0]])
  chex.assert_trees_all_equal(elsa_jax.project(y, 0.5), jnp.array([[3.0], [0.0], [0.0], [-2.0]]))
  # With curvature v, a small entry on a stiff coordinate survives.
  v = jnp.array([[0.01], [100.0], [1.0], [1.0]])
  chex.assert_trees_all_equal(
      elsa_jax.project(y, 0.5, v=v), jnp.array([[0.0], [-1.0], [0.0], [-2.0]])
  )
  chex.assert_trees_all_equal(
      elsa_jax.project(y, pattern="nm", n_m=(1, 2), v=v), jnp.array([[0.0], [-1.0], [0.0], [-2.0]])
  )


def test_sharded_masks_communicate_only_counts():
  """On a sharded matrix the bisection all-reduces counts; nothing is gathered."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest.py sets XLA_FLAGS before JAX starts)")
  mesh = jax.make_mesh((8,), ("m",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "m"))
  x = jax.device_put(jax.random.normal(jax.random.key(3), (16, 64)), sharding)
  masks = jax.jit(lambda x: elsa_jax.sparsity_masks([jnp.abs(x), x * x], [0.9, 0.5]))
  hlo = masks.lower(x).compile().as_text()
  assert "all-reduce" in hlo
  assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))
  a, b = masks(x)
  assert a.sharding.spec == sharding.spec
  np.testing.assert_array_equal(a, _sort_reference(np.abs(np.asarray(x)), 16 * 64 - 922))
  assert int(b.sum()) == 512
