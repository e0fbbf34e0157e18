"""One battery of optax checks, run against every optax transform the package exports.

Every case builds a transform on a tiny params tree with prunable
``layers/.../kernel`` matrices, a non-prunable matrix and a vector, and is put
through the same checks: jit against eager, minimising a quadratic,
``optax.MultiSteps``, ``optax.inject_hyperparams``,
``optax.tree_utils.tree_map_params``, a stable state layout under jit with the
state donated, and ``optax.clip_by_global_norm`` chained in front.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elsa_jax

LR = 0.05
SPARSITY = 0.5
STEPS = 3  # updates per trajectory in the checks that compare two of them


# ----------------------------------------------------------------------------
# The transforms under test.


@dataclasses.dataclass(frozen=True)
class Case:
  """A transform factory with its arguments and the hyperparameter to inject.

  Attributes:
    factory: the exported function that builds the transform.
    kwargs: its arguments, except ``hyperparam``.
    hyperparam: the argument injected by ``optax.inject_hyperparams``.
    values: two values of ``hyperparam``: the default and another one.
    static_args: ``static_args`` for ``optax.inject_hyperparams``.
    params_fields: state fields that hold a copy of the params tree.
  """

  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  hyperparam: str
  values: tuple[float, float]
  static_args: tuple[str, ...] = ()
  params_fields: tuple[str, ...] = ("mu", "nu")
  int8: bool = False  # int8 moments (see assert_close_up_to_int8_rounding)

  @property
  def is_admm(self) -> bool:
    return self.factory is elsa_jax.admm

  @property
  def is_direction(self) -> bool:
    """Whether the transform returns a direction, not a step (no learning rate)."""
    return self.factory is elsa_jax.scale_by_adam_lowp

  @property
  def tolerance(self) -> dict[str, float]:
    """Tight tolerances for two trajectories of the same steps, scaled to the step size."""
    return dict(rtol=1e-5, atol=2e-5 * (1.0 if self.is_direction else LR))

  def build(self, value=None) -> optax.GradientTransformation:
    return self.factory(**self.kwargs, **{self.hyperparam: self.values[0] if value is None else value})

  def build_injected(self, value=None) -> optax.GradientTransformation:
    injected = optax.inject_hyperparams(self.factory, static_args=self.static_args)
    return injected(**self.kwargs, **{self.hyperparam: self.values[0] if value is None else value})


_ADMM_FIELDS = ("z", "u", "z_scale", "u_scale", "score", "score_scale", "mu", "nu")
_LOWP_FIELDS = ("mu", "nu", "mu_scale", "nu_scale")
# Betas whose complements are exact in float32: under inject_hyperparams they
# are float32 arrays, and ``1 - 0.999`` (float64, then cast) is not
# ``1 - float32(0.999)`` (a relative 1e-5 apart in Adam's nu).
_BETAS = dict(b1=1 - 2.0**-3, b2=1 - 2.0**-10)

CASES = {
    "elsa": Case(
        elsa_jax.admm,
        dict(base=optax.adam(LR, b2=0.95), sparsity=SPARSITY, interval=2),
        "lmda", (0.05, 0.5), params_fields=_ADMM_FIELDS,
    ),
    "elsa_l": Case(
        elsa_jax.admm,
        dict(base=elsa_jax.adam_lowp(LR, b2=0.95, moment_dtype="int8"), sparsity=SPARSITY, interval=2,
             state_dtype="float8_e4m3fn"),
        "lmda", (0.05, 0.5), params_fields=_ADMM_FIELDS + ("mu_scale", "nu_scale"), int8=True,
    ),
    "elsa_global": Case(
        elsa_jax.admm,
        dict(base=optax.adam(LR, b2=0.95), sparsity=SPARSITY, interval=2, global_bounds=(0.25, 0.75)),
        "lmda", (0.05, 0.5), params_fields=_ADMM_FIELDS,
    ),
    "elsa_nm": Case(
        elsa_jax.admm,
        dict(base=optax.adam(LR, b2=0.95), pattern="nm", n_m=(2, 4), interval=2),
        "lmda", (0.05, 0.5), params_fields=_ADMM_FIELDS,
    ),
    "adam_lowp_int8": Case(
        elsa_jax.adam_lowp, dict(moment_dtype="int8", **_BETAS), "learning_rate", (LR, 3 * LR),
        params_fields=_LOWP_FIELDS, int8=True,
    ),
    "adam_lowp_bf16": Case(
        elsa_jax.adam_lowp, dict(moment_dtype="bfloat16", **_BETAS), "learning_rate", (LR, 3 * LR),
        params_fields=_LOWP_FIELDS,
    ),
    "scale_by_adam_lowp": Case(
        elsa_jax.scale_by_adam_lowp, dict(moment_dtype="int8", b2=_BETAS["b2"]), "b1", (0.875, 0.5),
        params_fields=_LOWP_FIELDS, int8=True,
    ),
}

battery = pytest.mark.parametrize("name", list(CASES))


@functools.cache
def transform(name: str) -> optax.GradientTransformation:
  return CASES[name].build()


@functools.cache
def jitted_update(name: str) -> Callable:
  """The case's jitted update with the state donated, shared by the checks (one compile per case)."""
  return jax.jit(transform(name).update, donate_argnums=(1,))


