"""Tests of the ELSA transformation: the method, its composition with optax, ELSA-L."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import elsa_jax

# ----------------------------------------------------------------------------
# An ill-conditioned least-squares problem.

SPARSITY = 0.9
STEPS = 1000
BATCH = 64


@functools.lru_cache(maxsize=None)
def lsq_problem(d=128, k=8, n=2048, seed=0):
  """Correlated features with scales over two decades (condition ~150), dense w*."""
  r = np.random.default_rng(seed)
  scales = 10.0 ** (-2.0 * r.permutation(d) / d)
  mixing = np.diag(scales) @ (np.eye(d) + 0.5 * r.normal(size=(d, d)) / np.sqrt(d))
  x = (r.normal(size=(n, d)) @ mixing).astype(np.float32)
  w = r.normal(size=(d, k)).astype(np.float32)
  y = (x @ w + 0.1 * r.normal(size=(n, k))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def lsq_loss(params, x=None, y=None):
  if x is None:
    x, y = lsq_problem()
  return 0.5 * jnp.mean(jnp.sum((x @ params["layers"]["0"]["kernel"] - y) ** 2, -1))


def lsq_dense():
  x, y = lsq_problem()
  return {"layers": {"0": {"kernel": jnp.linalg.lstsq(x, y)[0]}}}


def lsq_train(tx, params, steps=STEPS):
  """Minibatch training from ``params`` in one jitted scan; returns (params, state)."""
  x, y = lsq_problem()
  n = x.shape[0]

  def step(carry, t):
    p, s = carry
    i = (t * BATCH) % n
    g = jax.grad(lsq_loss)(
        p, jax.lax.dynamic_slice_in_dim(x, i, BATCH), jax.lax.dynamic_slice_in_dim(y, i, BATCH)
    )
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, s), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))((params, tx.init(params)))
  return p, s


def elsa_lsq(lmda=0.3, base=None, **kwargs):
  sched = optax.linear_schedule(1e-2, 0.0, STEPS)
  base = optax.adam(sched, b2=0.95) if base is None else base(sched)
  return optax.chain(
      optax.clip_by_global_norm(10.0),
      elsa_jax.admm(base, sparsity=SPARSITY, lmda=lmda, interval=16, **kwargs),
  )


@functools.lru_cache(maxsize=None)
def lsq_result(name):
  """Final loss after finalize, and the run's final state, for a named setting."""
  configs = {
      "magnitude": dict(projection="magnitude"),
      "objective_aware": dict(),
      "base_second_moment": dict(score_source="base_second_moment"),
      "elsa_l": dict(
          state_dtype="float8_e4m3fn",
          score_dtype="int8",
          base=lambda lr: elsa_jax.adam_lowp(lr, b2=0.95, moment_dtype="int8"),
      ),
  }
  kwargs = configs[name]
  projection = kwargs.get("projection", "objective_aware")
  tx = elsa_lsq(**kwargs)
  params, state = lsq_train(tx, lsq_dense())
  final = elsa_jax.finalize(params, state, sparsity=SPARSITY, projection=projection)
  report = elsa_jax.sparsity_report(final)
  assert report["zeros"] == round(SPARSITY * 128 * 8), report
  return float(lsq_loss(final)), tx, state


def test_lsq_elsa_beats_magnitude_pruning():
  dense = lsq_dense()
  dense_loss = float(lsq_loss(dense))
  magnitude_loss = float(
      lsq_loss(elsa_jax.finalize(dense, sparsity=SPARSITY, projection="magnitude"))
  )
  plain, _, _ = lsq_result("magnitude")
  aware, _, state = lsq_result("objective_aware")
  adam_v, _, _ = lsq_result("base_second_moment")
  print(f"LSQ 90%: dense {dense_loss:.4f} magnitude {magnitude_loss:.2f} "
        f"ELSA plain {plain:.2f} ELSA objective-aware {aware:.2f} (Adam's v: {adam_v:.2f})")
  assert dense_loss < 0.1
  assert plain < 0.75 * magnitude_loss  # ADMM beats one-shot magnitude pruning
  assert aware < 0.85 * plain  # the objective-aware projection beats magnitude
  assert adam_v < 0.75 * magnitude_loss  # the paper's score source works too
  metrics = elsa_jax.admm_metrics(state)
  assert 0.0 < float(metrics.rel_gap) < 1.0
  assert 0.0 <= float(metrics.mask_flip_fraction) < 0.5


