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
"""Rotary embeddings and causal attention, shared by every architecture's blocks (pure functions).

:func:`causal_attention` covers what the supported families need: grouped
query heads, any softmax scale (Gemma's ``query_pre_attn_scalar``), a
sliding window (Mistral, Qwen2 and Gemma's local layers: a query at ``i``
sees keys ``i - window < j <= i``, HF's convention) and tanh soft-capping
of the scores (Gemma 2). :func:`rope_inv_freq` gives the frequencies of one
layer type (Gemma 3's local layers have their own base).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

#: Attention falls back to query chunks of this many tokens above it, so that
#: the score matrix held at once is [batch, heads, chunk, seqlen].
ATTENTION_CHUNK = 1024


def rope_inv_freq(config, layer_type: str = "full_attention") -> np.ndarray:
  """RoPE inverse frequencies of ``config``'s layers of ``layer_type``, with HF's 'linear' and
  'llama3' scaling (float32). ``config.rope(layer_type)`` gives ``(theta, scaling)``."""
  theta, scaling = config.rope(layer_type)
  d = config.head_dim
  inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
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


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(x / cap)`` (Gemma 2's soft-capping of scores and logits); ``x`` when ``cap`` is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     sliding_window: int | None = None, logit_softcap: float | None = None,
                     chunk: int = ATTENTION_CHUNK) -> jax.Array:
  """Causal grouped-query attention, ``q [B,T,N,H]``, ``k, v [B,T,K,H]`` -> ``[B,T,N,H]``.

  Args:
    q, k, v: queries, keys and values (RoPE applied).
    scale: softmax scale of the scores (None: ``1 / sqrt(H)``).
    sliding_window: a query at position ``i`` sees only keys ``j > i - sliding_window``
      (None: all keys up to ``i``).
    logit_softcap: soft-cap the scaled scores at this value before masking (None: off).
    chunk: query chunk of the explicit path.

  Without soft-capping, on GPU in 16-bit it is cuDNN's flash attention through
  ``jax.nn.dot_product_attention`` (which takes the window too). Elsewhere,
  sequences longer than ``chunk`` run as rematerialised query chunks so that no
  more than ``[B, N, chunk, T]`` scores exist at once; soft-capped attention
  always takes this explicit path (one chunk for short sequences).
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  t = q.shape[1]
  on_gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
  fits = t <= chunk or t % chunk
  if logit_softcap is None and (on_gpu or fits):
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                        implementation=None if on_gpu else "xla")
  chunk = t if fits else chunk
  b, _, n, h = q.shape
  groups = n // k.shape[2]
  kf = jnp.repeat(k, groups, axis=2)
  vf = jnp.repeat(v, groups, axis=2)
  key_pos = jnp.arange(t)

  @jax.checkpoint
  def one_chunk(args):
    qc, start = args
    s = jnp.einsum("bqnh,bknh->bnqk", qc, kf, preferred_element_type=jnp.float32) * scale
    s = softcap(s, logit_softcap)
    query_pos = (start + jnp.arange(chunk))[:, None]
    mask = query_pos >= key_pos[None, :]
    if sliding_window is not None:
      mask &= query_pos - key_pos[None, :] < sliding_window
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", p, vf)

  qs = q.reshape(b, t // chunk, chunk, n, h).swapaxes(0, 1)
  out = jax.lax.map(one_chunk, (qs, jnp.arange(0, t, chunk)))
  return out.swapaxes(0, 1).reshape(b, t, n, h)
