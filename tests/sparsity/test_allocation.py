"""Allocations of a sparsity budget: OWL's layer sparsities and exact per-matrix counts."""

from __future__ import annotations

import numpy as np
import pytest

from elsa_jax.sparsity import allocation


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 30))


def _owl_reference(scores_per_layer, target, m, lmda):
  """The OWL code's steps, transcribed: ratios in percent, rescaled to [0, 2 lambda], centred on 1 - target."""
  ratios = []
  for layer in scores_per_layer:
    flat = np.concatenate([np.ravel(s) for s in layer]).astype(np.float64)
    ratios.append(100 * np.sum(flat > np.mean(flat) * m) / flat.size)
  ratios = np.array(ratios)
  ratios = (ratios - ratios.min()) * (1 / (ratios.max() - ratios.min()) * lmda * 2)
  ratios = ratios - np.mean(ratios) + (1 - target)
  return 1 - ratios


def _layers(rng, n_layers=6):
  """Per layer, a few score matrices with a layer-dependent share of heavy outliers."""
  layers = []
  for i in range(n_layers):
    mats = [np.abs(rng.normal(size=shape)) for shape in ((16, 24), (24, 16), (16, 8))]
    for s in mats:
      s[rng.random(s.shape) < 0.002 * (i + 1) * rng.random()] *= 40.0
    layers.append(mats)
  return layers


@pytest.mark.parametrize("target,m,lmda", [(0.5, 5.0, 0.08), (0.7, 3.0, 0.05), (0.9, 5.0, 0.08)])
def test_owl_layer_sparsities_are_the_published_ones(target, m, lmda):
  layers = _layers(np.random.default_rng(_seed()))
  got = allocation.owl_layer_sparsities(layers, target, m=m, lmda=lmda)
  want = _owl_reference(layers, target, m, lmda)
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert abs(np.mean(got) - target) < 1e-12
  np.testing.assert_allclose(max(got) - min(got), 2 * lmda, atol=1e-12)
  ratios = [allocation.outlier_ratio(layer, m) for layer in layers]
  # More outliers, less pruning.
  assert np.argmax(ratios) == np.argmin(got) and np.argmin(ratios) == np.argmax(got)


def test_outlier_ratio_counts_above_m_times_the_layer_mean():
  scores = [np.ones((4, 5)), np.array([[10.0, 1.0], [1.0, 1.0]])]  # mean 33 / 24 = 1.375
  assert allocation.outlier_ratio(scores, 5.0) == 1 / 24  # only the 10 is above 6.875
  assert allocation.outlier_ratio(scores, 0.5) == 1.0


def test_equal_ratios_or_no_lambda_are_uniform_and_bad_settings_are_refused():
  same = [[np.ones((3, 3))]] * 4
  assert allocation.owl_layer_sparsities(same, 0.6) == [0.6] * 4
  layers = _layers(np.random.default_rng(_seed()))
  assert allocation.owl_layer_sparsities(layers, 0.6, lmda=0.0) == [0.6] * 6
  with pytest.raises(ValueError, match="--owl-lambda 0.2 spreads the layers over"):
    allocation.owl_layer_sparsities(layers, 0.9, lmda=0.2)
  with pytest.raises(ValueError, match="--owl-m must be positive"):
    allocation.owl_layer_sparsities(layers, 0.5, m=0.0)
  # One layer far from the others at a high target: its partner leaves [0, 1).
  with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
    allocation.owl_from_ratios([0.0] + [1.0] * 20, 0.95, lmda=0.049)


def test_exact_sparsities_hit_the_total_count_and_stay_near_the_wish():
  rng = np.random.default_rng(_seed())
  sizes = list(rng.integers(50, 5000, size=12))
  wish = list(rng.uniform(0.55, 0.85, size=12))
  target = 0.7
  got = allocation.exact_sparsities(sizes, wish, target)
  counts = [round(s * n) for s, n in zip(got, sizes)]
  assert all(abs(s * n - c) < 1e-9 for s, n, c in zip(got, sizes, counts))  # whole counts
  assert sum(counts) == round(target * sum(sizes))
  assert allocation.mean_sparsity(sizes, got) == round(target * sum(sizes)) / sum(sizes)
  shift = (target * sum(sizes) - sum(w * n for w, n in zip(wish, sizes))) / sum(sizes)
  for s, w, n in zip(got, wish, sizes):
    assert abs(s - (w + shift)) <= 1 / n + 1e-12
  # Same-size matrices whose wishes average to the target: rounding only.
  equal = allocation.exact_sparsities([1000] * 4, [0.6, 0.7, 0.8, 0.7], 0.7)
  np.testing.assert_allclose(equal, [0.6, 0.7, 0.8, 0.7])
