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
"""Gemma 2 and Gemma 3 text models: LLaMA's attention and MLP in Gemma's sandwich-norm block.

Everything else Gemma does differently is a block option of its config
(:mod:`elsa_jax.models.gemma.config`) that the shared blocks of
:mod:`elsa_jax.models.llama.model` read: ``1 + w`` RMSNorm, the scaled
embedding, tanh-GELU, the softmax scale, soft-capping, per-layer sliding
windows and RoPE bases, q/k norms (Gemma 3).
"""

from __future__ import annotations

import jax
from flax import nnx

from elsa_jax.models.llama.config import FULL
from elsa_jax.models.llama.model import Llama, LlamaAttention, LlamaMLP, norm


class GemmaDecoderLayer(nnx.Module):
  """Gemma's block: ``x + norm(attn(norm(x)))``, then ``x + norm(mlp(norm(x)))`` (HF's names)."""

  def __init__(self, config, *, layer_type: str = FULL, dtype, param_dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.input_layernorm = norm(config, d, param_dtype)
    self.self_attn = LlamaAttention(config, layer_type=layer_type, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = norm(config, d, param_dtype)
    self.pre_feedforward_layernorm = norm(config, d, param_dtype)
    self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_feedforward_layernorm = norm(config, d, param_dtype)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return self.with_linear_inputs(x, positions)[0]

  def with_linear_inputs(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The layer's output and the input of each linear map, keyed as
    :meth:`elsa_jax.models.llama.model.LlamaDecoderLayer.with_linear_inputs`'s."""
    h_attn = self.input_layernorm(x)
    a = self.self_attn.attend(h_attn, positions)
    x = x + self.post_attention_layernorm(self.self_attn.o_proj(a))
    h_mlp = self.pre_feedforward_layernorm(x)
    m = self.mlp.hidden(h_mlp)
    x = x + self.post_feedforward_layernorm(self.mlp.down_proj(m))
    return x, {"attn_in": h_attn, "attn_out": a, "mlp_in": h_mlp, "mlp_hidden": m}


class Gemma2(Llama):
  """Gemma2ForCausalLM: :class:`GemmaDecoderLayer` blocks with a
  :class:`~elsa_jax.models.gemma.config.Gemma2Config`."""

  decoder_layer = GemmaDecoderLayer


class Gemma3Text(Gemma2):
  """Gemma3ForCausalLM (Gemma 3's text model) with a
  :class:`~elsa_jax.models.gemma.config.Gemma3TextConfig`."""
