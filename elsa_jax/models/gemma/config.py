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
"""The configs of Gemma 2 (``"gemma2"``) and Gemma 3's text model (``"gemma3_text"``).

Both read and write HF's config.json fields. Gemma 3 keeps two RoPE bases
(``rope_theta`` for global layers, with their ``rope_scaling``, and
``rope_local_base_freq`` for local ones), read from either of HF's formats
(those fields, or transformers 5's ``rope_parameters`` per layer type), and
written as the fields (which every transformers version reads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from elsa_jax.models.llama import config as config_lib
from elsa_jax.models.llama.config import FULL, SLIDING, LlamaConfig


@dataclasses.dataclass(frozen=True)
class Gemma2Config(LlamaConfig):
  """Gemma 2's config (HF's Gemma2Config fields; ``hidden_act`` is HF's ``hidden_activation``).

  Block options: RMSNorm scaled by ``1 + w``, embeddings times ``sqrt(hidden_size)``, the tanh-GELU
  MLP, softmax scale ``query_pre_attn_scalar ** -0.5``, attention scores and final logits soft-capped,
  and local (sliding-window) layers alternating with global ones (``layer_types``; by default even
  layers are local).
  """

  MODEL_TYPE: ClassVar[str] = "gemma2"
  HF_CLASS: ClassVar[str] = "Gemma2ForCausalLM"
  FAMILY: ClassVar[str] = "Gemma 2"
  ACTIVATIONS: ClassVar[tuple[str, ...]] = ("gelu_pytorch_tanh",)
  HF_EXTRAS: ClassVar[tuple] = ()
  norm_unit_offset: ClassVar[bool] = True

  vocab_size: int = 256000
  head_dim: int | None = 256
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = True
  hidden_act: str = "gelu_pytorch_tanh"
  bos_token_id: int | None = 2
  eos_token_id: int | list[int] | None = 1
  pad_token_id: int | None = 0
  query_pre_attn_scalar: float = 256
  sliding_window: int | None = 4096
  layer_types: tuple[str, ...] | None = None
  final_logit_softcapping: float | None = 30.0
  attn_logit_softcapping: float | None = 50.0

  def __post_init__(self):
    super().__post_init__()
    types = config_lib.layer_types(self, self.layer_types, self.default_layer_type)
    if SLIDING in types and not self.sliding_window:
      raise ValueError("layer_types names sliding_attention layers but sliding_window is not set.")
    object.__setattr__(self, "layer_types", types)

  def default_layer_type(self, layer: int) -> str:
    """The type of layer ``layer`` when config.json lists none (HF's default)."""
    return SLIDING if (layer + 1) % 2 else FULL

  @property
  def attention_scale(self) -> float:
    return float(self.query_pre_attn_scalar) ** -0.5

  @property
  def attention_softcap(self) -> float | None:
    return self.attn_logit_softcapping

  @property
  def logit_softcap(self) -> float | None:
    return self.final_logit_softcapping

  @property
  def embed_scale(self) -> float:
    return self.hidden_size ** 0.5

  def layer_type(self, layer: int) -> str:
    return self.layer_types[layer]

  def attention_window(self, layer_type: str) -> int | None:
    return self.sliding_window if layer_type == SLIDING else None

  @classmethod
  def _hf_kwargs(cls, config: dict[str, Any]) -> dict[str, Any]:
    if config.get("use_bidirectional_attention"):
      raise ValueError(f"use_bidirectional_attention is set: this {cls.FAMILY} is an encoder (no causal mask), "
                       f"not a language model elsa_jax prunes.")
    act = config.get("hidden_activation") or config.get("hidden_act")
    return dict(super()._hf_kwargs(config), **({"hidden_act": act} if act else {}))

  def to_hf_dict(self) -> dict[str, Any]:
    d = super().to_hf_dict()
    d["hidden_activation"] = d.pop("hidden_act")
    return d


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig(Gemma2Config):
  """Gemma 3's text config (HF's Gemma3TextConfig fields).

  Gemma 2's block options plus per-head q/k norms, no soft-capping by
  default, five local layers to one global (``sliding_window_pattern``), and
  the local layers' own RoPE base ``rope_local_base_freq`` (no scaling).
  """

  MODEL_TYPE: ClassVar[str] = "gemma3_text"
  HF_CLASS: ClassVar[str] = "Gemma3ForCausalLM"
  FAMILY: ClassVar[str] = "Gemma 3"
  qk_norm: ClassVar[bool] = True

  vocab_size: int = 262208
  max_position_embeddings: int = 131072
  rope_theta: float = 1_000_000.0
  rope_local_base_freq: float = 10_000.0
  sliding_window_pattern: int = 6
  final_logit_softcapping: float | None = None
  attn_logit_softcapping: float | None = None

  def default_layer_type(self, layer: int) -> str:
    return SLIDING if (layer + 1) % self.sliding_window_pattern else FULL

  def rope(self, layer_type: str) -> tuple[float, Mapping[str, Any] | None]:
    if layer_type == SLIDING:
      return self.rope_local_base_freq, None
    return self.rope_theta, self.rope_scaling

  @classmethod
  def _hf_kwargs(cls, config: dict[str, Any]) -> dict[str, Any]:
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and (FULL in params or SLIDING in params):  # transformers >= 5
      config = {k: v for k, v in config.items() if k != "rope_parameters"}
      full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
      if local.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {local['rope_type']!r} of the sliding-window layers is not supported.")
      if "rope_theta" in local:
        config["rope_local_base_freq"] = local["rope_theta"]
      if "rope_theta" in full:
        config["rope_theta"] = full.pop("rope_theta")
      config["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
    return super()._hf_kwargs(config)
