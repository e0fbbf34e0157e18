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
"""OWL's per-matrix sparsities of a model, from the Wanda scores of its dense calibration pass.

:func:`owl_sparsities` runs the calibration windows through the *dense* model
layer by layer (as the OWL code does), takes every decoder layer's outlier
ratio over the Wanda scores ``|W_ij| * ||X_j||`` of all its prunable matrices
(:func:`elsa_jax.sparsity.allocation.owl_layer_sparsities`) and returns a
params-shaped tree of per-matrix sparsities whose pruned counts add up to the
target's exactly. Every method takes that tree as its ``sparsity``: the
one-shot walk (:func:`elsa_jax.oneshot.walk.prune_oneshot`) and ELSA
(:func:`elsa_jax.admm`, per-leaf sparsity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from elsa_jax import hosts
from elsa_jax import models
from elsa_jax.oneshot import walk
from elsa_jax.oneshot import wanda
from elsa_jax.sparsity import allocation


def layer_values_tree(architecture: models.Architecture, params: Any,
                      values: Sequence[Mapping[tuple[str, ...], Any]]) -> Any:
  """A tree shaped like ``params``: ``values[i][path]`` at layer ``i``'s kernel ``path + ("kernel",)``, None
  elsewhere (so it is a prefix tree of exactly the given matrices)."""
  blank = jax.tree.map(lambda _: None, params)
  layers = architecture.decoder_layers(blank)
  for layer, layer_values in zip(layers, values):
    for path, value in layer_values.items():
      walk.get_path(layer, path)["kernel"] = value
  return architecture.replace_decoder_layers(blank, layers)


def owl_sparsities(graphdef: Any, params: Any, windows: np.ndarray, *, target: float,
                   m: float = allocation.OWL_M, lmda: float = allocation.OWL_LAMBDA,
                   batch_size: int = 8) -> tuple[Any, list[float]]:
  """OWL's allocation of ``target`` over the model's prunable matrices.

  Args:
    graphdef, params: the dense model (:func:`elsa_jax.models.split`).
    windows: ``[n, seqlen]`` calibration token ids.
    target: the overall sparsity.
    m: OWL's outlier threshold (a multiple of a layer's mean score).
    lmda: OWL's half-width of the layer sparsities.
    batch_size: windows per forward pass.

  Returns:
    ``(tree, layer_sparsities)``: a params-shaped tree with each prunable
    matrix's sparsity (None elsewhere), and OWL's sparsity of every layer.
    Over all matrices the pruned counts add up to ``round(target * total)``.
  """
  allocation.check_owl(target, m, lmda)
  arch = models.architecture_of(graphdef)
  layers = arch.decoder_layers(params)
  stats = walk.calibration_statistics(graphdef, params, windows, batch_size=batch_size)
  ratios = []
  for layer, layer_stats in zip(layers, stats):
    scores = [hosts.host_array(wanda.wanda_score(walk.get_path(layer, path)["kernel"],
                                                wanda.activation_norms(layer_stats[key])))
              for path, key in arch.linear_inputs.items()]
    ratios.append(allocation.outlier_ratio(scores, m))
  layer_s = allocation.owl_from_ratios(ratios, target, lmda)
  paths = list(arch.linear_inputs)
  sizes = [int(np.prod(walk.get_path(layer, p)["kernel"].shape)) for layer in layers for p in paths]
  exact = iter(allocation.exact_sparsities(sizes, [s for s in layer_s for _ in paths], target))
  values = [{p: next(exact) for p in paths} for _ in layers]
  return layer_values_tree(arch, params, values), layer_s


__all__ = ["layer_values_tree", "owl_sparsities"]
