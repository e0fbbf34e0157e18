"""The pieces of train.run: batch placement, the metrics logger, the checkpoint cadence, a non-finite loss."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from elsa_jax import hosts
from elsa_jax.models import llama
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import train

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4)


def test_a_batch_is_placed_over_the_data_axis():
  if jax.device_count() < 8:
    pytest.skip("needs 8 CPU devices")
  mesh = sharding_lib.make_mesh(4, 2)
  cfg = train.ElsaConfig(batch_size=4, grad_accum=2, seqlen=7)
  rows = np.random.default_rng().integers(0, 64, size=(cfg.batch_size * cfg.grad_accum, cfg.seqlen + 1))
  batch = train.place_batch(rows, cfg, sharding_lib.batch_sharding(mesh))
  assert batch.shape == (2, 4, 8) and batch.dtype == jnp.int32
  assert batch.sharding.spec == P(None, "data")
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 1, 8)}
  np.testing.assert_array_equal(np.asarray(batch), rows.reshape(2, 4, 8))  # micro-batch i: rows i*4 .. i*4+3


def test_metrics_logger_writes_checks_and_keeps_the_history(tmp_path):
  cfg = train.ElsaConfig(steps=10, lr=1e-3)
  path = tmp_path / "sub" / "metrics.jsonl"
  log = train.MetricsLogger(cfg, path, progress=False, start=0)
  loss = float(np.random.default_rng().uniform(1, 5))
  log.defer(4, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(0.5)})
  log.flush()
  log.flush()  # nothing pending: no second line
  log.defer(5, {"loss": jnp.float32(np.nan), "grad_norm": jnp.float32(0.5)})
  with pytest.raises(FloatingPointError, match=r"step 5.*--lr \(now 0.001\)"):
    log.flush()
  log.close()
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert lines == log.history and len(lines) == 1
  assert lines[0]["step"] == 4 and lines[0]["lr"] == pytest.approx(1e-3 * (1 - 3 / 10))
  assert lines[0]["loss"] == pytest.approx(loss) and lines[0]["grad_norm"] == 0.5


def test_checkpoint_cadence(tmp_path):
  ckpt = checkpoint_lib.RunCheckpointer(tmp_path / "c", config={}, save_every=4, async_save=False)
  assert [d for d in range(1, 11) if train.saves_at(ckpt, d, total=10, end=10)] == [4, 8, 10]
  assert [d for d in range(1, 7) if train.saves_at(ckpt, d, total=10, end=6)] == [4, 6]  # stop_after
  assert not any(train.saves_at(None, d, total=10, end=10) for d in range(1, 11))
  ckpt.close()
  tree = {"a": jnp.arange(3)}
  assert hosts.gather_to_hosts(tree) is tree  # one process: nothing to gather


def test_a_non_finite_loss_stops_the_run_before_it_is_saved(tmp_path):
  graphdef, params = llama.split(llama.Llama(CONFIG, rngs=nnx.Rngs(int(np.random.default_rng().integers(99)))))
  params = jax.tree.map(np.array, params)
  params["norm"]["scale"][:] = np.nan
  cfg = train.ElsaConfig(steps=4, batch_size=2, seqlen=16, interval=2, compute_dtype="float32")
  data = np.random.default_rng().integers(0, 64, size=(cfg.steps, 2, cfg.seqlen + 1))
  ckpt = checkpoint_lib.RunCheckpointer(tmp_path / "c", config={}, save_every=1)
  with pytest.raises(FloatingPointError, match="step 1"):
    train.run(graphdef, params, cfg, lambda s: data[s], mesh=sharding_lib.make_mesh(1, 1),
              logical_axes=llama.logical_axes_of(graphdef, params), checkpointer=ckpt,
              metrics_path=tmp_path / "metrics.jsonl", progress=False)
  assert ckpt.latest_step() is None
  assert (tmp_path / "metrics.jsonl").read_text() == ""
  ckpt.close()
