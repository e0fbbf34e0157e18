"""Multi-host: CPU processes on localhost joined by jax.distributed, against a single process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import launch_local  # noqa: E402


def _prune_cmd(model_dir, calib, evalt, out, mesh):
  return [sys.executable, "-m", "elsa_jax.cli", "prune", "--model", str(model_dir), "--calib", str(calib),
          "--eval-text", str(evalt), "--output", str(out), "--steps", "6", "--batch-size", "4", "--seqlen", "32",
          "--interval", "2", "--compute-dtype", "float32", "--eval-seqlen", "32", "--checkpoint-every", "2",
          "--no-compare-magnitude", "--no-dense-eval", "--preset", "cpu", "--mesh", mesh]


def _single_process_env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  return env


@pytest.mark.parametrize("processes,devices", [(2, 4)])
def test_multi_process_run_resumes_and_matches_single_process(tiny_run, processes, devices, exported):
  root, model_dir, calib, evalt = tiny_run
  ref = root / "single-8dev"
  if not (ref / "model").exists():
    subprocess.run(_prune_cmd(model_dir, calib, evalt, ref, "4x2"), env=_single_process_env(), check=True,
                   capture_output=True)
  out = root / f"multi-{processes}x{devices}"
  cmd = _prune_cmd(model_dir, calib, evalt, out, "4x2") + ["--distributed"]
  # First attempt dies right after the checkpoint of step 4 started writing, in every process.
  env = dict(os.environ, ELSA_JAX_TEST_CRASH_IN_SAVE="4")
  rc = launch_local.launch(cmd, processes, devices, timeout=300, env=env)
  assert rc != 0
  assert not (out / "model").exists()
  # The same command again resumes from the last committed checkpoint and finishes.
  env = dict(os.environ)
  env.pop("ELSA_JAX_TEST_CRASH_IN_SAVE", None)
  rc = launch_local.launch(cmd, processes, devices, timeout=300, env=env)
  assert rc == 0
  # The defaults (distillation and OWL, whose Wanda scores span both processes' devices) ran in both.
  ref_summary, summary = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
  assert summary["config"]["distill"] == 0.5 and summary["allocation"]["name"] == "owl"
  assert summary["allocation"]["layer_sparsities"] == ref_summary["allocation"]["layer_sparsities"]
  want, got = exported(ref), exported(out)
  assert want.keys() == got.keys()
  for k in want:
    # Same sparsity pattern exactly; values to float32 reduction-order noise (gloo sums across processes
    # in another order than one process's 8 devices do).
    np.testing.assert_array_equal(got[k] == 0, want[k] == 0, err_msg=k)
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
