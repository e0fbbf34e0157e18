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
"""Greedy decoding with a KV cache, for a model of any registered architecture.

A batch of prompts is left-padded to a bucketed length ``P`` (pads at position
-1), given a cache of ``P + N`` slots (:mod:`elsa_jax.models.kv_cache`), run
once over the prompts (the prefill), then one token at a time: two compiled
programs per ``(batch, P, N)`` bucket. The decode step is a pure function of
``(params, cache, tokens, positions)`` that returns the next tokens and the
new cache (donated, so it is updated in place).

A row stops at its end-of-sequence token (kept in its output, as
``transformers``' ``generate`` does) or when ``stop(row, tokens)`` says so; the
batch stops when every row has. Architectures without ``init_cache``
recompute the whole (right-padded) sequence at every step instead.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from elsa_jax import models
  >>> from elsa_jax.models import generate
  >>> config = models.llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
  ...                                   num_hidden_layers=1, num_attention_heads=2)
  >>> graphdef, params = models.split(models.llama.Llama(config, rngs=nnx.Rngs(0)))
  >>> out = generate.greedy(graphdef, params, [[5, 6, 7], [8]], max_new_tokens=4)
  >>> [len(row) for row in out]
  [4, 4]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.models import registry
from elsa_jax.models.base import merge

#: ``stop(row, generated_tokens) -> bool``: whether row ``row`` (of the prompts given) is finished.
StopFn = Callable[[int, list[int]], bool]


def bucket(n: int, minimum: int = 16) -> int:
  """The smallest power of two ``>= max(n, minimum)``: the padded lengths that are compiled."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def decoding_model(graphdef: Any, params: dict, *, batch: int, length: int) -> tuple[Any, dict]:
  """``(graphdef, cache)`` of the model with an empty KV cache of ``length`` slots for ``batch`` rows.

  The returned graphdef merges with ``(params, cache)``; layers run unrolled and without remat.

  Raises:
    ValueError: the architecture has no ``init_cache``.
  """
  arch = registry.architecture_of(graphdef)
  if arch.init_cache is None:
    raise ValueError(f"architecture {arch.model_type!r} has no init_cache (KV cache) to decode with.")
  model = merge(graphdef, params)
  model.scan_layers, model.remat = False, False
  arch.init_cache(model, batch=batch, length=length)
  decode_graphdef, cache, _ = nnx.split(model, nnx.Cache, ...)
  return decode_graphdef, nnx.to_pure_dict(cache)


