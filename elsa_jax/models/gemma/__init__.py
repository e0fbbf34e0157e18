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
"""Gemma 2 and Gemma 3 (text): Gemma's block around LLaMA's attention and MLP.

:data:`GEMMA2` and :data:`GEMMA3_TEXT` are what :mod:`elsa_jax.models.registry`
registers under ``"gemma2"`` and ``"gemma3_text"``.
"""

from elsa_jax.models.gemma.config import Gemma2Config, Gemma3TextConfig
from elsa_jax.models.gemma.model import Gemma2, Gemma3Text, GemmaDecoderLayer
from elsa_jax.models.gemma.architecture import GEMMA2, GEMMA3_TEXT, embed

__all__ = ["GEMMA2", "GEMMA3_TEXT", "Gemma2", "Gemma2Config", "Gemma3Text", "Gemma3TextConfig",
           "GemmaDecoderLayer", "embed"]
