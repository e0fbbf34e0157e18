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
"""The losses of the x-update: next-token cross-entropy, and distillation from the dense model.

Pure functions of arrays, in float32 whatever the compute dtype:

* :func:`next_token_loss`: the mean cross-entropy of ``logits[:, t]`` against ``tokens[:, t + 1]``;
* :func:`kl_distill_loss`: the mean over tokens of ``KL(softmax(teacher / T) || softmax(student / T))``;
* :func:`squarehead_loss`: SquareHead's per-block feature loss (Kurtic et al. 2023, arXiv 2310.06927),
  ``mean_l mean_tokens ||h_s^l - h_t^l||^2 / ||h_t^l||^2``;
* :func:`distillation_loss`: the mixed loss ``(1 - a) CE + a (T^2 KL [+ SquareHead])``.

Example:
  >>> import jax.numpy as jnp
  >>> logits = jnp.array([[[1.0, 2.0, 0.5]]])
  >>> float(kl_distill_loss(logits, logits, temperature=2.0))
  0.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of ``logits[:, t]`` against ``tokens[:, t + 1]``."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]
  ).mean()


@jax.custom_vjp
def _kl_rows(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """``KL(softmax(teacher) || softmax(student))`` over the last axis, float32; exactly 0 on equal rows."""
  return _kl_rows_fwd(student, teacher)[0]


def _kl_rows_fwd(student, teacher):
  # Rows equal bit for bit have a KL of exactly 0 and a gradient of exactly 0. Computed, both would carry
  # the rounding of two softmaxes (XLA fuses each its own way): noise that Adam would scale up to a step.
  equal = jnp.all(student == teacher, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher, axis=-1)
  log_ratio = log_p_teacher - jax.nn.log_softmax(student, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * log_ratio, axis=-1)
  return jnp.where(equal, 0.0, kl), (student, teacher, equal)


def _kl_rows_bwd(residuals, g):
  # The analytic gradient: d/ds = softmax(s) - softmax(t), d/dt = p_t (log p_t - log p_s - KL).
  student, teacher, equal = residuals
  g = jnp.where(equal, 0.0, g)[..., None]
  log_p_teacher = jax.nn.log_softmax(teacher, axis=-1)
  log_ratio = log_p_teacher - jax.nn.log_softmax(student, axis=-1)
  p_teacher = jnp.exp(log_p_teacher)
  kl = jnp.sum(p_teacher * log_ratio, axis=-1, keepdims=True)
  return g * (jax.nn.softmax(student, axis=-1) - p_teacher), g * p_teacher * (log_ratio - kl)


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd)


def kl_distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Mean over tokens of ``KL(softmax(teacher / T) || softmax(student / T))`` (not scaled by ``T^2``).

  Args:
    student_logits: ``[..., vocab]``, any float dtype (computed in float32).
    teacher_logits: the same shape; its gradient is the true one, but the train step stops it.
    temperature: ``T > 0``; higher softens both distributions.

  Returns:
    A float32 scalar, ``>= 0``, exactly 0 (and of gradient exactly 0) where the logits are equal.
  """
  scale = jnp.float32(1.0 / temperature)
  rows = _kl_rows(student_logits.astype(jnp.float32) * scale, teacher_logits.astype(jnp.float32) * scale)
  return rows.mean()


def squarehead_loss(student_hiddens: jax.Array, teacher_hiddens: jax.Array) -> jax.Array:
  """SquareHead's feature loss: ``mean_l mean_tokens ||h_s^l - h_t^l||^2 / ||h_t^l||^2``.

  Args:
    student_hiddens: every decoder block's output, ``[layers, ..., hidden]`` (any float dtype).
    teacher_hiddens: the teacher's, the same shape.

  Returns:
    A float32 scalar: per token the squared error normalised by the teacher's squared norm (a token whose
    teacher features are all zero counts its squared error as it is), averaged over the tokens of each
    block, then over the blocks.
  """
  student = student_hiddens.astype(jnp.float32)
  teacher = teacher_hiddens.astype(jnp.float32)
  error = jnp.sum(jnp.square(student - teacher), axis=-1)
  norm = jnp.sum(jnp.square(teacher), axis=-1)
  norm = jnp.where(norm > 0, norm, 1.0)
  return (error / norm).mean()


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, tokens: jax.Array, *, alpha: float,
                      temperature: float = 1.0, student_hiddens: jax.Array | None = None,
                      teacher_hiddens: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The x-update's loss with distillation: ``(1 - a) CE + a D``.

  ``D = T^2 KL(teacher_T || student_T)`` (:func:`kl_distill_loss`), plus, when the hidden states are
  given, SquareHead's :func:`squarehead_loss` on top of the KL (so that ``a = 0.5`` weighs the task,
  logit and feature losses as Kurtic et al. do, up to a factor 2).

  Args:
    student_logits: ``[B, T, vocab]``, the logits of ``tokens[:, :-1]``.
    teacher_logits: the teacher's, the same shape.
    tokens: ``[B, T + 1]`` token ids (the CE's targets are ``tokens[:, 1:]``).
    alpha: ``a`` in ``[0, 1]``; 0 gives the CE exactly.
    temperature: ``T > 0``.
    student_hiddens, teacher_hiddens: every block's output ``[layers, B, T, hidden]``, or None (no SquareHead).

  Returns:
    ``(loss, terms)``, ``terms`` the unweighted ``ce_loss``, ``kl_loss`` and (with hidden states)
    ``squarehead_loss``, float32 scalars.
  """
  terms = {"ce_loss": next_token_loss(student_logits, tokens),
           "kl_loss": kl_distill_loss(student_logits, teacher_logits, temperature)}
  distill = temperature ** 2 * terms["kl_loss"]
  if student_hiddens is not None:
    terms["squarehead_loss"] = squarehead_loss(student_hiddens, teacher_hiddens)
    distill = distill + terms["squarehead_loss"]
  return (1.0 - alpha) * terms["ce_loss"] + alpha * distill, terms