def test_elsa_l_fp8_state_and_int8_moments():
  aware, tx32, state32 = lsq_result("objective_aware")
  low, tx8, state8 = lsq_result("elsa_l")
  print(f"ELSA-L fp8 z/u + int8 moments: {low:.3f} vs fp32 {aware:.3f}")
  assert low < 1.05 * aware
  params = lsq_dense()
  bytes32 = elsa_jax.optimizer_state_bytes(state32, params)["per_prunable_param"]
  bytes8 = elsa_jax.optimizer_state_bytes(state8, params)["per_prunable_param"]
  print(f"state bytes per prunable param: fp32 {bytes32:.3f}, ELSA-L {bytes8:.3f}")
  assert bytes32 >= 20.0  # m, v, z, u, score in float32
  # Five one-byte tensors (z, u, m, v, score) against five float32 ones, plus
  # the float32 scales: one per 256-entry block of the 8-bit tensors (1.6%
  # each) and one per fp8 tensor. A quarter plus the block scales' 1%:
  assert bytes8 / bytes32 < 0.255
  z = elsa_jax.find_admm_state(state8).z["layers"]["0"]["kernel"]
  assert z.dtype == jnp.float8_e4m3fn


# ----------------------------------------------------------------------------
# A small LLaMA-shaped params tree (numpy-initialised: no compiles).


