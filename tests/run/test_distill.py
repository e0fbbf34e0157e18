"""Distillation from the dense model in the train step (elsa_jax.run.teacher): tiny LLaMAs, 1-4 steps."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elsa_jax.models import llama
from elsa_jax.oneshot import walk
from elsa_jax.run import losses
from elsa_jax.run import memory
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import teacher as teacher_lib
from elsa_jax.run import train

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4)


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 30))


def _run(graphdef, params, cfg, data, **kwargs):
  return train.run(graphdef, params, cfg, lambda s: data[s], mesh=sharding_lib.make_mesh(1, 1),
                   logical_axes=llama.logical_axes_of(graphdef, params), progress=False, **kwargs)


def _kernel_paths(tree):
  return [(p, leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if llama.ARCHITECTURE.prunable(p, leaf)]


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("scan_layers", [False, True])
def test_block_outputs_are_every_decoder_layers_output(scan_layers):
  seed = _seed()
  graphdef, params = llama.split(llama.Llama(CONFIG, scan_layers=scan_layers, rngs=nnx.Rngs(seed % 1000)))
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=(2, 9)), jnp.int32)
  logits, blocks = jax.jit(llama.ARCHITECTURE.apply_with_blocks, static_argnums=0)(graphdef, params, ids)
  assert blocks.shape == (CONFIG.num_hidden_layers, 2, 9, CONFIG.hidden_size)
  np.testing.assert_allclose(logits, llama.apply(graphdef, params, ids), atol=1e-5, rtol=1e-5)
  model = llama.Llama(CONFIG, rngs=nnx.Rngs(seed % 1000))  # the same weights, unrolled by hand
  h = model.embed(ids)
  for i, layer in enumerate(model.layers):
    h, _ = llama.ARCHITECTURE.layer_forward(layer, h)
    np.testing.assert_allclose(blocks[i], h, atol=1e-5, rtol=1e-5)


def test_with_a_1_and_the_teacher_at_the_start_the_first_step_moves_only_by_the_admm_penalty():
  seed = _seed()
  graphdef, params = llama.split(llama.Llama(CONFIG, rngs=nnx.Rngs(seed % 1000)))
  params = jax.tree.map(np.asarray, params)
  cfg = train.ElsaConfig(steps=2, batch_size=2, seqlen=16, interval=2, lr=1e-2, lmda=0.5, distill=1.0,
                         distill_temp=2.0, squarehead=True)  # bf16 compute, the default
  data = np.random.default_rng(seed).integers(0, 64, size=(cfg.steps, 2, cfg.seqlen + 1))
  result = _run(graphdef, params, cfg, data, stop_after=1)  # teacher None: a copy of the starting params
  first = result.history[0]
  assert first["kl_loss"] == 0.0 and first["squarehead_loss"] == 0.0 and first["loss"] == 0.0
  assert first["grad_norm"] == 0.0 and first["ce_loss"] > 1.0  # the CE is there, weighted by 1 - a = 0
  # In float32 XLA:CPU rounds the student's forward (fused with what its backward keeps) and the
  # teacher's differently: the logits agree to rounding only, and so do the loss and gradient with 0.
  fp32 = _run(graphdef, params, dataclasses.replace(cfg, compute_dtype="float32"), data, stop_after=1).history[0]
  assert abs(fp32["kl_loss"]) < 1e-7 and fp32["squarehead_loss"] < 1e-10 and fp32["grad_norm"] < 1e-5
  # The reference: the optimizer on a zero loss gradient, i.e. the ADMM penalty lmda (w - z + u) alone.
  tx = train.make_optimizer(cfg)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p, z_update=False))(params)
  want = jax.tree.map(np.asarray, train.optax.apply_updates(params, updates))
  chex.assert_trees_all_close(result.params, want, atol=1e-7, rtol=1e-6)
  moved = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    got = np.asarray(_at(result.params, path))
    if not llama.ARCHITECTURE.prunable(path, leaf):
      np.testing.assert_array_equal(got, leaf)  # no penalty, no loss gradient: not moved at all
    else:
      moved += int(np.sum(got != leaf))
      kept = np.asarray(_at(want, path)) == leaf  # where the penalty is zero (w = z, u = 0)
      np.testing.assert_array_equal(got[kept], leaf[kept])
  assert moved > 0  # the penalty pulled the pruned entries towards z = 0


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
def test_a_run_with_distill_half_trains_and_reports_the_mixed_loss(sam_rho):
  seed = _seed()
  rng = np.random.default_rng(seed)
  graphdef, dense = llama.split(llama.Llama(CONFIG, rngs=nnx.Rngs(seed % 1000)))
  dense = jax.tree.map(np.asarray, dense)  # host copies: the run donates the arrays it is given
  teacher = jax.tree.map(np.asarray, llama.split(llama.Llama(CONFIG, rngs=nnx.Rngs(seed % 1000 + 1)))[1])
  teacher["lm_head"]["kernel"] = teacher["lm_head"]["kernel"] * 30  # peaked: a KL well above 0
  cfg = train.ElsaConfig(steps=4, batch_size=2, grad_accum=2, seqlen=16, interval=2, lr=3e-3,
                         compute_dtype="float32", distill=0.5, distill_temp=2.0, sam_rho=sam_rho)
  rows = rng.integers(0, 64, size=(4, cfg.seqlen + 1))
  data = np.broadcast_to(rows, (cfg.steps, *rows.shape))  # one batch again and again: the loss must fall
  result = _run(graphdef, dense, cfg, data, teacher=teacher)
  hist = result.history
  assert [h["loss"] for h in hist][-1] < hist[0]["loss"], hist
  assert {"loss", "ce_loss", "kl_loss"} <= set(hist[0]) and "squarehead_loss" not in hist[0]
  # The first step's loss, computed directly: the mean over the 2 micro-batches of the mixed loss.
  want = {"loss": 0.0, "ce_loss": 0.0, "kl_loss": 0.0}
  for micro in rows.reshape(2, 2, -1):
    s = llama.apply(graphdef, dense, micro[:, :-1])
    t = llama.apply(graphdef, teacher, micro[:, :-1])
    ce, kl = losses.next_token_loss(s, micro), losses.kl_distill_loss(s, t, 2.0)
    for k, v in (("loss", 0.5 * ce + 0.5 * 4.0 * kl), ("ce_loss", ce), ("kl_loss", kl)):
      want[k] += float(v) / 2
  assert want["kl_loss"] > 0.01
  for k, v in want.items():
    np.testing.assert_allclose(hist[0][k], v, rtol=2e-5, err_msg=k)


def test_masked_recovery_with_distillation_keeps_its_mask():
  seed = _seed()
  graphdef, dense = llama.split(llama.Llama(CONFIG, rngs=nnx.Rngs(seed % 1000)))
  pruned = jax.tree.map(np.asarray, walk.prune_oneshot(graphdef, dense, None, method="magnitude", sparsity=0.7))
  cfg = train.ElsaConfig(steps=3, batch_size=2, seqlen=16, lr=3e-3, distill=0.5, squarehead=True)  # bf16
  data = np.random.default_rng(seed).integers(0, 64, size=(cfg.steps, 2, cfg.seqlen + 1))
  mesh = sharding_lib.make_mesh(1, 1)
  teacher = teacher_lib.make_teacher(graphdef, dense, cfg, mesh)
  assert {leaf.dtype for leaf in jax.tree.leaves(teacher)} == {jnp.dtype(jnp.bfloat16)}
  result = _run(graphdef, pruned, cfg, data, teacher=teacher, tx=train.make_finetune_optimizer(cfg))
  assert all(h["squarehead_loss"] > 0 and h["kl_loss"] > 0 for h in result.history)
  for path, leaf in _kernel_paths(pruned):
    got = np.asarray(_at(result.params, path))
    assert np.all(got[leaf == 0] == 0.0), path  # every pruned entry exactly zero
    assert np.any(got[leaf != 0] != leaf[leaf != 0]), path  # the survivors trained
  assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(teacher))  # never donated


def test_the_step_takes_the_teacher_exactly_when_distilling():
  graphdef, params = llama.split(llama.Llama(CONFIG, rngs=nnx.Rngs(0)))
  mesh = sharding_lib.make_mesh(1, 1)
  cfg = train.ElsaConfig(steps=2, batch_size=2, seqlen=8, distill=0.3)
  tx = train.make_optimizer(cfg)
  axes = llama.logical_axes_of(graphdef, params)
  placed, state, shardings = train._place_state(tx, params, axes, mesh, dict(sharding_lib.DEFAULT_RULES))
  with pytest.raises(ValueError, match="--distill 0.3 needs teacher"):
    train.compile_programs(graphdef, tx, cfg, placed, state, shardings, mesh, steps=range(2))
  with pytest.raises(ValueError, match="takes no teacher"):
    train.compile_programs(graphdef, tx, train.ElsaConfig(steps=2, batch_size=2, seqlen=8), placed, state,
                           shardings, mesh, steps=range(2), teacher=params)
  assert teacher_lib.spec(train.ElsaConfig()) is None
  assert teacher_lib.spec(cfg) == teacher_lib.DistillSpec(0.3, 1.0, False)


def test_the_memory_prediction_holds_the_teacher():
  config = llama.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
  mesh = sharding_lib.make_mesh(1, 1)
  plain = memory.predict_memory(config, train.ElsaConfig(batch_size=2, seqlen=32), mesh, z_update=False)
  distilled = memory.predict_memory(config, train.ElsaConfig(batch_size=2, seqlen=32, distill=0.5), mesh,
                                    z_update=False)
  teacher_bytes = plain.n_params * 2  # bf16, the compute dtype
  assert distilled.argument_bytes - plain.argument_bytes == teacher_bytes
  assert distilled.total_bytes >= plain.total_bytes + teacher_bytes
