"""Tests of the storage codecs and of Adam with low-precision moments."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elsa_jax
from elsa_jax.lowp import codecs as quant


@pytest.mark.parametrize("dtype,rel", [(jnp.float8_e4m3fn, 2.0**-4), (jnp.float8_e5m2, 2.0**-3)])
@pytest.mark.parametrize("axis", [None, 0])
def test_fp8_scaled_roundtrip(dtype, rel, axis):
  x = jax.random.normal(jax.random.key(0), (64, 16)) * jnp.logspace(-3, 3, 16)
  q, scale = elsa_jax.quantize_scaled(x, dtype, axis=axis)
  assert q.dtype == dtype and q.shape == x.shape
  assert scale.dtype == jnp.float32 and scale.shape == quant.scale_shape(x.shape, axis)
  back = elsa_jax.dequantize_scaled(q, scale)
  assert bool(jnp.isfinite(back).all())
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None)
  # Normal range: relative error of half a unit in the last place (plus the margin).
  normal = jnp.abs(x) > amax * 2.0**-5
  err = jnp.abs(back - x) / jnp.abs(x)
  assert float(jnp.max(jnp.where(normal, err, 0.0))) <= rel * 1.05
  # Huge and zero tensors neither overflow nor divide by zero.
  q, scale = elsa_jax.quantize_scaled(jnp.array([3e38, -1e38]), dtype)
  assert bool(jnp.isfinite(elsa_jax.dequantize_scaled(q, scale)).all())
  q, scale = elsa_jax.quantize_scaled(jnp.zeros((3, 2)), dtype, axis=axis)
  chex.assert_trees_all_equal(elsa_jax.dequantize_scaled(q, scale), jnp.zeros((3, 2)))


@pytest.mark.parametrize("shape", [(), (3, 300), (2, 512)])
def test_blockwise_roundtrip_and_shapes(shape):
  x = jax.random.normal(jax.random.key(1), shape)
  q, absmax = elsa_jax.quantize_blockwise(x)
  assert q.shape == shape and q.dtype == jnp.int8
  assert absmax.shape == quant.block_scale_shape(shape)
  # Blocks are 256 consecutive entries; cut along the last axis when it allows.
  assert absmax.shape == ((2, 2) if shape == (2, 512) else (-(-max(x.size, 1) // 256),))
  back = elsa_jax.dequantize_blockwise(q, absmax)
  # Error at most half a code of the block's absmax.
  bound = jnp.repeat(absmax.reshape(-1), 256)[: x.size].reshape(shape) / 254
  assert bool((jnp.abs(back - x) <= bound * 1.0001).all())
  # Unsigned with keep_nonzero: tiny positive values stay positive.
  v = jnp.abs(x) * jnp.where(jnp.arange(x.size).reshape(shape) % 2 == 0, 1.0, 1e-6)
  qv, sv = elsa_jax.quantize_blockwise(v, signed=False, keep_nonzero=True)
  assert qv.dtype == jnp.uint8
  assert bool((elsa_jax.dequantize_blockwise(qv, sv) > 0).all())


def test_adam_lowp_float32_is_adam():
  params = {"w": jax.random.normal(jax.random.key(2), (8, 300)), "b": jnp.zeros(3)}
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
  ours, ref = elsa_jax.adam_lowp(1e-2, moment_dtype="float32"), optax.adam(1e-2)
  s_ours, s_ref = ours.init(params), ref.init(params)
  for _ in range(3):
    u_ours, s_ours = ours.update(grads, s_ours, params)
    u_ref, s_ref = ref.update(grads, s_ref, params)
    chex.assert_trees_all_close(u_ours, u_ref, rtol=1e-5, atol=1e-8)


@functools.lru_cache(maxsize=None)
def _lsq_adam(moment_dtype):
  """600 Adam steps on a small least-squares problem; ``None`` is optax.adam."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(256, 32)) * np.logspace(-1, 1, 32), jnp.float32)
  y = x @ jnp.asarray(r.normal(size=(32, 8)), jnp.float32)

  def loss(p, xb, yb):
    return 0.5 * jnp.mean(jnp.sum((xb @ p["w"] - yb) ** 2, -1))

  sched = optax.linear_schedule(3e-2, 0.0, 600)
  if moment_dtype is None:
    tx = optax.adam(sched, b2=0.95)
  else:
    tx = elsa_jax.adam_lowp(sched, b2=0.95, moment_dtype=moment_dtype)

  def step(carry, t):
    p, s = carry
    i = (t * 32) % 256
    g = jax.grad(loss)(p, jax.lax.dynamic_slice_in_dim(x, i, 32), jax.lax.dynamic_slice_in_dim(y, i, 32))
    u, s2 = tx.update(g, s, p)
    chex.assert_trees_all_equal_shapes_and_dtypes(s, s2)
    return (optax.apply_updates(p, u), s2), None

  p0 = {"w": jnp.zeros((32, 8))}
  (p, s), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(600)))((p0, tx.init(p0)))
  return float(loss(p0, x, y)), float(loss(p, x, y)), s


@pytest.mark.parametrize("moment_dtype", ["bfloat16", "int8"])
def test_adam_lowp_state_and_convergence(moment_dtype):
  """Reduced-precision moments: stable state layout and near-fp32 convergence."""
  start, ref, _ = _lsq_adam(None)
  _, ours, state = _lsq_adam(moment_dtype)
  assert ours < 1e-7 * start  # both reach ~1e-8 of the initial loss
  assert ours < 2.0 * ref + 1e-8 * start
  nu = state[0].nu["w"]
  assert nu.dtype == (jnp.uint8 if moment_dtype == "int8" else jnp.bfloat16)


@pytest.mark.parametrize("shape", [(256, 64), (300, 7), (5,)])
def test_zero_encodings_equal_encoded_zeros(shape):
  """The initial states are built, not quantised (no constant folding at compile time)."""
  zeros = jnp.zeros(shape, jnp.float32)
  for axis in (None, 0):
    chex.assert_trees_all_equal(
        elsa_jax.quantize_scaled(zeros, jnp.float8_e4m3fn, axis=axis),
        quant.scaled_zeros(shape, jnp.float8_e4m3fn, axis=axis),
    )
  for signed in (True, False):
    chex.assert_trees_all_equal(
        elsa_jax.quantize_blockwise(zeros, signed=signed), quant.blockwise_zeros(shape, signed=signed)
    )
