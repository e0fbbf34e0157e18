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
"""Flax NNX LLaMA: the model, and its conversion from/to Hugging Face and GGUF weights.

:data:`ARCHITECTURE` is what :mod:`elsa_jax.models.registry` registers under
``"llama"``: everything the rest of the package knows of LLaMA.
"""

from elsa_jax.models.llama.config import LlamaConfig
from elsa_jax.models.llama.convert import config_from_pretrained, from_pretrained, save_pretrained, hf_name, flax_path
from elsa_jax.models.llama.gguf import config_from_gguf_file, from_gguf, tokenizer_from_gguf
from elsa_jax.models.llama.model import (
    REMAT_POLICIES,
    Llama,
    apply,
    logical_axes,
    logical_axes_of,
    merge,
    param_count,
    remat_policy,
    rope_inv_freq,
    split,
)
from elsa_jax.models.llama.architecture import ARCHITECTURE, LINEAR_INPUTS

__all__ = [
    "ARCHITECTURE", "LINEAR_INPUTS", "REMAT_POLICIES", "Llama", "LlamaConfig", "apply", "config_from_gguf_file",
    "config_from_pretrained", "flax_path", "from_gguf", "from_pretrained", "hf_name", "logical_axes",
    "logical_axes_of", "merge", "param_count", "remat_policy", "rope_inv_freq", "save_pretrained", "split",
    "tokenizer_from_gguf",
]
