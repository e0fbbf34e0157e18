"""One-shot baselines: magnitude, Wanda and SparseGPT, per matrix and layer by layer.

A method is a module here (its single-matrix maths) plus one entry of
:data:`registry.METHODS`; :mod:`walk` runs any of them on any registered architecture.
"""

from elsa_jax.oneshot import magnitude
from elsa_jax.oneshot import wanda
from elsa_jax.oneshot import sparsegpt
from elsa_jax.oneshot import registry
from elsa_jax.oneshot import walk
from elsa_jax.oneshot.registry import METHODS, Method
from elsa_jax.oneshot.walk import calibration_statistics, prune_matrix, prune_oneshot
