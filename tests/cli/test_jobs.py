"""End to end: prune a tiny random LLaMA, export, reload with transformers; resume; meshes."""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import elsa_jax
from elsa_jax.models import llama
from elsa_jax.cli import config as config_lib
from elsa_jax.cli import jobs as pipeline
from elsa_jax.run import memory as memory_lib
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import train

def _cfg(**kw):
  base = dict(sparsity=0.5, steps=6, batch_size=2, seqlen=32, interval=2, lr=1e-3, compute_dtype="float32")
  base.update(kw)
  return train.ElsaConfig(**base)


def _run(tiny_run, out, cfg=None, **sections) -> config_lib.RunConfig:
  """The tiny model and text on one device, ``cfg`` (default ``_cfg()``), eval windows of 32 tokens,
  writing to ``out``; ``sections`` replace fields as :func:`elsa_jax.cli.config.override` does."""
  _, model_dir, calib, evalt = tiny_run
  base = config_lib.RunConfig(
      model=config_lib.ModelSpec(path=str(model_dir), mesh=(1, 1)),
      data=config_lib.DataSpec(calib=str(calib), eval_text=str(evalt)),
      method=config_lib.MethodSpec(elsa=cfg or _cfg()),
      evaluation=config_lib.EvalSpec(seqlen=32),
      output=config_lib.OutputSpec(dir=out),
  )
  return config_lib.override(base, **sections)


