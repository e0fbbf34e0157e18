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
"""Reading an ELSA run's state, the final projection, and reports.

:func:`finalize` projects the trained weights themselves onto the sparse set
(exact counts), reading the target, the pattern, the prunable set and the
score from the run's :class:`elsa_jax.AdmmState`; :func:`sparsity_report` and
:func:`optimizer_state_bytes` measure the result and the state.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elsa_jax.lowp import adam as adam_lowp_lib
from elsa_jax.optim import config as config_lib
from elsa_jax.optim import scores as scores_lib
from elsa_jax.optim import steps
from elsa_jax.optim import transform
from elsa_jax.sparsity import patterns as patterns_lib
from elsa_jax.sparsity import prunable as prunable_lib


def admm_metrics(opt_state: Any) -> transform.AdmmMetrics:
  """The convergence signals of :func:`admm` from anywhere in an optimizer state.

  Works through ``optax.chain``, ``optax.MultiSteps`` and
  ``optax.inject_hyperparams``; inside a jitted step it returns device arrays
  (no host sync). ``optax.tree_utils.tree_get(opt_state, "metrics")`` finds
  the same object.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.ones((4, 4))}}}
    >>> tx = optax.MultiSteps(elsa_jax.admm(optax.sgd(0.1), sparsity=0.5), 2)
    >>> elsa_jax.admm_metrics(tx.init(params)).rel_gap
    Array(0., dtype=float32)

  Args:
    opt_state: an optimizer state that contains an :class:`elsa_jax.AdmmState`.

  Returns:
    :class:`elsa_jax.AdmmMetrics`.

  Raises:
    ValueError: when the state contains no :class:`elsa_jax.AdmmState`.
  """
  state = transform.find_admm_state(opt_state)
  if state is None:
    raise ValueError(
        "no elsa_jax.admm state found in this optimizer state; pass the state of "
        "an optimizer built with elsa_jax.admm(...)."
    )
  return state.metrics


FINALIZE_HELP = "drop the argument to use the run's own, or finalize with the matching value"


def _run_target(params, admm_state, opt_state, sparsity, pattern, n_m, axis, projection, prunable, score):
  """The run's target from its state; every argument given must agree with it."""
  cfg = config_lib.resolve(admm_state.config, opt_state)
  if pattern is not None and patterns_lib.parse(pattern, n_m) != cfg.pattern:
    raise ValueError(f"finalize(pattern={pattern!r}) differs from the run's pattern {cfg.pattern}; {FINALIZE_HELP}.")
  if axis is not None and axis != cfg.axis:
    raise ValueError(f"finalize(axis={axis}) differs from the run's axis {cfg.axis}; {FINALIZE_HELP}.")
  kind = "magnitude" if cfg.score.name == "magnitude" else "objective_aware"
  if projection is not None and projection != kind:
    raise ValueError(f"finalize(projection={projection!r}) differs from the run's {kind!r}; {FINALIZE_HELP}.")
  keep = jax.tree_util.tree_map_with_path(cfg.is_prunable, params)
  if prunable is not None and prunable_lib.prunable_mask(params, prunable) != keep:
    raise ValueError(f"finalize(prunable=...) selects other leaves than the run pruned; {FINALIZE_HELP}.")
  if sparsity is not None:
    given = prunable_lib.resolve_sparsity(sparsity, cfg.pattern)
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
      if cfg.is_prunable(path, w) and not np.isclose(float(given(path)), float(cfg.sparsity_at(path))):
        raise ValueError(f"finalize(sparsity=...) gives {float(given(path)):g} for "
                         f"{prunable_lib.path_str(path)!r}, the run's target is {float(cfg.sparsity_at(path)):g}; "
                         f"{FINALIZE_HELP}.")
  if score is not None:
    if not isinstance(cfg.score, scores_lib.Fixed):
      raise ValueError(f"finalize(score=...) is for runs with a fixed score; this run's is {cfg.score.name!r}.")
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), score, cfg.score.score)
    if not all(jax.tree.leaves(same)):
      raise ValueError(f"finalize(score=...) differs from the run's fixed score; {FINALIZE_HELP}.")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  v = cfg.score.weights(admm_state.score, admm_state.score_scale, admm_state.base_state, flat, treedef)
  return cfg.pattern, cfg.axis, cfg.is_prunable, cfg.sparsity_at, v, cfg.score.decode


