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
"""SparseGPT (Frantar & Alistarh 2023): prune with blocked OBS updates from ``X^T X``.

Conventions as in :mod:`elsa_jax.oneshot.wanda`: kernels ``[in, out]``,
``gram`` = ``X^T X`` of the map's input. :func:`reconstruction_error` is the
layer-wise objective SparseGPT minimises, and the yardstick of every one-shot
method.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from elsa_jax.sparsity import topk as _projection

logger = logging.getLogger(__name__)


def _blocks(columns: int, target: int, multiple: int) -> tuple[int, int, int]:
  """``(width, full blocks, tail width)``: blocks of ``target`` columns (rounded down to a multiple of
  ``multiple``) from the left, and what remains at the right, as SparseGPT's reference walks them."""
  width = min(target, columns)
  width = max(multiple, width - width % multiple)
  return width, columns // width, columns % width


def inverse_hessian_factor(gram: jax.Array, damp: float) -> jax.Array:
  """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U`` = that inverse).

  Dead inputs (zero diagonal) get a unit diagonal first, as in SparseGPT.
  """
  h = gram.astype(jnp.float32)
  diag = jnp.diagonal(h)
  h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
  h = h + (damp * jnp.mean(jnp.diagonal(h))) * jnp.eye(h.shape[0], dtype=h.dtype)
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
  return jnp.linalg.cholesky(h_inv).T


