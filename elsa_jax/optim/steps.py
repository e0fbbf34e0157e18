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
"""The ADMM steps of ELSA as pure functions (float32 maths, no state, no codecs).

With the scaled dual ``u`` and penalty ``lmda``, one optimizer step is

1. :func:`penalty`: ``g += lmda * (w - z + u)`` on every prunable matrix;
2. a step of the base optimizer: ``w' = w + update``;
3. every ``interval`` steps, the z/u update (:func:`zu_step`):
   :func:`project` ``z = Proj_S(w' + u)``, then :func:`dual` ``u = u + w' - z``.

When ``lmda`` changes, ``u`` is rescaled by :func:`dual_ratio` (it is the
scaled dual), and :func:`balance_lmda` is the residual-balancing rule. The
tree-level functions :func:`admm_penalty`, :func:`admm_projection` and
:func:`admm_dual` are the same steps on whole params trees; :func:`elsa_jax.admm`
runs exactly these functions (:mod:`elsa_jax.optim.zu_update` feeds them from
the stored, possibly low-precision state, group after group).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from elsa_jax.sparsity import patterns as patterns_lib
from elsa_jax.sparsity import prunable as prunable_lib
from elsa_jax.sparsity import global_topk
from elsa_jax.sparsity import topk


def _total(xs) -> jax.Array:
  return sum(xs, jnp.zeros([], jnp.float32))


def penalty(grads, params, z, u, lmda, keep):
  """``g + lmda * (w - z + u)`` on the leaves where ``keep`` is True (float32 maths, ``g``'s dtype)."""

  def leaf(g, w, z_, u_, k):
    if not k:
      return g
    pen = lmda * (w.astype(jnp.float32) - z_.astype(jnp.float32) + u_.astype(jnp.float32))
    return (g.astype(jnp.float32) + pen).astype(g.dtype)

  return jax.tree.map(leaf, grads, params, z, u, keep)


def dual_ratio(lmda_old: jax.Array, lmda_new: jax.Array) -> jax.Array:
  """``lmda_old / lmda_new``, the factor of the scaled dual when lmda changes (1 when either is 0)."""
  valid = (lmda_new > 0) & (lmda_old > 0)
  return jnp.where(valid, lmda_old / jnp.where(valid, lmda_new, 1.0), 1.0)


def scores(ys: Sequence[jax.Array], vs: Sequence[jax.Array | None]) -> list[jax.Array]:
  """The projection's scores: ``|y|`` where ``v`` is None, else ``v * y**2``."""
  return [topk.magnitude_score(y) if v is None else topk.objective_aware_score(y, v) for y, v in zip(ys, vs)]


def global_counts(score: Sequence[jax.Array], sparsities: Sequence, bounds: Sequence) -> list[jax.Array]:
  """The pruned counts of ``--allocation global``: one threshold on ``score`` over all the matrices.

  Matrix ``i`` of ``n_i`` entries prunes between ``round(low_i * n_i)`` and ``round(high_i * n_i)``
  (``bounds[i] = (low_i, high_i)``), and the counts add up to the uniform ones, ``round(s_i * n_i)``
  (:func:`elsa_jax.sparsity.global_topk.global_pruned_counts`).
  """
  sizes = [s.size for s in score]
  count = lambda ss: [topk.num_pruned(n, s) for n, s in zip(sizes, ss)]  # noqa: E731
  return global_topk.global_pruned_counts(score, count(sparsities), count([b[0] for b in bounds]),
                                          count([b[1] for b in bounds]))


def project(ys: Sequence[jax.Array], vs: Sequence[jax.Array | None], sparsities: Sequence,
            pattern: patterns_lib.Pattern, axis: int = 0, pruned: Sequence | None = None) -> list[jax.Array]:
  """``z = Proj_S(y)`` for several matrices: the top entries of each by :func:`scores`, the rest zero.

  Counts are exact (``round(sparsity * n)`` pruned per matrix or per slice, ``m - n`` per N:M group), ties
  broken by position; consecutive matrices share one bisection. ``pruned``: the counts of
  :func:`global_counts` in place of the sparsities (``--allocation global``).
  """
  masks = topk.sparsity_masks(scores(ys, vs), sparsities, pattern=pattern.kind, n_m=pattern.n_m or (2, 4),
                              axis=axis, pruned=pruned)
  return [jnp.where(m, y, 0.0) for m, y in zip(masks, ys)]


def dual(u: jax.Array, w: jax.Array, z: jax.Array) -> jax.Array:
  """The scaled dual ascent ``u + (w - z)`` in float32."""
  return u.astype(jnp.float32) + w.astype(jnp.float32) - z.astype(jnp.float32)


def zu_step(w, u_prev, z_prev, v, sparsities, pattern: patterns_lib.Pattern, axis: int = 0, pruned=None):
  """The z/u update of some matrices: ``y = w + u``, ``z = Proj(y)``, ``u = u + w - z``.

  Args:
    w: float32 weights right after the base step (a list).
    u_prev: float32 scaled duals.
    z_prev: float32 sparse copies of the previous z-update (for the residuals).
    v: float32 score weights, or None entries for the magnitude score.
    sparsities: the fraction pruned in each.
    pattern: the sparsity pattern.
    axis: the axis along which entries compete.
    pruned: the pruned counts in place of ``sparsities`` (:func:`global_counts`), or None.

  Returns:
    ``(z, u, sums)``: lists of float32 arrays and the float32 sums
    ``[||w - z||^2, ||w||^2, ||z - z_prev||^2, mask flips]``.
  """
  y = [w_ + u_ for w_, u_ in zip(w, u_prev)]
  z = project(y, v, sparsities, pattern, axis, pruned)
  u = [dual(u_, w_, z_) for u_, w_, z_ in zip(u_prev, w, z)]
  sums = [
      _total([jnp.sum(jnp.square(w_ - z_)) for w_, z_ in zip(w, z)]),
      _total([jnp.sum(jnp.square(w_)) for w_ in w]),
      _total([jnp.sum(jnp.square(z_ - zp)) for z_, zp in zip(z, z_prev)]),
      _total([jnp.sum((z_ != 0) != (zp != 0), dtype=jnp.float32) for z_, zp in zip(z, z_prev)]),
  ]
  return z, u, sums


def residual_signals(sums: jax.Array, n: int, lmda: jax.Array) -> tuple[jax.Array, ...]:
  """``(rel_gap, primal, dual, flip fraction, z sparsity)`` from the summed squares of :func:`zu_step`.

  ``sums`` stacks :func:`zu_step`'s four sums and the count of stored zeros of ``z``; ``n`` is the number
  of prunable entries.
  """
  primal = jnp.sqrt(sums[0])
  norm_w = jnp.sqrt(sums[1])
  dual_res = lmda * jnp.sqrt(sums[2])
  n = max(1, n)
  return (primal / jnp.maximum(norm_w, jnp.finfo(jnp.float32).tiny), primal, dual_res, sums[3] / n, sums[4] / n)


def balance_lmda(factor: jax.Array, primal: jax.Array, dual_res: jax.Array, mu, tau) -> jax.Array:
  """Residual balancing (Boyd et al. 2011, 3.4.1): ``lmda *= tau`` when ``primal > mu * dual``, ``/= tau`` when
  ``dual > mu * primal``."""
  up = primal > mu * dual_res
  down = dual_res > mu * primal
  return factor * jnp.where(up, tau, jnp.where(down, 1.0 / tau, 1.0))


# ----------------------------------------------------------------------------
# The same steps on whole params trees.


def admm_penalty(grads, params, z, u, lmda, *, prunable=None):
  """Step 1: adds the penalty gradient ``lmda * (w - z + u)`` to prunable leaves.

  The paper clips the loss gradient's global norm *before* adding the penalty
  (so ``optax.chain(optax.clip_by_global_norm(1.0), admm(...))``).

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import admm_penalty
    >>> w = {"layers": {"kernel": jnp.ones((2, 2))}}
    >>> z = {"layers": {"kernel": jnp.zeros((2, 2))}}
    >>> u = {"layers": {"kernel": jnp.zeros((2, 2))}}
    >>> g = admm_penalty(w, w, z, u, 0.5)["layers"]["kernel"]
    >>> g.tolist()
    [[1.5, 1.5], [1.5, 1.5]]

  Args:
    grads: the loss gradient (params structure).
    params: the current weights ``w``.
    z: the sparse copy (params structure; non-prunable leaves are ignored).
    u: the scaled dual (params structure; non-prunable leaves are ignored).
    lmda: the penalty weight (a scalar).
    prunable: which leaves are pruned (see :func:`elsa_jax.prunable_mask`).

  Returns:
    The penalised gradient, in the gradient's dtypes.
  """
  return penalty(grads, params, z, u, lmda, prunable_lib.prunable_mask(params, prunable))


def admm_projection(y, sparsity=None, *, v=None, pattern: patterns_lib.PatternLike = "unstructured",
                    n_m: tuple[int, int] | None = None, axis: int = 0, prunable=None):
  """Step 3a: ``z = Proj_S(y)`` on every prunable leaf (``y = w + u`` in ADMM).

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import admm_projection
    >>> y = {"layers": {"kernel": jnp.array([[1., -4.], [3., 2.]])}}
    >>> admm_projection(y, 0.5)["layers"]["kernel"].tolist()
    [[0.0, -4.0], [3.0, 0.0]]

  Args:
    y: the tree to project (params structure).
    sparsity: the fraction pruned per leaf: a float or a (prefix) pytree;
      implied by an N:M pattern.
    v: None for the magnitude projection (score ``|y|``), or a tree of
      second-moment weights for the objective-aware one (score ``v * y**2``).
    pattern: a :mod:`elsa_jax.sparsity.patterns` pattern or its spelling
      (``"unstructured"``, ``"row"``, ``"2:4"``).
    n_m: ``(n, m)`` with ``pattern="nm"`` (the earlier spelling of ``NM(n, m)``).
    axis: the axis along which entries compete (``0`` = input features of a
      Flax ``[in, out]`` kernel).
    prunable: which leaves are pruned; the others are returned unchanged.

  Returns:
    The projected tree.
  """
  pattern = patterns_lib.parse(pattern, n_m)
  at = prunable_lib.resolve_sparsity(sparsity, pattern)
  keep = prunable_lib.prunable_mask(y, prunable)
  flat, treedef = jax.tree_util.tree_flatten_with_path(y)
  v_leaves = [None] * len(flat) if v is None else treedef.flatten_up_to(v)
  kept = [i for i, k in enumerate(treedef.flatten_up_to(keep)) if k]
  for i in kept:
    pattern.check_shape(flat[i][1].shape, axis)
  z = project([flat[i][1] for i in kept], [v_leaves[i] for i in kept], [at(flat[i][0]) for i in kept],
              pattern, axis)
  out = [x for _, x in flat]
  for i, z_ in zip(kept, z):
    out[i] = z_.astype(out[i].dtype)
  return treedef.unflatten(out)


def admm_dual(u, params, z, *, prunable=None):
  """Step 3b: the scaled dual ascent ``u = u + (w - z)`` on prunable leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import admm_dual
    >>> t = lambda x: {"layers": {"kernel": jnp.full((1, 2), x)}}
    >>> admm_dual(t(0.5), t(2.0), t(1.5))["layers"]["kernel"].tolist()
    [[1.0, 1.0]]

  Args:
    u: the scaled dual (params structure).
    params: the weights ``w`` after the base step.
    z: the new sparse copy.
    prunable: which leaves are pruned; ``u`` is returned unchanged elsewhere.

  Returns:
    The new ``u`` (float32 on prunable leaves).
  """
  keep = prunable_lib.prunable_mask(params, prunable)
  return jax.tree.map(lambda u_, w, z_, k: dual(u_, w, z_) if k else u_, u, params, z, keep)