def _given_target(params, opt_state, sparsity, pattern, n_m, axis, projection, prunable, score):
  """The target from the arguments alone (no ELSA state): the one-shot magnitude projection, say."""
  pattern = patterns_lib.parse("unstructured" if pattern is None else pattern, n_m)
  projection = "objective_aware" if projection is None else projection
  prunable_lib.check_choice("projection", projection, ("objective_aware", "magnitude"))
  at = prunable_lib.resolve_sparsity(sparsity, pattern)
  predicate = prunable_lib.as_predicate(prunable)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if projection == "magnitude":
    v = [None] * len(flat)
  elif score is not None:
    v = scores_lib.Fixed(score).weights(None, None, None, flat, treedef)
  elif opt_state is None:
    raise ValueError("projection='objective_aware' needs the run's optimizer state: call "
                     "finalize(params, opt_state) or use projection='magnitude'.")
  else:
    found, nu = adam_lowp_lib.find_second_moment(opt_state)
    if not found:
      raise ValueError("projection='objective_aware' needs a second moment, but the optimizer state holds "
                       "neither an ELSA state nor an Adam-family `nu`; pass the state of the ELSA run or use "
                       "projection='magnitude'.")
    v = treedef.flatten_up_to(nu)

  def is_prunable(path, leaf):
    if not predicate(path, leaf):
      return False
    prunable_lib.check_matrix(path, leaf)
    return True

  return pattern, 0 if axis is None else axis, is_prunable, at, v, lambda raw: raw


def finalize(params: Any, opt_state: Any = None, *, sparsity=None, pattern=None, n_m=None, axis=None,
             projection=None, prunable=None, score=None) -> Any:
  """The final hard projection of the weights themselves (not ``w + u``).

  Every prunable matrix ends with exactly ``round(sparsity * numel)`` pruned
  entries (unstructured), ``round(sparsity * shape[axis])`` per slice (per
  row), or ``m - n`` per group (N:M); ties are broken by position. Given the
  state of an :func:`elsa_jax.admm` run, the target sparsity, pattern, axis,
  prunable set and score (``v * w**2``: the grad-EMA score, Adam's ``nu`` or
  the fixed score; ``|w|`` for the magnitude projection) are the run's own;
  an argument given as well must agree with them, else ValueError (a run with
  ``global_bounds`` moves counts between matrices by one threshold, the total
  unchanged: :func:`elsa_jax.optim.steps.global_counts`). Without one,
  the arguments say it all (``projection="magnitude"``, or the ``nu`` of a
  plain Adam state). Non-prunable leaves are returned unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.arange(1., 9.).reshape(4, 2)}}}
    >>> pruned = elsa_jax.finalize(params, sparsity=0.5, projection="magnitude")
    >>> pruned["layers"]["0"]["kernel"].tolist()
    [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]

  Args:
    params: the trained params.
    opt_state: the optimizer state of the run.
    sparsity: a float or (prefix) pytree of floats in ``[0, 1)`` (implied by N:M).
    pattern: a pattern or its spelling (default: the run's, else unstructured).
    n_m: ``(n, m)`` with ``pattern="nm"``.
    axis: the axis along which entries compete (default: the run's, else 0).
    projection: ``"objective_aware"`` or ``"magnitude"``.
    prunable: which leaves are pruned (see :func:`elsa_jax.prunable_mask`).
    score: a (prefix) pytree of ``v`` per prunable leaf (a fixed score).

  Returns:
    The params with every prunable matrix projected onto the sparse set.

  Raises:
    ValueError: for a bad or mismatching argument, a prunable leaf that is not
      a matrix or holds NaN, or a missing second moment.
  """
  admm_state = transform.find_admm_state(opt_state) if opt_state is not None else None
  args = (sparsity, pattern, n_m, axis, projection, prunable, score)
  if admm_state is not None:
    pattern, axis, is_prunable, at, v, decode = _run_target(params, admm_state, opt_state, *args)
  else:
    pattern, axis, is_prunable, at, v, decode = _given_target(params, opt_state, *args)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  kept = [i for i, (path, w) in enumerate(flat) if is_prunable(path, w)]
  for i in kept:
    path, w = flat[i]
    pattern.check_shape(w.shape, axis)
    if prunable_lib.is_concrete(w) and bool(jnp.isnan(w).any()):
      raise ValueError(f"prunable leaf {prunable_lib.path_str(path)!r} contains NaN; the run diverged. Lower "
                       "the learning rate or lmda, or finalize an earlier checkpoint.")
  sparsities = []
  for i in kept:
    s = at(flat[i][0])
    sparsities.append(float(np.asarray(s)) if prunable_lib.is_concrete(s) else s)
  ws, vs = [flat[i][1] for i in kept], [decode(v[i]) for i in kept]
  bounds = None if admm_state is None else config_lib.resolve(admm_state.config, opt_state).global_bounds
  counts = None if bounds is None else steps.global_counts(steps.scores(ws, vs), sparsities, [bounds] * len(kept))
  pruned = steps.project(ws, vs, sparsities, pattern, axis, counts)
  out = [w for _, w in flat]
  for i, w in zip(kept, pruned):
    out[i] = w
  return treedef.unflatten(out)


