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
"""A key/value cache for autoregressive decoding, shared by every architecture.

The cache of one attention module is a :class:`KVCache` NamedTuple of arrays,
held in an ``nnx.Cache`` variable named ``kv_cache`` on the module (the way
``flax.nnx.MultiHeadAttention`` keeps its decode cache). A module without it
runs its ordinary causal attention; a model gets one with its architecture's
``init_cache`` (:class:`elsa_jax.models.base.Architecture`), and
:mod:`elsa_jax.models.generate` splits it off as a separate state.

Every call writes its ``T`` new keys and values at slots
``index .. index + T - 1`` (the same slots for every row) together with their
token positions, and attends over all slots written so far. A slot whose
position is negative (not written yet, or left padding) is never attended to,
and a query at position ``p`` sees the keys at positions ``0 .. p``: a batch of
left-padded prompts of different lengths decodes in lockstep, each row with its
own positions.

Example:
  >>> import jax.numpy as jnp
  >>> from elsa_jax.models import kv_cache
  >>> cache = kv_cache.init(batch=1, length=4, num_kv_heads=1, head_dim=2, dtype=jnp.float32)
  >>> k = v = jnp.ones((1, 3, 1, 2))
  >>> cache = kv_cache.update(cache, k, v, jnp.array([[-1, 0, 1]]))   # one pad slot, then positions 0, 1
  >>> cache.positions.tolist(), int(cache.index)
  ([[-1, 0, 1, -1]], 3)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

#: The attribute of an attention module that holds its cache.
ATTRIBUTE = "kv_cache"


class KVCache(NamedTuple):
  """The keys and values of one attention module.

  Attributes:
    keys: ``[B, S, K, H]`` keys (after RoPE), ``S`` slots.
    values: ``[B, S, K, H]`` values.
    positions: ``[B, S]`` int32 token position of every slot, -1 where nothing is to be attended to.
    index: ``[]`` int32, the next slot to write.
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  index: jax.Array


def init(*, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
  """An empty cache of ``length`` slots per row."""
  shape = (batch, length, num_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, length), -1, jnp.int32),
                 jnp.zeros((), jnp.int32))


def update(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
  """Writes ``k, v [B, T, K, H]`` and their ``positions [B, T]`` (negative: padding) at ``cache.index``."""
  start = (0, cache.index, 0, 0)
  return KVCache(
      jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start),
      jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start),
      jax.lax.dynamic_update_slice(cache.positions, jnp.where(positions < 0, -1, positions).astype(jnp.int32),
                                   start[:2]),
      cache.index + k.shape[1],
  )


def attend(q: jax.Array, positions: jax.Array, cache: KVCache, *, scale: float | None = None,
           sliding_window: int | None = None, logit_softcap: float | None = None) -> jax.Array:
  """Grouped-query attention of ``q [B, T, N, H]`` at ``positions [B, T]`` over the cache: ``[B, T, N, H]``.

  A query at position ``p`` sees the slots at positions ``0 .. p`` of its row
  (only those above ``p - sliding_window`` with a window). ``scale`` (None:
  ``1 / sqrt(H)``) and ``logit_softcap`` are the model's, as in
  :func:`elsa_jax.models.llama.attention.causal_attention`.
  """
  key_pos = cache.positions[:, None, None, :]  # [B, 1, 1, S]
  query_pos = positions[:, None, :, None]  # [B, 1, T, 1]
  mask = (key_pos >= 0) & (key_pos <= query_pos)  # [B, 1, T, S]
  if sliding_window is not None:
    mask &= key_pos > query_pos - sliding_window
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  keys, values = cache.keys.astype(q.dtype), cache.values.astype(q.dtype)
  if logit_softcap is None:
    return jax.nn.dot_product_attention(q, keys, values, mask=mask, scale=scale)
  groups = q.shape[2] // keys.shape[2]
  keys, values = jnp.repeat(keys, groups, axis=2), jnp.repeat(values, groups, axis=2)
  s = jnp.einsum("bqnh,bknh->bnqk", q, keys, preferred_element_type=jnp.float32) * scale
  s = logit_softcap * jnp.tanh(s / logit_softcap)  # Gemma 2's soft-capping, as in causal_attention
  s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  return jnp.einsum("bnqk,bknh->bqnh", p, values)


def attach(module: nnx.Module, cache: KVCache) -> None:
  """Gives an attention module a cache (in place); it then attends through it (:func:`cached_attention`)."""
  setattr(module, ATTRIBUTE, nnx.Cache(cache))


def has_cache(module: nnx.Module) -> bool:
  """Whether ``module`` decodes through a cache."""
  return getattr(module, ATTRIBUTE, None) is not None


def cached_attention(module: nnx.Module, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     **options) -> jax.Array:
  """Writes ``k, v`` into the module's cache and attends ``q`` over everything it holds (``options``:
  :func:`attend`'s)."""
  variable = getattr(module, ATTRIBUTE)
  cache = update(variable.get_value(), k, v, positions)
  variable.set_value(cache)
  return attend(q, positions, cache, **options)
