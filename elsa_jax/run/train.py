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
"""The ELSA pruning loop: a sharded, jitted train step, checkpoints and logging.

The loop is deliberately thin: the method lives in the optax transforms
(:func:`elsa_jax.admm`), the model in :mod:`elsa_jax.models` (any registered
architecture), the data in
:mod:`elsa_jax.data.documents`. This module wires them together under a device mesh:

* parameters (fp32 master copy), gradients and optimizer state are placed with
  ``NamedSharding`` derived from the model's logical axes;
* one jitted step computes the next-token loss in the compute dtype (bf16 by
  default), accumulates gradients over micro-batches, applies the optimizer and
  returns metrics as device arrays (no host sync inside the step);
* the host reads metrics only every ``log_every`` steps, one step behind, so
  the device never waits for the host.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elsa_jax.optim import finalize as finalize_lib
from elsa_jax.optim import transform as _admm
from elsa_jax.lowp import adam as _low_precision
from elsa_jax.optim import sam as _sam
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run import checks
from elsa_jax.run import losses
from elsa_jax.run.metrics_log import MetricsLogger
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import teacher as teacher_lib
from elsa_jax import hosts
from elsa_jax import models
from elsa_jax.optim import masked as _masked
from elsa_jax.sparsity import allocation as _allocation
from elsa_jax.sparsity import patterns

logger = logging.getLogger(__name__)


#: The ElsaConfig fields that name one of a few choices (None: the field's own default rule).
CHOICES = {
    "lmda_schedule": ("constant", "residual_balancing"),
    "projection": ("objective_aware", "magnitude"),
    "score_source": ("grad_ema", "base_second_moment", "activations"),
    "state_dtype": ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2"),
    "moment_dtype": ("float32", "bfloat16", "int8"),
    "score_dtype": (None, "float32", "bfloat16", "int8"),
    "compute_dtype": ("bfloat16", "float32", "float16"),
}
#: ``(field, low, high, closed)``: the field must be finite and in ``[low, high)``, or ``(low, high)``
#: when not ``closed`` (a None bound is open).
_BOUNDS = (("lr", 0.0, None, False), ("lmda", 0.0, None, True), ("b1", 0.0, 1.0, True), ("b2", 0.0, 1.0, True),
           ("eps", 0.0, None, True), ("clip", 0.0, None, False), ("sam_rho", 0.0, None, True),
           ("distill_temp", 0.0, None, False))


@dataclasses.dataclass(frozen=True)
class ElsaConfig:
  """Hyperparameters of one ELSA run (the resumable part of a run's config)."""

  sparsity: float = 0.5
  pattern: str = "unstructured"  # unstructured | row | 2:4 | 4:8 (any N:M)
  lmda: float = 0.01
  lmda_schedule: str = "constant"  # constant | residual_balancing
  interval: int = 32
  projection: str = "objective_aware"  # objective_aware | magnitude
  score_source: str = "grad_ema"  # grad_ema | base_second_moment | activations (SAFE+)
  sam_rho: float = 0.0  # > 0: SAFE's sharpness-aware x-update (gradient at w + rho g/||g||)
  steps: int = 1024
  batch_size: int = 8
  grad_accum: int = 1
  seqlen: int = 1024
  lr: float = 1e-3
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip: float = 1.0
  state_dtype: str = "float32"  # z/u storage: float32 | bfloat16 | float8_e4m3fn | float8_e5m2
  moment_dtype: str = "float32"  # Adam moments: float32 | bfloat16 | int8
  score_dtype: str | None = None  # grad_ema score: float32 | bfloat16 | int8 (None: the state's width, int8 for fp8)
  compute_dtype: str = "bfloat16"
  seed: int = 0
  allocation: str = "uniform"  # uniform | owl (per layer, from the outlier ratios) | global (ELSA)
  owl_m: float = _allocation.OWL_M  # OWL's outlier threshold, a multiple of a layer's mean Wanda score
  owl_lambda: float = _allocation.OWL_LAMBDA  # OWL's half-width of the layer sparsities
  global_min: float | None = None  # global: a matrix's least sparsity (None: _allocation.global_bounds')
  global_max: float | None = None  # global: a matrix's most sparsity
  # Distillation from the dense model (elsa_jax.run.teacher): the x-update's loss is
  # (1 - distill) CE + distill (distill_temp^2 KL(teacher_T || student_T) [+ SquareHead, with squarehead]).
  distill: float = 0.0  # a in [0, 1]; 0: the CE alone, no teacher
  distill_temp: float = 1.0  # T > 0, the softmax temperature of both models
  squarehead: bool = False  # add SquareHead's per-block feature loss to the distillation term (needs distill > 0)

  def __post_init__(self):
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"--sparsity must lie in [0, 1), got {self.sparsity}; e.g. 0.7 prunes 70%.")
    for name in ("steps", "batch_size", "grad_accum", "seqlen", "interval"):
      if getattr(self, name) < 1:
        raise ValueError(f"{checks.flag(name)} must be a positive integer, got {getattr(self, name)}.")
    for name, low, high, closed in _BOUNDS:
      checks.check_bound(name, getattr(self, name), low, high, closed)
    for name, choices in CHOICES.items():
      checks.check_choice(name, getattr(self, name), choices)
    _check_distill(self.distill, self.squarehead)
    try:
      pattern = patterns.parse(self.pattern)
    except ValueError as err:
      raise ValueError(f"--pattern: {err}") from None
    _allocation.check_allocation(self.allocation, self.sparsity, self.owl_m, self.owl_lambda,
                                 fixed_counts=str(pattern) if isinstance(pattern, patterns.NM) else None,
                                 per_row=isinstance(pattern, patterns.PerRow))
    if self.allocation == "global":
      _allocation.check_global(self.sparsity, *self.global_bounds)
    elif (self.global_min, self.global_max) != (None, None):
      raise ValueError(f"--global-min/--global-max bound the matrices of --allocation global; this run's "
                       f"allocation is {self.allocation}: add --allocation global or drop them.")

  @property
  def global_bounds(self) -> tuple[float, float]:
    """``(s_min, s_max)`` of ``--allocation global``: the flags, else :func:`elsa_jax.sparsity.allocation.global_bounds`."""
    low, high = _allocation.global_bounds(self.sparsity)
    return (low if self.global_min is None else self.global_min, high if self.global_max is None else self.global_max)

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.grad_accum * self.seqlen


