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
"""A Flax NNX LLaMA that reproduces Hugging Face's LlamaForCausalLM, and the blocks other families share.

Layout follows HF so that conversion is a transpose and nothing else: rotate-half
RoPE on unscaled query/key projections, the softmax scale applied inside
attention, RMSNorm in float32, SwiGLU MLP, tied or untied ``lm_head``. Linear
kernels are ``[in, out]`` (HF's ``weight.T``). Every parameter carries logical
axis names (:func:`logical_axes`) for sharding.

The blocks (:class:`RMSNorm`, :class:`LlamaAttention`, :class:`LlamaMLP`,
:class:`LlamaDecoderLayer`) and the model read their options from the config's
block options (:class:`~elsa_jax.models.llama.config.LlamaConfig`): q/k/v and
output biases, per-head q/k norms, a sliding window and RoPE base per layer
type, the softmax scale, soft-capping, the activation, the norm's ``1 + w``
form and the embedding scale. Qwen2, Qwen3 and Mistral are this model with
their configs; Gemma adds its own decoder layer (:mod:`elsa_jax.models.gemma`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.models import kv_cache
from elsa_jax.models.base import REMAT_POLICIES, merge, remat_policy, split  # noqa: F401  (re-exported)
from elsa_jax.models.llama.attention import (  # noqa: F401  (re-exported)
    ATTENTION_CHUNK,
    apply_rope,
    causal_attention,
    rope_inv_freq,
    rotate_half,
    softcap,
)
from elsa_jax.models.llama.config import FULL, LlamaConfig

#: HF's ``hidden_act`` names -> the MLP's gate activation (``gelu_pytorch_tanh`` is the tanh GELU).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _partitioned(init, names):
  return nnx.with_partitioning(init, names)


def _linear(din, dout, names, *, bias, dtype, param_dtype, rngs):
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(nnx.initializers.normal(0.02), names),
      bias_init=_partitioned(nnx.initializers.zeros_init(), names[-1:]), rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """HF's LlamaRMSNorm: normalise in float32, cast back, then scale by ``w``.

  With ``unit_offset`` it is Gemma's: scale by ``1 + w`` in float32, then cast
  (``w`` starts at zero).
  """

  def __init__(self, dim: int, eps: float, *, unit_offset: bool = False, param_dtype=jnp.float32):
    self.eps = eps
    self.unit_offset = unit_offset
    init = jnp.zeros if unit_offset else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:
      return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def norm(config: LlamaConfig, dim: int, param_dtype) -> RMSNorm:
  """The family's RMSNorm over ``dim`` features."""
  return RMSNorm(dim, config.rms_norm_eps, unit_offset=config.norm_unit_offset, param_dtype=param_dtype)


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with RoPE; the config's block options choose biases, q/k norms,
  the scale and soft-cap, and (by ``layer_type``) the sliding window and RoPE base."""

  def __init__(self, config: LlamaConfig, *, layer_type: str = FULL, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    qkv = dict(bias=c.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim, ("embed", "q_heads"), **qkv)
    self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), **qkv)
    self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), **qkv)
    self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size, ("q_heads", "embed"),
                          **dict(qkv, bias=c.o_bias))
    self.q_norm = norm(c, c.head_dim, param_dtype) if c.qk_norm else None
    self.k_norm = norm(c, c.head_dim, param_dtype) if c.qk_norm else None
    self.layer_type = layer_type
    self.config = config

  def attend(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Attention output before ``o_proj``, ``[B, T, heads * head_dim]`` (its input)."""
    b, t, _ = x.shape
    c = self.config
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inv_freq(c, self.layer_type)  # a trace-time constant
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    options = dict(scale=c.attention_scale, sliding_window=c.attention_window(self.layer_type),
                   logit_softcap=c.attention_softcap)
    if kv_cache.has_cache(self):  # decoding (init_cache): attend over the keys and values of earlier calls too
      out = kv_cache.cached_attention(self, q, k, v, positions, **options)
    else:
      out = causal_attention(q, k, v, **options)
    return out.reshape(b, t, self.num_heads * self.head_dim)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return self.o_proj(self.attend(x, positions))


