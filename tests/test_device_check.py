"""scripts/device_check.sh --dry-run: the accelerator check's own code, at toy size on the CPU."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _numbers(v)
  elif isinstance(tree, list):
    for v in tree:
      yield from _numbers(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield float(tree)


def test_the_dry_run_writes_every_result_with_finite_numbers(tmp_path):
  out = tmp_path / "dry"
  # Alone on two cores the dry run takes about 95 s of its 175 s budget; beside the other tests (pytest -n 2)
  # it gets a larger one, so that a loaded machine cuts no stage.
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, XLA_FLAGS="", BUDGET_S_DRY="330",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=420)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  stages = (out / "stages.txt").read_text()
  for name in ("quality-elsa", "quality-baselines", "speed-smollm2", "speed-1b"):
    assert f"{name} ok" in stages, stages
  elsa = json.loads((out / "quality-cpu-elsa.json").read_text())
  baselines = json.loads((out / "quality-cpu-baselines.json").read_text())
  assert set(elsa["results"]) == {"elsa@0.7", "elsa@0.9"}
  assert set(baselines["results"]) == {f"{m}@{s}" for m in ("wanda", "sparsegpt") for s in ("0.7", "0.9")}
  for result in (elsa, baselines):
    assert all(math.isfinite(v) and v > 1 for v in result["results"].values()), result
    assert math.isfinite(result["dense"])
  for name in ("speed-smollm2", "speed-1b"):
    speed = json.loads((out / f"{name}.json").read_text())
    assert [r["variant"].split()[0] for r in speed["rows"]] == ["adam", "elsa", "elsa-L"]
    for row in speed["rows"]:
      assert row["tokens_per_s"] > 0 and math.isfinite(row["mfu"]) and math.isfinite(row["step_ms"]), row
    assert all(math.isfinite(r["zu_share"]) for r in speed["rows"][1:])
  assert (out / "speed.md").read_text().count("| variant |") == 2
  total = int(stages.strip().splitlines()[-1].split()[1].rstrip("s"))
  assert total < 330, stages
