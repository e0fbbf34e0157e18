"""--distill, --distill-temp and --squarehead from the command line: the run config, and a run end to end."""

from __future__ import annotations

import json

import numpy as np

from elsa_jax.cli import commands
from elsa_jax.run import train


def _run_config(*flags: str):
  return commands.run_config(commands.build_parser().parse_args(["prune", *flags]))


def test_the_flags_set_the_method_and_the_recovery_and_are_recorded_only_when_set():
  run = _run_config("--preset", "cpu", "--method", "safe", "--distill", "0.25", "--distill-temp", "2",
                    "--squarehead", "--finetune-steps", "3")
  cfg = run.method.hyperparameters
  assert (cfg.distill, cfg.distill_temp, cfg.squarehead, cfg.sam_rho) == (0.25, 2.0, True, 0.05)
  ft = run.finetune_config
  assert (ft.distill, ft.distill_temp, ft.squarehead, ft.sam_rho) == (0.25, 2.0, True, 0.0)
  recorded = run.checkpoint_config()
  assert (recorded["distill"], recorded["distill_temp"], recorded["squarehead"]) == (0.25, 2.0, True)
  assert run.finetune_checkpoint_config()["distill"] == 0.25
  only_a = _run_config("--preset", "cpu", "--distill", "0.5").checkpoint_config()
  assert only_a["distill"] == 0.5 and "distill_temp" not in only_a and "squarehead" not in only_a
  plain = _run_config("--preset", "paper").checkpoint_config()  # no levers: distill's default, 0
  assert not {"distill", "distill_temp", "squarehead"} & set(plain)  # older runs' checkpoints still resume
  assert _run_config("--preset", "cpu").checkpoint_config()["distill"] == 0.5  # the cpu preset's lever
  # A one-shot method distils in its masked recovery.
  assert _run_config("--method", "wanda", "--distill", "0.5", "--finetune-steps", "2").finetune_config.distill == 0.5


def test_elsa_and_its_masked_recovery_distil_from_the_dense_model(tiny_run, tmp_path, exported):
  _, model_dir, calib, evalt = tiny_run
  out = tmp_path / "run"
  flags = ["--model", str(model_dir), "--calib", str(calib), "--eval-text", str(evalt), "--preset", "cpu",
           "--mesh", "1x1", "--steps", "2", "--interval", "2", "--batch-size", "2", "--seqlen", "32",
           "--eval-seqlen", "32", "--finetune-steps", "2", "--finetune-lr", "3e-3", "--no-compare-magnitude",
           "--no-dense-eval", "--distill", "0.5", "--squarehead", "--allocation", "uniform",
           "--output", str(out)]
  assert commands.main(["prune", *flags]) == 0
  for name in ("metrics.jsonl", "finetune_metrics.jsonl"):
    lines = [json.loads(line) for line in (out / name).read_text().splitlines()]
    # (ELSA's first step starts at the teacher: a KL of 0 up to float32 rounding, which may be below 0.)
    assert len(lines) == 2 and all(line["kl_loss"] > -1e-6 and line["squarehead_loss"] >= 0 for line in lines), name
    for line in lines:
      np.testing.assert_allclose(line["loss"], 0.5 * line["ce_loss"] + 0.5 * (line["kl_loss"]
                                                                              + line["squarehead_loss"]), rtol=1e-5)
  assert lines[-1]["kl_loss"] > 0  # the recovery starts from the pruned model: it differs from the teacher
  recorded = json.loads((out / "checkpoints" / "run_config.json").read_text())
  assert recorded["distill"] == 0.5 and recorded["squarehead"] is True and "distill_temp" not in recorded
  summary = json.loads((out / "summary.json").read_text())
  assert summary["config"]["distill"] == 0.5 and len(summary["config"]) == len(train.ElsaConfig.__dataclass_fields__)
  tensors = exported(out)
  pruned = [w for name, w in tensors.items() if name.startswith("model.layers.") and name.endswith("proj.weight")]
  assert all(abs(float(np.mean(w == 0)) - 0.5) < 0.01 for w in pruned)  # the recovery kept ELSA's 50%
