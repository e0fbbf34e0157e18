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
"""Distillation from the dense model: the frozen teacher and the train step's loss with it.

With ``--distill a`` (:class:`elsa_jax.run.train.ElsaConfig`'s ``distill``) the x-update minimises
:func:`elsa_jax.run.losses.distillation_loss`, ``(1 - a) CE + a T^2 KL(teacher_T || student_T)`` (plus
SquareHead's per-block loss inside the distillation term with ``--squarehead``). The teacher is the dense
model, frozen:

* it is stored once in the compute dtype (bf16 by default: half the fp32 master copy), placed with the
  student params' shardings (:func:`make_teacher`, :func:`place_teacher`);
* it is an argument of the jitted train step (``step(params, opt_state, batch, teacher)``), never a
  closure constant (which XLA would embed in the program) and never donated;
* its forward runs in the same step, once per micro-batch, under ``jax.lax.stop_gradient``
  (:func:`distill_grad_fn`); SAM's second gradient reuses its outputs.

Without distillation (``distill = 0``) none of this is used: the step has no teacher argument and is the
program it always was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elsa_jax import models
from elsa_jax.optim import sam as _sam
from elsa_jax.run import losses
from elsa_jax.run import sharding as sharding_lib


class DistillSpec(NamedTuple):
  """What the train step distils with (:func:`spec`): ``a``, ``T`` and whether SquareHead is on."""

  alpha: float
  temperature: float
  squarehead: bool


def spec(cfg: Any) -> DistillSpec | None:
  """The distillation of an :class:`elsa_jax.run.train.ElsaConfig`, or None where ``cfg.distill`` is 0."""
  if not cfg.distill > 0:
    return None
  return DistillSpec(float(cfg.distill), float(cfg.distill_temp), bool(cfg.squarehead))


def metric_names(distill: DistillSpec | None) -> tuple[str, ...]:
  """The per-step loss metrics of a step: ``loss``, and with distillation its unweighted terms."""
  if distill is None:
    return ("loss",)
  return ("loss", "ce_loss", "kl_loss") + (("squarehead_loss",) if distill.squarehead else ())


def cast_floating(params: Any, dtype: Any, *, copy: bool = False) -> Any:
  """``params`` with every floating-point leaf in ``dtype`` (others as they are); ``copy``: new arrays
  even where the dtype is already ``dtype`` (inside ``jit``, so the output never aliases the input)."""
  def cast(p):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      return p
    return jnp.array(p, dtype, copy=True) if copy else p.astype(dtype)
  return jax.tree.map(cast, params)


def make_teacher(graphdef: Any, params: Any, cfg: Any, mesh: jax.sharding.Mesh,
                 rules: dict[str, str | None] | None = None) -> Any | None:
  """The teacher of a run of ``cfg`` (None where it does not distil): a frozen copy of ``params`` in
  ``cfg.compute_dtype``, placed as :func:`elsa_jax.run.train.run` places the student params (``rules``:
  the same as its). New buffers: the student's donation never reaches them."""
  if spec(cfg) is None:
    return None
  rules = dict(sharding_lib.DEFAULT_RULES if rules is None else rules)
  shardings = sharding_lib.param_shardings(models.logical_axes_of(graphdef, params), params, mesh, rules)
  return copy_teacher(params, shardings, cfg.compute_dtype)


def copy_teacher(params: Any, shardings: Any, compute_dtype: Any) -> Any:
  """A copy of ``params`` in ``compute_dtype`` with ``shardings``, in new buffers (one jitted cast)."""
  return jax.jit(functools.partial(cast_floating, dtype=jnp.dtype(compute_dtype), copy=True),
                 out_shardings=shardings)(params)


def place_teacher(teacher: Any, shardings: Any, compute_dtype: Any) -> Any:
  """``teacher`` in ``compute_dtype`` with ``shardings``; leaves that already are stay as they are (no copy)."""
  return jax.device_put(cast_floating(teacher, jnp.dtype(compute_dtype)), shardings)


def abstract_teacher(params: Any, compute_dtype: Any) -> Any:
  """The teacher's ``jax.ShapeDtypeStruct`` s from the student params' (their shapes and shardings)."""
  dtype = jnp.dtype(compute_dtype)
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(
      p.shape, dtype if jnp.issubdtype(p.dtype, jnp.floating) else p.dtype, sharding=getattr(p, "sharding", None)),
      params)


def _forward(graphdef: Any, blocks: bool) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array | None]]:
  """``forward(params, ids) -> (logits, block outputs or None)`` of ``graphdef``'s architecture."""
  architecture = models.architecture_of(graphdef)
  if not blocks:
    return lambda params, ids: (architecture.apply(graphdef, params, ids), None)
  if architecture.apply_with_blocks is None:
    raise ValueError(f"--squarehead needs every decoder block's output, which the {architecture.model_type} "
                     f"architecture does not give (its apply_with_blocks); drop --squarehead.")
  return functools.partial(architecture.apply_with_blocks, graphdef)


def distill_grad_fn(graphdef: Any, compute_dtype: Any, distill: DistillSpec, sam_rho: float = 0.0
                    ) -> Callable[[Any, jax.Array, Any], tuple[dict[str, jax.Array], Any]]:
  """``grad_fn(params, tokens[B, T+1], teacher) -> (metrics, grads)`` of the distillation loss.

  The teacher's logits (and block outputs with SquareHead) are computed once, under
  ``stop_gradient``; the student's in ``compute_dtype``. ``sam_rho > 0`` takes the gradient
  sharpness-aware (:func:`elsa_jax.sam_gradient`), at the same teacher outputs. ``metrics`` are the loss
  and its unweighted terms (:func:`metric_names`).
  """
  forward = _forward(graphdef, distill.squarehead)

  def loss_fn(params, tokens, teacher_out):
    logits, blocks = forward(cast_floating(params, compute_dtype), tokens[:, :-1])
    teacher_logits, teacher_blocks = teacher_out
    return losses.distillation_loss(logits, teacher_logits, tokens, alpha=distill.alpha,
                                    temperature=distill.temperature, student_hiddens=blocks,
                                    teacher_hiddens=teacher_blocks)

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  if sam_rho > 0:
    value_and_grad = _sam.sam_gradient(value_and_grad, sam_rho)

  def grad_fn(params, tokens, teacher):
    teacher = jax.lax.stop_gradient(cast_floating(teacher, compute_dtype))
    teacher_out = jax.lax.stop_gradient(forward(teacher, tokens[:, :-1]))
    (loss, terms), grads = value_and_grad(params, tokens, teacher_out)
    return {"loss": loss, **terms}, grads

  return grad_fn
