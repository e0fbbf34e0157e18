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
"""LLaMA as an :class:`elsa_jax.models.base.Architecture`: what the rest of the package sees of it.

:func:`family_architecture` gives the same for a family that shares LLaMA's
parameter tree and HF tensor names (Qwen2, Qwen3, Mistral, Gemma): its own
model, config and loaders, LLaMA's layer walk, prunable set and writer.

Example:
  >>> from elsa_jax.models import llama
  >>> llama.ARCHITECTURE.model_type, llama.LINEAR_INPUTS[("mlp", "down_proj")]
  ('llama', 'mlp_hidden')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from elsa_jax.models.base import Architecture, merge
from elsa_jax.sparsity.prunable import path_names
from elsa_jax.models.llama.config import LlamaConfig
from elsa_jax.models.llama.convert import from_pretrained, pretrained_loader, save_pretrained
from elsa_jax.models.llama.gguf import config_from_gguf, from_gguf
from elsa_jax.models.llama.model import Llama, apply, apply_with_blocks, init_cache, logical_axes

#: Which captured input (:meth:`LlamaDecoderLayer.with_linear_inputs`) each linear map of a decoder layer reads.
LINEAR_INPUTS = {
    ("self_attn", "q_proj"): "attn_in",
    ("self_attn", "k_proj"): "attn_in",
    ("self_attn", "v_proj"): "attn_in",
    ("self_attn", "o_proj"): "attn_out",
    ("mlp", "gate_proj"): "mlp_in",
    ("mlp", "up_proj"): "mlp_in",
    ("mlp", "down_proj"): "mlp_hidden",
}


def embed(params: dict, input_ids: jax.Array, compute_dtype) -> jax.Array:
  """The token embeddings ``[..., hidden]`` that the first decoder layer reads, in ``compute_dtype``."""
  table = params["embed_tokens"]["embedding"].astype(compute_dtype)
  return jnp.take(table, input_ids, axis=0)


def decoder_layers(params: dict) -> list:
  """The params of every decoder layer, in order (``params["layers"]``, a dict or a list)."""
  layers = params["layers"]
  return [layers[k] for k in sorted(layers)] if isinstance(layers, dict) else list(layers)


def replace_decoder_layers(params: dict, new_layers: list) -> dict:
  """``params`` with its decoder layers replaced by ``new_layers`` (same container type)."""
  out = dict(params)
  layers = params["layers"]
  out["layers"] = dict(zip(sorted(layers), new_layers)) if isinstance(layers, dict) else type(layers)(new_layers)
  return out


def layer_graphdefs(graphdef: Any, params: dict) -> list:
  """The graphdef of every decoder layer, in order (layers of one layer type share theirs)."""
  return [nnx.split(layer)[0] for layer in merge(graphdef, params).layers]


def layer_forward(layer: Any, hidden: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One decoder layer on ``hidden [B, T, D]`` (positions ``0..T-1``) and its linear maps' inputs."""
  b, t = hidden.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return layer.with_linear_inputs(hidden, positions)


def prunable(path: tuple, leaf: Any) -> bool:
  """The decoder layers' linear kernels: 2-D ``kernel`` leaves below ``layers`` (never embeddings,
  norms, biases or the LM head)."""
  names = path_names(path)
  return (len(names) >= 2 and names[0] == "layers" and names[-1] == "kernel"
          and getattr(leaf, "ndim", None) == 2)


def build(config: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, remat: bool | str = False,
          scan_layers: bool = False, rngs: nnx.Rngs | None = None) -> Llama:
  """A :class:`Llama` of ``config`` (see its arguments)."""
  return Llama(config, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers, rngs=rngs)


def family_architecture(model_type: str, model_class: type, config_class: type, **fields) -> Architecture:
  """:data:`ARCHITECTURE` for a family of LLaMA's layout: ``model_class`` (a :class:`Llama` subclass)
  built from ``config_class`` (a :class:`LlamaConfig` subclass) and loaded from HF by them; ``fields``
  replace others (its GGUF reader, its ``embed``). No GGUF reader unless given."""
  base = dict(model_type=model_type, model_class=model_class, config_class=config_class, build=model_class,
              config_from_hf=config_class.from_hf, from_pretrained=pretrained_loader(config_class, model_class),
              config_from_gguf=None, from_gguf=None, gguf_architecture=None)
  return dataclasses.replace(ARCHITECTURE, **dict(base, **fields))


ARCHITECTURE = Architecture(
    model_type="llama",
    model_class=Llama,
    config_class=LlamaConfig,
    build=build,
    apply=apply,
    logical_axes=logical_axes,
    config_from_hf=LlamaConfig.from_hf,
    from_pretrained=from_pretrained,
    save_pretrained=save_pretrained,
    embed=embed,
    decoder_layers=decoder_layers,
    replace_decoder_layers=replace_decoder_layers,
    layer_graphdefs=layer_graphdefs,
    layer_forward=layer_forward,
    linear_inputs=LINEAR_INPUTS,
    prunable=prunable,
    config_from_gguf=config_from_gguf,
    from_gguf=from_gguf,
    init_cache=init_cache,
    apply_with_blocks=apply_with_blocks,
)
