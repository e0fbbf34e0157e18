"""Masked recovery through train.run: the mask frozen, the loss down, checkpoints resumed bit for bit."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.models import llama
from elsa_jax.oneshot import walk
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import train

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)


def _finetune(graphdef, params, cfg, data, ckpt=None, stop_after=None):
  return train.run(graphdef, params, cfg, lambda s: data[s], mesh=sharding_lib.make_mesh(1, 1),
                   logical_axes=llama.logical_axes_of(graphdef, params), checkpointer=ckpt, progress=False,
                   stop_after=stop_after, tx=train.make_finetune_optimizer(cfg))


def test_masked_recovery_keeps_the_zeros_lowers_the_loss_and_resumes_bit_identically(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 30))
  graphdef, dense = llama.split(llama.Llama(CONFIG, rngs=nnx.Rngs(seed % 1000)))
  pruned = jax.tree.map(np.asarray, walk.prune_oneshot(graphdef, dense, None, method="magnitude", sparsity=0.7))
  cfg = train.ElsaConfig(steps=8, batch_size=2, seqlen=16, lr=3e-3, compute_dtype="float32")
  rows = np.random.default_rng(seed).integers(0, 64, size=(2, cfg.seqlen + 1))
  data = np.broadcast_to(rows, (cfg.steps, *rows.shape))  # one batch again and again: the loss must fall

  whole = _finetune(graphdef, pruned, cfg, data)
  zeros = jax.tree.map(lambda p: np.asarray(p) == 0, pruned)
  for path, z in jax.tree_util.tree_flatten_with_path(zeros)[0]:
    got = np.asarray(_at(whole.params, path))
    if "layers" in str(path[0]) and path[-1].key == "kernel":
      assert np.all(got[z] == 0.0), path  # every pruned entry exactly zero
      assert np.any(got[~z] != np.asarray(_at(pruned, path))[~z]), path  # the survivors trained
  losses = [h["loss"] for h in whole.history]
  assert len(losses) == cfg.steps and losses[-1] < 0.9 * losses[0], losses
  assert "rel_gap" not in whole.history[0]  # no ADMM, no z/u update

  ckpt = lambda: checkpoint_lib.RunCheckpointer(tmp_path / "ft", config={"stage": "finetune"}, save_every=2,
                                                async_save=False)
  first = ckpt()
  part = _finetune(graphdef, pruned, cfg, data, first, stop_after=3)
  first.close()
  assert part.final_step == 3
  second = ckpt()
  rest = _finetune(graphdef, pruned, cfg, data, second)
  second.close()
  assert rest.final_step == cfg.steps and rest.steps_run == cfg.steps - 3
  chex.assert_trees_all_equal(rest.params, whole.params)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, rest.opt_state), jax.tree.map(np.asarray, whole.opt_state))


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree
