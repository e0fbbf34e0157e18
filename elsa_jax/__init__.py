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
"""elsa_jax: pruning LLMs to extreme sparsity with ELSA (surrogate-free ADMM) in JAX.

The method is a set of optax transforms (:func:`admm`, :func:`adam_lowp`),
the models Flax NNX modules converted from and to Hugging Face weights
(:mod:`elsa_jax.models`), the loop a sharded, jitted step (:mod:`elsa_jax.run`).
The subpackages, bottom layer first (each imports only those before it):
``lowp``, ``sparsity``, ``optim``, ``models``, ``oneshot``, ``data``, ``run``,
``cli``.
"""

__version__ = "0.1.0"

# The ELSA transform, its steps, state and final projection.
from elsa_jax.optim.config import AdmmConfig
from elsa_jax.optim.finalize import admm_metrics
from elsa_jax.optim.finalize import finalize
from elsa_jax.optim.finalize import optimizer_state_bytes
from elsa_jax.optim.finalize import sparsity_report
from elsa_jax.optim.sam import sam_gradient
from elsa_jax.optim.steps import admm_dual
from elsa_jax.optim.steps import admm_penalty
from elsa_jax.optim.steps import admm_projection
from elsa_jax.optim.transform import AdmmMetrics
from elsa_jax.optim.transform import AdmmState
from elsa_jax.optim.transform import admm
from elsa_jax.optim.transform import admm_zu_update
from elsa_jax.optim.transform import find_admm_state
# Sparsity patterns, the prunable set, exact top-k projections.
from elsa_jax.sparsity.patterns import NM
from elsa_jax.sparsity.patterns import PerRow
from elsa_jax.sparsity.patterns import Unstructured
from elsa_jax.sparsity.prunable import default_prunable
from elsa_jax.sparsity.prunable import path_str
from elsa_jax.sparsity.prunable import prunable_mask
from elsa_jax.sparsity.topk import magnitude_score
from elsa_jax.sparsity.topk import nm_mask
from elsa_jax.sparsity.topk import num_pruned
from elsa_jax.sparsity.topk import objective_aware_score
from elsa_jax.sparsity.topk import project
from elsa_jax.sparsity.topk import row_mask
from elsa_jax.sparsity.topk import sparsity_mask
from elsa_jax.sparsity.topk import sparsity_masks
from elsa_jax.sparsity.topk import topk_mask
from elsa_jax.sparsity.topk import topk_masks
from elsa_jax.sparsity.topk import unstructured_mask
# Low-precision state (ELSA-L).
from elsa_jax.lowp.adam import ScaleByAdamLowpState
from elsa_jax.lowp.adam import adam_lowp
from elsa_jax.lowp.adam import scale_by_adam_lowp
from elsa_jax.lowp.codecs import dequantize_blockwise
from elsa_jax.lowp.codecs import dequantize_scaled
from elsa_jax.lowp.codecs import quantize_blockwise
from elsa_jax.lowp.codecs import quantize_scaled
# One-shot baselines, one matrix at a time.
from elsa_jax.oneshot.sparsegpt import reconstruction_error
from elsa_jax.oneshot.sparsegpt import sparsegpt_prune
from elsa_jax.oneshot.wanda import activation_norms
from elsa_jax.oneshot.wanda import wanda_prune
from elsa_jax.oneshot.wanda import wanda_score

# Public subpackages, reachable as attributes (``elsa_jax.models.from_pretrained``), bottom layer first.
from elsa_jax import files
from elsa_jax import hosts
from elsa_jax import lowp
from elsa_jax import sparsity
from elsa_jax import optim
from elsa_jax import models
from elsa_jax import oneshot
from elsa_jax import data
from elsa_jax import run
from elsa_jax import cli
from elsa_jax.models import llama  # the LLaMA architecture, also as ``elsa_jax.llama``

__all__ = [
    # transform, steps, state
    "AdmmConfig", "AdmmMetrics", "AdmmState", "admm", "admm_dual", "admm_metrics", "admm_penalty",
    "admm_projection", "admm_zu_update", "finalize", "find_admm_state", "optimizer_state_bytes", "sam_gradient",
    "sparsity_report",
    # sparsity
    "NM", "PerRow", "Unstructured", "default_prunable", "magnitude_score", "nm_mask", "num_pruned",
    "objective_aware_score", "path_str", "project", "prunable_mask", "row_mask", "sparsity_mask", "sparsity_masks",
    "topk_mask", "topk_masks", "unstructured_mask",
    # low precision
    "ScaleByAdamLowpState", "adam_lowp", "dequantize_blockwise", "dequantize_scaled", "quantize_blockwise",
    "quantize_scaled", "scale_by_adam_lowp",
    # one-shot
    "activation_norms", "reconstruction_error", "sparsegpt_prune", "wanda_prune", "wanda_score",
    # subpackages
    "cli", "data", "files", "llama", "lowp", "models", "oneshot", "optim", "run", "sparsity",
]
