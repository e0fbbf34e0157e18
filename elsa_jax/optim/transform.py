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
"""ELSA: sparsity by ADMM on the model's own loss, as an optax transformation.

The problem ``min f(w) s.t. ||w||_0 <= k`` is split as ``f(w) + I_S(z)`` with
``w = z``; with the scaled dual ``u`` and penalty ``lmda`` one optimizer step is

1. ``g += lmda * (w - z + u)`` on every prunable matrix (the gradient of the
   augmented Lagrangian's penalty term);
2. a step of the base optimizer (Adam in the paper): ``w' = w + update``;
3. every ``interval`` steps (counts ``0, interval, 2 * interval, ...``), right
   after that step: ``z = Proj_S(w' + u)``, then ``u = u + w' - z``.

At the end, :func:`finalize` projects ``w`` itself (not ``w + u``).

This module holds the transformation :func:`admm`, the three ADMM steps as
pure functions on trees (:func:`admm_penalty`, :func:`admm_projection`,
:func:`admm_dual`) so that they can be assembled differently, and the helpers
around them (prunable predicates, :func:`finalize`, :func:`sparsity_report`,
:func:`admm_metrics`, :func:`optimizer_state_bytes`).

Prunable leaves. ``prunable`` is None (:func:`default_prunable`: 2-D leaves
named ``kernel`` under a ``layers`` key, i.e. the linear layers of the
transformer blocks, never embeddings, norms or the LM head), a predicate
``(path, leaf) -> bool`` on jax key paths, or a pytree of bools (a prefix of
the params tree is enough). Per-leaf settings such as ``sparsity`` may be a
scalar or a pytree (again a prefix is enough) for non-uniform allocations.

State layout. Every tree in :class:`AdmmState` that follows the params has
exactly the params' structure: prunable leaves hold arrays of the param's
shape, the rest hold empty ``(0,)`` arrays. So ``tx.init`` only tree-maps over
the params, :func:`optax.tree_utils.tree_map_params` works on the state, and
shapes and dtypes never change through an update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elsa_jax.lowp import adam as _low_precision
from elsa_jax.sparsity import topk as _projection
from elsa_jax.lowp import ordering as _scheduling
from elsa_jax.lowp import codecs as quant

_EMPTY = (0,)
_MISSING = object()

Predicate = Callable[[tuple, Any], bool]


# ----------------------------------------------------------------------------
# Prunable leaves and per-leaf settings.


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path: tuple) -> tuple[str, ...]:
  """A jax key path as a tuple of strings, e.g. ``('layers', '0', 'mlp', ...)``."""
  return tuple(_key_name(k) for k in path)


def path_str(path: tuple) -> str:
  """A jax key path as ``'layers/0/mlp/up_proj/kernel'``."""
  return "/".join(path_names(path))


def default_prunable(path: tuple, leaf: Any) -> bool:
  """The default prunable set: 2-D ``kernel`` leaves below a ``layers`` key.

  With the project's LLaMA params this selects q, k, v, o, gate, up and down
  projections of every block, and never the embeddings, the norms or the LM
  head.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from elsa_jax import default_prunable
    >>> params = {"layers": {0: {"mlp": {"kernel": jnp.ones((4, 8))}}},
    ...           "lm_head": {"kernel": jnp.ones((4, 16))}}
    >>> jax.tree_util.tree_map_with_path(default_prunable, params)
    {'layers': {0: {'mlp': {'kernel': True}}}, 'lm_head': {'kernel': False}}

  Args:
    path: the leaf's jax key path.
    leaf: the leaf (anything with ``ndim``).

  Returns:
    Whether the leaf is pruned.
  """
  names = path_names(path)
  return (
      len(names) >= 2
      and names[-1] == "kernel"
      and "layers" in names[:-1]
      and getattr(leaf, "ndim", None) == 2
  )


class _PathLookup:
  """Finds the value of a (prefix) pytree that applies to a params path."""

  def __init__(self, tree: Any):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    self._entries = [(path_names(p), v) for p, v in flat]

  def __call__(self, path: tuple) -> Any:
    names = path_names(path)
    best, best_len = _MISSING, -1
    for prefix, value in self._entries:
      if len(prefix) > best_len and names[: len(prefix)] == prefix:
        best, best_len = value, len(prefix)
    return best


def _as_predicate(prunable) -> Predicate:
  if prunable is None:
    return default_prunable
  if callable(prunable):
    return prunable
  lookup = _PathLookup(prunable)

  def predicate(path, leaf):
    del leaf
    value = lookup(path)
    return False if value is _MISSING or value is None else bool(value)

  return predicate


def prunable_mask(params: Any, prunable=None) -> Any:
  """The params tree of bools saying which leaves are pruned.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import prunable_mask
    >>> prunable_mask({"layers": {"0": {"kernel": jnp.ones((2, 2))}},
    ...                "norm": {"scale": jnp.ones(2)}})
    {'layers': {'0': {'kernel': True}}, 'norm': {'scale': False}}

  Args:
    params: the params tree.
    prunable: None (:func:`default_prunable`), a predicate ``(path, leaf)``,
      or a (prefix) pytree of bools.

  Returns:
    A tree of Python bools with the params' structure.

  Raises:
    ValueError: when a prunable leaf is not a matrix.
  """
  predicate = _as_predicate(prunable)

  def leaf_fn(path, leaf):
    keep = bool(predicate(path, leaf))
    if keep:
      _check_matrix(path, leaf)
    return keep

  return jax.tree_util.tree_map_with_path(leaf_fn, params)


def _check_matrix(path, leaf):
  if getattr(leaf, "ndim", None) != 2:
    raise ValueError(
        f"prunable leaf {path_str(path)!r} has shape {getattr(leaf, 'shape', None)}, "
        "not a matrix; ELSA prunes 2-D weight matrices only. Exclude it with "
        "`prunable=` (a predicate or a bool tree)."
    )


def _is_concrete(x) -> bool:
  return isinstance(x, (int, float, np.ndarray, np.number)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
  )


def _check_sparsity(s, where: str = "") -> None:
  if not _is_concrete(s):
    return
  arr = np.asarray(s, dtype=np.float64)
  if arr.shape != ():
    raise ValueError(
        f"sparsity{where} must be a scalar per leaf, got shape {arr.shape}; give a "
        "float or a pytree of floats (one per prunable leaf)."
    )
  value = float(arr)
  if not 0.0 <= value < 1.0:
    raise ValueError(
        f"sparsity{where} must lie in [0, 1), got {value}; e.g. 0.9 prunes 90% of "
        "every prunable matrix."
    )


def _resolve_sparsity(sparsity, pattern: str, n_m: tuple[int, int]):
  """Validates ``sparsity`` and returns ``path -> sparsity`` for prunable leaves."""
  if pattern == "nm":
    n, m = n_m
    implied = 1.0 - n / m
    leaves = [] if sparsity is None else jax.tree.leaves(sparsity)
    for s in leaves:
      if _is_concrete(s) and abs(float(np.asarray(s)) - implied) > 1e-6:
        raise ValueError(
            f"pattern 'nm' with n_m={tuple(n_m)} prunes {implied:g}, but sparsity="
            f"{float(np.asarray(s)):g} was given; pass sparsity=None (or {implied:g})."
        )
    return lambda path: implied
  if sparsity is None:
    raise ValueError(
        "sparsity is required for the 'unstructured' and 'row' patterns, e.g. sparsity=0.9."
    )
  for p, s in jax.tree_util.tree_flatten_with_path(sparsity)[0]:
    _check_sparsity(s, f" at {path_str(p)!r}" if p else "")
  lookup = _PathLookup(sparsity)

  def at(path):
    value = lookup(path)
    if value is _MISSING or value is None:
      raise ValueError(
          f"no sparsity given for the prunable leaf {path_str(path)!r}; the sparsity "
          "pytree must cover every prunable leaf (a prefix is enough)."
      )
    return value

  return at


def _static_int(name: str, value) -> int:
  if not _is_concrete(value):
    raise ValueError(
        f"{name} must be a Python int, not a traced value; under "
        f"optax.inject_hyperparams list {name!r} in static_args."
    )
  return int(np.asarray(value))


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, choices))}.")


# ----------------------------------------------------------------------------
# The three ADMM steps on trees (pure, fp32).


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
    prunable: which leaves are pruned (see :func:`prunable_mask`).

  Returns:
    The penalised gradient, in the gradient's dtypes.
  """

  return _penalty(grads, params, z, u, lmda, prunable_mask(params, prunable))


