"""Tests of the global threshold (``--allocation global``): exact totals, bounds, ties, wide sums, shards."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elsa_jax
from elsa_jax.optim import steps
from elsa_jax.sparsity import global_topk
from elsa_jax.sparsity import topk

_counts = jax.jit(global_topk.global_pruned_counts)


def _reference(scores, targets, low, high):
  """The definition, by brute force over every distinct score: the largest threshold whose clipped
  counts below it fit the budget, then the ties at it in array order."""
  budget = sum(targets)
  flat = [np.asarray(s, np.float64).ravel() for s in scores]
  clipped = lambda t, incl: [int(np.clip((f <= t).sum() if incl else (f < t).sum(), lo, hi))
                             for f, lo, hi in zip(flat, low, high)]
  candidates = np.unique(np.concatenate(flat))
  t = candidates[0]
  for c in candidates:
    if sum(clipped(c, False)) <= budget:
      t = c
  base, upto = clipped(t, False), clipped(t, True)
  rest, out = budget - sum(base), []
  for b, u in zip(base, upto):
    take = min(rest, u - b)
    out.append(b + take)
    rest -= take
  return out


@pytest.mark.parametrize("ties", [False, True])
def test_counts_match_the_definition_and_add_up(ties):
  rng = np.random.default_rng(int(ties))
  for trial in range(6):
    shapes = [(12, 8), (12, 8), (6, 16), (20,)]
    if ties:  # few distinct values, zeros among them (a sparse starting point)
      scores = [rng.integers(0, 4, size=s).astype(np.float32) for s in shapes]
    else:
      scores = [(rng.normal(size=s) * (i + 1)) ** 2 for i, s in enumerate(shapes)]
    sizes = [int(np.prod(s)) for s in shapes]
    target = rng.uniform(0.2, 0.8)
    targets = [int(round(target * n)) for n in sizes]
    low = [int(round(max(0.0, target - 0.15) * n)) for n in sizes]
    high = [int(round(min(1.0, target + 0.15) * n)) for n in sizes]
    got = [int(k) for k in _counts([jnp.asarray(s, jnp.float32) for s in scores], targets, low, high)]
    assert got == _reference(scores, targets, low, high), trial
    assert sum(got) == sum(targets)
    assert all(lo <= k <= hi for k, lo, hi in zip(got, low, high))


def test_without_binding_bounds_the_globally_lowest_scores_are_pruned():
  rng = np.random.default_rng(2)
  scores = [jnp.asarray(rng.normal(size=s) ** 2 * (3 * i + 1), jnp.float32) for i, s in enumerate([(16, 8), (8, 8)])]
  sizes = [s.size for s in scores]
  targets = [int(0.6 * n) for n in sizes]
  counts = _counts(scores, targets, [0, 0], sizes)
  masks = topk.sparsity_masks(scores, [0.0, 0.0], pruned=counts)
  everything = np.concatenate([np.asarray(s).ravel() for s in scores])
  cut = np.sort(everything)[sum(targets) - 1]
  kept = np.concatenate([np.asarray(m).ravel() for m in masks])
  np.testing.assert_array_equal(kept, everything > cut)
  assert int(counts[1]) < targets[1]  # the matrix with the larger scores keeps more


def test_wide_sums_pass_two_to_the_31():
  big = 2**31 - 1
  x = jnp.array([big, big, big, 7], jnp.int32)
  hi, lo = jax.jit(global_topk.wide_sum)(x)
  assert int(hi) * 2**16 + int(lo) == 3 * big + 7
  a = global_topk.wide_sum(x)
  b = global_topk.wide_sum(jnp.array([big, 5], jnp.int32))
  hi, lo = global_topk.wide_sub(a, b)
  assert int(hi) * 2**16 + int(lo) == 2 * big + 2
  assert bool(global_topk.wide_le(b, a)) and not bool(global_topk.wide_le(a, b))
  assert int(global_topk.wide_min(a, jnp.int32(big))) == big
  assert int(global_topk.wide_min(global_topk.wide_sum(jnp.array([70000])), jnp.int32(big))) == 70000


def test_sharded_scores_give_the_same_counts():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest.py sets XLA_FLAGS before JAX starts)")
  mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(3)
  scores = [jnp.asarray(rng.normal(size=(16, 32)) ** 2, jnp.float32) for _ in range(3)]
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
  sharded = [jax.device_put(s, sharding) for s in scores]
  args = ([256] * 3, [128] * 3, [384] * 3)
  chex.assert_trees_all_equal(_counts(sharded, *args), _counts(scores, *args))


def _trained(bounds, steps_=6):
  keys = jax.random.split(jax.random.key(0), 3)
  # Layer i's weights, and so its scores v * w**2, grow with i.
  params = {"layers": {str(i): {"kernel": jax.random.normal(keys[i], (16, 8)) * (i + 1)} for i in range(3)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   elsa_jax.admm(optax.adam(1e-2), sparsity=0.5, interval=2, global_bounds=bounds))
  state = tx.init(params)

  @jax.jit
  def step(p, s, k):
    g = jax.tree.map(lambda x: 0.1 * x + 0.01 * jax.random.normal(k, x.shape), p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for t in range(steps_):
    params, state = step(params, state, jax.random.key(t + 1))
  return params, state


def test_admm_with_global_bounds_moves_counts_between_matrices_and_keeps_the_total():
  params, state = _trained((0.3, 0.7))
  report = elsa_jax.sparsity_report(elsa_jax.finalize(params, state))
  s = [report["per_matrix"][f"layers/{i}/kernel"] for i in range(3)]
  assert report["overall"] == 0.5  # 192 of 384, as uniform
  assert s[0] > 0.5 > s[2] and all(round(0.3 * 128) <= x * 128 <= round(0.7 * 128) for x in s), s
  z = elsa_jax.find_admm_state(state).z["layers"]
  assert sum(int((np.asarray(z[str(i)]["kernel"]) == 0).sum()) for i in range(3)) == 192
  # The projection's counts are those of global_counts on the final weights' scores.
  ws = [params["layers"][str(i)]["kernel"] for i in range(3)]
  v = elsa_jax.find_admm_state(state).score["layers"]
  counts = steps.global_counts(steps.scores(ws, [v[str(i)]["kernel"] for i in range(3)]), [0.5] * 3,
                               [(0.3, 0.7)] * 3)
  assert [int(c) / 128 for c in counts] == s


def test_global_bounds_are_checked():
  with pytest.raises(ValueError, match="unstructured pattern"):
    elsa_jax.admm(optax.adam(1e-3), pattern="2:4", global_bounds=(0.3, 0.7))
  with pytest.raises(ValueError, match=r"s_min <= sparsity \(0.5\) <= s_max"):
    elsa_jax.admm(optax.adam(1e-3), sparsity=0.5, global_bounds=(0.6, 0.7))
