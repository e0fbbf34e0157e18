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
"""Model architectures (Flax NNX), their registry, and their conversion from/to Hugging Face and GGUF files.

An architecture is a module or subpackage (``llama/``, ``qwen2``, ``qwen3``,
``mistral``, ``gemma/``) exposing an
:class:`~elsa_jax.models.base.Architecture`, registered by ``model_type`` in
:data:`~elsa_jax.models.registry.ARCHITECTURES`. The functions below pick it
from the file or the object they are given.
"""

from elsa_jax.models import base
from elsa_jax.models import gemma
from elsa_jax.models import generate
from elsa_jax.models import gguf_file
from elsa_jax.models import gguf_tokenizer
from elsa_jax.models import hf
from elsa_jax.models import kv_cache
from elsa_jax.models import llama
from elsa_jax.models import mistral
from elsa_jax.models import qwen2
from elsa_jax.models import qwen3
from elsa_jax.models import registry
from elsa_jax.models import safetensors_dir
from elsa_jax.models import sparse_format
from elsa_jax.models.safetensors_dir import SPARSE_FORMATS, compact_directory, densify_directory
from elsa_jax.models.base import REMAT_POLICIES, Architecture, merge, remat_policy, split
from elsa_jax.models.registry import (
    ARCHITECTURES,
    abstract_model,
    architecture,
    architecture_of,
    config_from_gguf_file,
    config_from_pretrained,
    from_gguf,
    from_pretrained,
    logical_axes_of,
    save_pretrained,
    tokenizer_from_gguf,
)