def _merge_trees(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves (params and cache of one model)."""
  out = dict(a)
  for key, value in b.items():
    out[key] = _merge_trees(a[key], value) if key in a and isinstance(value, dict) else value
  return out


def cached_forward(decode_graphdef: Any, params: dict, cache: dict, input_ids: jax.Array, positions: jax.Array
                   ) -> tuple[jax.Array, dict]:
  """Logits ``[B, T, V]`` of ``input_ids`` at ``positions`` (negative: padding) and the updated cache."""
  model = nnx.merge(decode_graphdef, _merge_trees(params, cache))
  logits = model(input_ids, positions)
  return logits, nnx.to_pure_dict(nnx.state(model, nnx.Cache))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def greedy_step(decode_graphdef: Any, params: dict, cache: dict, input_ids: jax.Array, positions: jax.Array
                ) -> tuple[jax.Array, dict]:
  """The argmax next token of every row ``[B]`` after ``input_ids``, and the updated cache."""
  logits, cache = cached_forward(decode_graphdef, params, cache, input_ids, positions)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=0)
def _uncached_step(graphdef: Any, params: dict, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
  logits = registry.architecture_of(graphdef).apply(graphdef, params, input_ids)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return jnp.argmax(last, axis=-1).astype(jnp.int32)


def left_padded(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, positions)`` ``[B, length]``: each prompt at the right end, positions ``0..n-1``, pads at -1."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  positions = np.full((len(prompts), length), -1, np.int32)
  for row, prompt in enumerate(prompts):
    n = len(prompt)
    ids[row, length - n:] = prompt
    positions[row, length - n:] = np.arange(n)
  return ids, positions


class _Rows:
  """The generated tokens of every row and which rows are finished."""

  def __init__(self, n: int, eos_ids: Collection[int], stop: StopFn | None):
    self.tokens: list[list[int]] = [[] for _ in range(n)]
    self.done = [False] * n
    self.eos_ids, self.stop = frozenset(eos_ids), stop

  def append(self, next_tokens: np.ndarray) -> bool:
    """Adds one token to every unfinished row; returns whether all rows are finished."""
    for row, token in enumerate(next_tokens[: len(self.tokens)].tolist()):
      if self.done[row]:
        continue
      self.tokens[row].append(token)
      self.done[row] = token in self.eos_ids or (self.stop is not None and self.stop(row, self.tokens[row]))
    return all(self.done)


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int | None) -> int:
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (give a BOS/EOS token for an empty one).")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}.")
  batch = batch_size or len(prompts)
  if len(prompts) > batch:
    raise ValueError(f"{len(prompts)} prompts do not fit a batch of {batch}; split them.")
  return batch


def greedy(graphdef: Any, params: dict, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           eos_ids: Collection[int] = (), stop: StopFn | None = None, batch_size: int | None = None,
           pad_id: int = 0, place: Callable[[np.ndarray], Any] = jnp.asarray) -> list[list[int]]:
  """Greedy continuations of a batch of prompts (token ids), with a KV cache.

  Args:
    graphdef, params: The model (:func:`elsa_jax.models.split`), params possibly sharded.
    prompts: Token ids of each prompt (at least one token each).
    max_new_tokens: Tokens generated at most per row.
    eos_ids: A row stops after generating one of these tokens (kept).
    stop: ``stop(row, tokens)``: also stop row ``row`` once it returns True (e.g. a stop string).
    batch_size: Rows of the compiled batch (the prompts are padded with copies of the first);
      None: ``len(prompts)``.
    pad_id: Token id of the left padding (never attended to).
    place: Puts a host batch ``[B, T]`` on the devices (e.g. sharded over a mesh's data axis).

  Returns:
    The generated tokens of every prompt, without the prompt.
  """
  batch = _check(prompts, max_new_tokens, batch_size)
  rows = _Rows(len(prompts), eos_ids, stop)
  full = list(prompts) + [prompts[0]] * (batch - len(prompts))
  if registry.architecture_of(graphdef).init_cache is None:
    return _greedy_uncached(graphdef, params, full, rows, max_new_tokens, pad_id, place)
  length = bucket(max(len(p) for p in full))
  ids, positions = left_padded(full, length, pad_id)
  decode_graphdef, cache = decoding_model(graphdef, params, batch=batch, length=length + bucket(max_new_tokens))
  next_tokens, cache = greedy_step(decode_graphdef, params, cache, place(ids), place(positions))
  lengths = np.asarray([len(p) for p in full], np.int32)
  for t in range(max_new_tokens):
    host = np.asarray(next_tokens)
    if rows.append(host) or t == max_new_tokens - 1:
      break
    next_tokens, cache = greedy_step(decode_graphdef, params, cache, place(host[:, None]),
                                     place((lengths + t)[:, None]))
  return rows.tokens


def _greedy_uncached(graphdef, params, full, rows: _Rows, max_new_tokens: int, pad_id: int, place
                     ) -> list[list[int]]:
  """:func:`greedy` for an architecture without a KV cache: the right-padded sequence, recomputed per token."""
  lengths = np.asarray([len(p) for p in full], np.int32)
  ids = np.full((len(full), bucket(int(lengths.max()) + max_new_tokens)), pad_id, np.int32)
  for row, prompt in enumerate(full):
    ids[row, : len(prompt)] = prompt
  for t in range(max_new_tokens):
    host = np.asarray(_uncached_step(graphdef, params, place(ids), jnp.asarray(lengths + t)))
    if rows.append(host) or t == max_new_tokens - 1:
      break
    ids[np.arange(len(full)), lengths + t] = host
  return rows.tokens
