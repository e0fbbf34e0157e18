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
"""The frozen configuration of :func:`elsa_jax.admm`, validated once.

:func:`make_config` checks every argument of ``admm`` and returns an
:class:`AdmmConfig`. The z/u update and :func:`elsa_jax.finalize` read the
target (sparsity, pattern, prunable set, score) from it. A copy of it rides
in :class:`elsa_jax.AdmmState` as static pytree data (no arrays, nothing in a
checkpoint): values that were traced when the state was built (hyperparameters
of ``optax.inject_hyperparams``) are stored as None there and read back from
the hyperparameters in the state (:func:`resolve`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elsa_jax.lowp import codecs
from elsa_jax.optim import scores as scores_lib
from elsa_jax.sparsity import patterns as patterns_lib
from elsa_jax.sparsity import prunable as prunable_lib

_NUMERIC = ("sparsity", "interval", "lmda", "balance_mu", "balance_tau")


class _Entries(tuple):
  """A frozen per-leaf sparsity: ``((path names, float), ...)``."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AdmmConfig:
  """What :func:`elsa_jax.admm` drives the params to, and how (see its arguments).

  Attributes:
    pattern: the sparsity pattern (:mod:`elsa_jax.sparsity.patterns`).
    axis: the axis along which entries compete (``"row"``, N:M, per-row scales).
    sparsity: the fraction pruned: a float or a (prefix) pytree (None for N:M,
      which implies it).
    prunable: the predicate ``(path, leaf) -> bool`` of the pruned leaves.
    score: the projection's score source (:mod:`elsa_jax.optim.scores`).
    interval: steps between z/u updates.
    lmda: the penalty weight (a float or a schedule of the step count).
    lmda_schedule: ``"constant"`` or ``"residual_balancing"``.
    balance_mu: residual-balancing ratio.
    balance_tau: residual-balancing factor.
    sparsity_ramp: None or a schedule of the fraction of the target used at a z-update.
    state_dtype: storage of ``z`` and ``u``.
    state_scale: ``"tensor"`` or ``"row"`` scales of float8 state.
    global_bounds: None (each matrix at its own sparsity), or ``(s_min, s_max)``:
      ``--allocation global``, one threshold on the projection's score over every
      prunable matrix, each matrix's sparsity within the bounds.
  """

  pattern: patterns_lib.Pattern
  axis: int
  sparsity: Any
  prunable: Callable[[tuple, Any], bool]
  score: Any
  interval: Any
  lmda: Any
  lmda_schedule: str
  balance_mu: Any
  balance_tau: Any
  sparsity_ramp: Callable | None
  state_dtype: Any
  state_scale: str
  global_bounds: tuple[float, float] | None = None

  def __hash__(self):  # the per-leaf sparsity of a static copy is a tuple; a live config is never hashed
    return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

  @property
  def scale_axis(self) -> int | None:
    return None if self.state_scale == "tensor" else self.axis

  @functools.cached_property
  def _sparsity_at(self) -> Callable[[tuple], Any]:
    sparsity = self.sparsity
    if isinstance(sparsity, _Entries):
      sparsity = prunable_lib.PathLookup.from_entries(sparsity)
    return prunable_lib.resolve_sparsity(sparsity, self.pattern)

  def sparsity_at(self, path: tuple) -> Any:
    """The target sparsity of the prunable leaf at ``path`` (raises when the tree does not cover it)."""
    return self._sparsity_at(path)

  def leaf_sparsity(self, path: tuple, count) -> Any:
    """:meth:`sparsity_at`, times the ramp at ``count`` (N:M is never ramped)."""
    s = self.sparsity_at(path)
    if isinstance(self.pattern, patterns_lib.NM) or self.sparsity_ramp is None:
      return s
    return jnp.asarray(s, jnp.float32) * jnp.asarray(self.sparsity_ramp(count), jnp.float32)

  def leaf_bounds(self, count) -> tuple[Any, Any] | None:
    """:attr:`global_bounds` times the ramp at ``count`` (None without a global allocation)."""
    if self.global_bounds is None or self.sparsity_ramp is None:
      return self.global_bounds
    ramp = jnp.asarray(self.sparsity_ramp(count), jnp.float32)
    return tuple(jnp.float32(b) * ramp for b in self.global_bounds)

  def lmda_at(self, count) -> jax.Array:
    return jnp.asarray(self.lmda(count) if callable(self.lmda) else self.lmda, jnp.float32)

  def is_prunable(self, path: tuple, leaf: Any) -> bool:
    """Whether ``leaf`` is pruned; raises for a prunable leaf that cannot be (shape, missing sparsity)."""
    if not self.prunable(path, leaf):
      return False
    prunable_lib.check_matrix(path, leaf)
    self.pattern.check_shape(leaf.shape, self.axis)
    self.sparsity_at(path)
    return True

  def static(self) -> "AdmmConfig":
    """The copy stored in the state: Python values only (jax arrays, e.g. injected ones, become None)."""
    values = {}
    for name in _NUMERIC:
      value = getattr(self, name)
      if value is None or isinstance(value, _Entries):  # unset (N:M), or already frozen
        pass
      elif name == "sparsity":
        entries = prunable_lib.frozen_entries(value)
        value = None if entries is None else _Entries(entries)
      elif prunable_lib.is_python_scalar(value):
        value = np.asarray(value).item()
      elif not callable(value):  # a jax array (an injected hyperparameter): read back from the state
        value = None
      values[name] = value
    score = self.score
    if isinstance(score, scores_lib.GradEma) and not prunable_lib.is_python_scalar(score.decay):
      score = dataclasses.replace(score, decay=None)
    return dataclasses.replace(self, score=score, **values)


