"""The memory predictor: XLA's buffer assignment of the real step, before any weight exists."""

import re

import chex
import jax
import pytest

import elsa_jax
from elsa_jax.models import llama
from elsa_jax.run import memory
from elsa_jax.run import sharding
from elsa_jax.run import train

CONFIG = llama.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)


def test_prediction_shrinks_with_the_mesh_and_refuses_what_does_not_fit():
  if jax.device_count() < 8:
    pytest.skip("needs 8 CPU devices")
  cfg = train.ElsaConfig(batch_size=8, seqlen=64)
  one = memory.predict_memory(CONFIG, cfg, sharding.make_mesh(1, 1))
  eight = memory.predict_memory(CONFIG, cfg, sharding.make_mesh(4, 2))
  n = one.n_params
  # fp32 params (4 B) + Adam m, v (8 B) + z, u, score (12 B on prunable) lie in the arguments.
  assert one.argument_bytes >= 12 * n
  assert eight.argument_bytes < one.argument_bytes / 4
  assert one.state_bytes_per_param > 8
  lowp = memory.predict_memory(CONFIG, train.ElsaConfig(batch_size=8, seqlen=64, state_dtype="float8_e4m3fn",
                                                        moment_dtype="int8"), sharding.make_mesh(1, 1))
  assert lowp.state_bytes_per_param < one.state_bytes_per_param / 2
  with pytest.raises(MemoryError, match="GiB"):
    memory.check_fits(one, capacity_bytes=one.total_bytes // 2)
  memory.check_fits(one, capacity_bytes=one.total_bytes * 2)


def test_remat_policies_keep_the_gradients_and_cut_the_activations():
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  # (XLA:CPU's buffer assignment does not show remat's saving -- its temporaries
  # grow with the layer count with or without it -- so the saving is measured on
  # a GPU; here: the layers are checkpointed and the gradients are unchanged.)
  seed = int(np.random.default_rng().integers(1 << 30))
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 512, size=(2, 33)), jnp.int32)
  grads = {}
  for remat in (False, "full", "dots", "dots_no_batch"):
    graphdef, params = llama.split(llama.Llama(CONFIG, remat=remat, rngs=nnx.Rngs(seed)))
    loss_fn = train.make_loss_fn(graphdef, jnp.float32)
    jaxpr = str(jax.make_jaxpr(loss_fn)(params, tokens))
    assert len(re.findall(r"= (?:remat\d*|checkpoint)\[", jaxpr)) == (CONFIG.num_hidden_layers if remat else 0)
    grads[remat] = jax.jit(jax.grad(loss_fn))(params, tokens)
  for remat in ("full", "dots", "dots_no_batch"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads[remat], grads[False])
  with pytest.raises(ValueError, match="remat policy"):
    llama.Llama(CONFIG, remat="everything")


def test_z_update_temporaries_stay_one_group(monkeypatch):
  """The z/u update runs group by group: its step needs little more scratch than the plain step.

  Before the update was split into groups, XLA:CPU kept float32 y, scores,
  integer keys and z of every matrix alive at once (the z-update step's
  temporaries exceeded the plain step's by ~2x the fp32 size of the prunable
  weights on a 48M-parameter LLaMA).
  """
  import jax.numpy as jnp

  from elsa_jax.lowp import ordering as _scheduling

  config = llama.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
  monkeypatch.setattr(_scheduling, "GROUP_ENTRIES", 256 * 512)  # ~one MLP matrix per group
  graphdef, params = memory.abstract_model(config)
  tx = train.make_optimizer(train.ElsaConfig(sparsity=0.7))
  state = jax.eval_shape(tx.init, params)
  batch = jax.ShapeDtypeStruct((1, 1, 33), jnp.int32)
  temps = {}
  for due in (False, True):
    step = jax.jit(train.make_train_step(graphdef, tx, compute_dtype=jnp.float32, z_update=due),
                   donate_argnums=(0, 1))
    temps[due] = step.lower(params, state, batch).compile().memory_analysis().temp_size_in_bytes
  keep = jax.tree.leaves(elsa_jax.prunable_mask(params))
  prunable_bytes = sum(4 * p.size for p, k in zip(jax.tree.leaves(params), keep) if k)
  assert temps[True] - temps[False] < 0.5 * prunable_bytes, (temps, prunable_bytes)