def _check_distill(distill: float, squarehead: bool) -> None:
  """Refuses a ``--distill`` outside ``[0, 1]``, and ``--squarehead`` without distillation."""
  if not (isinstance(distill, numbers.Real) and 0.0 <= distill <= 1.0):  # NaN too
    raise ValueError(f"--distill must lie in [0, 1], got {distill}; it is the weight a of the distillation term "
                     f"in (1 - a) CE + a T^2 KL.")
  if squarehead and distill == 0:
    raise ValueError("--squarehead adds its per-block loss to the distillation term, which --distill 0 turns off; "
                     "give --distill A with A in (0, 1], e.g. 0.5.")


def pattern_sparsity(cfg: ElsaConfig) -> float:
  """The sparsity a run prunes: N:M keeps N of every M, i.e. ``1 - N/M`` pruned; else ``cfg.sparsity``."""
  pattern = patterns.parse(cfg.pattern)
  return pattern.sparsity if isinstance(pattern, patterns.NM) else cfg.sparsity


def _base_adam(cfg: ElsaConfig) -> optax.GradientTransformation:
  """Adam with the run's betas, eps and moment storage, its lr decaying linearly to 0 over ``cfg.steps``."""
  schedule = optax.linear_schedule(cfg.lr, 0.0, cfg.steps)
  if cfg.moment_dtype == "float32":
    return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  return _low_precision.adam_lowp(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, moment_dtype=cfg.moment_dtype)


