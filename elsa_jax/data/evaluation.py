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
"""Perplexity with the protocol of the LLM-pruning literature.

The evaluation documents are joined with ``"\\n\\n"`` and tokenised once
(:func:`eval_tokens`); the ids are cut into non-overlapping windows of
``seqlen`` tokens, the tail that does not fill a window being dropped
(:func:`eval_windows`). Every window is scored on its own, from a fresh
context: position ``t`` (``1 <= t < seqlen``) is predicted from tokens
``0 .. t-1`` of the same window, exactly as HF's perplexity scripts do with
``labels = input_ids`` (the first token of a window is never predicted). Then

    ppl = exp( sum over windows and t of -log p(x_t | x_<t) / (windows * (seqlen - 1)) ),

i.e. the exponential of the mean NLL over all predicted tokens. As every window
predicts the same number of tokens, this equals the exponential of the mean of
the per-window mean losses, which is how those scripts average.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elsa_jax.data import documents as data_lib

LogitsFn = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """A perplexity and what it was measured on.

  Attributes:
    perplexity: ``exp(mean_nll)``.
    mean_nll: Mean next-token negative log-likelihood (nats) over the
      predicted tokens.
    windows: Number of ``seqlen``-token windows evaluated.
    seqlen: Tokens per window.
    tokens: Tokens in the evaluated windows (``windows * seqlen``).
    predicted_tokens: Tokens whose NLL is averaged (``windows * (seqlen - 1)``).
  """

  perplexity: float
  mean_nll: float
  windows: int
  seqlen: int
  tokens: int
  predicted_tokens: int

  def __float__(self) -> float:
    return self.perplexity


def eval_tokens(tokenizer: Any, docs: Sequence[str], *, separator: str = "\n\n",
                cache_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
  """Tokenises the evaluation text the field's way: ``separator.join(docs)``, once.

  The tokenizer's default special tokens are added, as in the published
  evaluation scripts (a single BOS at the very start for LLaMA tokenizers;
  nothing for SmolLM2's). The ids are cached on disk like
  :func:`elsa_jax.data.documents.tokenize_documents`.

  Args:
    tokenizer: A ``transformers`` tokenizer.
    docs: The evaluation documents.
    separator: What joins them: ``"\\n\\n"`` (WikiText-2 and the default), ``" "`` (C4); see
      :mod:`elsa_jax.data.perplexity_sets`.
    cache_dir: Folder of the token cache; None for ``<cache>/tokens``.

  Returns:
    The int32 token ids of the whole evaluation text.
  """
  (ids,) = data_lib.cached_encode(tokenizer, [separator.join(docs)], kind="evaluation", add_special_tokens=True,
                                  append_id=None, cache_dir=cache_dir)
  return ids


def eval_windows(tokens: np.ndarray, seqlen: int, *, max_windows: int | None = None,
                 max_tokens: int | None = None) -> np.ndarray:
  """Cuts ``tokens`` into non-overlapping ``seqlen`` windows, dropping the tail.

  Args:
    tokens: 1-D token ids.
    seqlen: Tokens per window (at least 2: one context and one target).
    max_windows: Keep at most this many windows (the first ones).
    max_tokens: Keep at most ``max_tokens // seqlen`` windows.

  Returns:
    int32 ``[windows, seqlen]``.

  Raises:
    ValueError: ``seqlen < 2`` or fewer tokens than one window.
  """
  tokens = np.asarray(tokens).reshape(-1)
  if seqlen < 2:
    raise ValueError(f"seqlen must be at least 2 to predict a token, got {seqlen}.")
  n = len(tokens) // seqlen
  if max_windows is not None:
    n = min(n, max_windows)
  if max_tokens is not None:
    n = min(n, max_tokens // seqlen)
  if n < 1:
    raise ValueError(
        f"no evaluation window: the text has {len(tokens)} tokens, a window needs {seqlen} "
        f"(max_windows={max_windows}, max_tokens={max_tokens})."
    )
  return tokens[: n * seqlen].reshape(n, seqlen).astype(np.int32)


@jax.jit
def window_nll(logits: jax.Array, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed next-token NLL of each window, zero where ``mask`` is False.

  Args:
    logits: ``[B, T, V]`` logits of ``input_ids`` (any float dtype).
    input_ids: ``[B, T]`` token ids.
    mask: ``[B]`` bools; False rows (padding) contribute 0.

  Returns:
    float32 ``[B]``: ``sum_{t=1}^{T-1} -log softmax(logits[:, t-1])[input_ids[:, t]]``,
    the log-softmax taken in float32.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), input_ids[:, 1:]
  )
  return jnp.where(mask, nll.sum(axis=-1), 0.0)


def _padded_batches(windows: np.ndarray, batch_size: int):
  """Yields ``(ids, mask)`` batches of exactly ``batch_size`` rows (zero-padded)."""
  for i in range(0, len(windows), batch_size):
    ids = windows[i:i + batch_size]
    n = len(ids)
    if n < batch_size:
      ids = np.concatenate([ids, np.zeros((batch_size - n, ids.shape[1]), ids.dtype)])
    yield ids, np.arange(batch_size) < n


def _host_sum(values: jax.Array) -> float:
  return float(np.sum(np.asarray(values, np.float64)))


def perplexity_with_stats(logits_fn: LogitsFn, tokens: np.ndarray, *, seqlen: int, batch_size: int = 8,
                          max_windows: int | None = None, max_tokens: int | None = None,
                          progress: bool = False) -> PerplexityResult:
  """Perplexity of a model on a token stream, with the windows/tokens counted.

  Every batch has exactly ``batch_size`` rows: the last one is padded with
  zero windows that are masked out, so ``logits_fn`` and the NLL reduction see
  one shape and compile once. Per-window NLL sums come back as float32 and are
  accumulated on the host in float64.

  Args:
    logits_fn: ``input_ids [B, T] int32 -> logits [B, T, V]``. It is called
      as is (jit it yourself, passing the parameters as arguments rather than
      closing over them, so they are not baked into the program as constants).
    tokens: 1-D token ids of the whole evaluation text (:func:`eval_tokens`).
    seqlen: Tokens per window.
    batch_size: Windows per call of ``logits_fn``.
    max_windows: Evaluate at most this many windows (the first ones).
    max_tokens: Evaluate at most ``max_tokens // seqlen`` windows.
    progress: Show a progress bar (tqdm) over the batches.

  Returns:
    The perplexity with its mean NLL and the number of windows and tokens.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  windows = eval_windows(tokens, seqlen, max_windows=max_windows, max_tokens=max_tokens)
  batches = _padded_batches(windows, batch_size)
  if progress:
    from tqdm.auto import tqdm

    batches = tqdm(batches, total=-(-len(windows) // batch_size), unit="batch", desc="perplexity")
  total, pending = 0.0, None
  for ids, mask in batches:
    logits = logits_fn(ids)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
      raise ValueError(f"logits_fn returned shape {logits.shape} for input_ids of shape {ids.shape}; "
                       f"expected [{ids.shape[0]}, {ids.shape[1]}, vocab].")
    # Read back the previous batch only now: one batch computes while the next is dispatched, and at
    # most two batches of logits are alive.
    if pending is not None:
      total += _host_sum(pending)
    pending = window_nll(logits, ids, mask)
  total += _host_sum(pending)
  n = len(windows)
  predicted = n * (seqlen - 1)
  mean_nll = total / predicted
  ppl = math.exp(mean_nll) if mean_nll < 700.0 else math.inf
  return PerplexityResult(perplexity=ppl, mean_nll=mean_nll, windows=n, seqlen=seqlen, tokens=n * seqlen,
                          predicted_tokens=predicted)


def perplexity(logits_fn: LogitsFn, tokens: np.ndarray, *, seqlen: int, batch_size: int = 8,
               max_windows: int | None = None, max_tokens: int | None = None, progress: bool = False) -> float:
  """Perplexity of a model on a token stream (see :func:`perplexity_with_stats`)."""
  return perplexity_with_stats(logits_fn, tokens, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows,
                               max_tokens=max_tokens, progress=progress).perplexity
