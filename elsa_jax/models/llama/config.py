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
"""The LLaMA configuration, read from and written to Hugging Face's config.json.

:class:`LlamaConfig` is also the base of the configs of the families that
share LLaMA's blocks (Qwen2, Qwen3, Mistral, Gemma): besides HF's fields it
answers what the blocks of :mod:`elsa_jax.models.llama.model` ask (the
"block options" below), and a family's config overrides the answers. Layer
types follow HF's ``layer_types``: ``"full_attention"`` or
``"sliding_attention"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

#: HF ``model_type`` values this model reproduces exactly.
SUPPORTED_MODEL_TYPES = ("llama",)
_ROPE_TYPES = ("default", "linear", "llama3")
FULL = "full_attention"
SLIDING = "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)


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

  #: HF's ``model_type``, its ``*ForCausalLM`` class and the family's name in messages.
  MODEL_TYPE: ClassVar[str] = "llama"
  HF_CLASS: ClassVar[str] = "LlamaForCausalLM"
  FAMILY: ClassVar[str] = "LLaMA"
  #: The ``hidden_act`` values of the family.
  ACTIVATIONS: ClassVar[tuple[str, ...]] = ("silu",)
  #: Constant config.json entries of the family that are no field here.
  HF_EXTRAS: ClassVar[tuple[tuple[str, Any], ...]] = (("pretraining_tp", 1),)
  #: Block options fixed by the family: RMSNorm of each head's queries and keys (Qwen3, Gemma 3),
  #: and RMSNorm scaled by ``1 + w`` computed in float32 (Gemma) instead of LLaMA's ``w``.
  qk_norm: ClassVar[bool] = False
  norm_unit_offset: ClassVar[bool] = False

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
    if self.hidden_act not in self.ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; {self.FAMILY} uses "
                       f"{' or '.join(map(repr, self.ACTIVATIONS))}.")
    object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))

  # Block options: what the shared blocks ask; LLaMA's answers, overridden by other families.

  @property
  def qkv_bias(self) -> bool:
    """Whether q/k/v projections have biases."""
    return self.attention_bias

  @property
  def o_bias(self) -> bool:
    """Whether the output projection has a bias."""
    return self.attention_bias

  @property
  def attention_scale(self) -> float:
    """The softmax scale of the attention scores."""
    return self.head_dim ** -0.5

  @property
  def attention_softcap(self) -> float | None:
    """Soft-cap of the attention scores (None: none)."""
    return None

  @property
  def logit_softcap(self) -> float | None:
    """Soft-cap of the output logits (None: none)."""
    return None

  @property
  def embed_scale(self) -> float | None:
    """Factor of the token embeddings, applied in the compute dtype (None: none)."""
    return None

  def layer_type(self, layer: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"``: the attention of decoder layer ``layer``."""
    return FULL

  def attention_window(self, layer_type: str) -> int | None:
    """The sliding window of layers of ``layer_type`` (None: full causal attention)."""
    return None

  def rope(self, layer_type: str) -> tuple[float, Mapping[str, Any] | None]:
    """``(theta, scaling)`` of the rotary embedding of layers of ``layer_type``."""
    return self.rope_theta, self.rope_scaling

  # Hugging Face's config.json.

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | Any) -> "LlamaConfig":
    """Builds the config from HF's config.json dict or a ``transformers`` config object.

    Raises:
      ValueError: for a model of another family (e.g. GPT-2, or a Mistral for :class:`LlamaConfig`),
        or a setting this family's blocks do not reproduce.
    """
    if not isinstance(config, Mapping):
      config = config.to_dict()
    model_type = config.get("model_type", cls.MODEL_TYPE)
    if model_type != cls.MODEL_TYPE:
      raise ValueError(
          f"model_type {model_type!r} is not a {cls.FAMILY} architecture; {cls.__name__} reads "
          f"{cls.MODEL_TYPE!r} checkpoints ({cls.HF_CLASS}). Load it with elsa_jax.models.from_pretrained, "
          f"which picks the architecture by model_type, or choose a {cls.FAMILY} checkpoint."
      )
    return cls(**cls._hf_kwargs(dict(config)))

  @classmethod
  def _hf_kwargs(cls, config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of an HF config dict (its known fields, RoPE in either format)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if "sliding_window" not in fields and config.get("sliding_window"):
      raise ValueError(f"sliding-window attention is not part of {cls.FAMILY}; this checkpoint is not supported.")
    kwargs = {k: v for k, v in config.items() if k in fields}
    rope_params = config.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here
    if isinstance(rope_params, Mapping):
      rope_params = dict(rope_params)
      if "rope_theta" in rope_params:
        kwargs["rope_theta"] = rope_params.pop("rope_theta")
      if rope_params.get("rope_type", "default") != "default":
        kwargs["rope_scaling"] = rope_params
    return kwargs

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that the family's ``transformers`` config accepts."""
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
    d.update(model_type=self.MODEL_TYPE, architectures=[self.HF_CLASS], torch_dtype="float32",
             initializer_range=0.02, use_cache=True, attention_dropout=0.0, **dict(self.HF_EXTRAS))
    return d


class RopeScaling(dict):
  """HF's ``rope_scaling`` dict, hashable: a config rides in the model's graphdef, which
  ``jax.jit(..., static_argnums=...)`` hashes (greedy decoding, the lm-eval backend)."""

  def __hash__(self):
    return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))


def _rope_scaling(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
  """HF's ``rope_scaling`` with its type under ``rope_type`` (None for the default)."""
  if scaling is None:
    return None
  scaling = dict(scaling)
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; use one of {_ROPE_TYPES}.")
  if rope_type == "default":
    return None
  scaling["rope_type"] = rope_type
  scaling.pop("type", None)
  return RopeScaling(scaling)


def layer_types(config: LlamaConfig, given, default) -> tuple[str, ...]:
  """A config's per-layer types: ``given`` (HF's ``layer_types``) checked, or ``default(i)`` per layer.

  Raises:
    ValueError: a list of the wrong length or with an unknown type.
  """
  n = config.num_hidden_layers
  types = tuple(given) if given is not None else tuple(default(i) for i in range(n))
  if len(types) != n or any(t not in LAYER_TYPES for t in types):
    raise ValueError(f"layer_types {list(types)} must list one of {LAYER_TYPES} for each of the "
                     f"{n} layers (num_hidden_layers).")
  return types