def make_optimizer(cfg: ElsaConfig, fixed_score: Any = None, sparsity: Any = None
                   ) -> optax.GradientTransformationExtraArgs:
  """Clip -> ELSA(ADMM around Adam with linear decay), as the paper does.

  ``fixed_score`` (squared input-activation norms per kernel, see
  :func:`activation_scores`) is required by ``score_source="activations"``.
  ``sparsity``: a per-matrix tree (``--allocation owl``,
  :func:`elsa_jax.oneshot.owl.owl_sparsities`) in place of ``cfg.sparsity``.
  """
  if cfg.allocation == "owl" and sparsity is None:
    raise ValueError("--allocation owl needs per-matrix sparsities (elsa_jax.oneshot.owl.owl_sparsities).")
  base = _base_adam(cfg)
  kwargs = dict(
      sparsity=pattern_sparsity(cfg) if sparsity is None else sparsity,
      lmda=cfg.lmda,
      interval=cfg.interval,
      projection=cfg.projection,
      score_source="fixed" if cfg.score_source == "activations" else cfg.score_source,
      pattern=patterns.parse(cfg.pattern),
      state_dtype=cfg.state_dtype,
      score_dtype=cfg.score_dtype,
      global_bounds=cfg.global_bounds if cfg.allocation == "global" else None,
  )
  if cfg.score_source == "activations":
    if fixed_score is None and cfg.projection == "objective_aware":
      raise ValueError("score_source='activations' needs the activation scores of the calibration data "
                       "(train.activation_scores); elsa_jax.cli.jobs computes them.")
    kwargs["fixed_score"] = fixed_score
  if cfg.lmda_schedule == "residual_balancing":
    kwargs["lmda_schedule"] = "residual_balancing"
  elif cfg.lmda_schedule != "constant":
    raise ValueError(f"unknown lmda schedule {cfg.lmda_schedule!r}; use 'constant' or 'residual_balancing'.")
  return optax.chain(optax.clip_by_global_norm(cfg.clip), _admm.admm(base, **kwargs))


def make_finetune_optimizer(cfg: ElsaConfig, prunable=None) -> optax.GradientTransformationExtraArgs:
  """Masked recovery (``--finetune-steps``): clip -> Adam of :func:`make_optimizer`, on the surviving
  weights only (:func:`elsa_jax.optim.masked.keep_mask`): the zeros of the params it is initialised
  with stay exactly zero."""
  return _masked.keep_mask(optax.chain(optax.clip_by_global_norm(cfg.clip), _base_adam(cfg)), prunable=prunable)


next_token_loss = losses.next_token_loss  # re-exported: it lived here


