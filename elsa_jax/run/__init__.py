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
"""The sharded pruning loop: train step, mesh sharding, checkpoints, checks, multi-host, memory prediction."""

from elsa_jax.run import checkpoint
from elsa_jax.run import checks
from elsa_jax.run import checksums
from elsa_jax.run import distributed
from elsa_jax.run import loading
from elsa_jax.run import lock
from elsa_jax.run import memory
from elsa_jax.run import sharding
from elsa_jax.run import train