class LlamaMLP(nnx.Module):
  """The gated MLP: ``down(act(gate(x)) * up(x))``, ``act`` the config's (SwiGLU, or Gemma's GeGLU)."""

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    kw = dict(bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden_act = c.hidden_act
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw)

  def hidden(self, x: jax.Array) -> jax.Array:
    """The gated activation that ``down_proj`` reads."""
    return ACTIVATIONS[self.hidden_act](self.gate_proj(x)) * self.up_proj(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.hidden(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, config: LlamaConfig, *, layer_type: str = FULL, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = norm(config, config.hidden_size, param_dtype)
    self.self_attn = LlamaAttention(config, layer_type=layer_type, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = norm(config, config.hidden_size, param_dtype)
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


def layer_period(graphdefs: list) -> int:
  """The smallest ``p`` such that layer ``i`` has the graphdef of layer ``i % p`` (alternating
  local/global layers repeat with a period; identical layers have period 1)."""
  n = len(graphdefs)
  return next(p for p in range(1, n + 1) if all(graphdefs[i] == graphdefs[i % p] for i in range(n)))


class Llama(nnx.Module):
  """LLaMA decoder with a language-model head; attribute names mirror HF's.

  Also the model of every family that shares its blocks: a subclass with the
  family's config (Qwen2, Qwen3, Mistral) and, for another block layout, its
  own :attr:`decoder_layer` (Gemma).

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
      layer (one period of alternating layer types) instead of all of them
      (compile time independent of depth).
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

  #: The class of the decoder layers (built with each layer's ``layer_type``); a family with another
  #: block layout (Gemma) sets its own.
  decoder_layer = LlamaDecoderLayer

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
        self.decoder_layer(config, layer_type=config.layer_type(i), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for i in range(config.num_hidden_layers)
    ])
    self.norm = norm(config, config.hidden_size, param_dtype)
    self.lm_head = None if config.tie_word_embeddings else _linear(
        config.hidden_size, config.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings ``[B, T, hidden]`` in the compute dtype (times the config's ``embed_scale``)."""
    table = self.embed_tokens.embedding[...]
    return embed_tokens(table, input_ids, self.dtype or table.dtype, self.config.embed_scale)

  def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None, *, blocks: bool = False
                    ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The final normalised hidden states ``[B, T, hidden]``.

    With ``blocks``, ``(hidden states, outputs)``: ``outputs [layers, B, T, hidden]`` is every decoder
    block's output (the residual stream after the block, before the final norm), e.g. for SquareHead
    distillation (:func:`elsa_jax.run.losses.squarehead_loss`).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = self.embed(input_ids)
    outputs = [] if blocks else None
    if getattr(self, "scan_layers", False) and len(self.layers) > 1:
      x = self._scanned_layers(x, positions, outputs)
    else:
      x = self._unrolled_layers(list(self.layers), x, positions, outputs)
    return (self.norm(x), jnp.concatenate(outputs)) if blocks else self.norm(x)

  def _unrolled_layers(self, layers: list, x: jax.Array, positions: jax.Array, outputs: list | None = None
                       ) -> jax.Array:
    """``layers`` in turn on ``x``; each one's output ``[1, B, T, hidden]`` appended to ``outputs`` if given."""
    for layer in layers:
      if self.remat:
        x = nnx.remat(lambda mdl, h, p: mdl(h, p), policy=remat_policy(self.remat))(layer, x, positions)
      else:
        x = layer(x, positions)
      if outputs is not None:
        outputs.append(x[None])
    return x

  def _scanned_layers(self, x: jax.Array, positions: jax.Array, outputs: list | None = None) -> jax.Array:
    """The decoder layers as one ``lax.scan`` over their stacked weights.

    Layers that differ (alternating local and global attention) are scanned in
    groups of one period of the pattern (:func:`layer_period`); the layers past
    the last whole group run unrolled after the scan. ``outputs``: as
    :meth:`_unrolled_layers`'s (the scan's outputs, in layer order).
    """
    splits = [nnx.split(layer) for layer in self.layers]
    graphdefs = [graphdef for graphdef, _ in splits]
    period = layer_period(graphdefs)
    groups = len(splits) // period
    if groups < 2:
      return self._unrolled_layers(list(self.layers), x, positions, outputs)
    scanned = groups * period
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in splits[j:scanned:period]))
               for j in range(period)]

    def step(graphdef):
      fn = lambda h, state: nnx.merge(graphdef, state)(h, positions)
      return jax.checkpoint(fn, policy=remat_policy(self.remat), prevent_cse=False) if self.remat else fn

    steps = [step(graphdef) for graphdef in graphdefs[:period]]

    def body(h, group):
      hs = []
      for fn, state in zip(steps, group):
        h = fn(h, state)
        hs.append(h)
      return h, None if outputs is None else jnp.stack(hs)

    x, ys = jax.lax.scan(body, x, stacked)
    if outputs is not None:
      outputs.append(ys.reshape(-1, *x.shape))  # [groups, period, ...] -> [groups * period, ...]
    return self._unrolled_layers(list(self.layers)[scanned:], x, positions, outputs)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Next-token logits ``[B, T, vocab]`` in float32 (soft-capped by the config's ``logit_softcap``)."""
    return self.logits(self.hidden_states(input_ids, positions))

  def logits(self, h: jax.Array) -> jax.Array:
    """The LM head on final hidden states ``h``: logits in float32, soft-capped by the config's ``logit_softcap``."""
    if self.lm_head is None:
      logits = h @ self.embed_tokens.embedding[...].astype(h.dtype).T
    else:
      logits = self.lm_head(h)
    return softcap(logits.astype(jnp.float32), self.config.logit_softcap)


def embed_tokens(table: jax.Array, input_ids: jax.Array, dtype, scale: float | None = None) -> jax.Array:
  """Rows ``input_ids`` of the embedding ``table`` in ``dtype``, times ``scale`` (in ``dtype``) if given."""
  x = jnp.take(table, input_ids, axis=0).astype(dtype)
  return x if scale is None else x * jnp.asarray(scale, dtype)


def _with_lazy_sharding(fn):
  def wrapped(*args, **kwargs):
    with nnx.use_eager_sharding(False):
      return fn(*args, **kwargs)
  return wrapped


Llama.__init__ = _with_lazy_sharding(Llama.__init__)


def apply(graphdef: Any, params: dict, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
  """Logits of the model ``merge(graphdef, params)``: a pure function for jit/grad."""
  return merge(graphdef, params)(input_ids, positions)


def apply_with_blocks(graphdef: Any, params: dict, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(logits, block outputs [layers, B, T, hidden])`` of ``merge(graphdef, params)`` (see
  :meth:`Llama.hidden_states`): a pure function for jit/grad."""
  model = merge(graphdef, params)
  h, blocks = model.hidden_states(input_ids, blocks=True)
  return model.logits(h), blocks


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