@pytest.mark.parametrize("ordered", [True, False])
def test_elsa_l_step_peaks_below_fp32(monkeypatch, ordered):
  """ELSA-L's smaller state is a smaller step: its temporaries do not eat the saving.

  Without ordering the per-matrix work (``ordered=False`` drops the
  dependencies of :mod:`elsa_jax.lowp.ordering`), XLA:CPU's default scheduler
  decodes the int8 moments and the float8 z/u of every matrix before it
  re-encodes any, and ELSA-L's peak exceeds fp32's.
  """
  import jax.numpy as jnp

  from elsa_jax.sparsity import topk as _projection

  from elsa_jax.lowp import ordering as _scheduling

  if not ordered:
    monkeypatch.setattr(_scheduling, "zero_after", lambda *xs: jnp.zeros([], jnp.float32))
  config = llama.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
  monkeypatch.setattr(_scheduling, "GROUP_ENTRIES", 256 * 512)  # ~one MLP matrix per group
  mesh = sharding.make_mesh(1, 1)
  peaks = {}
  for name, dtypes in (("fp32", {}), ("elsa-l", dict(state_dtype="float8_e4m3fn", moment_dtype="int8"))):
    cfg = train.ElsaConfig(sparsity=0.7, batch_size=1, seqlen=32, compute_dtype="float32", **dtypes)
    peaks[name] = memory.predict_memory(config, cfg, mesh).total_bytes
  ratio = peaks["fp32"] / peaks["elsa-l"]
  if ordered:
    assert ratio > 1.4, peaks
  else:
    assert ratio < 1.4, peaks


@pytest.mark.parametrize("in_place", [True, False])
def test_int8_adam_updates_params_in_place(monkeypatch, in_place):
  """The int8 Adam update does not copy the donated params and moments.

  The gradient reads the params (as ELSA's penalty does), so without
  :func:`elsa_jax.lowp.ordering.materialize` XLA recomputes the float32 moments
  where it encodes them and where it updates the params, and must copy the
  old params and first moments first (``in_place=False`` drops it).
  """
  import jax.numpy as jnp
  import optax

  from elsa_jax.lowp import adam as _low_precision
  from elsa_jax.lowp import codecs as quant
  from elsa_jax.lowp import ordering as _scheduling

  if not in_place:
    monkeypatch.setattr(_scheduling, "materialize", lambda x, *deps: x)
  monkeypatch.setattr(_scheduling, "GROUP_ENTRIES", 512 * 1024)  # one matrix at a time
  keys = jax.random.split(jax.random.key(int(jax.random.randint(jax.random.key(7), (), 0, 1000))), 8)
  params = {f"w{i}": jax.random.normal(k, (512, 1024)) for i, k in enumerate(keys)}
  tx = elsa_jax.adam_lowp(1e-3, moment_dtype="int8")

  def step(params, state, x):
    grads = jax.tree.map(lambda w: x * w + 0.1 * w, params)  # reads the params, like the ADMM penalty
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  x = jnp.float32(0.5)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  param_bytes = sum(4 * p.size for p in params.values())
  if in_place:
    assert temp < 0.5 * param_bytes, (temp, param_bytes)
    # The step is Adam's, taken with the moments as the new state stores them.
    new, new_state = jax.jit(step)(params, state, x)
    adam = new_state[0]
    nu = _low_precision.second_moment(adam)
    for k in params:
      mu = quant.dequantize_blockwise(adam.mu[k], adam.mu_scale[k])
      expected = -1e-3 * (mu / (1 - 0.9)) / (jnp.sqrt(nu[k] / (1 - 0.999)) + 1e-8)
      chex.assert_trees_all_close(new[k] - params[k], expected, rtol=1e-4, atol=1e-6)
  else:
    assert temp > param_bytes, (temp, param_bytes)