def resolve(config: AdmmConfig, opt_state: Any) -> AdmmConfig:
  """``config`` with the values its static copy lacks read from ``optax.inject_hyperparams``' state."""
  missing = [n for n in _NUMERIC if getattr(config, n) is None and not (n == "sparsity" and isinstance(
      config.pattern, patterns_lib.NM))]
  if not missing:
    return config
  hyperparams = optax.tree_utils.tree_get(opt_state, "hyperparams") or {}
  absent = [n for n in missing if n not in hyperparams]
  if absent:
    raise ValueError(f"the admm state does not record {', '.join(absent)} (they were traced arrays when it "
                     "was built); pass them explicitly, or inject them with optax.inject_hyperparams.")
  return dataclasses.replace(config, **{n: hyperparams[n] for n in missing})


def make_config(*, sparsity, lmda, interval, projection, score_source, score_decay, fixed_score, pattern, n_m,
                axis, prunable, lmda_schedule, balance_mu, balance_tau, sparsity_ramp, state_dtype, state_scale,
                score_dtype, global_bounds=None) -> AdmmConfig:
  """Validates :func:`elsa_jax.admm`'s arguments (see there) and returns the config."""
  pattern = patterns_lib.parse(pattern, n_m)
  prunable_lib.check_choice("lmda_schedule", lmda_schedule, ("constant", "residual_balancing"))
  prunable_lib.check_choice("state_scale", state_scale, ("tensor", "row"))
  axis = prunable_lib.static_int("axis", 0 if axis is None else axis)
  if prunable_lib.is_concrete(interval) and int(np.asarray(interval)) < 1:
    raise ValueError(f"interval must be a positive integer, got {interval}.")
  state_dtype = codecs.canonical_dtype(state_dtype)
  if state_dtype not in (jnp.float32, jnp.bfloat16) and not codecs.is_fp8(state_dtype):
    raise ValueError(f"state_dtype {state_dtype} is not supported; use float32, bfloat16, "
                     "float8_e4m3fn or float8_e5m2.")
  if score_dtype is None:
    score_dtype = state_dtype if state_dtype in (jnp.float32, jnp.bfloat16) else jnp.int8
  score_dtype = codecs.canonical_dtype(score_dtype)
  if score_dtype not in (jnp.float32, jnp.bfloat16, jnp.int8):
    raise ValueError(f"score_dtype {score_dtype} is not supported; use float32, bfloat16 or int8.")
  score = scores_lib.make_score(projection, score_source, decay=score_decay, dtype=score_dtype,
                                fixed_score=fixed_score)
  prunable_lib.resolve_sparsity(sparsity, pattern)  # validates
  if global_bounds is not None:
    global_bounds = check_global_bounds(global_bounds, sparsity, pattern)
  return AdmmConfig(
      pattern=pattern, axis=axis, sparsity=None if isinstance(pattern, patterns_lib.NM) else sparsity,
      prunable=prunable_lib.as_predicate(prunable), score=score, interval=interval, lmda=lmda,
      lmda_schedule=lmda_schedule, balance_mu=balance_mu, balance_tau=balance_tau,
      sparsity_ramp=sparsity_ramp, state_dtype=state_dtype, state_scale=state_scale, global_bounds=global_bounds)


def check_global_bounds(bounds, sparsity, pattern: patterns_lib.Pattern) -> tuple[float, float]:
  """``bounds`` as ``(s_min, s_max)`` floats; refuses bounds that exclude ``sparsity``, or a pattern with
  fixed or per-row counts (a global threshold moves counts between matrices)."""
  if not isinstance(pattern, patterns_lib.Unstructured):
    raise ValueError(f"global_bounds (--allocation global) moves counts between matrices; the {pattern} pattern "
                     "fixes them per group or row: use the unstructured pattern, or drop global_bounds.")
  if isinstance(sparsity, (dict, list, tuple)) or np.ndim(sparsity) != 0:
    raise ValueError("global_bounds (--allocation global) needs one sparsity, the model-wide target, not a "
                     "tree of them.")
  low, high = (float(b) for b in bounds)
  if not 0.0 <= low <= high < 1.0 or (prunable_lib.is_concrete(sparsity) and not low <= float(sparsity) <= high):
    raise ValueError(f"global_bounds ({low:g}, {high:g}) (--global-min/--global-max) must satisfy 0 <= s_min <= "
                     f"sparsity ({float(sparsity):g}) <= s_max < 1.")
  return low, high
