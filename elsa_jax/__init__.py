"""elsa_jax: pruning LLMs to extreme sparsity with ELSA (surrogate-free ADMM) in JAX."""

__version__ = "0.1.0"

# ELSA optimizer, projections and low-precision state.
from elsa_jax.optim.config import AdmmConfig
from elsa_jax.optim.finalize import admm_metrics
from elsa_jax.optim.finalize import finalize
from elsa_jax.optim.finalize import optimizer_state_bytes
from elsa_jax.optim.finalize import sparsity_report
from elsa_jax.optim.steps import admm_dual
from elsa_jax.optim.steps import admm_penalty
from elsa_jax.optim.steps import admm_projection
from elsa_jax.optim.transform import AdmmMetrics
from elsa_jax.optim.transform import AdmmState
from elsa_jax.optim.transform import admm
from elsa_jax.optim.transform import admm_zu_update
from elsa_jax.optim.transform import find_admm_state
from elsa_jax.sparsity.patterns import NM
from elsa_jax.sparsity.patterns import PerRow
from elsa_jax.sparsity.patterns import Unstructured
from elsa_jax.sparsity.prunable import default_prunable
from elsa_jax.sparsity.prunable import path_str
from elsa_jax.sparsity.prunable import prunable_mask
from elsa_jax.lowp.adam import ScaleByAdamLowpState
from elsa_jax.lowp.adam import adam_lowp
from elsa_jax.lowp.adam import scale_by_adam_lowp
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
from elsa_jax.lowp.codecs import dequantize_blockwise
from elsa_jax.lowp.codecs import dequantize_scaled
from elsa_jax.lowp.codecs import quantize_blockwise
from elsa_jax.lowp.codecs import quantize_scaled
from elsa_jax.oneshot.sparsegpt import reconstruction_error
from elsa_jax.oneshot.sparsegpt import sparsegpt_prune
from elsa_jax.oneshot.wanda import activation_norms
from elsa_jax.oneshot.wanda import wanda_prune
from elsa_jax.oneshot.wanda import wanda_score
from elsa_jax.optim.sam import sam_gradient

# Public subpackages, reachable as attributes (``elsa_jax.models.llama.from_pretrained``),
# bottom layer first: nothing imports a package listed after it.
from elsa_jax import files
from elsa_jax import lowp
from elsa_jax import sparsity
from elsa_jax import optim
from elsa_jax import models
from elsa_jax import oneshot
from elsa_jax import data
from elsa_jax import run
from elsa_jax import cli
from elsa_jax.models import llama  # the LLaMA architecture, as ``elsa_jax.llama``