def make_loss_fn(graphdef: Any, compute_dtype: jnp.dtype) -> Callable[[Any, jax.Array], jax.Array]:
  """loss(params, tokens[B, T+1]) with params cast to the compute dtype.

  The logits are those of ``graphdef``'s architecture (:func:`elsa_jax.models.architecture_of`).
  """
  apply = models.architecture_of(graphdef).apply

  def loss_fn(params, tokens):
    cparams = teacher_lib.cast_floating(params, compute_dtype)
    logits = apply(graphdef, cparams, tokens[:, :-1])
    return next_token_loss(logits, tokens)

  return loss_fn


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    *,
    compute_dtype: jnp.dtype = jnp.bfloat16,
    sam_rho: float = 0.0,
    z_update: bool | None = None,
    distill: teacher_lib.DistillSpec | None = None,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
  """Returns ``step(params, opt_state, batch[accum, B, T+1]) -> (params, opt_state, metrics)``.

  Gradients are averaged over the ``accum`` micro-batches with a ``lax.scan``
  so that memory stays that of one micro-batch. ``sam_rho > 0`` takes each
  micro-batch's gradient sharpness-aware (:func:`elsa_jax.sam_gradient`; SAFE).
  ``z_update`` (True or False) is passed to :func:`elsa_jax.admm` as its static
  extra argument: build one step with each and call the first when
  ``step % interval == 0`` (None keeps the on-device conditional).
  ``distill`` (:func:`elsa_jax.run.teacher.spec`): the step is then
  ``step(params, opt_state, batch, teacher)`` and minimises the distillation loss
  (:func:`elsa_jax.run.teacher.distill_grad_fn`); its metrics add the loss's terms.
  """
  grad_fn = _grad_fn(graphdef, compute_dtype, sam_rho, distill)
  names = teacher_lib.metric_names(distill)

  def step(params, opt_state, batch, *teacher):
    def micro(carry, tokens):
      sums, grad_sum = carry
      values, grads = grad_fn(params, tokens, *teacher)
      return (jax.tree.map(jnp.add, sums, values), jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    sums = {name: jnp.zeros((), jnp.float32) for name in names}
    (sums, grad_sum), _ = jax.lax.scan(micro, (sums, zeros), batch)
    n = batch.shape[0]
    grads = jax.tree.map(lambda g: g / n, grad_sum)
    extra = {} if z_update is None else {"z_update": z_update}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    metrics = {**{name: total / n for name, total in sums.items()}, "grad_norm": optax.tree.norm(grads)}
    if _admm.find_admm_state(opt_state) is not None:
      metrics.update(finalize_lib.admm_metrics(opt_state)._asdict())
    return params, opt_state, metrics

  return step


def _grad_fn(graphdef: Any, compute_dtype: jnp.dtype, sam_rho: float, distill: teacher_lib.DistillSpec | None
             ) -> Callable[..., tuple[dict[str, jax.Array], Any]]:
  """``grad_fn(params, tokens[, teacher]) -> ({"loss": ...}, grads)``, one micro-batch's (:func:`make_train_step`)."""
  if distill is not None:
    return teacher_lib.distill_grad_fn(graphdef, compute_dtype, distill, sam_rho)
  value_and_grad = jax.value_and_grad(make_loss_fn(graphdef, compute_dtype))
  if sam_rho > 0:
    value_and_grad = _sam.sam_gradient(value_and_grad, sam_rho)

  def grad_fn(params, tokens):
    loss, grads = value_and_grad(params, tokens)
    return {"loss": loss}, grads

  return grad_fn


def make_zu_step(tx: optax.GradientTransformation) -> Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]:
  """Returns ``zu_step(params, opt_state) -> (opt_state, metrics)``: the z/u update on its own.

  Run it right after a step built with ``z_update=False`` at a step where the
  z/u update is due (``step % interval == 0``), on that step's outputs: the
  pair equals one step built with ``z_update=True``, but as two programs, so
  the z/u update's temporaries never coexist with the gradients, activations
  and base optimizer's temporaries (:func:`elsa_jax.admm_zu_update`). ``metrics`` are the z/u update's
  :class:`elsa_jax.AdmmMetrics`.
  """

  del tx  # the state carries what the z/u update needs

  def zu_step(params, opt_state):
    opt_state = _admm.admm_zu_update(opt_state, params)
    return opt_state, finalize_lib.admm_metrics(opt_state)._asdict()

  return zu_step


def activation_scores(stats: list[dict[str, jax.Array]], architecture: Any = None) -> dict:
  """SAFE+'s projection weights from :func:`elsa_jax.oneshot.walk.calibration_statistics`.

  ``||X_j||**2`` of each kernel's input as ``[in, 1]``, in a (prefix) pytree
  of the model's params: the objective-aware score ``v * w**2`` then ranks by
  Wanda's ``|w| * ||X_j||``.

  Args:
    stats: one dict per decoder layer, keyed like the architecture's ``linear_inputs`` values.
    architecture: the model's architecture, its ``model_type`` or its graphdef
      (:func:`elsa_jax.models.architecture_of`); None: that of
      :data:`elsa_jax.models.registry.DEFAULT_MODEL_TYPE`.

  Returns:
    ``{"layers": {i: {...: {"kernel": [in, 1]}}}}``, the linear maps at their paths in a layer.
  """
  if architecture is None:
    architecture = models.registry.DEFAULT_MODEL_TYPE
  linear_inputs = models.architecture_of(architecture).linear_inputs
  layers = {}
  for i, layer_stats in enumerate(stats):
    entry: dict = {}
    for path, key in linear_inputs.items():
      diag = jnp.diagonal(layer_stats[key]).astype(jnp.float32)
      node = entry
      for k in path:
        node = node.setdefault(k, {})
      node["kernel"] = diag[:, None]
    layers[i] = entry
  return {"layers": layers}


@dataclasses.dataclass
class RunResult:
  params: Any
  opt_state: Any
  final_step: int
  steps_run: int
  history: list[dict[str, float]]
  tokens_per_second: float


