"""elsa_jax: pruning LLMs to extreme sparsity with ELSA (surrogate-free ADMM) in JAX."""

__version__ = "0.1.0"

# ELSA optimizer, projections and low-precision state.
from elsa_jax._admm import AdmmMetrics
from elsa_jax._admm import AdmmState
from elsa_jax._admm import admm
from elsa_jax._admm import admm_dual
from elsa_jax._admm import admm_metrics
from elsa_jax._admm import admm_penalty
from elsa_jax._admm import admm_projection
from elsa_jax._admm import default_prunable
from elsa_jax._admm import finalize
from elsa_jax._admm import find_admm_state
from elsa_jax._admm import optimizer_state_bytes
from elsa_jax._admm import path_str
from elsa_jax._admm import prunable_mask
from elsa_jax._admm import sparsity_report
from elsa_jax._low_precision import ScaleByAdamLowpState
from elsa_jax._low_precision import adam_lowp
from elsa_jax._low_precision import scale_by_adam_lowp
from elsa_jax._projection import magnitude_score
from elsa_jax._projection import nm_mask
from elsa_jax._projection import num_pruned
from elsa_jax._projection import objective_aware_score
from elsa_jax._projection import project
from elsa_jax._projection import row_mask
from elsa_jax._projection import sparsity_mask
from elsa_jax._projection import sparsity_masks
from elsa_jax._projection import topk_mask
from elsa_jax._projection import topk_masks
from elsa_jax._projection import unstructured_mask
from elsa_jax._quantization import dequantize_blockwise
from elsa_jax._quantization import dequantize_scaled
from elsa_jax._quantization import quantize_blockwise
from elsa_jax._quantization import quantize_scaled
from elsa_jax._oneshot import activation_norms
from elsa_jax._oneshot import reconstruction_error
from elsa_jax._oneshot import sparsegpt_prune
from elsa_jax._oneshot import wanda_prune
from elsa_jax._oneshot import wanda_score
from elsa_jax._sam import sam_gradient

# Public subpackages, reachable as attributes (``elsa_jax.llama.from_pretrained``).
from elsa_jax import assets
from elsa_jax import baselines
from elsa_jax import checkpoint
from elsa_jax import data
from elsa_jax import distributed
from elsa_jax import evaluate
from elsa_jax import gguf_tokenizer
from elsa_jax import llama
from elsa_jax import memory
from elsa_jax import pipeline
from elsa_jax import sharding
from elsa_jax import train
