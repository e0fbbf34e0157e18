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
"""ELSA as an optax transformation: ADMM on the model's own loss around a base optimizer.

The problem ``min f(w) s.t. ||w||_0 <= k`` is split as ``f(w) + I_S(z)`` with
``w = z``. One update of :func:`admm` runs the steps of
:mod:`elsa_jax.optim.steps`: the penalty ``g += lmda * (w - z + u)``, the base
optimizer's step, and at step counts ``0, interval, 2 * interval, ...`` the
z/u update ``z = Proj_S(w' + u)``, ``u = u + w' - z`` with the weights ``w'``
right after the step. :func:`elsa_jax.finalize` projects ``w`` itself at the end.

When the z/u update runs. By default the step count decides on the device,
through a :func:`jax.lax.cond`, which costs more than the whole Adam update on
the CPU (XLA copies ``z`` and ``u`` through it). A loop that knows the step on
the host passes the extra argument ``z_update=True`` or ``False`` (a static
bool; jit the step once for each). With ``z_update=False`` at a step where the
update is due, :func:`admm_zu_update` then runs it as its own program, so that
its temporaries never coexist with the gradients and activations
(:func:`elsa_jax.run.train.make_zu_step`, what :func:`elsa_jax.run.train.run`
does).

State layout. Every tree in :class:`AdmmState` that follows the params has
exactly the params' structure: prunable leaves hold arrays of the param's
shape, the rest hold empty ``(0,)`` arrays. So ``tx.init`` only tree-maps over
the params, :func:`optax.tree_utils.tree_map_params` works on the state, and
shapes and dtypes never change through an update. The state also carries the
:class:`~elsa_jax.optim.config.AdmmConfig` as static data (no arrays).

Low-precision state (ELSA-L) goes through :mod:`elsa_jax.lowp.codecs`; the
order of the per-group work inside one XLA program through
:mod:`elsa_jax.lowp.ordering`. Neither appears in the maths.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elsa_jax.lowp import adam as adam_lowp_lib
from elsa_jax.lowp import codecs
from elsa_jax.lowp import ordering
from elsa_jax.optim import config as config_lib
from elsa_jax.optim import scores as scores_lib
from elsa_jax.optim import steps
from elsa_jax.sparsity import prunable as prunable_lib

AdmmConfig = config_lib.AdmmConfig


class AdmmMetrics(NamedTuple):
  """Convergence signals of :func:`admm`, as float32 scalars (device arrays).

  All but ``lmda`` are computed at the z-updates (with the weights right after
  the base step) and held in between; over prunable leaves only.

  Attributes:
    rel_gap: ``||w - z|| / ||w||``.
    primal_residual: ``||w - z||``.
    dual_residual: ``lmda * ||z - z_prev||`` (``z_prev`` from the previous z-update).
    mask_flip_fraction: the fraction of prunable entries whose kept/pruned
      status changed at the last z-update (read as ``z != 0``).
    z_sparsity: the fraction of zeros in the stored ``z`` (from ``init`` on).
    lmda: the penalty weight used at the last step.
  """

  rel_gap: jax.Array
  primal_residual: jax.Array
  dual_residual: jax.Array
  mask_flip_fraction: jax.Array
  z_sparsity: jax.Array
  lmda: jax.Array


class AdmmState(NamedTuple):
  """State of :func:`admm`.

  Attributes:
    count: optimizer steps taken (int32).
    z: the sparse copy, in ``state_dtype`` (params structure).
    u: the scaled dual, in ``state_dtype`` (params structure).
    z_scale: float32 scales of float8 ``z`` (scalar per tensor or ``[1, out]``
      per row); empty arrays otherwise.
    u_scale: the same for ``u``.
    score: the score source's state (the grad-EMA score), empty arrays when unused.
    score_scale: block absmax of an ``"int8"`` score; empty arrays otherwise.
    lmda: the penalty weight ``u`` is scaled for (the last step's).
    lmda_factor: the residual-balancing multiplier of ``lmda`` (1 otherwise).
    metrics: :class:`AdmmMetrics`.
    base_state: the base optimizer's state.
    config: the transform's :class:`~elsa_jax.optim.config.AdmmConfig` (static).
  """

  count: jax.Array
  z: optax.Params
  u: optax.Params
  z_scale: optax.Params
  u_scale: optax.Params
  score: optax.Params
  score_scale: optax.Params
  lmda: jax.Array
  lmda_factor: jax.Array
  metrics: AdmmMetrics
  base_state: optax.OptState
  config: AdmmConfig


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _columns(pairs, treedef, n):
  """A list of per-leaf ``n``-tuples as ``n`` trees."""
  return tuple(treedef.unflatten([p[i] for p in pairs]) for i in range(n))


def admm_init(cfg: AdmmConfig, base: optax.GradientTransformation, params) -> AdmmState:
  """The initial state: ``z`` the magnitude projection of ``params``, ``u = 0``, the score source's zeros."""
  zero = jnp.zeros([], jnp.int32)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keep = [cfg.is_prunable(path, p) for path, p in flat]
  kept = [(path, p.astype(jnp.float32)) for (path, p), k in zip(flat, keep) if k]
  z0 = iter(steps.project([w for _, w in kept], [None] * len(kept),
                          [cfg.leaf_sparsity(path, zero) for path, _ in kept], cfg.pattern, cfg.axis))
  rows = []
  for (_, p), k in zip(flat, keep):
    if k:
      zq = codecs.encode_scaled(next(z0), cfg.state_dtype, cfg.scale_axis)
      uq = codecs.zeros_scaled(p.shape, cfg.state_dtype, cfg.scale_axis)
      vq = cfg.score.init(p)
    else:  # distinct placeholder buffers: the state can be donated
      zq, uq = (codecs.empty(cfg.state_dtype), codecs.empty()), (codecs.empty(cfg.state_dtype), codecs.empty())
      vq = (codecs.empty(getattr(cfg.score, "dtype", jnp.float32)), codecs.empty())
    rows.append((*zq, *uq, *vq))
  z, z_scale, u, u_scale, score, score_scale = _columns(rows, treedef, 6)
  stored = [r[0] for r, k in zip(rows, keep) if k]
  z_zeros = sum((jnp.sum(codecs.is_zero(q), dtype=jnp.float32) for q in stored), jnp.zeros([], jnp.float32))
  z_zeros = z_zeros / max(1, sum(q.size for q in stored))
  base_state = base.init(params)
  if isinstance(cfg.score, scores_lib.BaseSecondMoment) and not adam_lowp_lib.find_second_moment(base_state)[0]:
    raise scores_lib.no_second_moment_error(base_state)
  lmda0 = cfg.lmda_at(zero)
  scalar = lambda x: jnp.array(x, jnp.float32, copy=True)  # distinct buffers: the state can be donated
  metrics = AdmmMetrics(scalar(0.0), scalar(0.0), scalar(0.0), scalar(0.0), z_zeros, scalar(lmda0))
  return AdmmState(count=zero, z=z, u=u, z_scale=z_scale, u_scale=u_scale, score=score, score_scale=score_scale,
                   lmda=scalar(lmda0), lmda_factor=scalar(1.0), metrics=metrics, base_state=base_state,
                   config=cfg.static())


def _observe_scores(cfg: AdmmConfig, updates, state: AdmmState, keep, treedef):
  """The score source sees the incoming gradient, before the penalty; group after group for int8."""
  if not cfg.score.stateful:
    return state.score, state.score_scale
  rows = list(zip(*(treedef.flatten_up_to(t) for t in (updates, state.score, state.score_scale, keep))))
  leaf = lambda g, q, s, k, after: cfg.score.observe(g, q, s, after) if k else (q, s)
  int8 = getattr(cfg.score, "dtype", None) == jnp.int8
  new = ordering.map_in_groups(leaf, rows, [g.size for g, *_ in rows],
                               deps=(lambda i, o: o[1:] if rows[i][3] else ()) if int8 else None)
  return _columns(new, treedef, 2)


def _penalised(cfg: AdmmConfig, updates, params, state: AdmmState, u_q, u_s, score_scale, keep, lmda_now):
  """The penalised gradient, with ``z`` and ``u`` decoded for it."""
  if cfg.score.stateful and getattr(cfg.score, "dtype", None) == jnp.int8 and cfg.state_dtype != jnp.float32:
    # Decode z and u only once this step's int8 score scales exist (they need the whole backward pass):
    # otherwise XLA may decode every matrix's z and u at the start of the step and keep the float32
    # copies through the backward (:mod:`elsa_jax.lowp.ordering`). Free: the scales exist anyway.
    decode = lambda q, s, k, v_s: codecs.decode_scaled(ordering.after(q, v_s), s) if k else q
  else:
    decode = lambda q, s, k, v_s: codecs.decode_scaled(q, s) if k else q
  u32 = jax.tree.map(decode, u_q, u_s, keep, score_scale)
  z32 = jax.tree.map(decode, state.z, state.z_scale, keep, score_scale)
  return steps.penalty(updates, params, z32, u32, lmda_now, keep)


def admm_update(cfg: AdmmConfig, base: optax.GradientTransformationExtraArgs, updates, state: AdmmState,
                params=None, *, z_update: bool | None = None, **extra_args):
  """One update of :func:`admm` (see there): penalty, base step, and the z/u update when due."""
  if params is None:
    raise ValueError("admm needs the params: call tx.update(grads, state, params).")
  if z_update is not None and not isinstance(z_update, (bool, np.bool_)):
    raise TypeError(f"z_update must be None or a Python bool (static under jit), got {z_update!r}; to run the "
                    "z/u update as its own program, call elsa_jax.admm_zu_update(opt_state, params).")
  count = state.count
  keep = jax.tree_util.tree_map_with_path(cfg.is_prunable, params)
  treedef = jax.tree.structure(params)
  lmda_now = cfg.lmda_at(count) * state.lmda_factor
  ratio = steps.dual_ratio(state.lmda, lmda_now)
  static_lmda = isinstance(cfg.lmda, (int, float)) and cfg.lmda_schedule == "constant"
  rescale = lambda q, s, k: codecs.rescale_scaled(q, s, ratio) if k and not static_lmda else (q, s)
  u_q, u_s = _columns(treedef.flatten_up_to(jax.tree.map(rescale, state.u, state.u_scale, keep)), treedef, 2)
  score, score_scale = _observe_scores(cfg, updates, state, keep, treedef)
  grads = _penalised(cfg, updates, params, state, u_q, u_s, score_scale, keep, lmda_now)
  base_updates, base_state = base.update(grads, state.base_state, params, **extra_args)
  state = state._replace(u=u_q, u_scale=u_s, score=score, score_scale=score_scale, base_state=base_state)
  m = state.metrics
  hold = lambda: (state.z, state.z_scale, u_q, u_s, state.lmda_factor,
                  (m.rel_gap, m.primal_residual, m.dual_residual, m.mask_flip_fraction, m.z_sparsity))
  zu = lambda: zu_update(cfg, params, base_updates, state, count, lmda_now, keep)
  due = count % cfg.interval == 0
  if z_update is not None:  # the caller's static choice: no conditional in the step
    result = zu() if z_update else hold()
  elif prunable_lib.is_concrete(due):  # eager mode, or interval == 1 under jit
    result = zu() if bool(due) else hold()
  elif prunable_lib.is_concrete(cfg.interval) and int(np.asarray(cfg.interval)) == 1:
    result = zu()
  else:
    result = jax.lax.cond(due, zu, hold)
  z, z_scale, u, u_scale, lmda_factor, signals = result
  return base_updates, state._replace(
      count=optax.safe_increment(count), z=z, u=u, z_scale=z_scale, u_scale=u_scale, lmda=_f32(lmda_now),
      lmda_factor=lmda_factor, metrics=AdmmMetrics(*signals, _f32(lmda_now)))


def _global_counts(cfg: AdmmConfig, flat, dw, kept, u_q, u_s, v, count):
  """The pruned count of each kept matrix under ``--allocation global`` (None otherwise), from all of
  ``y = w' + u`` at once (:func:`elsa_jax.optim.steps.global_counts`)."""
  bounds = cfg.leaf_bounds(count)
  if bounds is None:
    return None
  ys = [(flat[i][1] if dw[i] is None else optax.apply_updates(flat[i][1], dw[i])).astype(jnp.float32)
        + codecs.decode_scaled(u_q[i], u_s[i]) for i in kept]
  score = steps.scores(ys, [cfg.score.decode(v[i]) for i in kept])
  return steps.global_counts(score, [cfg.leaf_sparsity(flat[i][0], count) for i in kept], [bounds] * len(kept))


def zu_update(cfg: AdmmConfig, params, base_updates, state: AdmmState, count, lmda_now, keep):
  """The z/u update of :func:`elsa_jax.optim.steps.zu_step` on the stored state, group after group.

  ``w' = params + base_updates`` (``base_updates`` None: ``params`` already are
  ``w'``). ``state`` holds the ``u`` (rescaled to ``lmda_now``), score and base
  state of this update. Returns ``(z, z_scale, u, u_scale, lmda_factor,
  signals)``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = treedef.flatten_up_to
  v = cfg.score.weights(state.score, state.score_scale, state.base_state, flat, treedef)
  dw = [None] * len(flat) if base_updates is None else leaves(base_updates)
  kept = [i for i, k in enumerate(leaves(keep)) if k]
  u_q, u_s, z_q, z_s = (leaves(t) for t in (state.u, state.u_scale, state.z, state.z_scale))
  out = [leaves(t) for t in (state.z, state.z_scale, state.u, state.u_scale)]
  sums = [jnp.zeros(5, jnp.float32)]
  pruned = _global_counts(cfg, flat, dw, kept, u_q, u_s, v, count)

  def group(members, after):
    # The group's inputs in float32, each plus ``after``: a zero that orders this group after the last.
    idx = [kept[j] for j in members]
    u_prev = [codecs.decode_scaled(u_q[i], u_s[i]) + after for i in idx]
    z_prev = [codecs.decode_scaled(z_q[i], z_s[i]) + after for i in idx]
    vs = [cfg.score.decode(v[i]) for i in idx]
    vs = [x if x is None else x + after for x in vs]
    w = [(flat[i][1] if dw[i] is None else optax.apply_updates(flat[i][1], dw[i])).astype(jnp.float32) + after
         for i in idx]
    z, u, group_sums = steps.zu_step(w, u_prev, z_prev, vs, [cfg.leaf_sparsity(flat[i][0], count) for i in idx],
                                     cfg.pattern, cfg.axis, None if pruned is None else [pruned[j] for j in members])
    encoded = [(codecs.encode_scaled(z_, cfg.state_dtype, cfg.scale_axis),
                codecs.encode_scaled(u_, cfg.state_dtype, cfg.scale_axis)) for z_, u_ in zip(z, u)]
    stored_zeros = sum((jnp.sum(codecs.is_zero(zq), dtype=jnp.float32) for (zq, _), _ in encoded),
                       jnp.zeros([], jnp.float32))
    for i, ((zq, zs), (uq, us)) in zip(idx, encoded):
      out[0][i], out[1][i], out[2][i], out[3][i] = zq, zs, uq, us
    sums[0] = sums[0] + jnp.stack([*group_sums, stored_zeros])
    return None, (sums[0],)

  ordering.in_groups(group, [flat[i][1].size for i in kept], first_after=ordering.zero_after(sums[0]))
  signals = steps.residual_signals(sums[0], sum(flat[i][1].size for i in kept), lmda_now)
  factor = state.lmda_factor
  if cfg.lmda_schedule == "residual_balancing":
    factor = steps.balance_lmda(factor, signals[1], signals[2], cfg.balance_mu, cfg.balance_tau)
  return (*(treedef.unflatten(o) for o in out), _f32(factor), signals)


def admm_zu_update(opt_state: Any, params: Any) -> Any:
  """The z/u update of the last update (made with ``z_update=False``), as its own program.

  ``params`` are the weights right after that update (``w'``). Gives the same
  state as that update with ``z_update=True``, provided ``admm``'s updates
  were applied as they are (nothing after it in the chain). Works on the
  state of any chain or wrapper that contains an :class:`AdmmState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.arange(1., 9.).reshape(4, 2)}}}
    >>> tx = elsa_jax.admm(optax.sgd(0.1), sparsity=0.5, interval=1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params, z_update=False)
    >>> params = optax.apply_updates(params, updates)
    >>> state = elsa_jax.admm_zu_update(state, params)
    >>> int((elsa_jax.find_admm_state(state).z["layers"]["0"]["kernel"] == 0).sum())
    4
  """
  state = find_admm_state(opt_state)
  if state is None:
    raise ValueError("no elsa_jax.admm state found in this optimizer state; pass the state of an optimizer "
                     "built with elsa_jax.admm(...).")
  cfg = config_lib.resolve(state.config, opt_state)
  count = state.count - 1  # the update whose z/u step this is
  keep = jax.tree_util.tree_map_with_path(cfg.is_prunable, params)
  z, z_scale, u, u_scale, lmda_factor, signals = zu_update(cfg, params, None, state, count, state.lmda, keep)
  new = state._replace(z=z, u=u, z_scale=z_scale, u_scale=u_scale, lmda_factor=lmda_factor,
                       metrics=AdmmMetrics(*signals, state.lmda))
  return jax.tree.map(lambda x: new if isinstance(x, AdmmState) else x, opt_state,
                      is_leaf=lambda x: isinstance(x, AdmmState))


def find_admm_state(opt_state: Any) -> AdmmState | None:
  """The :class:`AdmmState` inside a (chained, wrapped) optimizer state, or None."""
  return optax.tree_utils.tree_get(opt_state, "AdmmState")


def admm(
    base: optax.GradientTransformation,
    *,
    sparsity=None,
    lmda: optax.ScalarOrSchedule = 0.01,
    interval: int = 32,
    projection: str = "objective_aware",
    score_source: str = "grad_ema",
    score_decay: float = 0.95,
    fixed_score: Any = None,
    pattern: Any = "unstructured",
    n_m: tuple[int, int] | None = None,
    axis: int | None = None,
    prunable=None,
    lmda_schedule: str = "constant",
    balance_mu: float = 10.0,
    balance_tau: float = 2.0,
    sparsity_ramp: optax.Schedule | None = None,
    state_dtype: Any = "float32",
    state_scale: str = "tensor",
    score_dtype: Any = None,
    global_bounds: tuple[float, float] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """ELSA: drives the prunable matrices to a sparse set by ADMM around ``base``.

  Chain :func:`optax.clip_by_global_norm` in front (the paper clips before the
  penalty). Under :class:`optax.MultiSteps` ``interval`` counts optimizer steps;
  under :func:`optax.inject_hyperparams` the numeric arguments may be traced
  (list ``prunable`` and ``sparsity_ramp`` in ``static_args``). The update takes
  the extra argument ``z_update`` (see the module docstring).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.ones((8, 4))}}}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  elsa_jax.admm(optax.adam(1e-3, b2=0.95), sparsity=0.5, interval=4))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> float(elsa_jax.admm_metrics(state).rel_gap) > 0
    True

  Args:
    base: the base optimizer (Adam with betas (0.9, 0.95) in the paper).
    sparsity: fraction pruned per prunable matrix, in ``[0, 1)``: a float or a
      (prefix) pytree of floats; implied by an N:M ``pattern``.
    lmda: the penalty weight: a float, a schedule, or traced; ``u`` is rescaled
      by ``lmda_old / lmda_new`` whenever it changes.
    interval: steps between z/u updates.
    projection: ``"objective_aware"`` (top ``v * y**2``) or ``"magnitude"`` (top ``|y|``).
    score_source: ``v`` of the objective-aware projection
      (:mod:`elsa_jax.optim.scores`): ``"grad_ema"`` (the squared gradient before
      the penalty, the default), ``"base_second_moment"`` (Adam's ``nu``, the
      paper's) or ``"fixed"`` (``fixed_score``, SAFE+).
    score_decay: decay of the ``"grad_ema"`` EMA.
    fixed_score: ``score_source="fixed"``'s (prefix) pytree, broadcastable per leaf.
    pattern: :class:`~elsa_jax.sparsity.patterns.Unstructured`, ``PerRow``,
      ``NM(n, m)``, or ``"unstructured"``, ``"row"``, ``"2:4"``.
    n_m: ``(n, m)`` with ``pattern="nm"`` (the earlier spelling of ``NM(n, m)``).
    axis: the axis along which entries compete (None: 0, the input features of
      a Flax ``[in, out]`` kernel).
    prunable: None (:func:`elsa_jax.default_prunable`), a predicate ``(path,
      leaf) -> bool`` or a (prefix) pytree of bools.
    lmda_schedule: ``"constant"`` or ``"residual_balancing"`` (Boyd et al. 2011, 3.4.1).
    balance_mu: residual-balancing ratio.
    balance_tau: residual-balancing factor.
    sparsity_ramp: optional schedule of the fraction of the target used at a z-update.
    state_dtype: ``z``/``u`` storage (ELSA-L): float32, bfloat16, float8_e4m3fn, float8_e5m2.
    state_scale: ``"tensor"`` or ``"row"`` scales of float8 storage.
    score_dtype: grad-EMA storage: float32, bfloat16, int8 (default: the state's width).
    global_bounds: None, or ``(s_min, s_max)`` with ``s_min <= sparsity <= s_max``:
      one threshold on the projection's score over every prunable matrix
      (unstructured), each matrix's sparsity within the bounds and the overall
      count that of ``sparsity`` (:func:`elsa_jax.optim.steps.global_counts`).
      The z-update then holds the keys of all the matrices at once (4 bytes
      per prunable weight), not group by group.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is :class:`AdmmState`.
  """
  cfg = config_lib.make_config(
      sparsity=sparsity, lmda=lmda, interval=interval, projection=projection, score_source=score_source,
      score_decay=score_decay, fixed_score=fixed_score, pattern=pattern, n_m=n_m, axis=axis, prunable=prunable,
      lmda_schedule=lmda_schedule, balance_mu=balance_mu, balance_tau=balance_tau, sparsity_ramp=sparsity_ramp,
      state_dtype=state_dtype, state_scale=state_scale, score_dtype=score_dtype, global_bounds=global_bounds)
  base = optax.with_extra_args_support(base)
  return optax.GradientTransformationExtraArgs(functools.partial(admm_init, cfg, base),
                                               functools.partial(admm_update, cfg, base))