def llama_params(seed=0, hidden=16, ffn=32, vocab=24, layers=1):
  r = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(r.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
  block = lambda: {
      "mlp": {"up_proj": {"kernel": normal(hidden, ffn)}, "down_proj": {"kernel": normal(ffn, hidden)}},
      "input_layernorm": {"scale": jnp.ones(hidden)},
  }
  return {
      "embed_tokens": {"embedding": normal(vocab, hidden)},
      "layers": {i: block() for i in range(layers)},
      "lm_head": {"kernel": normal(hidden, vocab)},
  }


def llama_loss(params, tokens):
  h = params["embed_tokens"]["embedding"][tokens[:, :-1]]
  for layer in params["layers"].values():
    a = h * layer["input_layernorm"]["scale"]
    h = h + jax.nn.gelu(a @ layer["mlp"]["up_proj"]["kernel"]) @ layer["mlp"]["down_proj"]["kernel"]
  logits = h @ params["lm_head"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def tokens(step, batch=4, length=9):
  return jnp.asarray(np.random.default_rng(1000 + step).integers(0, 24, (batch, length)), jnp.int32)


GRAD = jax.jit(jax.grad(llama_loss))

# The transform most tests share (so that its update compiles once).
DEFAULT_TX = optax.chain(
    optax.clip_by_global_norm(1.0),
    elsa_jax.admm(optax.adam(1e-2, b2=0.95), sparsity=0.6, interval=2, lmda=0.05),
)
DEFAULT_UPDATE = jax.jit(DEFAULT_TX.update, donate_argnums=(1,))


def run_steps(tx, params, steps, update=None):
  """``steps`` optimizer steps on ``tokens(t)``; ``update=tx.update`` runs eagerly."""
  update = jax.jit(tx.update) if update is None else update
  state = tx.init(params)
  for t in range(steps):
    grads = GRAD(params, tokens(t)) if update is not tx.update else jax.grad(llama_loss)(params, tokens(t))
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@functools.lru_cache(maxsize=None)
def trained_llama():
  """Three jitted steps of the default transform (state donated)."""
  return run_steps(DEFAULT_TX, llama_params(), 3, update=DEFAULT_UPDATE)


def kernel_paths(params):
  return [
      elsa_jax.path_str(p)
      for p, k in jax.tree_util.tree_flatten_with_path(elsa_jax.prunable_mask(params))[0]
      if k
  ]


def kernel_paths_with(params, prunable):
  mask = jax.tree_util.tree_map_with_path(
      lambda p, x: bool(elsa_jax.sparsity.prunable.as_predicate(prunable)(p, x)), params
  )
  return [elsa_jax.path_str(p) for p, k in jax.tree_util.tree_flatten_with_path(mask)[0] if k]


def get(tree, path):
  return functools.reduce(lambda node, key: node[int(key) if key.isdigit() else key], path.split("/"), tree)


def test_default_prunable_selects_block_linears_only():
  params = llama_params(layers=2)
  paths = kernel_paths(params)
  assert len(paths) == 4 and all(p.startswith("layers/") and p.endswith("/kernel") for p in paths)
  # A user predicate and a bool prefix tree.
  only_up = lambda path, leaf: "up_proj" in elsa_jax.sparsity.prunable.path_names(path) and leaf.ndim == 2
  assert len(kernel_paths_with(params, only_up)) == 2
  tree = {"layers": {0: True, 1: False}}
  assert len(kernel_paths_with(params, tree)) == 3  # layer 0: 2 kernels + its norm...
  # ...which is not a matrix: a clear error at init.
  with pytest.raises(ValueError, match="not a matrix"):
    elsa_jax.admm(optax.sgd(0.1), sparsity=0.5, prunable=tree).init(params)


@pytest.mark.parametrize(
    "pattern,kwargs",
    [
        ("unstructured", dict(sparsity=0.7)),
        ("row", dict(sparsity=0.75)),
        ("nm", dict(n_m=(2, 4))),
        ("nm", dict(n_m=(4, 8))),
        ("unstructured", dict(sparsity={"layers": {0: {"mlp": {"up_proj": 0.9, "down_proj": 0.25}}}})),
    ],
)
def test_finalize_gives_exact_sparsity(pattern, kwargs):
  """finalize reads the run's target from its state; the same target given again changes nothing."""
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   elsa_jax.admm(optax.adam(1e-2, b2=0.95), pattern=pattern, interval=2, lmda=0.05, **kwargs))
  params, state = run_steps(tx, llama_params(), 3)
  final = elsa_jax.finalize(params, state)
  chex.assert_trees_all_equal(final, elsa_jax.finalize(params, state, pattern=pattern, **kwargs))
  report = elsa_jax.sparsity_report(final)
  mask = elsa_jax.prunable_mask(params)
  for (path, w), k in zip(jax.tree_util.tree_flatten_with_path(final)[0], jax.tree.leaves(mask)):
    name = elsa_jax.path_str(path)
    if not k:
      assert name not in report["per_matrix"]
      np.testing.assert_array_equal(w, get(params, name))
      continue
    zero = np.asarray(w) == 0
    if pattern == "nm":
      n, m = kwargs["n_m"]
      groups = zero.reshape(w.shape[0] // m, m, w.shape[1]).sum(1)
      np.testing.assert_array_equal(groups, m - n)
    elif pattern == "row":
      np.testing.assert_array_equal(zero.sum(0), round(0.75 * w.shape[0]))
    else:
      s = kwargs["sparsity"]
      if isinstance(s, dict):
        s = 0.9 if "up_proj" in name else 0.25
      assert zero.sum() == round(s * w.size), name
    assert report["per_matrix"][name] == zero.mean()
  sizes = [w.size for w, k in zip(jax.tree.leaves(final), jax.tree.leaves(mask)) if k]
  assert report["total"] == sum(sizes) and len(report["per_matrix"]) == 2


def test_finalize_refuses_arguments_that_differ_from_the_run():
  """A target, pattern, prunable set or projection other than the run's is an error, never silence."""
  params, state = trained_llama()  # sparsity 0.6, unstructured, default prunable, objective-aware
  with pytest.raises(ValueError, match="sparsity=.*the run's target is 0.6"):
    elsa_jax.finalize(params, state, sparsity=0.7)
  with pytest.raises(ValueError, match="pattern"):
    elsa_jax.finalize(params, state, pattern="2:4")
  with pytest.raises(ValueError, match="prunable"):
    elsa_jax.finalize(params, state, prunable=lambda path, leaf: "up_proj" in elsa_jax.path_str(path))
  with pytest.raises(ValueError, match="projection"):
    elsa_jax.finalize(params, state, projection="magnitude")
  final = elsa_jax.finalize(params, state, sparsity=0.6, pattern=elsa_jax.Unstructured(),
                            prunable=elsa_jax.default_prunable)
  assert elsa_jax.sparsity_report(final)["overall"] == pytest.approx(0.6, abs=1e-3)


def test_per_leaf_sparsity_in_the_state():
  params = llama_params()
  sparsity = {"layers": {0: {"mlp": {"up_proj": 0.9, "down_proj": 0.25}}}}
  z = elsa_jax.admm(optax.sgd(0.1), sparsity=sparsity).init(params).z["layers"][0]["mlp"]
  assert int((z["up_proj"]["kernel"] == 0).sum()) == round(0.9 * 512)
  assert int((z["down_proj"]["kernel"] == 0).sum()) == round(0.25 * 512)


def test_second_moment_found_in_wrapped_and_chained_bases():
  params = llama_params()
  find = elsa_jax.lowp.adam.find_second_moment
  injected = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b2=0.95)
  for base in (optax.adam(1e-3), injected, optax.chain(optax.add_decayed_weights(0.1), injected),
               elsa_jax.adam_lowp(1e-3, moment_dtype="int8")):
    found, nu = find(base.init(params))
    assert found
    chex.assert_trees_all_equal_shapes(nu, params)
    # ...and admm accepts it as the source of the objective-aware score.
    elsa_jax.admm(base, sparsity=0.5, score_source="base_second_moment").init(params)
  assert not find(optax.sgd(0.1, momentum=0.9).init(params))[0]


# ----------------------------------------------------------------------------
# Composition with optax and JAX.


def test_state_layout_is_stable_and_maps_to_params():
  """Under jit with the state donated: shapes and dtypes never change; tree_map_params works."""
  params, state = trained_llama()
  init = DEFAULT_TX.init(llama_params())
  chex.assert_trees_all_equal_shapes_and_dtypes(init, state)
  admm_state = elsa_jax.find_admm_state(state)
  assert admm_state.z["layers"][0]["mlp"]["up_proj"]["kernel"].shape == (16, 32)
  assert admm_state.z["lm_head"]["kernel"].shape == (0,)  # non-prunable placeholder
  specs = jax.tree.map(lambda p: f"spec{p.ndim}", params)
  mapped = optax.tree_utils.tree_map_params(
      DEFAULT_TX, lambda leaf, spec: spec, state, specs, transform_non_params=lambda _: None
  )
  admm_mapped = elsa_jax.find_admm_state(mapped)
  assert admm_mapped.z == specs and admm_mapped.u == specs and admm_mapped.score == specs
  assert admm_mapped.count is None and all(m is None for m in admm_mapped.metrics)
  assert admm_mapped.base_state[0].mu == specs  # Adam's moments too


def test_multisteps_counts_optimizer_steps_and_equals_big_batch():
  k, steps = 3, 3
  accum = optax.MultiSteps(DEFAULT_TX, k)
  update_accum = jax.jit(accum.update)
  params = llama_params()
  p_a, s_a = params, accum.init(params)
  p_b, s_b = params, DEFAULT_TX.init(params)
  for t in range(steps):
    micro = [GRAD(p_a, tokens(100 + t * k + j)) for j in range(k)]
    for g in micro:
      u, s_a = update_accum(g, s_a, p_a)
      p_a = optax.apply_updates(p_a, u)
    # Micro-batches of equal size: the k-times batch's gradient is their mean.
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro)
    u, s_b = DEFAULT_UPDATE(mean, s_b, p_b)
    p_b = optax.apply_updates(p_b, u)
  chex.assert_trees_all_close(p_a, p_b, rtol=1e-5, atol=1e-6)
  inner = elsa_jax.find_admm_state(s_a)
  assert int(inner.count) == steps  # optimizer steps, not micro-steps
  chex.assert_trees_all_close(inner.z, elsa_jax.find_admm_state(s_b).z, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(elsa_jax.admm_metrics(s_a), elsa_jax.admm_metrics(s_b), rtol=1e-4)


def test_sharded_matches_single_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest.py sets XLA_FLAGS before JAX starts)")
  mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  params = llama_params()
  tx = DEFAULT_TX
  # Every matrix is sharded along its last axis (all are multiples of 8).
  spec = lambda x: P(None, "model") if x.ndim == 2 else P()
  p_shard = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params)
  replicated = NamedSharding(mesh, P())
  s_shard = optax.tree_utils.tree_map_params(
      tx,
      lambda leaf, pair: pair[0] if leaf.shape == pair[1] else replicated,
      jax.eval_shape(tx.init, params),
      jax.tree.map(lambda s, x: (s, x.shape), p_shard, params),
      transform_non_params=lambda x: jax.tree.map(lambda _: replicated, x),
      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], NamedSharding),
  )

  def step(params, state, batch):
    u, state = tx.update(jax.grad(llama_loss)(params, batch), state, params)
    return optax.apply_updates(params, u), state

  sharded_step = jax.jit(
      step, in_shardings=(p_shard, s_shard, replicated), out_shardings=(p_shard, s_shard),
      donate_argnums=(0, 1),
  )
  p_s = jax.device_put(params, p_shard)
  s_s = jax.jit(tx.init, out_shardings=s_shard)(p_s)
  for t in range(3):
    p_s, s_s = sharded_step(p_s, s_s, tokens(t))
  up = p_s["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert len(up.sharding.device_set) == 8 and up.sharding.spec == P(None, "model")
  z_up = elsa_jax.find_admm_state(s_s).z["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert z_up.sharding.spec == P(None, "model")
  p_1, s_1 = trained_llama()  # the same steps on one device
  chex.assert_trees_all_close(p_s, p_1, rtol=1e-5, atol=1e-6)
  z_s, z_1 = elsa_jax.find_admm_state(s_s).z, elsa_jax.find_admm_state(s_1).z
  chex.assert_trees_all_close(z_s, z_1, rtol=1e-5, atol=1e-6)
  masks = lambda z: jax.tree.map(lambda x: np.asarray(x) != 0, z)
  chex.assert_trees_all_equal(masks(z_s), masks(z_1))


def test_inject_hyperparams_low_precision_state():
  """lmda as a traced hyperparameter rescales u; ELSA-L state keeps its layout."""
  factory = optax.inject_hyperparams(elsa_jax.admm)
  tx = factory(
      elsa_jax.adam_lowp(1e-2, b2=0.95, moment_dtype="int8"), pattern="nm", n_m=(2, 4),
      interval=4, lmda=0.05, state_dtype="float8_e5m2", state_scale="row", score_dtype="int8",
  )
  params = llama_params()
  state = tx.init(params)
  layout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  update = jax.jit(tx.update, donate_argnums=(1,))
  for t in range(2):  # the z-update at step 0 makes u non-zero
    u, state = update(GRAD(params, tokens(t)), state, params)
    params = optax.apply_updates(params, u)
  before = jax.tree.map(np.asarray, elsa_jax.find_admm_state(state).u)
  before_scale = jax.tree.map(np.asarray, elsa_jax.find_admm_state(state).u_scale)
  state.hyperparams["lmda"] = jnp.asarray(0.2)
  u, state = update(GRAD(params, tokens(2)), state, params)  # step 2: no z-update
  after = elsa_jax.find_admm_state(state)
  # The unscaled dual lmda * u is continuous: u *= 0.05 / 0.2, exactly, by its fp8 scale.
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, after.u), before)
  chex.assert_trees_all_close(after.u_scale, jax.tree.map(lambda x: x * 0.25, before_scale), rtol=1e-6)
  assert float(elsa_jax.admm_metrics(state).lmda) == pytest.approx(0.2)
  assert optax.tree_utils.tree_get(state, "metrics") is after.metrics
  # Shapes and dtypes never change; the state maps onto the params.
  chex.assert_trees_all_equal_shapes_and_dtypes(layout, state)
  down = after.u["layers"][0]["mlp"]["down_proj"]["kernel"]
  assert down.dtype == jnp.float8_e5m2 and down.shape == (32, 16)
  assert after.u_scale["layers"][0]["mlp"]["down_proj"]["kernel"].shape == (1, 16)
  assert after.score["layers"][0]["mlp"]["down_proj"]["kernel"].dtype == jnp.uint8
  assert after.base_state[0].mu["lm_head"]["kernel"].dtype == jnp.int8
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda leaf, p: p.shape, state, params, transform_non_params=lambda _: None
  )
  mapped = elsa_jax.find_admm_state(mapped)
  assert mapped.z_scale["lm_head"]["kernel"] == (16, 24) and mapped.lmda is None


