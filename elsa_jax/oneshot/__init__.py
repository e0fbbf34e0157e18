"""One-shot baselines: magnitude, Wanda and SparseGPT, per matrix and layer by layer."""

from elsa_jax.oneshot import matrix
from elsa_jax.oneshot import walk
