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
"""Log-likelihoods of token continuations, batched and bucketed, on a device mesh.

A request is ``(context, continuation)`` token ids. As in lm-eval's ``hf``
backend, the model reads ``(context + continuation)[-(max_length + 1):][:-1]``
and the continuation's tokens are scored at the last ``len(continuation)``
positions: the result is the summed log-probability of the continuation and
whether every one of its tokens is the argmax (``is_greedy``).

Requests are sorted by length (longest first), cut into batches of a fixed
number of rows, and each batch is right-padded to a power-of-two length
(:func:`elsa_jax.models.generate.bucket`), so the jitted scorer compiles once
per bucket. Only ``[B]`` sums and flags leave the devices, never the logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from elsa_jax import models
from elsa_jax.models.generate import bucket
from elsa_jax.run import sharding as sharding_lib

TokenRequest = tuple[Sequence[int], Sequence[int]]


class Batch(NamedTuple):
  """One padded batch: ``ids``, next-token ``targets`` and the continuation ``mask``, all ``[B, L]``."""

  ids: np.ndarray
  targets: np.ndarray
  mask: np.ndarray


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
  """``(input ids, continuation length)`` of one request, left-truncated to ``max_length`` as lm-eval does.

  Raises:
    ValueError: an empty context or continuation, or a continuation longer than ``max_length``.
  """
  if not context or not continuation:
    raise ValueError("a loglikelihood request needs a non-empty context and continuation "
                     f"(got {len(context)} and {len(continuation)} tokens).")
  if len(continuation) > max_length:
    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={max_length}.")
  whole = (list(context) + list(continuation))[-(max_length + 1):]
  return whole, len(continuation)


def make_batch(rows: Sequence[tuple[list[int], int]], *, batch_size: int, length: int, pad_id: int = 0) -> Batch:
  """Pads ``(whole, continuation length)`` rows to ``[batch_size, length]`` (the extra rows score nothing)."""
  ids = np.full((batch_size, length), pad_id, np.int32)
  targets = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size, length), bool)
  for r, (whole, n_cont) in enumerate(rows):
    n_in = len(whole) - 1
    ids[r, :n_in] = whole[:-1]
    targets[r, :n_in] = whole[1:]
    mask[r, n_in - n_cont:n_in] = True
  return Batch(ids, targets, mask)


def continuation_scores(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed log-probability of the masked ``targets`` per row ``[B]`` (float32), and whether all are argmax."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return jnp.where(mask, token_logp, 0.0).sum(-1), jnp.where(mask, greedy, True).all(-1)


class Scorer:
  """Scores token requests with one model, its params placed on a mesh.

  Args:
    graphdef, params: The model (:func:`elsa_jax.models.split`); params already in the compute dtype.
    mesh: The device mesh; params are sharded by their logical axes (tensor parallel over ``model``,
      FSDP over ``data``) and every batch's rows over ``data``. None: one device, no placement.
    batch_size: Rows per batch (rounded up to a multiple of the ``data`` axis).
    max_length: The longest input the model reads.
  """

  def __init__(self, graphdef: Any, params: Any, *, mesh: Mesh | None, batch_size: int, max_length: int):
    self.graphdef = graphdef
    self.mesh = mesh
    data = 1 if mesh is None else mesh.shape[sharding_lib.DATA]
    self.batch_size = -(-max(1, batch_size) // data) * data
    self.max_length = max_length
    if mesh is not None:
      axes = models.logical_axes_of(graphdef, params)
      params = jax.device_put(params, sharding_lib.param_shardings(axes, params, mesh))
    self.params = params
    out = None if mesh is None else sharding_lib.replicated(mesh)
    apply = models.architecture_of(graphdef).apply

    @functools.partial(jax.jit, out_shardings=out)
    def score(params, ids, targets, mask):
      return continuation_scores(apply(graphdef, params, ids), targets, mask)

    self._score = score

  def place(self, x: np.ndarray) -> Any:
    """A host batch ``[B, ...]`` on the devices, its rows split over the mesh's ``data`` axis."""
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(self.mesh, P(sharding_lib.DATA)))

  def score_batch(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    logp, greedy = self._score(self.params, *(self.place(a) for a in batch))
    return np.asarray(logp, np.float64), np.asarray(greedy)

  def loglikelihoods(self, requests: Sequence[TokenRequest], *, pad_id: int = 0,
                     progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """``(summed log-probability, is_greedy)`` of every request, in the order given.

    Args:
      requests: ``(context ids, continuation ids)`` pairs.
      pad_id: Token id of the right padding (its logits are never read).
      progress: Called with the number of requests done after each batch.
    """
    rows = [model_input(c, k, self.max_length) for c, k in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = bucket(max(len(rows[i][0]) - 1 for i in chunk))
      batch = make_batch([rows[i] for i in chunk], batch_size=self.batch_size, length=length, pad_id=pad_id)
      logp, greedy = self.score_batch(batch)
      for r, i in enumerate(chunk):
        out[i] = (float(logp[r]), bool(greedy[r]))
      if progress is not None:
        progress(len(chunk))
    return out
