"""Fault injection on the tiny LLaMA: kills, damaged checkpoints, a full disk, two runs on one folder.

Every case ends with nothing lost: the run resumes (or exports) to the same bits as an uninterrupted run,
and what went wrong is named. Select them with ``-m faults``; they take about two to three minutes on two
cores, most of it in starting the killed CLI processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from elsa_jax.cli import commands
from elsa_jax.cli import jobs as pipeline
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run import checksums
from elsa_jax.run import lock as lock_lib

pytestmark = pytest.mark.faults

_STEPS = 12


def _argv(tiny_run, out) -> list[str]:
  _, model_dir, calib, evalt = tiny_run
  return ["prune", "--model", str(model_dir), "--calib", str(calib), "--eval-text", str(evalt), "--output", str(out),
          "--steps", str(_STEPS), "--batch-size", "2", "--seqlen", "32", "--interval", "2", "--compute-dtype",
          "float32", "--eval-seqlen", "32", "--checkpoint-every", "2", "--no-compare-magnitude", "--no-dense-eval",
          "--preset", "cpu", "--mesh", "1x1", "--overwrite"]


def _run_config(tiny_run, out):
  return commands.run_config(commands.build_parser().parse_args(_argv(tiny_run, out)))


def _start(tiny_run, out, log) -> subprocess.Popen:
  # One persistent compilation cache for the killed runs halves their CPU time (same executables).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(tiny_run[0] / "xla-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-m", "elsa_jax.cli", *_argv(tiny_run, out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=log)


def _assert_same_model(got, ref):
  assert ref.keys() == got.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def _assert_nothing_lost(out):
  """Every committed step is intact, and the model is either absent or whole."""
  ckpt = out / "checkpoints"
  for step_dir in (p for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else ():
    assert checksums.find_damage(step_dir) is None, step_dir
  if (out / "model").exists():
    assert _tensors(out / "model")


def _flip_a_bit(step_dir, rng):
  victim = max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
  victim.write_bytes(bytes(data))
  return victim


def _tensors(model_dir):
  from safetensors.numpy import load_file

  return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def reference(tiny_run):
  """The uninterrupted run's exported tensors (in this process) and its folder."""
  out = tiny_run[0] / "faults-reference"
  pipeline.prune(_run_config(tiny_run, out), progress=False)
  return _tensors(out / "model"), out


def _phase(out) -> str:
  """What the run was doing at the kill, from what it left."""
  names = [p.name for p in out.iterdir()] if out.exists() else []
  ckpt = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
  if any(n.startswith(".model.") for n in names):
    return "export"
  if any(checkpoint_lib._ORBAX_TMP in n for n in ckpt):
    return "checkpointing"
  return "training" if "metrics.jsonl" in names else "start-up"


