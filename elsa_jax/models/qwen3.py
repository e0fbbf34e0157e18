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
"""Qwen3 (HF ``model_type`` ``"qwen3"``): Qwen2's blocks with per-head q/k RMSNorm.

Each head's queries and keys are RMS-normalised (``q_norm``/``k_norm``, over
``head_dim``) before RoPE; ``head_dim`` is its own setting (not
``hidden_size / num_attention_heads``), and the projections have biases only
with ``attention_bias`` (all four then, as HF's). GGUF files of architecture
``qwen3`` load too.

Example:
  >>> from elsa_jax import models
  >>> config = models.qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=24,
  ...                                   num_hidden_layers=1, num_attention_heads=2)
  >>> _, params = models.abstract_model(config)
  >>> attn = params["layers"][0]["self_attn"]
  >>> attn["q_proj"]["kernel"].shape, attn["q_norm"]["scale"].shape
  ((32, 48), (24,))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax.numpy as jnp

from elsa_jax.models import qwen2
from elsa_jax.models.llama import gguf as gguf_lib
from elsa_jax.models.llama.architecture import family_architecture


@dataclasses.dataclass(frozen=True)
class Qwen3Config(qwen2.Qwen2Config):
  """Qwen3's config (HF's Qwen3Config fields, ``head_dim`` 128 unless given)."""

  MODEL_TYPE: ClassVar[str] = "qwen3"
  HF_CLASS: ClassVar[str] = "Qwen3ForCausalLM"
  FAMILY: ClassVar[str] = "Qwen3"
  qk_norm: ClassVar[bool] = True

  head_dim: int | None = 128

  @property
  def qkv_bias(self) -> bool:
    return self.attention_bias

  @property
  def o_bias(self) -> bool:
    return self.attention_bias


class Qwen3(qwen2.Qwen2):
  """Qwen3ForCausalLM: :class:`~elsa_jax.models.llama.Llama`'s blocks with a :class:`Qwen3Config`."""


#: Qwen3's block tensors in GGUF: Qwen2's and the q/k norms.
GGUF_TENSORS = dict(qwen2.GGUF_TENSORS, **{
    f"attn_{x}_norm.weight": ("self_attn", f"{x}_norm", "scale") for x in "qk"})
GGUF = gguf_lib.GgufLayout("qwen3", GGUF_TENSORS, permute_qk=False)


def config_from_gguf(reader: Any) -> Qwen3Config:
  """A :class:`Qwen3Config` from a GGUF file's ``qwen3.*`` metadata (biases if the file has them)."""
  kwargs = gguf_lib.config_kwargs(reader, GGUF.architecture)
  names = {t.name for t in reader.tensors}
  return Qwen3Config(**kwargs, attention_bias="blk.0.attn_q.bias" in names)


def from_gguf(path: str | os.PathLike, *, param_dtype=jnp.float32, **kwargs) -> tuple[Qwen3, Qwen3Config]:
  """Loads a Qwen3 GGUF file (every tensor dequantised to float32, then ``param_dtype``)."""
  return gguf_lib.load_gguf(path, GGUF, config_from_gguf, Qwen3, param_dtype=param_dtype, **kwargs)


ARCHITECTURE = family_architecture("qwen3", Qwen3, Qwen3Config, config_from_gguf=config_from_gguf,
                                   from_gguf=from_gguf)