def _prune_block(w, u, i1, width: int, sparsity, n_m):
  """One lazy-update block of SparseGPT: columns ``[i1, i1 + width)`` of ``w [rows, cols]`` pruned
  with OBS updates inside the block, then the block's error applied to every later column."""
  rows, cols = w.shape
  m = n_m[1] if n_m is not None else 1
  w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, width))
  u1 = jax.lax.dynamic_slice(u, (i1, i1), (width, width))
  d = jnp.diagonal(u1)
  if n_m is None:
    # This block's share of the matrix's count: the counts of the columns
    # before its end and before its start differ by it, so the shares add up
    # to the matrix's count exactly.
    before = lambda c: _projection.num_pruned(rows * c, jnp.asarray(sparsity, jnp.float32))
    k = before(i1 + width) - before(i1)
    keep = _projection.topk_mask(jnp.square(w1) / jnp.square(d)[None, :], rows * width - k)
  else:
    keep = jnp.ones((rows, width), bool)

  def group(g, carry):
    w1, err, keep = carry
    j0 = g * m
    if n_m is not None:
      wg = jax.lax.dynamic_slice(w1, (0, j0), (rows, m))
      dg = jax.lax.dynamic_slice(d, (j0,), (m,))
      kg = _projection.nm_mask(jnp.square(wg) / jnp.square(dg)[None, :], n_m[0], m, axis=1)
      keep = jax.lax.dynamic_update_slice(keep, kg, (0, j0))
    for t in range(m):
      j = j0 + t
      wj = jax.lax.dynamic_index_in_dim(w1, j, axis=1, keepdims=False)
      kj = jax.lax.dynamic_index_in_dim(keep, j, axis=1, keepdims=False)
      e = (wj - jnp.where(kj, wj, 0.0)) / d[j]
      # Row j of the upper factor is zero left of j, so earlier columns stay;
      # column j itself becomes the quantised (pruned) value.
      w1 = w1 - e[:, None] * jax.lax.dynamic_index_in_dim(u1, j, axis=0, keepdims=False)[None, :]
      err = jax.lax.dynamic_update_index_in_dim(err, e, j, axis=1)
    return w1, err, keep

  w1, err, keep = jax.lax.fori_loop(0, width // m, group, (w1, jnp.zeros_like(w1), keep))
  w1 = jnp.where(keep, w1, 0.0)  # exact zeros
  later = jax.lax.dynamic_slice(u, (i1, 0), (width, cols))
  w = w - jnp.where(jnp.arange(cols)[None, :] >= i1 + width, err @ later, 0.0)
  return jax.lax.dynamic_update_slice(w, w1, (0, i1))


@functools.partial(jax.jit, static_argnames=("n_m", "blocksize", "damp"))
def sparsegpt_prune(kernel: jax.Array, gram: jax.Array, sparsity=None, *, n_m: tuple[int, int] | None = None,
                    blocksize: int = 128, damp: float = 0.01) -> jax.Array:
  """SparseGPT (Frantar & Alistarh 2023): prune with blocked OBS updates of the kept weights.

  Columns (inputs) are processed left to right in blocks. Inside a block the
  mask is chosen by ``w**2 / [H^-1]_jj**2`` (unstructured: the block's lowest
  fraction over all rows at once; N:M: per row in each group of ``m`` as the
  group is reached), each pruned weight's error is spread over the block's
  remaining columns through the Cholesky factor of ``H^-1``, and the block's
  accumulated error updates every later column at once.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))
    >>> pruned = sparsegpt_prune(w, x.T @ x, 0.5, blocksize=8)
    >>> int((pruned == 0).sum())
    64

  Args:
    kernel: ``[in, out]`` weights.
    gram: ``[in, in]`` ``X^T X`` of the input activations.
    sparsity: fraction of weights zeroed (unstructured; exact over the matrix).
    n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs instead.
    blocksize: columns per lazy-update block (rounded down to a multiple of
      ``m``); as in the reference, the blocks start at the left and the last
      one holds the remaining ``in % blocksize`` columns.
    damp: dampening, as a fraction of the mean diagonal of ``H``.

  Returns:
    The pruned and updated kernel, in the kernel's dtype. Non-finite when the
    damped ``H`` is not positive definite (raise ``damp``).
  """
  w = kernel.astype(jnp.float32).T  # [rows (out), cols (in)], as in the paper
  cols = w.shape[1]
  m = n_m[1] if n_m is not None else 1
  if n_m is not None:
    _projection.check_nm((cols,), n_m[0], m, 0)
  width, n_full, tail = _blocks(cols, blocksize, m)
  w = jnp.where(jnp.diagonal(gram)[None, :] == 0, 0.0, w)
  u = inverse_hessian_factor(gram, damp)
  w = jax.lax.fori_loop(0, n_full, lambda b, w: _prune_block(w, u, b * width, width, sparsity, n_m), w)
  if tail:
    w = _prune_block(w, u, n_full * width, tail, sparsity, n_m)
  return w.T.astype(kernel.dtype)


def reconstruction_error(kernel: jax.Array, pruned: jax.Array, gram: jax.Array) -> jax.Array:
  """``||X W - X W'||_F^2 = tr((W - W')^T X^T X (W - W'))``: the layer-wise objective."""
  delta = (kernel.astype(jnp.float32) - pruned.astype(jnp.float32))
  return jnp.sum(delta * (gram.astype(jnp.float32) @ delta))


def sparsegpt_prune_retrying(kernel: jax.Array, gram: jax.Array, sparsity=None, *,
                             n_m: tuple[int, int] | None = None, blocksize: int = 128, damp: float = 0.01,
                             where: str = "the matrix") -> jax.Array:
  """:func:`sparsegpt_prune`, retried at 10x then 100x ``damp`` while the result is not finite.

  Args:
    kernel, gram, sparsity, n_m, blocksize, damp: as :func:`sparsegpt_prune`.
    where: the matrix's name in the warnings and the error, e.g. ``"layer 3 mlp.up_proj"``.

  Returns:
    The pruned kernel (finite).

  Raises:
    RuntimeError: when the damped Hessian stays singular at 100x ``damp``.
  """
  pruned = sparsegpt_prune(kernel, gram, sparsity, n_m=n_m, damp=damp, blocksize=blocksize)
  tries = 0
  while not bool(jnp.all(jnp.isfinite(pruned))):
    tries += 1
    if tries > 2:
      raise RuntimeError(f"SparseGPT: the Hessian of {where} stays singular at "
                         f"damp={damp * 10 ** tries / 10:g}; give more calibration windows.")
    logger.warning("SparseGPT: %s singular at damp %g; retrying at %g", where, damp * 10 ** (tries - 1),
                   damp * 10 ** tries)
    pruned = sparsegpt_prune(kernel, gram, sparsity, n_m=n_m, damp=damp * 10 ** tries, blocksize=blocksize)
  return pruned


__all__ = [
    "inverse_hessian_factor",
    "sparsegpt_prune",
    "sparsegpt_prune_retrying",
    "reconstruction_error",
]
