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
"""A Flax NNX LLaMA that reproduces Hugging Face's LlamaForCausalLM.

Layout follows HF so that conversion is a transpose and nothing else: rotate-half
RoPE on unscaled query/key projections, the softmax scale applied inside
attention, RMSNorm in float32, SwiGLU MLP, tied or untied ``lm_head``. Linear
kernels are ``[in, out]`` (HF's ``weight.T``). Every parameter carries logical
axis names (:func:`logical_axes`) for sharding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.models import kv_cache
from elsa_jax.models.base import REMAT_POLICIES, merge, remat_policy, split
from elsa_jax.models.llama.config import LlamaConfig

#: Attention falls back to query chunks of this many tokens above it, so that
#: the score matrix held at once is [batch, heads, chunk, seqlen].
ATTENTION_CHUNK = 1024


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies, with HF's 'linear' and 'llama3' scaling (float32)."""
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  scaling = config.rope_scaling
  if not scaling:
    return inv_freq.astype(np.float32)
  factor = float(scaling["factor"])
  if scaling["rope_type"] == "linear":
    return (inv_freq / factor).astype(np.float32)
  # llama3: long wavelengths divided by factor, short kept, a smooth blend between.
  low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
  old_len = float(scaling["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  out = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * out / factor + smooth * out
  medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
  return np.where(medium, smoothed, out).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE of ``x [B, T, heads, head_dim]`` at ``positions [B, T]``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  return x * cos + rotate_half(x) * sin


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk: int = ATTENTION_CHUNK) -> jax.Array:
  """Causal grouped-query attention, ``q [B,T,N,H]``, ``k, v [B,T,K,H]`` -> ``[B,T,N,H]``.

  On GPU in 16-bit it is cuDNN's flash attention through
  ``jax.nn.dot_product_attention``. Elsewhere, sequences longer than ``chunk``
  run as rematerialised query chunks so that no more than
  ``[B, N, chunk, T]`` scores exist at once.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  t = q.shape[1]
  on_gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
  if on_gpu or t <= chunk or t % chunk:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation=None if on_gpu else "xla")
  b, _, n, h = q.shape
  groups = n // k.shape[2]
  kf = jnp.repeat(k, groups, axis=2)
  vf = jnp.repeat(v, groups, axis=2)
  key_pos = jnp.arange(t)

  @jax.checkpoint
  def one_chunk(args):
    qc, start = args
    s = jnp.einsum("bqnh,bknh->bnqk", qc, kf, preferred_element_type=jnp.float32) * scale
    mask = (start + jnp.arange(chunk))[:, None] >= key_pos[None, :]
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", p, vf)

  qs = q.reshape(b, t // chunk, chunk, n, h).swapaxes(0, 1)
  out = jax.lax.map(one_chunk, (qs, jnp.arange(0, t, chunk)))
  return out.swapaxes(0, 1).reshape(b, t, n, h)


def _partitioned(init, names):
  return nnx.with_partitioning(init, names)


def _linear(din, dout, names, *, bias, dtype, param_dtype, rngs):
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(nnx.initializers.normal(0.02), names),
      bias_init=_partitioned(nnx.initializers.zeros_init(), names[-1:]), rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """HF's LlamaRMSNorm: normalise in float32, cast back, then scale."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class LlamaAttention(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    kw = dict(bias=c.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim, ("embed", "q_heads"), **kw)
    self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), **kw)
    self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), **kw)
    self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size, ("q_heads", "embed"), **kw)
    self.config = config

  def attend(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Attention output before ``o_proj``, ``[B, T, heads * head_dim]`` (its input)."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    inv_freq = rope_inv_freq(self.config)  # a trace-time constant
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if kv_cache.has_cache(self):  # decoding (init_cache): attend over the keys and values of earlier calls too
      return kv_cache.cached_attention(self, q, k, v, positions).reshape(b, t, self.num_heads * self.head_dim)
    return causal_attention(q, k, v).reshape(b, t, self.num_heads * self.head_dim)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return self.o_proj(self.attend(x, positions))


class LlamaMLP(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    kw = dict(bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw)

  def hidden(self, x: jax.Array) -> jax.Array:
    """The gated activation that ``down_proj`` reads."""
    return jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.hidden(x))


class LlamaDecoderLayer(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = LlamaAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return self.with_linear_inputs(x, positions)[0]

  def with_linear_inputs(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The layer's output and the input of each of its linear maps.

    The inputs are keyed ``attn_in`` (read by q/k/v), ``attn_out`` (o_proj),
    ``mlp_in`` (gate/up) and ``mlp_hidden`` (down_proj); layer-wise pruning
    (Wanda, SparseGPT) takes its statistics from them.
    """
    h_attn = self.input_layernorm(x)
    a = self.self_attn.attend(h_attn, positions)
    x = x + self.self_attn.o_proj(a)
    h_mlp = self.post_attention_layernorm(x)
    m = self.mlp.hidden(h_mlp)
    x = x + self.mlp.down_proj(m)
    return x, {"attn_in": h_attn, "attn_out": a, "mlp_in": h_mlp, "mlp_hidden": m}


class Llama(nnx.Module):
  """LLaMA decoder with a language-model head; attribute names mirror HF's.

  Args:
    config: the model's shape.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay in ``param_dtype``.
      None (the default) computes in the dtype of the parameters themselves, so
      a training step that casts fp32 master weights to bf16 computes in bf16.
    param_dtype: storage dtype of the parameters (the fp32 master copy).
    remat: rematerialise each decoder layer in the backward pass: False, True
      or ``"full"`` (keep only each layer's input), ``"dots"`` (also keep
      every matmul output) or ``"dots_no_batch"`` (keep matmul outputs without
      batch dimensions, i.e. the projections' outputs, not attention scores).
      See :data:`REMAT_POLICIES`.
    scan_layers: run the decoder layers as one :func:`jax.lax.scan` over their
      stacked weights instead of unrolling them. The parameters keep their
      per-layer layout (``layers/0``, ``layers/1``, ...: conversion, export,
      per-matrix pruning and sharding rules are unchanged); the weights are
      stacked inside the step, in the compute dtype. XLA then compiles one
      layer instead of all of them (compile time independent of depth).
    rngs: initialisation randomness.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from elsa_jax.models.llama import Llama, LlamaConfig
    >>> model = Llama(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
    ...                           num_hidden_layers=2, num_attention_heads=4), rngs=nnx.Rngs(0))
    >>> logits = model(jnp.zeros((1, 8), jnp.int32))
    >>> logits.shape, logits.dtype
    ((1, 8, 512), dtype('float32'))
  """

  def __init__(self, config: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, remat: bool | str = False,
               scan_layers: bool = False, rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    remat_policy(remat)  # validates
    self.config = config
    self.dtype = dtype
    self.remat = remat
    self.scan_layers = scan_layers
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=_partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs,
    )
    self.layers = nnx.List([
        LlamaDecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)
    ])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if config.tie_word_embeddings else _linear(
        config.hidden_size, config.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings ``[B, T, hidden]`` in the compute dtype."""
    table = self.embed_tokens.embedding[...]
    return jnp.take(table, input_ids, axis=0).astype(self.dtype or table.dtype)

  def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """The final normalised hidden states ``[B, T, hidden]``."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = self.embed(input_ids)
    if getattr(self, "scan_layers", False) and len(self.layers) > 1:
      return self.norm(self._scanned_layers(x, positions))
    for layer in self.layers:
      if self.remat:
        x = nnx.remat(lambda mdl, h, p: mdl(h, p), policy=remat_policy(self.remat))(layer, x, positions)
      else:
        x = layer(x, positions)
    return self.norm(x)

  def _scanned_layers(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """The decoder layers as one ``lax.scan`` over their stacked weights."""
    graphdef, _ = nnx.split(self.layers[0])
    states = [nnx.split(layer)[1] for layer in self.layers]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def body(h, state):
      return nnx.merge(graphdef, state)(h, positions), None

    if self.remat:
      body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=False)
    x, _ = jax.lax.scan(body, x, stacked)
    return x

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Next-token logits ``[B, T, vocab]`` in float32."""
    h = self.hidden_states(input_ids, positions)
    if self.lm_head is None:
      logits = h @ self.embed_tokens.embedding[...].astype(h.dtype).T
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)


def _with_lazy_sharding(fn):
  def wrapped(*args, **kwargs):
    with nnx.use_eager_sharding(False):
      return fn(*args, **kwargs)
  return wrapped


Llama.__init__ = _with_lazy_sharding(Llama.__init__)


def apply(graphdef: Any, params: dict, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
  """Logits of the model ``merge(graphdef, params)``: a pure function for jit/grad."""
  return merge(graphdef, params)(input_ids, positions)


def init_cache(model: Llama, *, batch: int, length: int) -> None:
  """Gives every attention layer of ``model`` an empty KV cache of ``length`` slots (in place; see
  :mod:`elsa_jax.models.kv_cache`), in the model's compute dtype."""
  c = model.config
  dtype = model.dtype or model.embed_tokens.embedding[...].dtype
  for layer in model.layers:
    kv_cache.attach(layer.self_attn, kv_cache.init(batch=batch, length=length, num_kv_heads=c.num_key_value_heads,
                                                   head_dim=c.head_dim, dtype=dtype))


def logical_axes(model: Llama) -> dict:
  """Logical axis names of every parameter, as a pure dict shaped like :func:`split`'s params."""
  specs = nnx.get_partition_spec(nnx.state(model))
  return jax.tree.map(lambda p: tuple(p), nnx.to_pure_dict(specs),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def logical_axes_of(graphdef: Any, params: dict) -> dict:
  return logical_axes(merge(graphdef, params))


def param_count(params: Any) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
