"""One-shot pruning of a single linear map from its calibration statistics.

Pure functions: they see one kernel and the statistics of its input, never a
model. :mod:`elsa_jax.oneshot.walk` runs them layer by layer.

Conventions: a kernel is Flax's ``[in, out]``; ``gram`` is ``X^T X`` of the
map's input activations ``X [tokens, in]`` (any positive scale: both methods
are invariant to it). "Per output row" (Wanda's comparison group, PyTorch's
row of ``weight [out, in]``) is a column of the kernel, i.e. ``axis=0``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from elsa_jax.sparsity import topk as _projection


def activation_norms(gram: jax.Array) -> jax.Array:
  """``||X_j||_2`` of every input feature, from ``X^T X`` (its diagonal)."""
  return jnp.sqrt(jnp.maximum(jnp.diagonal(gram).astype(jnp.float32), 0.0))


def wanda_score(kernel: jax.Array, norms: jax.Array) -> jax.Array:
  """Wanda's importance ``|W_ij| * ||X_j||`` of a kernel ``[in, out]`` (Sun et al. 2023)."""
  return jnp.abs(kernel.astype(jnp.float32)) * norms.astype(jnp.float32)[:, None]


def wanda_prune(kernel: jax.Array, gram: jax.Array, sparsity=None, *, n_m: tuple[int, int] | None = None
                ) -> jax.Array:
  """Wanda: zero the lowest ``|W| * ||X||`` inside every output row (or N:M group).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))
    >>> pruned = wanda_prune(w, x.T @ x, 0.5)
    >>> int((pruned == 0).sum(axis=0).min())  # 8 of 16 inputs zeroed for every output
    8

  Args:
    kernel: ``[in, out]`` weights.
    gram: ``[in, in]`` input second moments ``X^T X`` (only the diagonal is read).
    sparsity: fraction of every output row's weights zeroed (unstructured).
    n_m: ``(n, m)``: instead keep ``n`` of every ``m`` consecutive inputs.

  Returns:
    The pruned kernel, in the kernel's dtype.
  """
  score = wanda_score(kernel, activation_norms(gram))
  if n_m is not None:
    keep = _projection.nm_mask(score, *n_m, axis=0)
  else:
    keep = _projection.row_mask(score, sparsity, axis=0)
  return jnp.where(keep, kernel, jnp.zeros_like(kernel))


def _block_size(columns: int, target: int, multiple: int) -> int:
  """The largest divisor of ``columns`` that is at most ``target`` and a multiple of ``multiple``."""
  for b in range(min(target, columns), 0, -1):
    if columns % b == 0 and b % multiple == 0:
      return b
  raise ValueError(f"no block of a multiple of {multiple} divides {columns} columns.")


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
    blocksize: columns per lazy-update block (the largest divisor of ``in``
      not above it, and a multiple of ``m``, is used).
    damp: dampening, as a fraction of the mean diagonal of ``H``.

  Returns:
    The pruned and updated kernel, in the kernel's dtype. Non-finite when the
    damped ``H`` is not positive definite (raise ``damp``).
  """
  w = kernel.astype(jnp.float32).T  # [rows (out), cols (in)], as in the paper
  rows, cols = w.shape
  m = n_m[1] if n_m is not None else 1
  if n_m is not None:
    _projection.check_nm((cols,), n_m[0], m, 0)
  bs = _block_size(cols, blocksize, m)
  n_blocks = cols // bs
  w = jnp.where(jnp.diagonal(gram)[None, :] == 0, 0.0, w)
  u = inverse_hessian_factor(gram, damp)
  total_pruned = None if n_m is not None else _projection.num_pruned(rows * cols, sparsity)
  column = jnp.arange(cols)

  def block(b, w):
    i1 = b * bs
    w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, bs))
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
    d = jnp.diagonal(u1)
    if n_m is None:
      # Shares of the matrix's count that add up to it exactly.
      k = total_pruned // n_blocks + (b < total_pruned % n_blocks).astype(jnp.int32)
      score = jnp.square(w1) / jnp.square(d)[None, :]
      keep = _projection.topk_mask(score, rows * bs - k)
    else:
      keep = jnp.ones((rows, bs), bool)

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

    w1, err, keep = jax.lax.fori_loop(0, bs // m, group, (w1, jnp.zeros_like(w1), keep))
    w1 = jnp.where(keep, w1, 0.0)  # exact zeros
    later = jax.lax.dynamic_slice(u, (i1, 0), (bs, cols))
    w = w - jnp.where(column[None, :] >= i1 + bs, err @ later, 0.0)
    return jax.lax.dynamic_update_slice(w, w1, (0, i1))

  w = jax.lax.fori_loop(0, n_blocks, block, w)
  return w.T.astype(kernel.dtype)


def reconstruction_error(kernel: jax.Array, pruned: jax.Array, gram: jax.Array) -> jax.Array:
  """``||X W - X W'||_F^2 = tr((W - W')^T X^T X (W - W'))``: the layer-wise objective."""
  delta = (kernel.astype(jnp.float32) - pruned.astype(jnp.float32))
  return jnp.sum(delta * (gram.astype(jnp.float32) @ delta))


__all__ = [
    "activation_norms",
    "wanda_score",
    "wanda_prune",
    "sparsegpt_prune",
    "inverse_hessian_factor",
    "reconstruction_error",
]