# ----------------------------------------------------------------------------
# Inputs: a tiny params tree and fresh random gradients.


@pytest.fixture
def rng():
  seed = int(np.random.SeedSequence().entropy % (1 << 32))
  print(f"seed {seed}")  # shown by pytest when the test fails
  return np.random.default_rng(seed)


def _normal(rng, shape, scale=1.0, dyadic=False):
  x = rng.normal(size=shape) * scale
  if dyadic:  # few mantissa bits: sums and halvings of these are exact in float32
    x = np.round(x * 64) / 64
  return jnp.asarray(x, jnp.float32)


def make_params(rng):
  """Two prunable kernels (axis 0 a multiple of 4, one over 256 entries), a dense head and a norm."""
  return {
      "layers": {
          "0": {"attn": {"kernel": _normal(rng, (16, 32), 0.3)}},
          "1": {"mlp": {"kernel": _normal(rng, (32, 8), 0.3)}},
      },
      "head": {"kernel": _normal(rng, (8, 4), 0.3)},
      "norm": {"scale": 1.0 + _normal(rng, (8,), 0.1)},
  }


def make_grads(rng, params, scale=1.0, dyadic=False):
  return jax.tree.map(lambda p: _normal(rng, p.shape, scale, dyadic), params)


def run(tx, params, grads, update=None):
  """Applies ``tx`` to the gradients one after the other; returns (params, state)."""
  update = tx.update if update is None else update
  state = tx.init(params)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def prunable_z(state):
  """The ``z`` matrices of the prunable leaves of an ADMM state, as float32 numpy arrays."""
  z = elsa_jax.find_admm_state(state).z
  mask = elsa_jax.prunable_mask(z)
  return [np.asarray(q.astype(jnp.float32)) for q, k in zip(jax.tree.leaves(z), jax.tree.leaves(mask)) if k]


def counts(state):
  """Every ``count`` field in a state (the inner step counters)."""
  return [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state, "count")]


# ----------------------------------------------------------------------------
# The battery.


@battery
def test_jit_and_eager_agree(name, rng):
  """A few updates eagerly and under jax.jit: the same params and the same state layout."""
  tx = transform(name)
  params = make_params(rng)
  grads = [make_grads(rng, params) for _ in range(STEPS)]
  p_eager, s_eager = run(tx, params, grads)
  p_jit, s_jit = run(tx, params, grads, update=jitted_update(name))
  chex.assert_trees_all_close(p_jit, p_eager, **CASES[name].tolerance)
  assert jax.tree.structure(s_jit) == jax.tree.structure(s_eager)
  chex.assert_trees_all_equal_shapes_and_dtypes(s_jit, s_eager)
  assert counts(s_jit) and all(c == STEPS for c in counts(s_jit))
  # The steps moved every param: the comparison is not between two no-ops.
  assert all(bool(jnp.all(a != b)) for a, b in zip(jax.tree.leaves(p_jit), jax.tree.leaves(params)))


