"""Runs that fail cleanly: options refused before any work, diverged runs, damaged inputs, logs on stderr.

Every case goes through the command line's entry point (``elsa_jax.cli.commands.main``, in process, or
``python -m elsa_jax.cli`` where the process matters) on the tiny LLaMA of ``tests/conftest.py``, and checks
the exit status, the message (the flag or file, no traceback) and what was (not) written.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elsa_jax.cli import commands
from elsa_jax.cli import jobs as pipeline
from elsa_jax.cli import output
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run import train


def _flags(tiny_run, out, *extra: str) -> list[str]:
  _, model_dir, calib, evalt = tiny_run
  return ["prune", "--model", str(model_dir), "--calib", str(calib), "--eval-text", str(evalt), "--output", str(out),
          "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--interval", "2", "--compute-dtype", "float32",
          "--eval-seqlen", "32", "--eval-windows", "2", "--checkpoint-every", "2", "--no-compare-magnitude",
          "--no-dense-eval", "--preset", "cpu", "--mesh", "1x1", *extra]


def _strict_json(path: pathlib.Path):
  def refuse(constant):
    raise AssertionError(f"{path} holds {constant}, which is not JSON")
  return json.loads(path.read_text(), parse_constant=refuse)


def _no_work(monkeypatch):
  """Makes loading the model or reading the text fail the test."""
  monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  monkeypatch.setattr(pipeline.data_lib, "load_documents", lambda *a, **k: pytest.fail("read the text"))


LATE_OPTIONS = [
    (["--pattern", "2:5"], "--pattern"),  # 64 and 128 input features: no groups of 5
    (["--pattern", "2:5", "--method", "sparsegpt"], "--pattern"),
    (["--state-dtype", "foo"], "--state-dtype"),
    (["--moment-dtype", "foo"], "--moment-dtype"),
    (["--score-dtype", "foo"], "--score-dtype"),
    (["--projection", "foo"], "--projection"),
    (["--lmda-schedule", "foo"], "--lmda-schedule"),
    (["--compute-dtype", "foo"], "--compute-dtype"),
    (["--eval-windows", "-1"], "--eval-windows"),
    (["--eval-seqlen", "0"], "--eval-seqlen"),
    (["--keep", "0"], "--keep"),
    (["--lmda", "-1"], "--lmda"),
    (["--b1", "1.5"], "--b1"),
    (["--b2", "1"], "--b2"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--sparsity", "0.7", "--pattern", "2:4"], "--sparsity"),
    (["--calib", "no-such-calib.jsonl"], "no-such-calib.jsonl"),
]


def test_each_late_option_is_refused_before_any_work_then_the_fixed_command_runs(tiny_run, tmp_path, monkeypatch,
                                                                                 capsys):
  out = tmp_path / "run"
  with monkeypatch.context() as m:
    _no_work(m)
    for extra, flag in LATE_OPTIONS:
      assert commands.main(_flags(tiny_run, out, *extra)) == 2, extra
      err = capsys.readouterr().err
      assert flag in err and "Traceback" not in err, (extra, err)
      assert err.strip().splitlines()[-1].startswith("elsa-jax: error: "), err
      assert not out.exists(), extra  # nothing written, so the fixed command is not "another configuration"
  assert commands.main(_flags(tiny_run, out, "--pattern", "2:4")) == 0
  assert (out / "model" / "config.json").is_file()
  summary = _strict_json(out / "summary.json")
  assert summary["config"]["pattern"] == "2:4" and summary["environment"]["jax"] == jax.__version__
  run_config = _strict_json(out / "checkpoints" / "run_config.json")
  assert run_config["environment"]["device_count"] == jax.device_count()
  assert "2:4 50% perplexity" in capsys.readouterr().out


def test_an_output_that_is_not_a_run_is_refused_and_kept(tiny_run, tmp_path, monkeypatch, capsys):
  _no_work(monkeypatch)
  out = tmp_path / "notes"
  out.mkdir()
  (out / "summary.json").write_text('{"mine": 1}')
  for extra_file in (None, "report.txt"):
    if extra_file:
      (out / extra_file).write_text("user data")
    assert commands.main(_flags(tiny_run, out)) == 2
    err = capsys.readouterr().err
    assert "not an elsa-jax run" in err and "--output" in err
  assert (out / "summary.json").read_text() == '{"mine": 1}' and sorted(os.listdir(out)) == ["report.txt",
                                                                                               "summary.json"]


@contextlib.contextmanager
def _mounted_tmpfs(path: pathlib.Path, options: str):
  """A tmpfs at ``path`` (root only); skips the test where mounting is not allowed."""
  path.mkdir(parents=True, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_output_is_refused_before_a_one_shot_method_works(tiny_run, tmp_path, monkeypatch, capsys):
  _no_work(monkeypatch)
  if os.geteuid() == 0:
    ctx = _mounted_tmpfs(tmp_path / "ro", "size=1m,ro")
  else:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    ctx = contextlib.nullcontext(tmp_path / "ro")
  with ctx as ro:
    assert commands.main(_flags(tiny_run, ro / "run", "--method", "magnitude")) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "not writable" in err and "Traceback" not in err


def test_a_full_disk_during_export_leaves_no_model(tiny_run, tmp_path, capsys):
  if os.geteuid() != 0:
    pytest.skip("needs root to mount a small tmpfs")
  with _mounted_tmpfs(tmp_path / "small", "size=128k") as small:
    assert commands.main(_flags(tiny_run, small / "run", "--method", "magnitude")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--output" in err and "Traceback" not in err
    assert not (small / "run" / "model").exists() and not (small / "run" / "summary.json").exists()


def _checkpoint_steps(out: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) if (
      out / "checkpoints").exists() else []


def test_a_run_diverging_at_step_one_exits_non_zero_and_saves_nothing(tiny_run, tmp_path, capsys):
  out = tmp_path / "run"
  code = commands.main(_flags(tiny_run, out, "--steps", "1", "--lr", "1e39"))
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  assert "at step 1" in err and "--lr (now 1e+39)" in err and "no checkpoint of this run" in err, err
  assert _checkpoint_steps(out) == [] and not (out / "model").exists() and not (out / "summary.json").exists()


def _poison(tree):
  return jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) and x.size else x, tree)


@pytest.mark.parametrize("target", ["params", "opt_state"])
def test_a_state_going_non_finite_later_keeps_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch, capsys,
                                                                       target):
  """NaN in the params (or only in the optimizer state) after step 4 of 6, checkpoints every 2 steps."""
  real = train.run_step

  def poisoned(programs, step, params, opt_state, batch):
    params, opt_state, metrics = real(programs, step, params, opt_state, batch)
    if step + 1 == 4:
      params, opt_state = (_poison(params), opt_state) if target == "params" else (params, _poison(opt_state))
    return params, opt_state, metrics

  monkeypatch.setattr(train, "run_step", poisoned)
  out = tmp_path / "run"
  assert commands.main(_flags(tiny_run, out, "--steps", "6")) == 2
  err = capsys.readouterr().err
  assert f"['{target}']" in err and "at step 4" in err and "step 2, is kept" in err and "--lr" in err, err
  assert _checkpoint_steps(out) == [2]
  assert not (out / "model").exists() and not (out / "summary.json").exists()
  steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]
  # The kept checkpoint is finite, and exporting it works.
  monkeypatch.setattr(train, "run_step", real)
  exported = pipeline.export_run(out, tmp_path / "from-step-2")
  assert json.loads((exported / "elsa_jax.json").read_text())["checkpoint_step"] == 2


def test_export_refuses_non_finite_weights(tiny_run, tmp_path):
  loaded = pipeline.load_model(str(tiny_run[1]))
  with pytest.raises(FloatingPointError, match="NaN or inf.*nothing was exported"):
    pipeline.check_finite_weights(_poison(loaded.params), "the test's weights")
  pipeline.check_finite_weights(loaded.params, "the test's weights")  # finite: no error


def _run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **(env or {}))
  return subprocess.run([sys.executable, "-m", "elsa_jax.cli", *args], env=env, capture_output=True, text=True)


def test_a_resumed_run_logs_on_stderr_and_writes_each_step_once(tiny_run, tmp_path):
  out = tmp_path / "run"
  flags = _flags(tiny_run, out, "--steps", "4")
  crashed = _run_cli(flags, {"ELSA_JAX_TEST_CRASH_IN_SAVE": "4"})  # dies while saving step 4, after step 2
  assert crashed.returncode == 17, crashed.stderr
  steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]
  resumed = _run_cli(flags)
  assert resumed.returncode == 0, resumed.stderr
  assert "INFO elsa_jax.run.train: resuming from step 2" in resumed.stderr
  steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


def test_the_resume_refusal_names_prunes_flag(tiny_run, tmp_path, capsys):
  out = tmp_path / "run"
  first = commands.run_config(commands.build_parser().parse_args(_flags(tiny_run, out, "--steps", "4")))
  assert pipeline.prune(first, stop_after=2, progress=False)["stopped_at"] == 2
  assert commands.main(_flags(tiny_run, out, "--steps", "4", "--lmda", "0.03")) == 2
  err = capsys.readouterr().err
  assert "another configuration" in err and "--output" in err and "--run-dir" not in err


def _eval(model, text, *extra) -> list[str]:
  return ["eval", "--model", str(model), "--eval-text", str(text), "--seqlen", "16", "--windows", "1", *extra]


def test_damaged_text_files_are_named_with_their_line(tiny_run, tmp_path, capsys):
  _, model_dir, _, evalt = tiny_run
  lines = evalt.read_text().splitlines()
  cases = {
      "latin1.txt": ("\n".join(json.loads(l)["text"] for l in lines[:2]).encode() + "\ncaf\xe9\n".encode("latin1"),
                     "latin1.txt:3: not UTF-8"),
      "broken.jsonl": ("\n".join([lines[0], lines[1][:-5], lines[2]]).encode(), "broken.jsonl:2:"),
      "fields.jsonl": ("\n".join(lines[:3]).encode(), "--text-field"),
  }
  for name, (data, want) in cases.items():
    (tmp_path / name).write_bytes(data)
    extra = ["--text-field", "body"] if name == "fields.jsonl" else []
    assert commands.main(_eval(model_dir, tmp_path / name, *extra)) == 2, name
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err, (name, err)


def test_truncated_model_files_are_named(tiny_run, tmp_path, capsys):
  import gguf

  _, model_dir, _, evalt = tiny_run
  broken = tmp_path / "model"
  shutil.copytree(model_dir, broken)
  weights = broken / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  assert commands.main(_eval(broken, evalt)) == 2
  err = capsys.readouterr().err
  assert "model.safetensors is not a complete safetensors file" in err and "Traceback" not in err
  path = tmp_path / "tiny.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.random.default_rng().normal(size=(64, 32)).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
  assert commands.main(_eval(path, evalt)) == 2
  err = capsys.readouterr().err
  assert "tiny.gguf is not a complete GGUF file" in err and "re-download" in err and "Traceback" not in err


def test_eval_refuses_bad_options_before_loading(tiny_run, monkeypatch, capsys):
  _no_work(monkeypatch)
  _, model_dir, _, evalt = tiny_run
  for extra, flag in [(["--seqlen", "0"], "--seqlen"), (["--windows", "-2"], "--windows"),
                      (["--compute-dtype", "foo"], "--compute-dtype")]:
    assert commands.main(_eval(model_dir, evalt, *extra)) == 2
    assert flag in capsys.readouterr().err


def test_checkpoint_environment_is_recorded_not_required(tmp_path, capsys):
  output.configure_logging()  # as the command line does: elsa_jax's records on stderr
  config = {"lr": 1e-3, checkpoint_lib.ENVIRONMENT_KEY: {"jax": "0.0.1"}}
  first = checkpoint_lib.RunCheckpointer(tmp_path, config=config, save_every=1, async_save=False)
  first.save(1, {"w": jnp.ones(3)}, {"m": jnp.zeros(3)})  # run_config.json is written with the first commit
  first.close()
  assert "another environment" not in capsys.readouterr().err
  moved = {**config, checkpoint_lib.ENVIRONMENT_KEY: {"jax": jax.__version__}}
  checkpoint_lib.RunCheckpointer(tmp_path, config=moved, save_every=0).close()
  assert "WARNING elsa_jax.run.checkpoint: resuming a run started in another environment" in capsys.readouterr().err
  with pytest.raises(checkpoint_lib.ConfigMismatchError, match="lr"):
    checkpoint_lib.RunCheckpointer(tmp_path, config={**moved, "lr": 2e-3}, save_every=0)
