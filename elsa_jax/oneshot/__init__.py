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
"""One-shot baselines: magnitude, Wanda and SparseGPT, per matrix and layer by layer.

A method is a module here (its single-matrix maths) plus one entry of
:data:`registry.METHODS`; :mod:`walk` runs any of them on any registered architecture,
at one sparsity or at :mod:`owl`'s per-matrix ones.
"""

from elsa_jax.oneshot import magnitude
from elsa_jax.oneshot import wanda
from elsa_jax.oneshot import sparsegpt
from elsa_jax.oneshot import registry
from elsa_jax.oneshot import walk
from elsa_jax.oneshot import owl
from elsa_jax.oneshot.registry import METHODS, Method
from elsa_jax.oneshot.walk import calibration_statistics, prune_matrix, prune_oneshot