def test_lmda_schedule_residual_balancing_and_sparsity_ramp():
  """lmda = schedule(count) * balancing factor, u follows every change; bf16 state."""
  sched = lambda count: jnp.where(count < 3, 1e-4, 2e-4)
  tx = elsa_jax.admm(
      elsa_jax.adam_lowp(1e-2, b2=0.95, moment_dtype="bfloat16"), sparsity=0.8, interval=2,
      lmda=sched, lmda_schedule="residual_balancing", state_dtype="bfloat16",
      sparsity_ramp=optax.linear_schedule(0.5, 1.0, 4),
  )
  update = jax.jit(tx.update)
  params = llama_params()
  state = tx.init(params)
  seen = []
  for t in range(6):
    u_before = state.u
    updates, state = update(GRAD(params, tokens(t)), state, params)
    params = optax.apply_updates(params, updates)
    seen.append((float(state.metrics.lmda), float(state.lmda_factor)))
    z = state.z["layers"][0]["mlp"]["up_proj"]["kernel"]
    if t == 0:  # ramp(0) = 0.5 of the target sparsity
      assert z.dtype == jnp.bfloat16 and int((z == 0).sum()) == round(0.4 * z.size)
    if t == 3:  # the schedule doubled and balancing doubled at step 2: u /= 4
      chex.assert_trees_all_close(state.u, jax.tree.map(lambda x: x / 4, u_before), rtol=1e-6)
    if t == 4:  # ramp(4) = 1
      assert int((z == 0).sum()) == round(0.8 * z.size)
  # Primal >> dual residual at every z-update (steps 0, 2, 4): the factor doubles.
  lmdas, factors = zip(*seen)
  np.testing.assert_allclose(factors, [2, 2, 4, 4, 8, 8])
  np.testing.assert_allclose(lmdas, [1e-4, 2e-4, 2e-4, 8e-4, 8e-4, 1.6e-3], rtol=1e-6)
  assert state.score["layers"][0]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16


