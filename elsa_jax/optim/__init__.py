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
"""The ELSA method as optax transforms: ADMM around a base optimizer, SAM (SAFE's x-update).

``config`` (the frozen configuration), ``steps`` (the maths as pure
functions), ``scores`` (the projection's score sources), ``transform``
(:func:`admm`, its state, :func:`admm_zu_update`), ``finalize`` (the final
projection and reports) and ``sam``.
"""

from elsa_jax.optim import config
from elsa_jax.optim import finalize
from elsa_jax.optim import sam
from elsa_jax.optim import scores
from elsa_jax.optim import steps
from elsa_jax.optim import transform
