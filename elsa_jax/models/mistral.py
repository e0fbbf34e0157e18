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
"""Mistral (HF ``model_type`` ``"mistral"``): LLaMA's blocks with sliding-window attention.

Every layer attends to the last ``sliding_window`` tokens (HF's convention: a
query at ``i`` sees keys ``i - sliding_window < j <= i``); ``sliding_window``
None (Mistral v0.2 and later) is full causal attention. The window is a mask
of :func:`elsa_jax.models.llama.attention.causal_attention`, in its chunked
path too.

Example:
  >>> from elsa_jax import models
  >>> config = models.mistral.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
  ...                                       num_hidden_layers=1, num_attention_heads=2, sliding_window=16)
  >>> config.layer_type(0), config.attention_window(config.layer_type(0))
  ('sliding_attention', 16)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from elsa_jax.models.llama import config as config_lib
from elsa_jax.models.llama.architecture import family_architecture
from elsa_jax.models.llama.config import LlamaConfig
from elsa_jax.models.llama.model import Llama


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
  """Mistral's config (HF's MistralConfig fields)."""

  MODEL_TYPE: ClassVar[str] = "mistral"
  HF_CLASS: ClassVar[str] = "MistralForCausalLM"
  FAMILY: ClassVar[str] = "Mistral"
  HF_EXTRAS: ClassVar[tuple] = ()

  sliding_window: int | None = 4096

  def layer_type(self, layer: int) -> str:
    return config_lib.FULL if self.sliding_window is None else config_lib.SLIDING

  def attention_window(self, layer_type: str) -> int | None:
    return self.sliding_window if layer_type == config_lib.SLIDING else None


class Mistral(Llama):
  """MistralForCausalLM: :class:`~elsa_jax.models.llama.Llama`'s blocks with a :class:`MistralConfig`."""


ARCHITECTURE = family_architecture("mistral", Mistral, MistralConfig)