def sparsity_report(params: Any, prunable=None) -> dict[str, Any]:
  """Fraction of zeros per prunable matrix and over all prunable matrices.

  Example:
    >>> import jax.numpy as jnp
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.array([[0., 1.], [0., 0.]])}},
    ...           "norm": {"scale": jnp.zeros(2)}}
    >>> elsa_jax.sparsity_report(params)["overall"]
    0.75

  Args:
    params: the params tree.
    prunable: which leaves count (see :func:`elsa_jax.prunable_mask`); only they enter
      the overall figure.

  Returns:
    ``{"per_matrix": {path: sparsity}, "overall": float, "zeros": int,
    "total": int}`` with plain Python numbers.
  """
  keep = prunable_lib.prunable_mask(params, prunable)
  per_matrix, zeros, total = {}, 0, 0
  for (path, w), k in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(keep)):
    if not k:
      continue
    nz = int(jnp.sum(w == 0))
    n = math.prod(w.shape)
    per_matrix[prunable_lib.path_str(path)] = nz / max(n, 1)
    zeros += nz
    total += n
  return {
      "per_matrix": per_matrix,
      "overall": zeros / total if total else 0.0,
      "zeros": zeros,
      "total": total,
  }


def optimizer_state_bytes(opt_state: Any, params: Any, prunable=None) -> dict[str, float]:
  """Bytes of optimizer state, in total and per (prunable) parameter.

  Counts every array in the state (moments, ``z``, ``u``, scores, scales,
  counters). ELSA with float32 state and Adam holds 20 bytes per prunable
  parameter (m, v, z, u and the grad-EMA score); see ELSA-L for less.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.ones((64, 64))}}}
    >>> tx = elsa_jax.admm(optax.adam(1e-3), sparsity=0.5)
    >>> round(elsa_jax.optimizer_state_bytes(tx.init(params), params)["per_prunable_param"])
    20

  Args:
    opt_state: the optimizer state (arrays or shape/dtype structs).
    params: the params tree.
    prunable: which leaves are pruned (see :func:`elsa_jax.prunable_mask`).

  Returns:
    ``{"total": bytes, "params": count, "prunable_params": count,
    "per_param": bytes / params, "per_prunable_param": bytes / prunable}``.
  """
  total = sum(
      math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(opt_state)
      if hasattr(x, "shape") and hasattr(x, "dtype")
  )
  keep = prunable_lib.prunable_mask(params, prunable)
  sizes = [math.prod(p.shape) for p in jax.tree.leaves(params)]
  n = sum(sizes)
  n_prunable = sum(s for s, k in zip(sizes, jax.tree.leaves(keep)) if k)
  return {
      "total": float(total),
      "params": float(n),
      "prunable_params": float(n_prunable),
      "per_param": total / max(n, 1),
      "per_prunable_param": total / max(n_prunable, 1),
  }