def _prunable(name: str) -> bool:
  return name.startswith("model.layers.") and name.endswith("proj.weight")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_export_reload_with_transformers(tiny_run, pattern):
  import torch
  from transformers import LlamaForCausalLM

  root = tiny_run[0]
  out = root / f"run-{pattern.replace(':', '')}"
  summary = pipeline.prune(_run(tiny_run, out, _cfg(pattern=pattern), evaluation={"compare_magnitude": False}),
                           progress=False)
  assert np.isfinite(summary["elsa_ppl"]) and np.isfinite(summary["dense_ppl"])
  hf = LlamaForCausalLM.from_pretrained(out / "model", torch_dtype=torch.float32)
  n_pruned = 0
  for name, w in hf.state_dict().items():
    w = w.numpy()
    if not _prunable(name):
      assert np.count_nonzero(w) == w.size, name  # embeddings, norms, lm_head stay dense
      continue
    n_pruned += 1
    if pattern == "unstructured":
      assert np.count_nonzero(w == 0) == w.size // 2, name
    else:  # HF weights are [out, in]: groups of 4 consecutive input features
      groups = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
      np.testing.assert_array_equal(groups, 2, err_msg=name)
  assert n_pruned == 2 * 7
  jax_model, _ = llama.from_pretrained(str(out / "model"))
  ids = np.random.default_rng().integers(0, hf.config.vocab_size, size=(2, 24))
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(jax_model(jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_existing_output_is_never_overwritten(tiny_run):
  root = tiny_run[0]
  out = root / "taken"
  (out / "model").mkdir(parents=True)
  (out / "model" / "keep.txt").write_text("user data")
  with pytest.raises(FileExistsError, match="--overwrite"):
    pipeline.prune(_run(tiny_run, out), progress=False)
  assert (out / "model" / "keep.txt").read_text() == "user data"


def test_bad_inputs_fail_before_work(tiny_run, tmp_path):
  with pytest.raises(ValueError, match="sparsity"):
    _cfg(sparsity=1.0)
  out = tmp_path / "o"
  with pytest.raises((FileNotFoundError, OSError), match="no-such"):
    pipeline.prune(_run(tiny_run, out, model={"path": str(tmp_path / "no-such-model")}), progress=False)
  with pytest.raises(ValueError, match="devices"):
    pipeline.prune(_run(tiny_run, out, model={"mesh": (3, 1)}), progress=False)
  with pytest.raises(ValueError, match="--method"):  # refused when the RunConfig is built
    _run(tiny_run, out, method={"name": "no-such-method"})
  short = tmp_path / "short.txt"
  short.write_text("too short")
  with pytest.raises(ValueError, match="token"):
    pipeline.prune(_run(tiny_run, out, data={"calib": str(short)}), progress=False)
  assert not (tmp_path / "o" / "model").exists()


def test_run_that_will_not_fit_is_refused_before_loading(tiny_run, tmp_path, monkeypatch):
  model_dir = tiny_run[1]
  mesh = sharding_lib.make_mesh(1, 1)
  fits = pipeline.check_memory(str(model_dir), _cfg(), mesh, capacity_bytes=1 << 40)
  need = fits.total_bytes
  assert need > 24 * fits.n_params  # fp32 w, z, u, score, Adam m, v, and more
  # A device with half of that: prune stops before reading any weight or writing anything.
  monkeypatch.setattr(memory_lib, "device_memory_bytes", lambda device=None: need // 2)
  monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  with pytest.raises(MemoryError, match=r"needs .* GiB.*--remat.*float8"):
    pipeline.prune(_run(tiny_run, tmp_path / "o"), progress=False)
  assert not (tmp_path / "o").exists()


def test_checkpoint_from_another_config_is_refused(tiny_run):
  root = tiny_run[0]
  out = root / "cfg-mismatch"
  run = _run(tiny_run, out, evaluation={"compare_magnitude": False, "dense": False},
             output={"checkpoint_every": 2})
  summary = pipeline.prune(run, stop_after=2, progress=False)
  assert summary["stopped_at"] == 2 and not (out / "model").exists()
  with pytest.raises(ValueError, match="another configuration"):
    pipeline.prune(config_lib.override(run, elsa={"lmda": 0.05}), progress=False)


def test_same_trajectory_on_one_and_eight_devices(tiny_run):
  if jax.device_count() < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  root, model_dir, calib, evalt = tiny_run
  loaded = pipeline.load_model(str(model_dir))
  cfg = _cfg(steps=4, batch_size=4)
  rng = np.random.default_rng()
  data = rng.integers(0, loaded.config.vocab_size, size=(cfg.steps, cfg.batch_size, cfg.seqlen + 1))
  axes = llama.logical_axes_of(loaded.graphdef, loaded.params)
  runs = {}
  for shape in [(1, 1), (4, 2)]:
    devices = jax.devices()[: shape[0] * shape[1]]
    mesh = sharding_lib.make_mesh(*shape, devices=devices)
    result = train.run(loaded.graphdef, jax.tree.map(np.array, loaded.params), cfg, lambda s: data[s],
                       mesh=mesh, logical_axes=axes, progress=False)
    runs[shape] = result
  one, eight = runs[(1, 1)], runs[(4, 2)]
  losses = lambda r: np.array([h["loss"] for h in r.history])
  np.testing.assert_allclose(losses(eight), losses(one), rtol=1e-5)
  # Adam divides by sqrt(v): a weight whose gradient is ~0 turns float32 reduction-order noise into
  # updates of up to ~1e-5 per step, so the bound is 1e-4 after 4 steps of lr 1e-3 (a lost or doubled
  # gradient shard moves weights by ~lr = 1e-3).
  chex.assert_trees_all_close(jax.device_get(eight.params), jax.device_get(one.params), atol=1e-4)


def _hf_kernels(path):
  from safetensors.numpy import load_file

  tensors = {}
  for f in sorted(pathlib.Path(path).glob("*.safetensors")):
    tensors.update(load_file(f))
  return {k: v for k, v in tensors.items() if _prunable(k)}


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_oneshot_methods_from_the_cli_entry_point(tiny_run, method, pattern):
  root = tiny_run[0]
  out = root / f"oneshot-{method}"
  summary = pipeline.prune(
      _run(tiny_run, out, _cfg(pattern=pattern), method={"name": method}, data={"calib_windows": 16}),
      progress=False,
  )
  assert np.isfinite(summary[f"{method}_ppl"]) and summary["oneshot_calibration"]["windows"] == 16
  assert not (out / "checkpoints").exists()  # nothing to resume in a one-shot run
  kernels = _hf_kernels(out / "model")
  assert len(kernels) == 14
  for name, w in kernels.items():  # HF [out, in]
    if pattern == "2:4":
      np.testing.assert_array_equal((w.reshape(w.shape[0], -1, 4) == 0).sum(-1), 2, err_msg=name)
    else:  # Wanda: half of every output row
      np.testing.assert_array_equal((w == 0).sum(1), w.shape[1] // 2, err_msg=name)


def test_safe_plus_from_wanda_trains_and_export_run_reproduces_it(tiny_run):
  root = tiny_run[0]
  out = root / "safe-plus"
  summary = pipeline.prune(
      _run(tiny_run, out, _cfg(sparsity=0.6), method={"name": "safe+", "init": "wanda"},
           data={"calib_windows": 8}, evaluation={"compare_magnitude": False, "dense": False}),
      progress=False,
  )
  assert list(summary) == ["model", "method", "config", "eval_seqlen", "init_method", "oneshot_calibration",
                           "environment", "wanda_seconds", "wanda_ppl", "train_tokens_per_second", "final_metrics", "safe+_ppl",
                           "sparsity", "sparsity_per_matrix", "wall_seconds"]
  assert summary["oneshot_calibration"] == {"windows": 8, "seqlen": 32, "damp": 0.01}
  assert summary["config"]["sam_rho"] == pipeline.SAFE_RHO
  assert summary["config"]["score_source"] == "activations"
  assert np.isfinite(summary["wanda_ppl"]) and np.isfinite(summary["safe+_ppl"])
  first = _hf_kernels(out / "model")
  for name, w in first.items():
    assert np.count_nonzero(w == 0) == round(0.6 * w.size), name
  again = pipeline.export_run(out, root / "safe-plus-again")  # recomputes the activation scores
  second = _hf_kernels(again)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_sam_changes_the_step():
  """SAFE's x-update differs from ELSA's: same data, same start, other weights; the loss is f(w)."""
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4)
  graphdef, params = llama.split(llama.Llama(config, rngs=nnx.Rngs(int(np.random.default_rng().integers(99)))))
  batch = jnp.asarray(np.random.default_rng().integers(0, 64, size=(1, 2, 17)), jnp.int32)
  first_loss, params_after = {}, {}
  for rho in (0.0, 0.5):
    tx = train.make_optimizer(_cfg(sam_rho=rho))
    step = jax.jit(train.make_train_step(graphdef, tx, compute_dtype=jnp.float32, sam_rho=rho))
    p, s, metrics = step(params, tx.init(params), batch)
    first_loss[rho] = float(metrics["loss"])
    params_after[rho] = step(p, s, batch)[0]  # two steps: Adam's first one is sign-like
  np.testing.assert_allclose(first_loss[0.0], first_loss[0.5], rtol=1e-6)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params_after[0.0], params_after[0.5])
  assert max(jax.tree.leaves(diff)) > 1e-5


def test_separate_z_update_program_keeps_the_trajectory(tiny_run):
  """train.run's z/u update as its own program (the default) = fused into the step."""
  root, model_dir, calib, evalt = tiny_run
  loaded = pipeline.load_model(str(model_dir))
  cfg = _cfg(steps=5, batch_size=2, interval=2, state_dtype="float8_e4m3fn", moment_dtype="int8")
  data = np.random.default_rng().integers(0, loaded.config.vocab_size, size=(cfg.steps, 2, cfg.seqlen + 1))
  axes = llama.logical_axes_of(loaded.graphdef, loaded.params)
  runs = {}
  for separate in (True, False):
    runs[separate] = train.run(loaded.graphdef, jax.tree.map(np.array, loaded.params), cfg, lambda s: data[s],
                               mesh=sharding_lib.make_mesh(1, 1), logical_axes=axes, progress=False,
                               separate_z_update=separate)
  sep, fused = runs[True], runs[False]
  for key in ("loss", "rel_gap", "mask_flip_fraction", "z_sparsity"):
    np.testing.assert_allclose([h[key] for h in sep.history], [h[key] for h in fused.history], rtol=1e-5,
                               err_msg=key)
  assert 0.4 < sep.history[-1]["z_sparsity"] < 0.6 and sep.history[-1]["rel_gap"] > 0
  chex.assert_trees_all_close(jax.device_get(sep.params), jax.device_get(fused.params), atol=1e-6)
  a, b = (elsa_jax.find_admm_state(r.opt_state) for r in (sep, fused))
  chex.assert_trees_all_close((a.z, a.u), (b.z, b.u), atol=1e-6)


def test_export_bitmask_then_densify_from_the_command_line(tiny_run, tmp_path, capsys):
  import torch
  from transformers import AutoTokenizer, LlamaForCausalLM

  from elsa_jax.cli import commands
  from elsa_jax.oneshot.magnitude import magnitude_prune_tree

  parser = commands.build_parser()
  assert parser.parse_args(["export", "--run-dir", "r"]).format == "dense"
  assert parser.parse_args(["export", "--run-dir", "r", "--format", "bitmask"]).format == "bitmask"
  with pytest.raises(SystemExit) as exit_code:
    parser.parse_args(["export", "--run-dir", "r", "--format", "csr"])
  assert exit_code.value.code == 2
  with pytest.raises(ValueError, match="sparse_format 'csr'"):
    pipeline.export_run(tmp_path / "no-run", sparse_format="csr")

  loaded = pipeline.load_model(str(tiny_run[1]))
  pruned = magnitude_prune_tree(loaded.params, sparsity=0.7, prunable=loaded.architecture.prunable)
  dense = pipeline.export(loaded, pruned, tmp_path / "dense")
  compact = pipeline.export(loaded, pruned, tmp_path / "compact", sparse_format="bitmask")
  assert (compact / "elsa_jax.json").exists() and AutoTokenizer.from_pretrained(compact)
  again = pipeline.load_model(str(compact))  # the jobs read a compact directory like a dense one
  chex.assert_trees_all_equal(again.params, jax.device_get(pruned))

  assert commands.main(["densify", str(compact), str(tmp_path / "densified")]) == 0
  assert commands.main(["densify", str(dense), str(tmp_path / "twice")]) == 2
  assert "already dense" in capsys.readouterr().err and not (tmp_path / "twice").exists()
  ids = torch.from_numpy(np.random.default_rng().integers(0, loaded.config.vocab_size, size=(2, 16)))
  with torch.no_grad():
    ref = LlamaForCausalLM.from_pretrained(dense).eval()(ids).logits.numpy()
    got = LlamaForCausalLM.from_pretrained(tmp_path / "densified").eval()(ids).logits.numpy()
  np.testing.assert_array_equal(got, ref)


def test_owl_allocation_for_a_oneshot_method_and_for_elsa(tiny_run, exported):
  root = tiny_run[0]
  owl = dict(sparsity=0.6, allocation="owl", owl_m=2.0, owl_lambda=0.1)
  with pytest.raises(ValueError, match="--allocation owl spreads an unstructured or per-row budget"):
    _cfg(pattern="2:4", allocation="owl")
  with pytest.raises(ValueError, match="--allocation global thresholds ELSA's projection score"):
    _run(tiny_run, root / "x", _cfg(allocation="global"), method={"name": "wanda"})
  one = pipeline.prune(_run(tiny_run, root / "owl-sgpt", _cfg(**owl), method={"name": "sparsegpt"},
                            data={"calib_windows": 8}, evaluation={"compare_magnitude": False}), progress=False)
  layers = one["allocation"]["layer_sparsities"]
  assert len(layers) == 2 and abs(layers[0] - layers[1]) == pytest.approx(0.2)
  per_matrix = one["sparsity_per_matrix"]
  assert len(per_matrix) == 14
  for name, s in per_matrix.items():
    assert abs(s - layers[int(name.split("/")[1])]) < 0.01, name
  total = sum(v.size for k, v in exported(root / "owl-sgpt").items() if _prunable(k))
  assert one["sparsity"] == round(0.6 * total) / total  # the overall count is exact
  info = json.loads((root / "owl-sgpt" / "model" / "elsa_jax.json").read_text())
  assert info["sparsity_report"]["per_matrix"] == per_matrix
  # ELSA with the same allocation; export --run-dir recomputes it from the calibration text.
  out = root / "owl-elsa"
  elsa = pipeline.prune(_run(tiny_run, out, _cfg(**owl), data={"calib_windows": 8},
                             evaluation={"compare_magnitude": False, "dense": False}), progress=False)
  assert elsa["allocation"]["layer_sparsities"] == layers
  assert {k: round(v, 4) for k, v in elsa["sparsity_per_matrix"].items()} == \
      {k: round(v, 4) for k, v in per_matrix.items()}
  pipeline.export_run(out, out / "again" / "model")
  chex.assert_trees_all_equal(exported(out / "again"), exported(out))


def test_global_allocation_spreads_one_threshold_over_the_matrices(tiny_run, exported):
  root = tiny_run[0]
  with pytest.raises(ValueError, match="--allocation global moves counts between matrices"):
    _cfg(pattern="2:4", allocation="global")
  with pytest.raises(ValueError, match="add --allocation global"):
    _cfg(global_min=0.3)
  with pytest.raises(ValueError, match="--global-min 0.7 and --global-max 0.8"):
    _cfg(allocation="global", global_min=0.7, global_max=0.8)
  out = root / "global"
  cfg = _cfg(sparsity=0.6, allocation="global", global_max=0.75)
  summary = pipeline.prune(_run(tiny_run, out, cfg, evaluation={"compare_magnitude": False, "dense": False}),
                           progress=False)
  assert summary["allocation"] == {"name": "global", "min": 0.5, "max": 0.75}
  per_matrix = summary["sparsity_per_matrix"]
  assert len(per_matrix) == 14 and max(per_matrix.values()) - min(per_matrix.values()) > 0.05
  assert all(0.5 - 1e-3 <= s <= 0.75 + 1e-3 for s in per_matrix.values()), per_matrix
  tensors = exported(out)
  sizes = [v.size for k, v in tensors.items() if _prunable(k)]
  assert summary["sparsity"] == sum(round(0.6 * n) for n in sizes) / sum(sizes)  # uniform's count, exactly
  assert json.loads((out / "checkpoints" / "run_config.json").read_text())["global_max"] == 0.75
  pipeline.export_run(out, out / "again" / "model")
  chex.assert_trees_all_equal(exported(out / "again"), tensors)


def test_masked_recovery_after_sparsegpt_keeps_its_mask_and_resumes_and_exports(tiny_run, exported):
  root = tiny_run[0]
  common = dict(data={"calib_windows": 8}, evaluation={"compare_magnitude": False},
                output={"checkpoint_every": 2})
  plain = pipeline.prune(_run(tiny_run, root / "sgpt", _cfg(), method={"name": "sparsegpt"}, **common),
                         progress=False)
  run = _run(tiny_run, root / "sgpt-ft", _cfg(), method={"name": "sparsegpt", "finetune_steps": 6,
                                                        "finetune_lr": 3e-3}, **common)
  stopped = pipeline.prune(run, stop_after=2, progress=False)
  assert stopped["finetune_stopped_at"] == 2 and not (root / "sgpt-ft" / "model").exists()
  tuned = pipeline.prune(run, progress=False)  # resumes the recovery at step 2
  whole = pipeline.prune(config_lib.override(run, output={"dir": root / "sgpt-ft2"}), progress=False)
  assert whole["sparsegpt_ppl"] == tuned["sparsegpt_ppl"]
  assert tuned["sparsegpt_before_finetune_ppl"] == pytest.approx(plain["sparsegpt_ppl"], rel=1e-6)
  assert tuned["sparsegpt_ppl"] < plain["sparsegpt_ppl"]
  before, after = exported(root / "sgpt"), exported(root / "sgpt-ft")
  chex.assert_trees_all_equal(after, exported(root / "sgpt-ft2"))  # resumed = uninterrupted, bit for bit
  for name, w in before.items():
    if _prunable(name):
      np.testing.assert_array_equal(after[name] == 0, w == 0, err_msg=name)  # the mask, exactly
      assert not np.array_equal(after[name], w), name  # the survivors trained
  pipeline.export_run(root / "sgpt-ft", root / "sgpt-ft" / "again" / "model")
  chex.assert_trees_all_equal(exported(root / "sgpt-ft" / "again"), after)