@battery
def test_minimises_a_quadratic(name, rng):
  """``0.5 * sum(c * (w - t)**2)`` over every leaf falls 20-fold in 200 jitted steps."""
  case = CASES[name]
  tx = transform(name)
  if case.is_direction:
    tx = optax.chain(tx, optax.scale(-LR))
  params = make_params(rng)
  target = make_grads(rng, params)
  weight = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 2.0, p.shape), jnp.float32), params)

  def loss(p):
    terms = jax.tree.map(lambda w, t, c: jnp.sum(c * (w - t) ** 2), p, target, weight)
    return 0.5 * sum(jax.tree.leaves(terms))

  def step(carry, _):
    p, s = carry
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  (final, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=200))((params, tx.init(params)))
  start, end = float(loss(params)), float(loss(final))
  assert end < 0.05 * start, (start, end)
  if case.is_admm and "global_bounds" in case.kwargs:  # ...and z is sparse: the total exact, each in bounds
    zs = prunable_z(state)
    assert sum(int((z == 0).sum()) for z in zs) == sum(round(SPARSITY * z.size) for z in zs)
    low, high = case.kwargs["global_bounds"]
    assert all(round(low * z.size) <= (z == 0).sum() <= round(high * z.size) for z in zs)
  elif case.is_admm:  # ...and z is sparse: exactly the requested count per matrix or per group
    for z in prunable_z(state):
      zero = z == 0
      if case.kwargs.get("pattern") == "nm":
        n, m = case.kwargs["n_m"]
        np.testing.assert_array_equal(zero.reshape(z.shape[0] // m, m, z.shape[1]).sum(1), m - n)
      else:
        assert zero.sum() == round(SPARSITY * z.size)


def assert_close_up_to_int8_rounding(a, b, case: Case) -> None:
  """``a`` and ``b`` within the case's tolerance; with 8-bit moments, up to 1% of each leaf's entries may
  be one quantum apart instead: two programs (MultiSteps' and the plain step) may round a last bit
  differently, and a moment sitting on a rounding boundary then lands one int8 step away (an element of
  the next param update about 1% of lr away)."""
  if not case.int8:
    chex.assert_trees_all_close(a, b, **case.tolerance)
    return
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    quantum = 1.0 if np.issubdtype(np.asarray(x).dtype, np.integer) else 0.05 * LR
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    off = np.abs(x - y) > case.tolerance["atol"] + case.tolerance["rtol"] * np.abs(y)
    assert off.sum() <= 0.01 * x.size, (off.sum(), x.size)
    assert np.all(np.abs(x - y)[off] <= np.maximum(quantum, 0.05 * np.abs(y[off]))), (x[off], y[off])


@battery
def test_multisteps_equals_one_step_on_the_mean(name, rng):
  """k micro-steps under MultiSteps = one plain step on the mean gradient; inner counts once per k.

  The micro-gradients are dyadic with few bits and k = 2, so MultiSteps' running
  mean equals the plain mean exactly and the comparison can be tight even with
  8-bit moments (whose rounding would amplify a last-bit difference).
  """
  k, outer = 2, STEPS
  tx = transform(name)
  accum = optax.MultiSteps(tx, k)
  update = jax.jit(accum.update)
  params = make_params(rng)
  p_a, s_a = params, accum.init(params)
  means = []
  for t in range(outer):
    micro = [make_grads(rng, params, dyadic=True) for _ in range(k)]
    for j, g in enumerate(micro):
      updates, s_a = update(g, s_a, p_a)
      if j < k - 1:  # nothing moves between the micro-steps
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
      p_a = optax.apply_updates(p_a, updates)
      assert counts(s_a.inner_opt_state) == [t + (j == k - 1)] * len(counts(s_a.inner_opt_state))
    means.append(jax.tree.map(lambda *g: sum(g) / k, *micro))
  p_b, s_b = run(tx, params, means, update=jitted_update(name))
  assert_close_up_to_int8_rounding(p_a, p_b, CASES[name])
  assert_close_up_to_int8_rounding(s_a.inner_opt_state, s_b, CASES[name])
  assert int(s_a.gradient_step) == outer and counts(s_b) and counts(s_b) == [outer] * len(counts(s_b))


@battery
def test_inject_hyperparams_follows_the_constant(name, rng):
  """Injected = constant at either value; setting the injected value changes the trajectory."""
  case = CASES[name]
  tx = case.build_injected()
  update = jax.jit(tx.update)
  params = make_params(rng)
  grads = [make_grads(rng, params) for _ in range(STEPS)]
  first, second = case.values
  p_first, s_first = run(tx, params, grads, update=update)
  assert float(s_first.hyperparams[case.hyperparam]) == pytest.approx(first)
  p_const, s_const = run(transform(name), params, grads, update=jitted_update(name))
  chex.assert_trees_all_close(p_first, p_const, **case.tolerance)
  # Leaves only: the admm state's static config records injected values as None (read from the hyperparams).
  chex.assert_trees_all_close(jax.tree.leaves(s_first.inner_state), jax.tree.leaves(s_const), **case.tolerance)

  state = tx.init(params)
  state.hyperparams[case.hyperparam] = jnp.asarray(second, jnp.float32)
  p_second = params
  for g in grads:
    updates, state = update(g, state, p_second)
    p_second = optax.apply_updates(p_second, updates)
  p_ref, _ = run(case.build(second), params, grads)  # eager: no compile of one more program
  chex.assert_trees_all_close(p_second, p_ref, **case.tolerance)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_second), jax.tree.leaves(p_first)))
  assert moved > 1e-3, moved


