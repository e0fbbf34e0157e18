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
"""How a model-wide sparsity budget is spread over layers and matrices.

* ``uniform``: every prunable matrix at the target sparsity;
* ``owl``: OWL (Yin et al. 2023, "Outlier Weighed Layerwise sparsity"): a
  decoder layer with more outliers among its Wanda scores ``|W_ij| * ||X_j||``
  is pruned less (:func:`owl_layer_sparsities`);
* ``global``: one threshold on ELSA's projection score over every matrix,
  each within ``[s_min, s_max]`` (:func:`global_bounds`); an ADMM-only
  allocation, computed on the device at every z-update
  (:mod:`elsa_jax.sparsity.global_topk`).

The functions here are pure maths on host numbers and score arrays; the
one-shot walk and the ELSA jobs feed them (:mod:`elsa_jax.oneshot.owl`).

Example:
  >>> import numpy as np
  >>> calm = [np.ones(100)]
  >>> spiky = [np.r_[np.ones(90), 50 * np.ones(10)]]
  >>> [round(s, 3) for s in owl_layer_sparsities([calm, spiky, calm], 0.7, m=5, lmda=0.08)]
  [0.753, 0.593, 0.753]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: The allocations a run can ask for (``--allocation``).
ALLOCATIONS = ("uniform", "owl", "global")
#: OWL's defaults (the paper's LLaMA settings): outlier threshold M and the half-width lambda.
OWL_M = 5.0
OWL_LAMBDA = 0.08
#: ``--allocation global``'s default half-width of the per-matrix sparsities (:func:`global_bounds`).
GLOBAL_SPREAD = 0.1


def outlier_ratio(scores: Sequence, m: float) -> float:
  """OWL's ``D``: the fraction of entries above ``m`` times their mean, over all ``scores`` together.

  Args:
    scores: the score arrays of one layer (every prunable matrix of the block).
    m: the outlier threshold, a multiple of the layer's mean score.

  Returns:
    A fraction in ``[0, 1]``.
  """
  flat = [np.asarray(s).ravel() for s in scores]
  total = sum(f.size for f in flat)
  if not total:
    raise ValueError("outlier_ratio needs at least one score.")
  mean = sum(float(f.sum(dtype=np.float64)) for f in flat) / total
  return sum(int(np.count_nonzero(f > m * mean)) for f in flat) / total


def check_owl(target: float, m: float, lmda: float) -> None:
  """Refuses OWL settings whose nominal range ``[target - lmda, target + lmda]`` leaves ``[0, 1)``."""
  if not m > 0:
    raise ValueError(f"--owl-m must be positive (the outlier threshold, a multiple of the mean score), got {m}.")
  if not lmda >= 0:
    raise ValueError(f"--owl-lambda must be >= 0 (the half-width of the layer sparsities), got {lmda}.")
  if target + lmda >= 1.0 or target - lmda < 0.0:
    raise ValueError(f"--owl-lambda {lmda:g} spreads the layers over [{target - lmda:g}, {target + lmda:g}] "
                     f"around --sparsity {target:g}, outside [0, 1); use --owl-lambda below "
                     f"{min(1.0 - target, target):g}.")


def check_allocation(name: str, target: float, m: float = OWL_M, lmda: float = OWL_LAMBDA, *,
                     fixed_counts: str | None = None, per_row: bool = False) -> None:
  """Refuses an unknown ``--allocation``, OWL with bad settings, OWL over a pattern whose counts
  are fixed (``fixed_counts``: its spelling, e.g. ``"2:4"``), or a global allocation over any
  pattern but unstructured (``per_row``: the per-row pattern)."""
  if name not in ALLOCATIONS:
    raise ValueError(f"unknown --allocation {name!r}; choose one of {', '.join(ALLOCATIONS)}.")
  if name == "global" and (fixed_counts or per_row):
    raise ValueError(f"--allocation global moves counts between matrices by one threshold; the "
                     f"{fixed_counts or 'row'} pattern fixes the count of every {'group' if fixed_counts else 'row'}: "
                     f"use --pattern unstructured, or another --allocation.")
  if name == "owl":
    if fixed_counts:
      raise ValueError(f"--allocation owl spreads an unstructured or per-row budget over the layers; the "
                       f"{fixed_counts} pattern fixes every group's count: drop one of them.")
    check_owl(target, m, lmda)


def global_bounds(target: float, spread: float = GLOBAL_SPREAD) -> tuple[float, float]:
  """The default ``[s_min, s_max]`` of ``--allocation global``: ``target -+ spread``, the upper end at
  most half-way from ``target`` to 1 (so that no matrix is emptied at 90%: ``[0.8, 0.95]``).

  Example:
    >>> global_bounds(0.7), global_bounds(0.9)
    ((0.6, 0.8), (0.8, 0.95))
  """
  low, high = max(0.0, target - spread), min(target + spread, (1.0 + target) / 2)
  return round(low, 12), round(high, 12)


def check_global(target: float, low: float, high: float) -> None:
  """Refuses global bounds that leave ``[0, 1)`` or exclude the target."""
  if not 0.0 <= low <= target <= high < 1.0:
    raise ValueError(f"--global-min {low:g} and --global-max {high:g} must satisfy 0 <= --global-min <= "
                     f"--sparsity ({target:g}) <= --global-max < 1.")


def owl_layer_sparsities(scores_per_layer: Sequence[Sequence], target: float, m: float = OWL_M,
                         lmda: float = OWL_LAMBDA) -> list[float]:
  """OWL's per-layer sparsities: fewer pruned where a layer has more outliers.

  As in the OWL code: the outlier ratios ``D_l`` (:func:`outlier_ratio`) are
  rescaled linearly to ``[0, 2 * lmda]``, ``D'_l = 2 lmda (D_l - min D) /
  (max D - min D)``, and layer ``l`` keeps ``(1 - target) + D'_l - mean(D')``
  of its weights: ``s_l = target - D'_l + mean(D')``. The mean of the ``s_l``
  is the target; the layer with the most outliers is ``2 lmda`` below the
  one with the fewest. Equal ratios (or ``lmda = 0``) give ``target`` everywhere.

  Args:
    scores_per_layer: per decoder layer, the Wanda scores ``|W| * ||X||`` of
      each of its prunable matrices (any shapes).
    target: the mean sparsity, in ``[0, 1)``.
    m: the outlier threshold (a multiple of each layer's mean score).
    lmda: the half-width of the spread.

  Returns:
    One sparsity per layer.

  Raises:
    ValueError: for bad settings (:func:`check_owl`), no layers, or a layer
      sparsity outside ``[0, 1)`` (a skewed spread at a high target).
  """
  check_owl(target, m, lmda)
  return owl_from_ratios([outlier_ratio(layer, m) for layer in scores_per_layer], target, lmda)


def owl_from_ratios(ratios: Sequence[float], target: float, lmda: float = OWL_LAMBDA) -> list[float]:
  """OWL's per-layer sparsities from the layers' outlier ratios (see :func:`owl_layer_sparsities`)."""
  ratios = np.asarray(ratios, np.float64)
  if not ratios.size:
    raise ValueError("OWL needs at least one layer.")
  spread = ratios.max() - ratios.min()
  if spread == 0 or lmda == 0:
    return [float(target)] * len(ratios)
  scaled = (ratios - ratios.min()) / spread * (2 * lmda)
  sparsities = target - scaled + scaled.mean()
  if sparsities.max() >= 1.0 or sparsities.min() < 0.0:
    raise ValueError(f"OWL at --owl-lambda {lmda:g} gives layer sparsities from {sparsities.min():.4f} to "
                     f"{sparsities.max():.4f}, outside [0, 1) (the outliers sit in few layers); lower "
                     f"--owl-lambda.")
  return [float(s) for s in sparsities]


def exact_sparsities(sizes: Sequence[int], sparsities: Sequence[float], target: float) -> list[float]:
  """Per-matrix sparsities near ``sparsities`` whose pruned counts add up to ``round(target * sum(sizes))``.

  Each matrix ``i`` of ``sizes[i]`` entries gets a whole count ``k_i``: the
  desired counts ``s_i * n_i`` are first shifted by one common sparsity so
  that they add up to the target's (a no-op when the matrices are the same
  size and the ``s_i`` average to the target, as OWL's layers do), then
  rounded down, the remaining units going to the largest remainders. The
  result is ``k_i / n_i``, which :func:`elsa_jax.sparsity.topk.num_pruned`
  turns back into ``k_i`` exactly.

  Example:
    >>> exact_sparsities([10, 10, 10], [0.55, 0.55, 0.4], 0.5)
    [0.6, 0.5, 0.4]

  Args:
    sizes: entries per matrix.
    sparsities: the wanted sparsity of each.
    target: the overall sparsity.

  Returns:
    One sparsity per matrix, each in ``[0, 1]``.
  """
  n = np.asarray(sizes, np.int64)
  s = np.asarray(sparsities, np.float64)
  if n.shape != s.shape or n.ndim != 1:
    raise ValueError(f"exact_sparsities needs one sparsity per size, got {len(n)} sizes and {len(s)} sparsities.")
  total = int(round(target * int(n.sum())))
  want = s * n + (total - float((s * n).sum())) * n / n.sum()
  want = np.clip(want, 0, n)
  k = np.floor(want).astype(np.int64)
  short = total - int(k.sum())
  order = np.argsort(-(want - k), kind="stable")
  for i in order:
    if short <= 0:
      break
    if k[i] < n[i]:
      k[i] += 1
      short -= 1
  return [float(ki / ni) if ni else 0.0 for ki, ni in zip(k, n)]


def mean_sparsity(sizes: Sequence[int], sparsities: Sequence[float]) -> float:
  """The overall sparsity of matrices of ``sizes`` at ``sparsities`` (pruned counts rounded per matrix)."""
  total = sum(sizes)
  return sum(int(round(s * n)) for n, s in zip(sizes, sparsities)) / total if total else 0.0


__all__ = ["ALLOCATIONS", "OWL_M", "OWL_LAMBDA", "GLOBAL_SPREAD", "outlier_ratio", "check_owl", "check_allocation",
           "global_bounds", "check_global", "owl_layer_sparsities", "owl_from_ratios", "exact_sparsities",
           "mean_sparsity"]
