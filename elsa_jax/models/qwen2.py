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
"""Qwen2 / Qwen2.5 (HF ``model_type`` ``"qwen2"``): LLaMA's blocks with q/k/v biases.

The output projection has no bias; the head is tied or not
(``tie_word_embeddings``). Sliding-window layers follow HF: with
``use_sliding_window``, layers from ``max_window_layers`` on (or those that
``layer_types`` names) attend to the last ``sliding_window`` tokens. GGUF
files of architecture ``qwen2`` load too (llama.cpp stores Qwen's Q/K
unpermuted).

Example:
  >>> from elsa_jax import models
  >>> config = models.qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
  ...                                   num_hidden_layers=1, num_attention_heads=2)
  >>> _, params = models.abstract_model(config)
  >>> sorted(params["layers"][0]["self_attn"]["q_proj"]), "bias" in params["layers"][0]["self_attn"]["o_proj"]
  (['bias', 'kernel'], False)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax.numpy as jnp

from elsa_jax.models.llama import config as config_lib
from elsa_jax.models.llama import gguf as gguf_lib
from elsa_jax.models.llama.architecture import family_architecture
from elsa_jax.models.llama.config import LlamaConfig
from elsa_jax.models.llama.model import Llama


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
  """Qwen2's config (HF's Qwen2Config fields); ``layer_types`` is derived as HF derives it."""

  MODEL_TYPE: ClassVar[str] = "qwen2"
  HF_CLASS: ClassVar[str] = "Qwen2ForCausalLM"
  FAMILY: ClassVar[str] = "Qwen2"
  HF_EXTRAS: ClassVar[tuple] = ()

  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  use_sliding_window: bool = False
  sliding_window: int | None = None
  max_window_layers: int = 28
  layer_types: tuple[str, ...] | None = None

  def __post_init__(self):
    super().__post_init__()
    if not self.use_sliding_window:
      object.__setattr__(self, "sliding_window", None)
    window_from = lambda i: (config_lib.SLIDING if self.sliding_window is not None and i >= self.max_window_layers
                             else config_lib.FULL)
    types = config_lib.layer_types(self, self.layer_types, window_from)
    if config_lib.SLIDING in types and not self.sliding_window:
      raise ValueError("layer_types names sliding_attention layers but no sliding_window is set "
                       "(use_sliding_window with a sliding_window size).")
    object.__setattr__(self, "layer_types", types)

  @property
  def qkv_bias(self) -> bool:
    return True

  @property
  def o_bias(self) -> bool:
    return False

  def layer_type(self, layer: int) -> str:
    return self.layer_types[layer]

  def attention_window(self, layer_type: str) -> int | None:
    return self.sliding_window if layer_type == config_lib.SLIDING else None


class Qwen2(Llama):
  """Qwen2ForCausalLM: :class:`~elsa_jax.models.llama.Llama`'s blocks with a :class:`Qwen2Config`."""


#: Qwen2's block tensors in GGUF: LLaMA's and the q/k/v biases.
GGUF_TENSORS = dict(gguf_lib.LLAMA_TENSORS, **{
    f"attn_{x}.bias": ("self_attn", f"{x}_proj", "bias") for x in "qkv"})
GGUF = gguf_lib.GgufLayout("qwen2", GGUF_TENSORS, permute_qk=False)


def config_from_gguf(reader: Any) -> Qwen2Config:
  """A :class:`Qwen2Config` from a GGUF file's ``qwen2.*`` metadata."""
  return Qwen2Config(**gguf_lib.config_kwargs(reader, GGUF.architecture))


def from_gguf(path: str | os.PathLike, *, param_dtype=jnp.float32, **kwargs) -> tuple[Qwen2, Qwen2Config]:
  """Loads a Qwen2 GGUF file (every tensor dequantised to float32, then ``param_dtype``)."""
  return gguf_lib.load_gguf(path, GGUF, config_from_gguf, Qwen2, param_dtype=param_dtype, **kwargs)


ARCHITECTURE = family_architecture("qwen2", Qwen2, Qwen2Config, config_from_gguf=config_from_gguf,
                                   from_gguf=from_gguf)