def _place_state(tx: optax.GradientTransformation, params: Any, logical_axes: Any, mesh: jax.sharding.Mesh,
                 rules: dict[str, str | None]) -> tuple[Any, Any, tuple[Any, Any]]:
  """``(params, opt_state, (param shardings, state shardings))``: the params on the mesh, the state initialised there."""
  p_shard = sharding_lib.param_shardings(logical_axes, params, mesh, rules)
  params = jax.device_put(params, p_shard)
  s_shard = sharding_lib.opt_state_shardings(tx, params, p_shard, mesh)
  opt_state = jax.jit(tx.init, out_shardings=s_shard)(params)
  return params, opt_state, (p_shard, s_shard)


class StepPrograms(NamedTuple):
  """The compiled programs of a run (see :func:`compile_programs`)."""

  steps: dict[bool, Any]  # z_update -> the compiled train step
  zu: Any | None  # the separate z/u program (:func:`make_zu_step`), or None
  interval: int  # 0: no z/u update (a state without ADMM)
  teacher: tuple = ()  # the train step's frozen last arguments: (teacher params,) with distillation, else ()


def compile_programs(
    graphdef: Any,
    tx: optax.GradientTransformation,
    cfg: ElsaConfig,
    params: Any,
    opt_state: Any,
    shardings: tuple[Any, Any],
    mesh: jax.sharding.Mesh,
    *,
    steps: range,
    separate_z_update: bool = True,
    teacher: Any = None,
) -> StepPrograms:
  """Compiles, before any step runs, the programs that ``steps`` need.

  The steps with and without the z/u update (or the step without it and the
  separate z/u program) are picked on the host by :func:`run_step` (a
  ``lax.cond`` on the device would copy z and u through it at every step).
  Params and state are donated; the batch is ``[grad_accum, batch_size, seqlen + 1]``
  in :func:`elsa_jax.run.sharding.batch_sharding`. ``teacher``: the frozen teacher
  params of a run that distils (:func:`elsa_jax.run.teacher.place_teacher`, the
  params' shardings), required then and refused otherwise; the steps take it last.
  """
  distill = teacher_lib.spec(cfg)
  if (distill is None) != (teacher is None):
    raise ValueError(f"--distill {cfg.distill} {'needs' if teacher is None else 'takes no'} teacher params.")
  extra = () if teacher is None else (teacher,)
  p_shard, s_shard = shardings
  data_shard = sharding_lib.batch_sharding(mesh)
  batch_spec = jax.ShapeDtypeStruct((cfg.grad_accum, cfg.batch_size, cfg.seqlen + 1), jnp.int32,
                                    sharding=data_shard)
  admm = _admm.find_admm_state(opt_state) is not None  # else no z/u update (masked recovery)
  dues = sorted({admm and s % cfg.interval == 0 for s in steps})
  step_fns = {}
  for due in sorted({due and not separate_z_update for due in dues}):
    step_fns[due] = jax.jit(
        make_train_step(graphdef, tx, compute_dtype=jnp.dtype(cfg.compute_dtype), sam_rho=cfg.sam_rho,
                        z_update=due, distill=distill),
        in_shardings=(p_shard, s_shard, data_shard) + (p_shard,) * len(extra),
        out_shardings=(p_shard, s_shard, sharding_lib.replicated(mesh)),
        donate_argnums=(0, 1),
    ).lower(params, opt_state, batch_spec, *extra).compile()
  zu_fn = None
  if separate_z_update and True in dues:
    zu_fn = jax.jit(
        make_zu_step(tx),
        in_shardings=(p_shard, s_shard),
        out_shardings=(s_shard, sharding_lib.replicated(mesh)),
        donate_argnums=(1,),
    ).lower(params, opt_state).compile()
  return StepPrograms(step_fns, zu_fn, cfg.interval if admm else 0, extra)