def _kill_when(proc, trigger, timeout=300.0) -> bool:
  """SIGKILLs ``proc`` as soon as ``trigger()``; False when it finished first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      return False
    if trigger():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.002)
  proc.kill()
  raise TimeoutError("the run neither finished nor reached its trigger")


def _after_seconds(seconds):
  t0 = time.time()
  return lambda: time.time() - t0 > seconds


def _lines(path):
  return len(path.read_text().splitlines()) if path.exists() else 0


def _after_more_steps(metrics, n):
  base = _lines(metrics)
  return lambda: _lines(metrics) >= base + n


def test_sigkill_at_random_instants_resumes_bit_identical(tiny_run, reference, tmp_path):
  ref, _ = reference
  seed = int(np.random.default_rng().integers(1 << 31))
  rng = np.random.default_rng(seed)
  out = tiny_run[0] / f"faults-kill-{seed}"
  ckpt = out / "checkpoints"

  def orbax_writing():
    return ckpt.exists() and any(checkpoint_lib._ORBAX_TMP in p.name for p in ckpt.iterdir())

  def exporting():
    return out.exists() and any(p.name.startswith(".model.") for p in out.iterdir())

  delay = float(rng.uniform(3, 30))  # start-up takes 10-25 s here: anywhere from start-up to training
  more = int(rng.integers(1, _STEPS // 3))
  def random_instant():  # at the delay, or half-way through training on a machine where that comes first
    late, halfway = _after_seconds(delay), _after_more_steps(out / "metrics.jsonl", _STEPS // 2)
    return lambda: late() or halfway()

  triggers = {  # each made when its attempt starts
      "random": random_instant,
      "training": lambda: _after_more_steps(out / "metrics.jsonl", more),
      "checkpointing": lambda: orbax_writing,
      "export": lambda: exporting,
  }
  hit = []
  for aim, make_trigger in triggers.items():
    with open(tmp_path / f"{aim}.log", "wb") as log:
      killed = _kill_when(_start(tiny_run, out, log), make_trigger())
    hit.append((aim, _phase(out) if killed else "finished"))
    _assert_nothing_lost(out)
  print(f"seed {seed}, random delay {delay:.1f} s: aimed -> hit {hit}")
  # Asynchronous checkpoints overlap training, so a kill in training may also cut a checkpoint write.
  assert {"checkpointing", "export"} <= {h for _, h in hit} and hit[-1][1] == "export", (seed, hit)
  pipeline.prune(_run_config(tiny_run, out), progress=False)  # the same command once more finishes the run
  _assert_same_model(_tensors(out / "model"), ref)
  assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no debris, no lock


def test_a_bit_flip_and_a_deleted_file_fall_back_to_the_previous_step(tiny_run, reference, caplog):
  ref, _ = reference
  rng = np.random.default_rng()
  out = tiny_run[0] / "faults-damage"
  run = _run_config(tiny_run, out)
  newest = out / "checkpoints" / "4"
  pipeline.prune(run, stop_after=4, progress=False)  # steps 2 and 4 kept
  victim = _flip_a_bit(newest, rng)
  with caplog.at_level(logging.WARNING):
    pipeline.prune(run, stop_after=2, progress=False)  # falls back to 2, writes 4 again
  assert f"checkpoint step 4 ({newest}) is damaged: " in caplog.text
  assert f"{victim.relative_to(newest)} does not match its checksum" in caplog.text
  caplog.clear()
  gone = max(newest.rglob("*.ocdbt"), key=lambda p: len(str(p)))
  gone.unlink()
  with caplog.at_level(logging.WARNING):
    pipeline.prune(run, progress=False)  # falls back to 2 again, and finishes
  assert f"checkpoint step 4 ({newest}) is damaged: {gone.relative_to(newest)} is missing" in caplog.text
  _assert_same_model(_tensors(out / "model"), ref)


def test_a_second_run_on_the_folder_is_refused_at_once_and_the_first_is_unharmed(tiny_run, reference, tmp_path,
                                                                                   capsys):
  ref, _ = reference
  out = tiny_run[0] / "faults-concurrent"
  with open(tmp_path / "first.log", "wb") as log:
    first = _start(tiny_run, out, log)
    while not (out / lock_lib.LOCK_FILE).exists() or not (out / lock_lib.LOCK_FILE).read_text():
      assert first.poll() is None, (tmp_path / "first.log").read_text()
      time.sleep(0.01)
    t = time.perf_counter()
    assert commands.main(_argv(tiny_run, out)) == 2
    refused_in = time.perf_counter() - t
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
  err = capsys.readouterr().err
  assert f"{out} is in use by another elsa-jax run (pid {first.pid}" in err
  assert refused_in < 5, refused_in
  _assert_same_model(_tensors(out / "model"), ref)


def _mount_tmpfs(where, size_bytes):
  if os.geteuid() != 0:
    pytest.skip("a full disk needs a small tmpfs, and mounting one needs root")
  where.mkdir(parents=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _fill(disk, leave_bytes):
  """Fills ``disk`` but for ``leave_bytes``; returns the filler file."""
  st = os.statvfs(disk)
  filler = disk / "filler"
  filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))
  return filler


def _tree_bytes(path):
  return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def test_a_full_disk_during_checkpoint_and_export_loses_nothing(tiny_run, reference, tmp_path):
  ref, ref_out = reference
  step_bytes = _tree_bytes(ref_out / "checkpoints" / str(_STEPS))
  model_bytes = _tree_bytes(ref_out / "model")
  disk = tmp_path / "disk"
  _mount_tmpfs(disk, 8 * (step_bytes + model_bytes) + (4 << 20))
  try:
    out = disk / "run"
    run = _run_config(tiny_run, out)
    # Room for one checkpoint and a half: the second fails.
    filler = _fill(disk, int(1.5 * step_bytes))
    with pytest.raises(checkpoint_lib.CheckpointWriteError,
                       match=r"writing checkpoint step 4 .*failed.*step 2 is kept\. Free disk space"):
      pipeline.prune(run, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "run_config.json"]
    assert not (out / lock_lib.LOCK_FILE).exists()
    filler.unlink()
    pipeline.prune(run, progress=False)  # resumes from step 2
    _assert_same_model(_tensors(out / "model"), ref)
    # Export over the existing model with room for half a model: the old one stays, no debris.
    filler = _fill(disk, model_bytes // 2)
    with pytest.raises(Exception, match="No space left"):
      pipeline.export_run(out, overwrite=True)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    _assert_same_model(_tensors(out / "model"), ref)
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)