def _penalty(grads, params, z, u, lmda, keep):
  def leaf(g, w, z_, u_, k):
    if not k:
      return g
    pen = lmda * (w.astype(jnp.float32) - z_.astype(jnp.float32) + u_.astype(jnp.float32))
    return (g.astype(jnp.float32) + pen).astype(g.dtype)

  return jax.tree.map(leaf, grads, params, z, u, keep)


def admm_projection(
    y,
    sparsity=None,
    *,
    v=None,
    pattern: str = "unstructured",
    n_m: tuple[int, int] = (2, 4),
    axis: int = 0,
    prunable=None,
):
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
      ignored for ``pattern="nm"``.
    v: None for the magnitude projection (score ``|y|``), or a tree of
      second-moment weights for the objective-aware one (score ``v * y**2``).
    pattern: ``"unstructured"``, ``"row"`` or ``"nm"``.
    n_m: ``(n, m)`` for ``"nm"``: keep ``n`` in each group of ``m``.
    axis: the axis along which entries compete (``0`` = input features of a
      Flax ``[in, out]`` kernel).
    prunable: which leaves are pruned; the others are returned unchanged.

  Returns:
    The projected tree.
  """
  _check_choice("pattern", pattern, ("unstructured", "row", "nm"))
  at = _resolve_sparsity(sparsity, pattern, n_m)
  keep = prunable_mask(y, prunable)
  if v is None:
    v = jax.tree.map(lambda _: None, keep)

  def leaf(path, x, k, v_):
    if not k:
      return x
    if pattern == "nm":
      _projection.check_nm(x.shape, n_m[0], n_m[1], axis)
    return _projection.project(x, at(path), v=v_, pattern=pattern, n_m=n_m, axis=axis)

  return jax.tree_util.tree_map_with_path(leaf, y, keep, v)


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
  keep = prunable_mask(params, prunable)

  def leaf(u_, w, z_, k):
    if not k:
      return u_
    return u_.astype(jnp.float32) + w.astype(jnp.float32) - z_.astype(jnp.float32)

  return jax.tree.map(leaf, u, params, z, keep)


# ----------------------------------------------------------------------------
# The transformation.


class AdmmMetrics(NamedTuple):
  """Convergence signals of :func:`admm`, as float32 scalars (device arrays).

  All but ``lmda`` are computed at the z-updates (with the weights right after
  the base step) and held in between; over prunable leaves only.

  Attributes:
    rel_gap: ``||w - z|| / ||w||``.
    primal_residual: ``||w - z||``.
    dual_residual: ``lmda * ||z - z_prev||`` (``z_prev`` from the previous
      z-update).
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
    z_scale: float32 scales of float8 ``z`` (scalar per tensor or
      ``[1, out]`` per row); empty arrays otherwise.
    u_scale: the same for ``u``.
    score: EMA of the squared loss gradient (``score_source="grad_ema"``) in
      ``score_dtype``; empty arrays when not used.
    score_scale: block absmax of an ``"int8"`` score; empty arrays otherwise.
    lmda: the penalty weight ``u`` is scaled for (the last step's).
    lmda_factor: the residual-balancing multiplier of ``lmda`` (1 otherwise).
    metrics: :class:`AdmmMetrics`.
    base_state: the base optimizer's state.
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


def _empty(dtype=jnp.float32):
  return jnp.zeros(_EMPTY, dtype)


def _is_empty(x) -> bool:
  return x.shape == _EMPTY


def _encode_state(x, dtype, scale_axis):
  """fp32 -> (storage, scale) for z and u."""
  if quant.is_fp8(dtype):
    return quant.quantize_scaled(x, dtype, axis=scale_axis)
  return x.astype(dtype), _empty()


def _zero_state(shape, dtype, scale_axis):
  """``_encode_state(zeros)`` without quantising a constant (slow to compile)."""
  if quant.is_fp8(dtype):
    return quant.scaled_zeros(shape, dtype, axis=scale_axis)
  return jnp.zeros(shape, dtype), _empty()


def _zero_score(shape, dtype):
  """``_encode_score(zeros)`` without quantising a constant."""
  if dtype == jnp.int8:
    return quant.blockwise_zeros(shape, signed=False)
  return jnp.zeros(shape, dtype), _empty()


def _decode_state(q, scale):
  if quant.is_fp8(q.dtype):
    return quant.dequantize_scaled(q, scale)
  return q.astype(jnp.float32)


def _encode_score(v, dtype):
  """Second-moment EMA -> (storage, scale); int8 is stored as sqrt(v) in uint8."""
  if dtype == jnp.int8:
    return quant.quantize_blockwise(jnp.sqrt(v), signed=False, keep_nonzero=True)
  return v.astype(dtype), _empty()


def _decode_score(q, scale):
  if q.dtype == jnp.uint8:
    return jnp.square(quant.dequantize_blockwise(q, scale))
  return q.astype(jnp.float32)


def _as_f32(x):
  return jnp.asarray(x, jnp.float32)


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
    pattern: str = "unstructured",
    n_m: tuple[int, int] = (2, 4),
    axis: int | None = None,
    prunable=None,
    lmda_schedule: str = "constant",
    balance_mu: float = 10.0,
    balance_tau: float = 2.0,
    sparsity_ramp: optax.Schedule | None = None,
    state_dtype: Any = "float32",
    state_scale: str = "tensor",
    score_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """ELSA: drives the prunable matrices to a sparse set by ADMM around ``base``.

  One update: (1) add ``lmda * (w - z + u)`` to the incoming gradient of every
  prunable leaf; (2) run ``base``; (3) at step counts ``0, interval,
  2 * interval, ...``, with ``w' = apply_updates(params, base_updates)``: set
  ``z = Proj_S(w' + u)`` then ``u = u + w' - z``. Returns ``base``'s updates.
  ``z`` starts as the magnitude projection of the initial params, ``u`` at 0.

  The paper clips the loss gradient before the penalty is added: chain
  :func:`optax.clip_by_global_norm` in front. Under :class:`optax.MultiSteps`
  ``interval`` counts optimizer steps, not micro-steps. Under
  :func:`optax.inject_hyperparams` the numeric arguments (``lmda``,
  ``sparsity``, ...) become traced hyperparameters; list ``prunable`` and
  ``sparsity_ramp`` in ``static_args`` when they are callables.

  By default the step count decides on the device whether a z/u update is
  due, through a :func:`jax.lax.cond`. That conditional is expensive: XLA
  copies ``z`` and ``u`` through it and fuses nothing across it (on the CPU it
  costs more than the whole Adam update). A training loop that knows the step
  on the host should instead pass the extra argument ``z_update=True`` or
  ``False`` (a static Python bool; jit the step once for each) at the steps
  where ``count % interval == 0`` holds or not, as :func:`elsa_jax.run.train.run`
  does. ``z_update`` overrides the schedule: it is the caller's to keep them
  in step.

  ``z_update="deferred"`` runs the z/u update on its own, as a separate
  program, so that its temporaries never coexist with the gradients, the
  activations and the base optimizer's: make the update due at step ``t``
  with ``z_update=False``, apply it, then call
  ``tx.update(updates, state, new_params, z_update="deferred")``, which
  returns ``updates`` untouched (ignore them) and the state after the z/u
  update of step ``t``, taken at ``w' = new_params``: the same state as
  ``z_update=True`` at step ``t`` gives, provided ``admm``'s updates are
  applied as they are (nothing after it in the chain).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.ones((8, 4))}}}
    >>> tx = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     elsa_jax.admm(optax.adam(1e-3, b2=0.95), sparsity=0.5, interval=4))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> float(elsa_jax.admm_metrics(state).rel_gap) > 0
    True

  Args:
    base: the base optimizer (Adam with betas (0.9, 0.95) in the paper).
    sparsity: fraction pruned in every prunable matrix, in ``[0, 1)``: a float
      or a (prefix) pytree of floats for per-leaf allocations. Implied by
      ``n_m`` for ``pattern="nm"`` (pass None).
    lmda: the penalty weight: a float, an :class:`optax.Schedule` of the step
      count, or a traced hyperparameter. Whenever the value changes, ``u`` is
      rescaled by ``lmda_old / lmda_new`` (it is the scaled dual).
    interval: steps between z/u updates.
    projection: ``"objective_aware"`` (keep the top ``v * y**2``) or
      ``"magnitude"`` (keep the top ``|y|``).
    score_source: where ``v`` comes from: ``"grad_ema"``, an EMA of the
      squared incoming gradient taken *before* the penalty is added (so the
      penalty cannot revive pruned entries); ``"base_second_moment"``, the
      ``nu`` of an Adam-family base optimizer (includes the penalty; the
      paper's choice); or ``"fixed"``, the constant ``fixed_score`` (SAFE+'s
      generalized projection: ``||X_j||**2`` of the input activations ranks
      entries by Wanda's ``|w| * ||X_j||``).
    score_decay: decay of the ``"grad_ema"`` EMA.
    fixed_score: for ``score_source="fixed"``: a (prefix) pytree of
      non-negative arrays broadcastable to each prunable leaf (e.g. ``[in, 1]``
      for a kernel); a constant of the transform, never part of its state.
    pattern: ``"unstructured"`` (one count per matrix), ``"row"`` (one count
      per output unit) or ``"nm"``.
    n_m: ``(n, m)`` for ``pattern="nm"``: keep ``n`` of every ``m``
      consecutive entries along ``axis``.
    axis: the axis along which entries compete for ``"row"`` and ``"nm"``
      (and along which per-row scales are shared). None means ``0``, the input
      features of a Flax ``[in, out]`` kernel, i.e. one group per output unit
      (a PyTorch row); None also keeps ``inject_hyperparams`` from tracing it.
    prunable: None (:func:`default_prunable`), a predicate ``(path, leaf) ->
      bool`` or a (prefix) pytree of bools.
    lmda_schedule: ``"constant"`` (``lmda`` as given) or
      ``"residual_balancing"``: at each z-update, multiply ``lmda`` by
      ``balance_tau`` when the primal residual exceeds ``balance_mu`` times
      the dual one, divide it when the reverse holds (Boyd et al. 2011, 3.4.1).
    balance_mu: residual-balancing ratio.
    balance_tau: residual-balancing factor.
    sparsity_ramp: optional schedule of the step count giving the fraction of
      the target sparsity used at a z-update (e.g.
      ``optax.linear_schedule(0.5, 1.0, 512)`` ramps from half the target).
    state_dtype: storage of ``z`` and ``u`` (ELSA-L): ``"float32"``,
      ``"bfloat16"``, ``"float8_e4m3fn"`` or ``"float8_e5m2"``. Float8 values
      carry a float32 scale, refreshed at every write.
    state_scale: ``"tensor"`` (one scale per matrix) or ``"row"`` (one per
      slice along ``axis``) for float8 storage.
    score_dtype: storage of the ``"grad_ema"`` score: ``"float32"``,
      ``"bfloat16"`` or ``"int8"`` (block-wise, square-root domain). Defaults
      to the state's own width: float32, bfloat16, or int8 for float8 state.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is
    :class:`AdmmState`.

  Raises:
    ValueError: for a sparsity outside ``[0, 1)``, an unknown option, or a
      base optimizer without a second moment under
      ``score_source="base_second_moment"``; at ``init``, for a prunable leaf
      that is not a matrix or whose axis ``m`` does not divide.
  """
  _check_choice("projection", projection, ("objective_aware", "magnitude"))
  _check_choice("score_source", score_source, ("grad_ema", "base_second_moment", "fixed"))
  _check_choice("pattern", pattern, ("unstructured", "row", "nm"))
  if score_source == "fixed" and projection == "objective_aware" and fixed_score is None:
    raise ValueError("score_source='fixed' needs fixed_score=, a pytree of importances per prunable leaf "
                     "(e.g. squared input-activation norms [in, 1] per kernel).")
  _check_choice("lmda_schedule", lmda_schedule, ("constant", "residual_balancing"))
  _check_choice("state_scale", state_scale, ("tensor", "row"))
  axis = _static_int("axis", 0 if axis is None else axis)
  if pattern == "nm":
    _projection.check_nm((n_m[1],), n_m[0], n_m[1], 0)
  if _is_concrete(interval) and int(np.asarray(interval)) < 1:
    raise ValueError(f"interval must be a positive integer, got {interval}.")
  state_dtype = quant.canonical_dtype(state_dtype)
  if state_dtype not in (jnp.float32, jnp.bfloat16) and not quant.is_fp8(state_dtype):
    raise ValueError(
        f"state_dtype {state_dtype} is not supported; use float32, bfloat16, "
        "float8_e4m3fn or float8_e5m2."
    )
  if score_dtype is None:
    score_dtype = state_dtype if state_dtype in (jnp.float32, jnp.bfloat16) else jnp.int8
  score_dtype = quant.canonical_dtype(score_dtype)
  if score_dtype not in (jnp.float32, jnp.bfloat16, jnp.int8):
    raise ValueError(f"score_dtype {score_dtype} is not supported; use float32, bfloat16 or int8.")

  sparsity_at = _resolve_sparsity(sparsity, pattern, n_m)
  is_prunable = _as_predicate(prunable)
  objective_aware = projection == "objective_aware"
  use_ema = objective_aware and score_source == "grad_ema"
  use_base_nu = objective_aware and score_source == "base_second_moment"
  use_fixed = objective_aware and score_source == "fixed"
  fixed_at = _PathLookup(fixed_score) if use_fixed else None
  scale_axis = None if state_scale == "tensor" else axis
  static_lmda = isinstance(lmda, (int, float)) and lmda_schedule == "constant"
  base = optax.with_extra_args_support(base)

  def lmda_at(count):
    return _as_f32(lmda(count) if callable(lmda) else lmda)

  def ramp_at(count):
    return 1.0 if sparsity_ramp is None else _as_f32(sparsity_ramp(count))

  def leaf_sparsity(path, count):
    s = sparsity_at(path)
    if pattern == "nm" or sparsity_ramp is None:
      return s
    return _as_f32(s) * ramp_at(count)

  def prunable_leaf(path, leaf) -> bool:
    if not is_prunable(path, leaf):
      return False
    _check_matrix(path, leaf)
    if pattern == "nm":
      _projection.check_nm(leaf.shape, n_m[0], n_m[1], axis)
    sparsity_at(path)  # raises when the leaf has none
    return True

  def masks_of(scores, sparsities):
    return _projection.sparsity_masks(scores, sparsities, pattern=pattern, n_m=n_m, axis=axis)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keep = [prunable_leaf(path, p) for path, p in flat]
    kept = [(path, p.astype(jnp.float32)) for (path, p), k in zip(flat, keep) if k]
    masks = masks_of(
        [_projection.magnitude_score(w) for _, w in kept],
        [leaf_sparsity(path, zero) for path, _ in kept],
    )
    z0 = iter(jnp.where(m, w, 0.0) for (_, w), m in zip(kept, masks))
    columns = [[] for _ in range(6)]  # z, z_scale, u, u_scale, score, score_scale
    for (_, p), k in zip(flat, keep):
      if k:
        z_q, z_s = _encode_state(next(z0), state_dtype, scale_axis)
        u_q, u_s = _zero_state(p.shape, state_dtype, scale_axis)
      else:
        z_q, z_s, u_q, u_s = _empty(state_dtype), _empty(), _empty(state_dtype), _empty()
      if k and use_ema:
        v_q, v_s = _zero_score(p.shape, score_dtype)
      else:
        v_q, v_s = _empty(score_dtype), _empty()
      for column, leaf in zip(columns, (z_q, z_s, u_q, u_s, v_q, v_s)):
        column.append(leaf)
    z, z_scale, u, u_scale, score, score_scale = (treedef.unflatten(c) for c in columns)
    stored = [q for q, k in zip(columns[0], keep) if k]
    z_zeros = sum((jnp.sum(quant.is_zero(q), dtype=jnp.float32) for q in stored), jnp.zeros([], jnp.float32))
    z_zeros = z_zeros / max(1, sum(q.size for q in stored))
    base_state = base.init(params)
    if use_base_nu and not _low_precision.find_second_moment(base_state)[0]:
      raise _no_second_moment_error(base_state)
    lmda0 = lmda_at(zero)
    # Distinct buffers for every scalar, so the state can be donated.
    scalar = lambda x: jnp.array(x, jnp.float32, copy=True)
    return AdmmState(
        count=zero,
        z=z,
        u=u,
        z_scale=z_scale,
        u_scale=u_scale,
        score=score,
        score_scale=score_scale,
        lmda=scalar(lmda0),
        lmda_factor=scalar(1.0),
        metrics=AdmmMetrics(scalar(0.0), scalar(0.0), scalar(0.0), scalar(0.0), z_zeros, scalar(lmda0)),
        base_state=base_state,
    )

  def update_fn(updates, state, params=None, *, z_update=None, **extra_args):
    if params is None:
      raise ValueError("admm needs the params: call tx.update(grads, state, params).")
    if isinstance(z_update, str) and z_update == "deferred":
      return updates, deferred_zu_update(state, params)
    if z_update is not None and not isinstance(z_update, (bool, np.bool_)):
      raise TypeError(
          f"z_update must be None, a Python bool (static under jit) or 'deferred', got "
          f"{z_update!r}; leave it None to let the step count decide on the device."
      )
    count = state.count
    keep = jax.tree_util.tree_map_with_path(prunable_leaf, params)
    treedef = jax.tree.structure(params)
    lmda_now = lmda_at(count) * state.lmda_factor

    # u is the scaled dual: when lmda changed, u *= lmda_old / lmda_new. Float8
    # storage rescales its float32 scale only; a ratio of 1 is exact otherwise.
    # A zero lmda (e.g. the end of a decaying schedule) leaves u as it is.
    valid = (lmda_now > 0) & (state.lmda > 0)
    ratio = jnp.where(valid, state.lmda / jnp.where(valid, lmda_now, 1.0), 1.0)

    def rescale(q, scale, k):
      if not k or static_lmda:
        return q, scale
      if quant.is_fp8(q.dtype):
        return q, scale * ratio
      return (q.astype(jnp.float32) * ratio).astype(q.dtype), scale

    u_q, u_s = _low_precision.unzip(
        jax.tree.map(rescale, state.u, state.u_scale, keep), params, 2
    )
    # The score EMA sees the incoming gradient, before the penalty is added.
    if use_ema:

      def ema(g, q, s, k, after):
        if not k:
          return q, s
        g = g.astype(jnp.float32) + after
        v = score_decay * _decode_score(q, s) + (1.0 - score_decay) * g * g
        return _encode_score(v, score_dtype)

      # Group after group for int8 scores, as for int8 moments (:mod:`elsa_jax.lowp.ordering`).
      rows = list(zip(*(treedef.flatten_up_to(t) for t in (updates, state.score, state.score_scale, keep))))
      new = _scheduling.map_in_groups(
          ema, rows, [g.size for g, *_ in rows],
          deps=(lambda i, o: o[1:] if rows[i][3] else ()) if score_dtype == jnp.int8 else None)
      score, score_scale = _low_precision.unzip(treedef.unflatten(new), params, 2)
    else:
      score, score_scale = state.score, state.score_scale

    if use_ema and score_dtype == jnp.int8 and state_dtype != jnp.float32:
      # Decode z and u only once this step's int8 score scales exist (they need
      # the clipped gradient, i.e. the whole backward pass): otherwise XLA may
      # decode every matrix's z and u at the start of the step and keep the
      # float32 copies through the backward (:mod:`elsa_jax.lowp.ordering`).
      # Free: the scales are small and computed anyway.
      decode = lambda q, s, k, v_s: _decode_state(_scheduling.after(q, v_s), s) if k else q
    else:
      decode = lambda q, s, k, v_s: _decode_state(q, s) if k else q
    u32 = jax.tree.map(decode, u_q, u_s, keep, score_scale)
    z32 = jax.tree.map(decode, state.z, state.z_scale, keep, score_scale)
    grads = _penalty(updates, params, z32, u32, lmda_now, keep)
    base_updates, base_state = base.update(grads, state.base_state, params, **extra_args)

    def zu_update():
      return _zu_update(params, base_updates, state._replace(u=u_q, u_scale=u_s, score=score,
                                                            score_scale=score_scale, base_state=base_state),
                        count, lmda_now, keep)

    def hold():
      m = state.metrics
      return (state.z, state.z_scale, u_q, u_s, state.lmda_factor,
              (m.rel_gap, m.primal_residual, m.dual_residual, m.mask_flip_fraction, m.z_sparsity))

    due = count % interval == 0
    if z_update is not None:  # the caller's static choice: no conditional in the step
      result = zu_update() if z_update else hold()
    elif _is_concrete(due):  # eager mode, or interval == 1 under jit
      result = zu_update() if bool(due) else hold()
    elif _is_concrete(interval) and int(np.asarray(interval)) == 1:
      result = zu_update()
    else:
      result = jax.lax.cond(due, zu_update, hold)
    z, z_scale, u, u_scale, lmda_factor, signals = result
    return base_updates, AdmmState(
        count=optax.safe_increment(count),
        z=z,
        u=u,
        z_scale=z_scale,
        u_scale=u_scale,
        score=score,
        score_scale=score_scale,
        lmda=_as_f32(lmda_now),
        lmda_factor=lmda_factor,
        metrics=AdmmMetrics(*signals, _as_f32(lmda_now)),
        base_state=base_state,
    )

  def deferred_zu_update(state, params):
    """The z/u update of the last update (made with ``z_update=False``), at ``params = w'``."""
    count = state.count - 1  # the update whose z/u step this is
    keep = jax.tree_util.tree_map_with_path(prunable_leaf, params)
    z, z_scale, u, u_scale, lmda_factor, signals = _zu_update(params, None, state, count, state.lmda, keep)
    return state._replace(z=z, u=u, z_scale=z_scale, u_scale=u_scale, lmda_factor=lmda_factor,
                          metrics=AdmmMetrics(*signals, state.lmda))

  def _zu_update(params, base_updates, state, count, lmda_now, keep):
    """``z = Proj(w' + u)``, ``u += w' - z`` with ``w' = params + base_updates``.

    ``base_updates`` None means ``params`` already are ``w'``. ``state`` holds
    the ``u`` (rescaled to ``lmda_now``), score and base state of this update.
    """
    u_q, u_s, score, score_scale, base_state = (
        state.u, state.u_scale, state.score, state.score_scale, state.base_state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = treedef.flatten_up_to
    if use_ema:  # decoded inside each group, from its stored form
      v = list(zip(leaves(score), leaves(score_scale)))
    elif use_base_nu:
      found, nu = _low_precision.find_second_moment(base_state)
      if not found:
        raise _no_second_moment_error(base_state)
      v = leaves(nu)
    elif use_fixed:
      v = [_fixed_leaf(fixed_at, path, w) for path, w in flat]
    else:
      v = [None] * len(flat)
    steps = [None] * len(flat) if base_updates is None else leaves(base_updates)
    total = lambda xs: sum(xs, jnp.zeros([], jnp.float32))
    kept = [i for i, k in enumerate(leaves(keep)) if k]
    u_q_l, u_s_l = leaves(u_q), leaves(u_s)
    z_q_l, z_s_l = leaves(state.z), leaves(state.z_scale)
    # z, z_scale, u, u_scale: prunable leaves are re-encoded with fresh scales
    # below; the others keep their placeholders.
    out = [leaves(t) for t in (state.z, state.z_scale, u_q, u_s)]

    def group_update(members, after, w, dw, u_in, z_in, z_sc, v_in):
      """The z/u update of some prunable leaves, from their stored state.

      ``after`` is a float32 zero computed from the previous group's results:
      added to every input, it orders the groups (see below).
      """
      u_prev = [_decode_state(q, sc) + after for q, sc in u_in]
      z_prev = [_decode_state(q, sc) + after for q, sc in zip(z_in, z_sc)]
      if use_ema:
        v_in = [_decode_score(q, sc) for q, sc in v_in]
      v_in = [v_ if v_ is None else v_ + after for v_ in v_in]
      # The weights right after the base step.
      w = [(w_ if d is None else optax.apply_updates(w_, d)).astype(jnp.float32) + after
           for w_, d in zip(w, dw)]
      y = [w_ + u_ for w_, u_ in zip(w, u_prev)]
      scores = [
          _projection.magnitude_score(y_) if v_ is None
          else _projection.objective_aware_score(y_, v_)
          for y_, v_ in zip(y, v_in)
      ]
      masks = masks_of(scores, [leaf_sparsity(flat[i][0], count) for i in members])
      z = [jnp.where(m, y_, 0.0) for m, y_ in zip(masks, y)]
      u_next = [u_ + w_ - z_ for u_, w_, z_ in zip(u_prev, w, z)]
      encoded = [(_encode_state(z_, state_dtype, scale_axis), _encode_state(un, state_dtype, scale_axis))
                 for z_, un in zip(z, u_next)]
      sums = jnp.stack([
          total([jnp.sum(jnp.square(w_ - z_)) for w_, z_ in zip(w, z)]),
          total([jnp.sum(jnp.square(w_)) for w_ in w]),
          total([jnp.sum(jnp.square(z_ - zp)) for z_, zp in zip(z, z_prev)]),
          total([jnp.sum((z_ != 0) != (zp != 0), dtype=jnp.float32) for z_, zp in zip(z, z_prev)]),
          total([jnp.sum(quant.is_zero(zq), dtype=jnp.float32) for (zq, _), _ in encoded]),  # stored zeros
      ])
      return encoded, sums

    # The update runs group by group (the groups of the joint bisection), so
    # that XLA can free one group's float32 temporaries (y, scores, z, u)
    # before it builds the next group's. Independent groups would leave the
    # order to XLA's scheduler, which (on the CPU at least) decodes the inputs
    # of every group first: each group's inputs get a zero that depends on the
    # previous group's sums (:mod:`elsa_jax.lowp.ordering`).
    sums = jnp.zeros(5, jnp.float32)
    sizes = [flat[i][1].size for i in kept]
    for members in _projection.leaf_groups(sizes, _projection.MAX_JOINT_ENTRIES):
      members = [kept[j] for j in members]
      inputs = (
          [flat[i][1] for i in members],
          [steps[i] for i in members],
          [(u_q_l[i], u_s_l[i]) for i in members],
          [z_q_l[i] for i in members],
          [z_s_l[i] for i in members],
          [v[i] for i in members],
      )
      after = _scheduling.zero_after(sums)
      encoded, group_sums = group_update(members, after, *inputs)
      sums = sums + group_sums
      for i, ((zq, zs), (uq, us)) in zip(members, encoded):
        out[0][i], out[1][i], out[2][i], out[3][i] = zq, zs, uq, us

    # Convergence signals over all prunable entries.
    primal = jnp.sqrt(sums[0])
    norm_w = jnp.sqrt(sums[1])
    dual = lmda_now * jnp.sqrt(sums[2])
    n = max(1, sum(sizes))
    signals = (
        primal / jnp.maximum(norm_w, jnp.finfo(jnp.float32).tiny),
        primal,
        dual,
        sums[3] / n,
        sums[4] / n,
    )
    factor = state.lmda_factor
    if lmda_schedule == "residual_balancing":
      up = primal > balance_mu * dual
      down = dual > balance_mu * primal
      factor = factor * jnp.where(up, balance_tau, jnp.where(down, 1.0 / balance_tau, 1.0))

    return (*(treedef.unflatten(o) for o in out), _as_f32(factor), signals)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _fixed_leaf(lookup: _PathLookup, path: tuple, leaf: Any) -> Any:
  """The fixed score of a prunable leaf, checked to broadcast to it (None elsewhere)."""
  value = lookup(path)
  if value is _MISSING or value is None:
    return None
  try:
    np.broadcast_shapes(np.shape(value), leaf.shape)
  except ValueError:
    raise ValueError(
        f"fixed_score for {path_str(path)!r} has shape {np.shape(value)}, which does not broadcast to "
        f"the leaf's {leaf.shape}; give [in, 1] per-input importances for a [in, out] kernel."
    ) from None
  return jnp.asarray(value, jnp.float32)


def _no_second_moment_error(base_state) -> ValueError:
  return ValueError(
      "score_source='base_second_moment' needs a base optimizer with an Adam-style "
      f"second moment `nu` in its state, found none in {type(base_state).__name__}; "
      "use an Adam-family base (optax.adam, elsa_jax.adam_lowp, ...) or "
      "score_source='grad_ema'."
  )


# ----------------------------------------------------------------------------
# Reading the state, finishing, reporting.


def find_admm_state(opt_state: Any) -> AdmmState | None:
  """The first :class:`AdmmState` inside a (chained, wrapped) optimizer state."""
  if isinstance(opt_state, AdmmState):
    return opt_state
  if isinstance(opt_state, dict):
    children = opt_state.values()
  elif isinstance(opt_state, (tuple, list)):
    children = opt_state
  else:
    return None
  for child in children:
    found = find_admm_state(child)
    if found is not None:
      return found
  return None


def admm_metrics(opt_state: Any) -> AdmmMetrics:
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
    opt_state: an optimizer state that contains an :class:`AdmmState`.

  Returns:
    :class:`AdmmMetrics`.

  Raises:
    ValueError: when the state contains no :class:`AdmmState`.
  """
  state = find_admm_state(opt_state)
  if state is None:
    raise ValueError(
        "no elsa_jax.admm state found in this optimizer state; pass the state of "
        "an optimizer built with elsa_jax.admm(...)."
    )
  return state.metrics


def _second_moment_for_finalize(opt_state):
  admm_state = find_admm_state(opt_state)
  if admm_state is not None:
    has_score = any(not _is_empty(x) for x in jax.tree.leaves(admm_state.score))
    if has_score:
      return jax.tree.map(
          lambda q, s: q if _is_empty(q) else _decode_score(q, s),
          admm_state.score,
          admm_state.score_scale,
      )
    found, v = _low_precision.find_second_moment(admm_state.base_state)
  else:
    found, v = _low_precision.find_second_moment(opt_state)
  if not found:
    raise ValueError(
        "projection='objective_aware' needs a second moment, but the optimizer state "
        "holds neither an ELSA grad-EMA score nor an Adam-family `nu`; pass the state "
        "of the ELSA run or use projection='magnitude'."
    )
  return v


def finalize(
    params: Any,
    opt_state: Any = None,
    *,
    sparsity=None,
    pattern: str = "unstructured",
    n_m: tuple[int, int] = (2, 4),
    axis: int = 0,
    projection: str = "objective_aware",
    prunable=None,
    score: Any = None,
) -> Any:
  """The final hard projection of the weights themselves (not ``w + u``).

  Every prunable matrix ends with exactly ``round(sparsity * numel)`` pruned
  entries (``"unstructured"``), ``round(sparsity * shape[axis])`` per slice
  (``"row"``), or ``m - n`` per group (``"nm"``); ties are broken by position.
  The objective-aware score ``v * w**2`` reads ``v`` from ``opt_state``: the
  grad-EMA score of :func:`admm` when it has one, else the base optimizer's
  ``nu``. Non-prunable leaves are returned unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> import elsa_jax
    >>> params = {"layers": {"0": {"kernel": jnp.arange(1., 9.).reshape(4, 2)}}}
    >>> pruned = elsa_jax.finalize(params, sparsity=0.5, projection="magnitude")
    >>> pruned["layers"]["0"]["kernel"].tolist()
    [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]

  Args:
    params: the trained params.
    opt_state: the optimizer state of the run (needed for
      ``projection="objective_aware"``).
    sparsity: a float or (prefix) pytree of floats in ``[0, 1)``; implied by
      ``n_m`` for ``"nm"``.
    pattern: ``"unstructured"``, ``"row"`` or ``"nm"``.
    n_m: ``(n, m)`` for ``"nm"``.
    axis: the axis along which entries compete (``0`` = input features of a
      Flax ``[in, out]`` kernel).
    projection: ``"objective_aware"`` or ``"magnitude"``.
    prunable: which leaves are pruned (see :func:`prunable_mask`).
    score: for ``"objective_aware"``: a (prefix) pytree of ``v`` broadcastable
      to each prunable leaf, used instead of the state's (the ``fixed_score``
      of a ``score_source="fixed"`` run).

  Returns:
    The params with every prunable matrix projected onto the sparse set.

  Raises:
    ValueError: for a bad sparsity, pattern or axis, a prunable leaf that is
      not a matrix or holds NaN, or a missing second moment.
  """
  _check_choice("projection", projection, ("objective_aware", "magnitude"))
  _check_choice("pattern", pattern, ("unstructured", "row", "nm"))
  at = _resolve_sparsity(sparsity, pattern, n_m)
  keep = prunable_mask(params, prunable)
  if projection == "magnitude":
    v = None
  elif score is not None:
    lookup = _PathLookup(score)
    v = jax.tree_util.tree_map_with_path(
        lambda path, w, k: _fixed_leaf(lookup, path, w) if k else None, params, keep)
  else:
    if opt_state is None:
      raise ValueError(
          "projection='objective_aware' needs the run's optimizer state: call "
          "finalize(params, opt_state, ...) or use projection='magnitude'."
      )
    v = _second_moment_for_finalize(opt_state)

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  v_leaves = [None] * len(flat) if v is None else treedef.flatten_up_to(v)
  kept = []
  for (path, w), k, v_ in zip(flat, jax.tree.leaves(keep), v_leaves):
    if not k:
      continue
    if pattern == "nm":
      _projection.check_nm(w.shape, n_m[0], n_m[1], axis)
    if _is_concrete(w) and bool(jnp.isnan(w).any()):
      raise ValueError(
          f"prunable leaf {path_str(path)!r} contains NaN; the run diverged. Lower "
          "the learning rate or lmda, or finalize an earlier checkpoint."
      )
    s = at(path)
    kept.append((w, v_, float(np.asarray(s)) if _is_concrete(s) else s))
  scores = [
      _projection.magnitude_score(w) if v_ is None else _projection.objective_aware_score(w, v_)
      for w, v_, _ in kept
  ]
  masks = iter(_projection.sparsity_masks(
      scores, [s for _, _, s in kept], pattern=pattern, n_m=tuple(n_m), axis=axis
  ))
  return treedef.unflatten([
      jnp.where(next(masks), w, jnp.zeros_like(w)) if k else w
      for (_, w), k in zip(flat, jax.tree.leaves(keep))
  ])


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
    prunable: which leaves count (see :func:`prunable_mask`); only they enter
      the overall figure.

  Returns:
    ``{"per_matrix": {path: sparsity}, "overall": float, "zeros": int,
    "total": int}`` with plain Python numbers.
  """
  keep = prunable_mask(params, prunable)
  per_matrix, zeros, total = {}, 0, 0
  for (path, w), k in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(keep)):
    if not k:
      continue
    nz = int(jnp.sum(w == 0))
    n = math.prod(w.shape)
    per_matrix[path_str(path)] = nz / max(n, 1)
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
    prunable: which leaves are pruned (see :func:`prunable_mask`).

  Returns:
    ``{"total": bytes, "params": count, "prunable_params": count,
    "per_param": bytes / params, "per_prunable_param": bytes / prunable}``.
  """
  total = sum(
      math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(opt_state)
      if hasattr(x, "shape") and hasattr(x, "dtype")
  )
  keep = prunable_mask(params, prunable)
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