def run_step(programs: StepPrograms, step: int, params: Any, opt_state: Any,
             batch: jax.Array) -> tuple[Any, Any, dict[str, jax.Array]]:
  """Optimizer step ``step`` (0-based): the train step, then the z/u program where it is due."""
  due = bool(programs.interval) and step % programs.interval == 0
  params, opt_state, metrics = programs.steps[due and programs.zu is None](params, opt_state, batch,
                                                                          *programs.teacher)
  if due and programs.zu is not None:
    opt_state, zu_metrics = programs.zu(params, opt_state)
    metrics = {**metrics, **zu_metrics}
  return params, opt_state, metrics


def place_batch(rows: np.ndarray, cfg: ElsaConfig, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """One step's batch on the mesh, ``[grad_accum, batch_size, seqlen + 1]``.

  Args:
    rows: this process's rows of the global batch, ``[rows, seqlen + 1]``
      (all of them in a single-process run).
    cfg: the run's hyperparameters (``grad_accum``, ``batch_size``).
    sharding: :func:`elsa_jax.run.sharding.batch_sharding` of the mesh.
  """
  batch = np.asarray(rows, np.int32)
  batch = batch.reshape(cfg.grad_accum, -1, batch.shape[-1])
  if jax.process_count() > 1:
    global_shape = (cfg.grad_accum, cfg.batch_size, batch.shape[-1])
    return jax.make_array_from_process_local_data(sharding, batch, global_shape)
  return jax.device_put(batch, sharding)


def saves_at(checkpointer: checkpoint_lib.RunCheckpointer | None, done: int, total: int, end: int) -> bool:
  """Whether to checkpoint after ``done`` of ``total`` steps: at the checkpointer's
  cadence, and always at ``end``, where this call stops."""
  return checkpointer is not None and (checkpointer.should_save(done, total) or done == end)


def _train_loop(programs: StepPrograms, params: Any, opt_state: Any, batches: Callable[[int], np.ndarray], *,
                steps: range, cfg: ElsaConfig, mesh: jax.sharding.Mesh, metrics_log: MetricsLogger,
                checkpointer: checkpoint_lib.RunCheckpointer | None, log_every: int) -> tuple[Any, Any]:
  """Runs ``steps``; metrics are read one step behind, and always before a checkpoint is saved."""
  data_shard = sharding_lib.batch_sharding(mesh)
  for step in steps:
    batch = place_batch(batches(step), cfg, data_shard)
    params, opt_state, metrics = run_step(programs, step, params, opt_state, batch)
    metrics_log.clock(metrics, first=step == steps.start)
    done = step + 1
    metrics_log.flush()
    saving = saves_at(checkpointer, done, cfg.steps, steps.stop)
    if done % log_every == 0 or done == steps.stop or saving:
      metrics_log.defer(done, metrics)
    metrics_log.advance()
    if saving:
      metrics_log.flush()  # never checkpoint a state whose loss is not finite ...
      checks.check_state(done, params, opt_state, lr=cfg.lr)  # ... nor one that is not finite itself
      checkpointer.save(done, params, opt_state)
  metrics_log.flush()
  if checkpointer is None:
    checks.check_state(steps.stop, params, opt_state, lr=cfg.lr)
  jax.block_until_ready(params)
  return params, opt_state


def _frozen_teacher(cfg: ElsaConfig, params: Any, teacher: Any, logical_axes: Any, mesh: jax.sharding.Mesh,
                    rules: dict[str, str | None]) -> Any:
  """The teacher of :func:`run` on the mesh in the compute dtype (None without distillation); a copy of
  ``params`` when ``teacher`` is None, made before the params are placed and donated."""
  if teacher_lib.spec(cfg) is None:
    return None
  shardings = sharding_lib.param_shardings(logical_axes, params, mesh, rules)
  if teacher is None:
    return teacher_lib.copy_teacher(params, shardings, cfg.compute_dtype)
  return teacher_lib.place_teacher(teacher, shardings, cfg.compute_dtype)


def run(
    graphdef: Any,
    params: Any,
    cfg: ElsaConfig,
    batches: Callable[[int], np.ndarray],
    *,
    mesh: jax.sharding.Mesh,
    logical_axes: Any,
    rules: dict[str, str | None] | None = None,
    checkpointer: checkpoint_lib.RunCheckpointer | None = None,
    metrics_path: str | pathlib.Path | None = None,
    log_every: int = 1,
    progress: bool = True,
    stop_after: int | None = None,
    fixed_score: Any = None,
    separate_z_update: bool = True,
    sparsity: Any = None,
    tx: optax.GradientTransformation | None = None,
    teacher: Any = None,
) -> RunResult:
  """Runs (or resumes) ELSA for ``cfg.steps`` optimizer steps.

  Args:
    graphdef: the model's NNX graph definition (from :func:`elsa_jax.models.split`).
    params: fp32 master parameters (a pure dict).
    cfg: the run's hyperparameters.
    batches: ``batches(step) -> int array [batch_size * grad_accum, seqlen + 1]``,
      a pure function of the step (so a resumed run sees the same data).
    mesh: the device mesh (see :func:`elsa_jax.run.sharding.make_mesh`).
    logical_axes: the params' logical axis names (:func:`elsa_jax.models.logical_axes_of`).
    rules: logical axis -> mesh axis rules; defaults to
      :data:`elsa_jax.run.sharding.DEFAULT_RULES`.
    checkpointer: saves every N steps and restores the latest checkpoint first.
    metrics_path: JSONL file that receives one line of metrics per logged step.
    log_every: how often the host reads metrics (one step behind).
    progress: show a progress bar (process 0 only).
    stop_after: stop (after saving) once this many steps have run in this call;
      used to test interruption.
    fixed_score: the activation scores of ``score_source="activations"`` (SAFE+).
    separate_z_update: run the z/u update as its own program after the step it
      belongs to (:func:`make_zu_step`), so that the run's peak memory is the
      larger of the two programs', not their sum; False fuses it into the step.
    sparsity: per-matrix sparsities in place of ``cfg.sparsity`` (:func:`make_optimizer`).
    tx: the optimizer, in place of :func:`make_optimizer`'s (e.g.
      :func:`make_finetune_optimizer`: a state without ADMM has no z/u update).
    teacher: the frozen teacher of ``cfg.distill > 0`` (:mod:`elsa_jax.run.teacher`), e.g. the dense
      model from :func:`elsa_jax.run.teacher.make_teacher`, kept as it is where it already is in the
      compute dtype and the params' shardings; None: a copy of ``params`` (the starting point, not a
      checkpoint resumed from). Ignored without distillation.

  Returns:
    A :class:`RunResult` with the final params and optimizer state.

  Raises:
    elsa_jax.run.checks.DivergedError: when the loss, the params or the optimizer state become NaN or
      infinite; no state from that step on is saved, and the error names the last good checkpoint.
  """
  rules = dict(sharding_lib.DEFAULT_RULES if rules is None else rules)
  sharding_lib.fits_mesh(cfg.batch_size, mesh)
  tx = make_optimizer(cfg, fixed_score, sparsity) if tx is None else tx
  teacher = _frozen_teacher(cfg, params, teacher, logical_axes, mesh, rules)
  params, opt_state, shardings = _place_state(tx, params, logical_axes, mesh, rules)
  start = 0
  if checkpointer is not None:
    start, params, opt_state = checkpointer.restore_or(params, opt_state)
    if start:
      checks.check_restored(start, checkpointer.directory, params, opt_state)
      logger.info("resuming from step %d", start)
  end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
  steps = range(start, end)
  programs = compile_programs(graphdef, tx, cfg, params, opt_state, shardings, mesh, steps=steps,
                              separate_z_update=separate_z_update, teacher=teacher)
  metrics_log = MetricsLogger(cfg, metrics_path, progress=progress, start=start)
  try:
    params, opt_state = _train_loop(programs, params, opt_state, batches, steps=steps, cfg=cfg, mesh=mesh,
                                    metrics_log=metrics_log, checkpointer=checkpointer, log_every=log_every)
  except checks.DivergedError as err:
    if checkpointer is not None:
      checkpointer.wait()
      err.last_good = checkpointer.latest_step()
    raise
  finally:
    metrics_log.close()
    if checkpointer is not None:
      checkpointer.wait()
  params, opt_state = hosts.gather_to_hosts(params), hosts.gather_to_hosts(opt_state)
  return RunResult(params, opt_state, end, end - start, metrics_log.history, metrics_log.tokens_per_second)
