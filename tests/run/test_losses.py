"""The x-update's losses (elsa_jax.run.losses) against hand computations in numpy, jitted, on fresh random inputs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elsa_jax.run import losses
from elsa_jax.run import train


def _rng():
  seed = int(np.random.default_rng().integers(1 << 30))
  return np.random.default_rng(seed)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_ce(logits, tokens):
  logp = _log_softmax(logits.astype(np.float64))
  return -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


def _np_kl(student, teacher, temperature):
  lt, ls = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
  return (np.exp(lt) * (lt - ls)).sum(-1).mean()


def _np_squarehead(hs, ht):
  return ((hs - ht) ** 2).sum(-1) / (ht ** 2).sum(-1)


def _inputs(rng, b=2, t=5, v=11):
  student = rng.normal(size=(b, t, v)) * 3
  teacher = rng.normal(size=(b, t, v)) * 3
  tokens = rng.integers(0, v, size=(b, t + 1))
  return student.astype(np.float32), teacher.astype(np.float32), tokens.astype(np.int32)


def test_next_token_loss_is_the_mean_cross_entropy_and_train_re_exports_it():
  student, _, tokens = _inputs(_rng())
  got = jax.jit(losses.next_token_loss)(student, tokens)
  np.testing.assert_allclose(got, _np_ce(student, tokens), rtol=1e-5)
  assert train.next_token_loss is losses.next_token_loss


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_numpy_and_is_zero_with_zero_gradient_at_the_teacher(temperature):
  student, teacher, _ = _inputs(_rng())
  kl = jax.jit(losses.kl_distill_loss, static_argnums=2)
  np.testing.assert_allclose(kl(student, teacher, temperature), _np_kl(student.astype(np.float64),
                                                                       teacher.astype(np.float64), temperature),
                             rtol=1e-5)
  assert float(kl(teacher, teacher, temperature)) == 0.0  # identical logits: exactly 0
  grad = jax.jit(jax.grad(losses.kl_distill_loss), static_argnums=2)
  chex.assert_trees_all_equal(grad(teacher, teacher, temperature), np.zeros_like(teacher))  # exactly 0
  # Elsewhere the analytic gradient (softmax_s - softmax_t) / (T N) equals autodiff's.
  n = student.shape[0] * student.shape[1]
  p_s = np.exp(_log_softmax(student.astype(np.float64) / temperature))
  p_t = np.exp(_log_softmax(teacher.astype(np.float64) / temperature))
  np.testing.assert_allclose(grad(student, teacher, temperature), (p_s - p_t) / (temperature * n), atol=1e-7)
  g_t = jax.jit(jax.grad(losses.kl_distill_loss, argnums=1), static_argnums=2)(student, teacher, temperature)
  eps, i = 1e-2, (0, 1, 3)  # the teacher's gradient, by a central difference
  up, down = teacher.copy(), teacher.copy()
  up[i] += eps
  down[i] -= eps
  fd = (_np_kl(student.astype(np.float64), up.astype(np.float64), temperature)
        - _np_kl(student.astype(np.float64), down.astype(np.float64), temperature)) / (2 * eps)
  np.testing.assert_allclose(g_t[i], fd, rtol=1e-2, atol=1e-6)


def test_squarehead_is_the_per_token_normalised_error_averaged():
  rng = _rng()
  hs, ht = rng.normal(size=(3, 2, 4, 8)).astype(np.float32), rng.normal(size=(3, 2, 4, 8)).astype(np.float32)
  got = jax.jit(losses.squarehead_loss)(hs, ht)
  np.testing.assert_allclose(got, _np_squarehead(hs.astype(np.float64), ht.astype(np.float64)).mean(), rtol=1e-5)
  per_layer = [_np_squarehead(hs[l], ht[l]).mean() for l in range(3)]  # mean over layers of per-layer means
  np.testing.assert_allclose(got, np.mean(per_layer), rtol=1e-5)
  assert float(losses.squarehead_loss(ht, ht)) == 0.0
  chex.assert_trees_all_equal(jax.grad(losses.squarehead_loss)(ht, ht), np.zeros_like(ht))
  assert np.isfinite(float(losses.squarehead_loss(hs, np.zeros_like(ht))))  # a zero teacher token: no NaN
  assert losses.squarehead_loss(hs.astype(jnp.bfloat16), ht.astype(jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_mixed_loss_weighs_ce_and_t_squared_kl(temperature):
  rng = _rng()
  student, teacher, tokens = _inputs(rng)
  alpha = float(rng.uniform(0.1, 0.9))
  fn = jax.jit(losses.distillation_loss, static_argnames=("alpha", "temperature"))
  loss, terms = fn(student, teacher, tokens, alpha=alpha, temperature=temperature)
  ce, kl = _np_ce(student, tokens), _np_kl(student.astype(np.float64), teacher.astype(np.float64), temperature)
  np.testing.assert_allclose(terms["ce_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(terms["kl_loss"], kl, rtol=1e-5)
  np.testing.assert_allclose(loss, (1 - alpha) * ce + alpha * temperature ** 2 * kl, rtol=1e-5)
  assert set(terms) == {"ce_loss", "kl_loss"}
  # a = 0: the CE exactly; a = 1: T^2 KL exactly.
  zero, _ = fn(student, teacher, tokens, alpha=0.0, temperature=temperature)
  assert float(zero) == float(jax.jit(losses.next_token_loss)(student, tokens))
  one, one_terms = fn(student, teacher, tokens, alpha=1.0, temperature=temperature)
  assert float(one) == float(np.float32(temperature ** 2) * one_terms["kl_loss"])


def test_squarehead_sits_on_top_of_the_kl_inside_the_distillation_term():
  rng = _rng()
  student, teacher, tokens = _inputs(rng)
  hs, ht = rng.normal(size=(2, 2, 5, 6)).astype(np.float32), rng.normal(size=(2, 2, 5, 6)).astype(np.float32)
  loss, terms = jax.jit(losses.distillation_loss, static_argnames=("alpha", "temperature"))(
      student, teacher, tokens, alpha=0.5, temperature=2.0, student_hiddens=hs, teacher_hiddens=ht)
  sq = _np_squarehead(hs.astype(np.float64), ht.astype(np.float64)).mean()
  np.testing.assert_allclose(terms["squarehead_loss"], sq, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * terms["ce_loss"] + 0.5 * (4.0 * terms["kl_loss"] + sq), rtol=1e-5)