@pytest.mark.parametrize("name", ["adam_lowp_int8", "scale_by_adam_lowp"])
def test_inject_hyperparams_block_size(name):
  """A plain ``inject_hyperparams`` works (block_size defaults to None); a numeric one names the fix."""
  case = CASES[name]
  params = make_params(np.random.default_rng())
  grads = make_grads(np.random.default_rng(), params)
  plain = optax.inject_hyperparams(case.factory)(**case.kwargs, **{case.hyperparam: case.values[0]})
  static = optax.inject_hyperparams(case.factory, static_args=("block_size",))(
      **case.kwargs, block_size=256, **{case.hyperparam: case.values[0]})
  got, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  want, _ = jax.jit(static.update)(grads, static.init(params), params)
  chex.assert_trees_all_equal(got, want)
  numeric = optax.inject_hyperparams(case.factory)(**case.kwargs, block_size=128,
                                                    **{case.hyperparam: case.values[0]})
  with pytest.raises(TypeError, match=r"static_args=\('block_size',\)"):
    numeric.init(params)


@battery
def test_tree_map_params_maps_the_params_copies(name, rng):
  """tree_map_params reaches every params-shaped tree of the state, and nothing else."""
  tx = transform(name)
  params = make_params(rng)
  abstract = jax.eval_shape(tx.init, params)
  as_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  mapped = optax.tree_utils.tree_map_params(tx, as_struct, abstract, transform_non_params=lambda _: None)
  params_def = jax.tree.structure(params)
  for field in CASES[name].params_fields:
    copies = optax.tree_utils.tree_get_all_with_path(mapped, field)
    assert copies, field
    for path, copy in copies:
      assert jax.tree.structure(copy) == params_def, (field, path)
      original = optax.tree_utils.tree_get_all_with_path(abstract, field)
      chex.assert_trees_all_equal_shapes_and_dtypes(copy, dict(original)[path])
  # Nothing else was mapped: the counters (and for ADMM lmda, metrics) went to None.
  assert all(c is None for _, c in optax.tree_utils.tree_get_all_with_path(mapped, "count"))
  n_mapped = sum(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(mapped))
  n_copies = sum(len(optax.tree_utils.tree_get_all_with_path(mapped, f)) for f in CASES[name].params_fields)
  assert n_mapped == n_copies * len(jax.tree.leaves(params))
  # A sharding per leaf, as a sharded training loop builds it: the state goes there.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = optax.tree_utils.tree_map_params(
      tx, lambda _: device, abstract, transform_non_params=lambda _: device)
  state = tx.init(params)
  placed = jax.device_put(state, shardings)
  assert all(x.sharding == device for x in jax.tree.leaves(placed))
  chex.assert_trees_all_equal(placed, state)


@battery
def test_state_layout_is_stable_under_jit_with_donation(name, rng):
  """Jitted updates with the state donated: it is consumed, its shapes and dtypes never change."""
  tx = transform(name)
  params = make_params(rng)
  init = tx.init(params)
  layout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), init)
  update = jitted_update(name)
  state = init
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. "Some donated buffers were not usable"
    for _ in range(STEPS):
      previous = state
      updates, state = update(make_grads(rng, params), state, params)
      params = optax.apply_updates(params, updates)
      # The donated state was consumed: every array with entries (not the
      # (0,) placeholders, not scalars that pass through) was reused.
      assert all(x.is_deleted() for x in jax.tree.leaves(previous) if x.ndim and x.size)
  chex.assert_trees_all_equal_shapes_and_dtypes(layout, state)
  assert jax.tree.structure(state) == jax.tree.structure(layout)
  assert counts(state) == [STEPS] * len(counts(state))


@battery
def test_clip_by_global_norm_in_front(name, rng):
  """chain(clip_by_global_norm(1.0), tx) = tx on gradients divided by their global norm."""
  tx = transform(name)
  clipped_tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
  params = make_params(rng)
  grads = [make_grads(rng, params, scale=10.0) for _ in range(STEPS)]
  clip = lambda g: jax.tree.map(lambda x: x / optax.tree_utils.tree_norm(g), g)  # all norms > 1
  assert all(float(optax.tree_utils.tree_norm(g)) > 10.0 for g in grads)
  p_chain, s_chain = run(clipped_tx, params, grads, update=jax.jit(clipped_tx.update))
  p_ref, s_ref = run(tx, params, [clip(g) for g in grads], update=jitted_update(name))
  chex.assert_trees_all_close(p_chain, p_ref, **CASES[name].tolerance)
  chex.assert_trees_all_close(s_chain[1], s_ref, **CASES[name].tolerance)
  # The clip did something: unclipped gradients give other params.
  p_raw, _ = run(tx, params, grads, update=jitted_update(name))
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_raw), jax.tree.leaves(p_ref))) > 1e-4
