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
"""The LLaMA configuration, read from and written to Hugging Face's config.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: HF ``model_type`` values this model reproduces exactly.
SUPPORTED_MODEL_TYPES = ("llama",)
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-family decoder (field names follow HF's LlamaConfig).

  Example:
    >>> from elsa_jax.models.llama import LlamaConfig
    >>> config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> config.to_hf_dict()["model_type"], config.num_key_value_heads
    ('llama', 2)
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | list[int] | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                         f"{self.num_attention_heads}; set head_dim explicitly.")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention).")
    if self.hidden_act != "silu":
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; LLaMA uses 'silu'.")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      rope_type = scaling.get("rope_type", scaling.get("type", "default"))
      if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; use one of {_ROPE_TYPES}.")
      if rope_type == "default":
        scaling = None
      else:
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
      object.__setattr__(self, "rope_scaling", scaling)

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | Any) -> "LlamaConfig":
    """Builds the config from HF's config.json dict or a ``transformers`` config object.

    Raises:
      ValueError: for a model that is not a LLaMA (e.g. GPT-2, or Mistral with sliding windows).
    """
    if not isinstance(config, Mapping):
      config = config.to_dict()
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {model_type!r} is not a LLaMA architecture; elsa_jax.models.llama loads "
          f"{SUPPORTED_MODEL_TYPES} checkpoints (LlamaForCausalLM). Convert the model to the LLaMA "
          f"layout or choose a LLaMA-family checkpoint."
      )
    if config.get("sliding_window"):
      raise ValueError("sliding-window attention is not part of LLaMA; this checkpoint is not supported.")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields}
    rope_params = config.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here
    if isinstance(rope_params, Mapping):
      rope_params = dict(rope_params)
      if "rope_theta" in rope_params:
        kwargs["rope_theta"] = rope_params.pop("rope_theta")
      if rope_params.get("rope_type", "default") != "default":
        kwargs["rope_scaling"] = rope_params
    return cls(**kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that ``transformers.LlamaConfig`` accepts."""
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="float32",
             initializer_range=0.02, use_cache=True, attention_dropout=0.0, pretraining_tp=1)
    return d