# The same ADMM on the least-squares problem, step by step (one leaf: cheap eagerly).
EAGER_TX = optax.chain(
    optax.clip_by_global_norm(1.0),
    elsa_jax.admm(optax.adam(1e-2, b2=0.95), sparsity=0.9, interval=2, lmda=0.3),
)


def lsq_batch(t):
  x, y = lsq_problem()
  return x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]


@functools.lru_cache(maxsize=None)
def lsq_steps(jit):
  update = jax.jit(EAGER_TX.update) if jit else EAGER_TX.update
  grad = jax.jit(jax.grad(lsq_loss)) if jit else jax.grad(lsq_loss)
  params = lsq_dense()
  state = EAGER_TX.init(params)
  for t in range(3):
    updates, state = update(grad(params, *lsq_batch(t)), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_jit_and_eager_trajectories_agree():
  p_jit, s_jit = lsq_steps(jit=True)
  p_eager, s_eager = lsq_steps(jit=False)
  chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-6)
  a_jit, a_eager = elsa_jax.find_admm_state(s_jit), elsa_jax.find_admm_state(s_eager)
  chex.assert_trees_all_close((a_jit.z, a_jit.u), (a_eager.z, a_eager.u), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(a_jit.metrics, a_eager.metrics, rtol=1e-5)


def test_static_z_update_matches_the_on_device_schedule():
  """Steps jitted with z_update=True/False, picked on the host, = the lax.cond path."""
  p_ref, s_ref = lsq_steps(jit=True)
  grad = jax.jit(jax.grad(lsq_loss))
  update = jax.jit(EAGER_TX.update, static_argnames="z_update")
  params = lsq_dense()
  state = EAGER_TX.init(params)
  for t in range(3):
    updates, state = update(grad(params, *lsq_batch(t)), state, params, z_update=t % 2 == 0)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(params, p_ref, rtol=1e-5, atol=1e-6)
  a, ref = elsa_jax.find_admm_state(state), elsa_jax.find_admm_state(s_ref)
  chex.assert_trees_all_close((a.z, a.u, a.metrics), (ref.z, ref.u, ref.metrics), rtol=1e-5, atol=1e-6)
  # Step 3 is off schedule: False holds z and u, True updates them all the same.
  grads = grad(params, *lsq_batch(3))
  held = elsa_jax.find_admm_state(update(grads, state, params, z_update=False)[1])
  moved = elsa_jax.find_admm_state(update(grads, state, params, z_update=True)[1])
  chex.assert_trees_all_equal((held.z, held.u), (a.z, a.u))
  assert not np.array_equal(moved.u["layers"]["0"]["kernel"], a.u["layers"]["0"]["kernel"])
  with pytest.raises(TypeError, match="z_update must be None or a Python bool"):
    jax.jit(EAGER_TX.update)(grads, state, params, z_update=jnp.array(True))


def test_building_blocks_reproduce_admm():
  """admm_penalty / admm_projection / admm_dual assembled by hand = admm()."""
  p_ref, s_ref = lsq_steps(jit=False)
  params = lsq_dense()
  lmda, sparsity, interval, decay = 0.3, 0.9, 2, 0.95
  clip, base = optax.clip_by_global_norm(1.0), optax.adam(1e-2, b2=0.95)
  z = elsa_jax.admm_projection(params, sparsity)  # z0: magnitude projection of w0
  u = jax.tree.map(jnp.zeros_like, params)
  v = jax.tree.map(jnp.zeros_like, params)
  base_state = base.init(params)
  for t in range(3):
    g, _ = clip.update(jax.grad(lsq_loss)(params, *lsq_batch(t)), clip.init(params))
    v = jax.tree.map(lambda v_, g_: decay * v_ + (1 - decay) * g_ * g_, v, g)  # pre-penalty
    g = elsa_jax.admm_penalty(g, params, z, u, lmda)
    updates, base_state = base.update(g, base_state, params)
    params = optax.apply_updates(params, updates)
    if t % interval == 0:
      z = elsa_jax.admm_projection(jax.tree.map(jnp.add, params, u), sparsity, v=v)
      u = elsa_jax.admm_dual(u, params, z)
  ref = elsa_jax.find_admm_state(s_ref)
  chex.assert_trees_all_close(params, p_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close((z, u), (ref.z, ref.u), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Errors that name the problem and the fix.


def test_clear_errors():
  params = llama_params()
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
      elsa_jax.admm(optax.sgd(0.1), sparsity=bad)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
      elsa_jax.finalize(params, sparsity=bad, projection="magnitude")
  with pytest.raises(ValueError, match=r"sparsity at 'layers/1' must lie in \[0, 1\)"):
    elsa_jax.admm(optax.sgd(0.1), sparsity={"layers": {0: 0.5, 1: 1.2}})
  with pytest.raises(ValueError, match="groups of M=3 do not divide axis 0 of length 32"):
    elsa_jax.admm(optax.sgd(0.1), pattern="nm", n_m=(1, 3)).init(params)
  with pytest.raises(ValueError, match="not a matrix"):
    elsa_jax.admm(optax.sgd(0.1), sparsity=0.5, prunable=lambda p, x: True).init(params)
  with pytest.raises(ValueError, match="second moment `nu`.*score_source='grad_ema'"):
    elsa_jax.admm(optax.sgd(0.1), sparsity=0.5, score_source="base_second_moment").init(params)
  with pytest.raises(ValueError, match="needs the run's optimizer state"):
    elsa_jax.finalize(params, sparsity=0.5)
  with pytest.raises(ValueError, match="unknown sparsity pattern 'blocks'"):
    elsa_jax.admm(optax.sgd(0.1), sparsity=0.5, pattern="blocks")
  with pytest.raises(ValueError, match="no sparsity given for the prunable leaf 'layers/0/mlp/up"):
    elsa_jax.admm(optax.sgd(0.1), sparsity={"layers": {0: {"mlp": {"down_proj": 0.5}}}}).init(params)
  with pytest.raises(ValueError, match="needs the params"):
    elsa_jax.admm(optax.sgd(0.1), sparsity=0.5).update(params, None)
  nan = jax.tree.map(lambda x: x, params)
  nan["layers"][0]["mlp"]["up_proj"]["kernel"] = jnp.full((16, 32), jnp.nan)
  with pytest.raises(ValueError, match="contains NaN"):
    elsa_jax.finalize(nan, sparsity=0.5, projection="magnitude")


def test_group_by_group_z_update_equals_the_joint_one(monkeypatch):
  """Leaves updated in groups (here one per group) give the z, u and metrics of one joint group."""
  from elsa_jax.sparsity import topk as _projection

  r = np.random.default_rng()
  params = {"layers": {str(i): {"kernel": jnp.asarray(r.normal(size=(16, 8 * (i + 1))), jnp.float32)}
                       for i in range(3)}}
  grads = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)

  def one_step():
    tx = elsa_jax.admm(optax.adam(1e-2), sparsity=0.6, interval=1)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    return state

  joint = one_step()
  from elsa_jax.lowp import ordering as _scheduling

  monkeypatch.setattr(_scheduling, "GROUP_ENTRIES", 16 * 8)
  assert len(_scheduling.leaf_groups([p.size for p in jax.tree.leaves(params)], 16 * 8)) == 3
  grouped = one_step()
  chex.assert_trees_all_equal((grouped.z, grouped.u), (joint.z, joint.u))
  chex.assert_trees_all_close(grouped.metrics, joint.metrics, rtol=1e-6)
  assert float(joint.metrics.rel_gap) > 0


@pytest.mark.parametrize("lowp", [False, True])
def test_deferred_z_update_equals_the_fused_one(lowp):
  """A step with z_update=False then admm_zu_update as its own program = one step with z_update=True."""
  base = elsa_jax.adam_lowp(1e-2, b2=0.95, moment_dtype="int8") if lowp else optax.adam(1e-2, b2=0.95)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      elsa_jax.admm(base, sparsity=0.6, interval=2, lmda=0.05, lmda_schedule="residual_balancing",
                    state_dtype="float8_e4m3fn" if lowp else "float32"),
  )
  update = jax.jit(tx.update, static_argnames="z_update")
  seed = int(np.random.default_rng().integers(1 << 30))
  params = llama_params(seed=seed, layers=2)
  state = tx.init(params)
  for t in range(3):  # into the run: u, the score and lmda are no longer at their initial values
    updates, state = update(GRAD(params, tokens(t)), state, params, z_update=t % 2 == 0)
    params = optax.apply_updates(params, updates)
  grads = GRAD(params, tokens(3))
  updates, state = update(grads, state, params, z_update=False)  # count 3: not due
  params = optax.apply_updates(params, updates)
  grads = GRAD(params, tokens(4))  # count 4: due

  fused_updates, fused = update(grads, state, params, z_update=True)
  plain_updates, plain = update(grads, state, params, z_update=False)
  new_params = optax.apply_updates(params, plain_updates)
  deferred = jax.jit(elsa_jax.admm_zu_update)(plain, new_params)
  chex.assert_trees_all_equal(fused_updates, plain_updates)
  assert jax.tree.structure(deferred) == jax.tree.structure(fused)
  a, b = elsa_jax.find_admm_state(fused), elsa_jax.find_admm_state(deferred)
  chex.assert_trees_all_equal((a.count, a.lmda, a.score, a.base_state), (b.count, b.lmda, b.score, b.base_state))
  chex.assert_trees_all_equal(jax.tree.map(lambda z: z != 0, a.z), jax.tree.map(lambda z: z != 0, b.z))
  chex.assert_trees_all_close((a.z, a.u, a.z_scale, a.u_scale), (b.z, b.u, b.z_scale, b.u_scale),
                              rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close((a.metrics, a.lmda_factor), (b.metrics, b.lmda_factor), rtol=1e-5)
  held = elsa_jax.find_admm_state(plain)
  assert float(jnp.max(jnp.abs(a.u["layers"][0]["mlp"]["up_proj"]["kernel"].astype(jnp.float32)
                               - held.u["layers"][0]["mlp"]["up_proj"]["kernel"].astype(jnp.float32)))) > 0
