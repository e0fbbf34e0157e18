"""RunConfig: presets are instances, flags override them, bad values are refused, run_config.json is unchanged."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from elsa_jax.cli import commands
from elsa_jax.cli import config
from elsa_jax.run import train


def _run_config(*flags: str) -> config.RunConfig:
  return commands.run_config(commands.build_parser().parse_args(["prune", *flags]))


def test_presets_are_run_configs():
  for name, preset in config.PRESETS.items():
    assert isinstance(preset, config.RunConfig), name
    assert isinstance(preset.method.elsa, train.ElsaConfig), name
  cpu = config.PRESETS["cpu"]
  assert (cpu.method.elsa.steps, cpu.method.elsa.batch_size, cpu.method.elsa.seqlen) == (16, 2, 256)
  assert (cpu.method.elsa.interval, cpu.method.elsa.compute_dtype) == (4, "float32")
  assert (cpu.evaluation.seqlen, cpu.evaluation.windows, cpu.data.calib_windows) == (512, 8, 32)
  paper = config.PRESETS["paper"]
  assert (paper.method.elsa.steps, paper.method.elsa.lr, paper.evaluation.seqlen) == (4096, 2e-4, 2048)
  assert paper.method.elsa.score_source == "base_second_moment" and paper.data.calib_windows == 128
  assert config.resolve_preset("full") is config.PRESETS["full"]
  want = "cpu" if jax.default_backend() == "cpu" else "full"
  assert config.resolve_preset("auto") is config.PRESETS[want]
  with pytest.raises(ValueError, match="--preset"):
    config.resolve_preset("gpu")


def test_flags_override_the_preset_and_only_the_flags_given():
  run = _run_config("--preset", "paper", "--steps", "3", "--method", "safe", "--eval-windows", "0",
                    "--calib-windows", "0", "--no-dense-eval", "--remat", "--mesh", "2x1", "--keep", "5")
  paper = config.PRESETS["paper"]
  assert run.method.elsa == dataclasses.replace(paper.method.elsa, steps=3)
  assert run.method.name == "safe" and run.method.hyperparameters.projection == "magnitude"
  assert run.method.hyperparameters.sam_rho == config.SAFE_RHO
  assert run.evaluation == dataclasses.replace(paper.evaluation, windows=0, dense=False)
  assert run.data.calib_windows == paper.data.calib_windows  # 0: the preset's, as before
  assert run.model == config.ModelSpec(remat="full", mesh=(2, 1))
  assert run.output == config.OutputSpec(checkpoint_every=100, keep=5)  # the flags' own defaults
  # No flags: the preset, with the defaults of the flags that have one.
  assert _run_config("--preset", "cpu") == config.override(config.PRESETS["cpu"], output={"checkpoint_every": 100})


@pytest.mark.parametrize("flags,flag", [
    (["--remat", "everything"], "--remat"),
    (["--mesh", "0x1"], "--mesh"),
    (["--calib-windows", "-4"], "--calib-windows"),
    (["--calib-seqlen", "-1"], "--calib-seqlen"),
    (["--method", "sparse"], "--method"),
    (["--init-method", "random"], "--init-method"),
    (["--damp", "-0.5"], "--damp"),
    (["--eval-seqlen", "-8"], "--eval-seqlen"),
    (["--eval-windows", "-1"], "--eval-windows"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--keep", "0"], "--keep"),
    (["--eval-tasks", "boolq", "--include-path", "/no/such/folder"], "--include-path"),
    (["--eval-tasks", "boolq", "--num-fewshot", "-1"], "--num-fewshot"),
    (["--eval-tasks", "boolq", "--task-batch-size", "0"], "--task-batch-size"),
    (["--limit", "5"], "--limit"),
    (["--distill", "1.5"], "--distill"),
    (["--distill", "nan"], "--distill"),
    (["--distill", "0.5", "--distill-temp", "0"], "--distill-temp"),
    (["--distill", "0", "--squarehead"], "--squarehead"),
    (["--preset", "paper", "--squarehead"], "--squarehead"),
    (["--method", "wanda", "--distill", "0.5"], "--distill"),
])
def test_a_bad_value_in_each_section_is_refused_naming_its_flag(flags, flag, capsys, tmp_path):
  with pytest.raises(ValueError, match=flag):
    _run_config(*flags)
  out = tmp_path / "never"
  assert commands.main(["prune", "--output", str(out), *flags]) == 2
  assert flag in capsys.readouterr().err
  assert not out.exists()


def test_sections_refuse_bad_values_when_built_in_python():
  with pytest.raises(ValueError, match="--output"):
    config.OutputSpec(dir="")
  with pytest.raises(ValueError, match="--model"):
    config.ModelSpec(path="")
  with pytest.raises(ValueError, match="--calib"):
    config.DataSpec(calib="")
  with pytest.raises(ValueError, match="sparsity"):
    config.override(config.RunConfig(), elsa={"sparsity": 1.0})
  with pytest.raises(ValueError, match="no section"):
    config.override(config.RunConfig(), optimizer={"lr": 1.0})


# checkpoints/run_config.json as the code before RunConfig wrote it (elsa_jax 74e129c..d7645e4), for the
# flags of each case; "M" and "C" stand for --model and --calib.
_CPU_32 = {
    "model": "M", "calib": "C", "method": "elsa", "init_method": "dense", "oneshot_windows": 32, "oneshot_seqlen": 32,
    "damp": 0.01, "sparsity": 0.5, "pattern": "unstructured", "lmda": 0.01, "lmda_schedule": "constant",
    "interval": 2, "projection": "objective_aware", "score_source": "grad_ema", "sam_rho": 0.0, "steps": 12,
    "batch_size": 2, "grad_accum": 1, "seqlen": 32, "lr": 0.001, "b1": 0.9, "b2": 0.95, "eps": 1e-08, "clip": 1.0,
    "state_dtype": "float32", "moment_dtype": "float32", "score_dtype": None, "compute_dtype": "float32", "seed": 0,
}
CLI_FLAGS = ["--steps", "12", "--batch-size", "2", "--seqlen", "32", "--interval", "2", "--compute-dtype", "float32",
             "--eval-seqlen", "32", "--checkpoint-every", "2", "--no-compare-magnitude", "--no-dense-eval",
             "--preset", "cpu"]
_PAPER_SAFE_FLAGS = ["--preset", "paper", "--method", "safe", "--sam-rho", "0.1", "--calib-windows", "0",
                     "--eval-windows", "3", "--remat", "dots", "--scan-layers", "--overwrite", "--keep", "3",
                     "--grad-accum", "2", "--score-dtype", "int8", "--moment-dtype", "int8", "--seed", "5", "--b1",
                     "0.8", "--lmda-schedule", "residual_balancing", "--calib-seqlen", "0",
                     "--text-field", "body", "--output", "X"]
PAPER_ELSA = ["--distill", "0", "--allocation", "uniform"]  # the levers off: the run config of the paper's ELSA
LEVERS = {"allocation": "owl", "distill": 0.5}
_BASE = ["--model", "M", "--calib", "C", "--eval-text", "E", "--seqlen", "32", "--batch-size", "2", "--eval-seqlen",
         "32", "--compute-dtype", "float32", "--preset", "cpu", "--mesh", "1x1"]
OLD_RUN_CONFIGS = [
    (["--model", "M", "--calib", "C", "--eval-text", "E", *CLI_FLAGS, *PAPER_ELSA], _CPU_32),
    # ELSA's levers (config.ELSA_LEVERS) are recorded, the newer fields, after the old ones.
    ([], {**_CPU_32, "model": "default", "calib": "default", "interval": 4, "oneshot_seqlen": 256, "seqlen": 256,
          "steps": 16, **LEVERS}),
    (["--preset", "full"], {**_CPU_32, "model": "default", "calib": "default", "batch_size": 8,
                            "compute_dtype": "bfloat16", "interval": 32, "oneshot_seqlen": 1024,
                            "oneshot_windows": 128, "seqlen": 1024, "steps": 1024, **LEVERS}),
    (_PAPER_SAFE_FLAGS, {**_CPU_32, "model": "default", "calib": "default", "b1": 0.8, "batch_size": 8,
                         "compute_dtype": "bfloat16", "grad_accum": 2, "interval": 32,
                         "lmda_schedule": "residual_balancing", "lr": 0.0002, "method": "safe",
                         "moment_dtype": "int8", "oneshot_seqlen": 2048, "oneshot_windows": 128,
                         "projection": "magnitude", "sam_rho": 0.1, "score_dtype": "int8",
                         "score_source": "base_second_moment", "seed": 5, "seqlen": 2048, "steps": 4096}),
    (_BASE + ["--steps", "2", "--method", "safe+", "--init-method", "wanda", "--sparsity", "0.6",
              "--calib-windows", "8", "--damp", "0.02", "--no-dense-eval"],
     {**_CPU_32, "damp": 0.02, "init_method": "wanda", "interval": 4, "method": "safe+", "oneshot_windows": 8,
      "sam_rho": 0.05, "score_source": "activations", "sparsity": 0.6, "steps": 2}),
    (_BASE + ["--steps", "2", "--method", "safe", "--init-method", "magnitude", "--pattern", "2:4",
              "--calib-seqlen", "16", "--state-dtype", "bfloat16"],
     {**_CPU_32, "init_method": "magnitude", "interval": 4, "method": "safe", "oneshot_seqlen": 16,
      "pattern": "2:4", "projection": "magnitude", "sam_rho": 0.05, "state_dtype": "bfloat16", "steps": 2}),
    (_BASE + ["--steps", "2", "--interval", "2", "--sparsity", "0.6", "--lmda", "0.02", "--remat", "--mesh", "1x1",
              *PAPER_ELSA],
     {**_CPU_32, "lmda": 0.02, "sparsity": 0.6, "steps": 2}),
]


@pytest.mark.parametrize("flags,want", OLD_RUN_CONFIGS)
def test_run_config_json_is_the_one_the_old_code_wrote(flags, want):
  got = json.loads(json.dumps(_run_config(*flags).checkpoint_config()))  # as RunCheckpointer stores it
  assert got == want
  assert list(got)[:7] == ["model", "calib", "method", "init_method", "oneshot_windows", "oneshot_seqlen", "damp"]


def test_a_run_writes_the_old_run_config_summary_and_lines(tiny_run, tmp_path, capsys):
  root, model_dir, calib, evalt = tiny_run
  flags, want = OLD_RUN_CONFIGS[-1]
  flags = [{"M": str(model_dir), "C": str(calib), "E": str(evalt)}.get(f, f) for f in flags]
  out = tmp_path / "run"
  assert commands.main(["prune", *flags, "--output", str(out)]) == 0
  written = json.loads((out / "checkpoints" / "run_config.json").read_text())
  environment = written.pop("environment")  # recorded beside the configuration, not compared on resume
  fingerprints = written.pop("fingerprints")  # the inputs' contents, compared on resume
  assert set(fingerprints) == {"model", "calib"}
  assert fingerprints["calib"]["path"] == str(calib.resolve())
  assert written == {**want, "model": str(model_dir.resolve()), "calib": str(calib.resolve())}
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary) == ["model", "method", "config", "eval_seqlen", "init_method", "environment", "dense_ppl",
                           "magnitude_ppl", "train_tokens_per_second", "final_metrics", "elsa_ppl",
                           "sparsity", "sparsity_per_matrix", "wall_seconds"]
  assert len(summary["sparsity_per_matrix"]) == 14 and all(  # 2 layers x 7 linear maps, each at the target
      abs(s - 0.6) < 0.01 for s in summary["sparsity_per_matrix"].values())
  assert summary["environment"] == environment and environment["jax"] == jax.__version__
  assert {k: v for k, v in summary["config"].items() if k in want} == \
      {k: v for k, v in want.items() if k in summary["config"]}
  assert len(summary["config"]) == len(dataclasses.fields(train.ElsaConfig))
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in lines] == [
      "dense perplexity @32", "magnitude unstructured 60% perplexity @32", "elsa unstructured 60% perplexity @32",
      f"wrote the pruned model to {out / 'model'}", '{"dense_ppl"']
  assert json.loads(lines[-1]) == {k: round(summary[k], 3) for k in ("dense_ppl", "magnitude_ppl", "elsa_ppl")}


@pytest.mark.parametrize("flags,distill,allocation", [
    ([], 0.5, "owl"),                                      # the cpu preset's ELSA: both levers
    (["--preset", "full", "--sparsity", "0.9"], 0.5, "owl"),
    (["--distill", "0"], 0.0, "owl"),                      # a flag given replaces its lever only
    (["--allocation", "global"], 0.5, "global"),
    (["--distill", "0.25", "--allocation", "uniform"], 0.25, "uniform"),
    (["--pattern", "2:4"], 0.5, "uniform"),                # N:M fixes every group's count: no OWL
    (["--sparsity", "0.95"], 0.5, "uniform"),              # 0.95 + OWL's 0.08 leaves [0, 1): no OWL
    (["--sparsity", "0.05"], 0.5, "uniform"),
    (["--squarehead"], 0.5, "owl"),                        # SquareHead joins the lever's distillation
    (["--preset", "paper"], 0.0, "uniform"),               # the paper's recipe has none
    (["--method", "safe"], 0.0, "uniform"),                # the baselines run as published
    (["--method", "sparsegpt"], 0.0, "uniform"),
    (["--method", "wanda", "--finetune-steps", "4"], 0.0, "uniform"),
])
def test_elsa_levers_apply_where_their_flag_is_not_given(flags, distill, allocation):
  hp = _run_config(*flags).method.hyperparameters
  assert (hp.distill, hp.allocation) == (distill, allocation)
  assert hp.squarehead == ("--squarehead" in flags)


def test_the_levers_are_ones_that_won_and_the_finetune_of_elsa_distills_too():
  assert dict(config.ELSA_LEVERS) == {"distill": 0.5, "allocation": "owl"}
  run = _run_config("--finetune-steps", "3", "--finetune-lr", "2e-4")
  assert (run.finetune_config.distill, run.finetune_config.steps, run.finetune_config.lr) == (0.5, 3, 2e-4)
  assert run.checkpoint_config()["distill"] == 0.5 and run.checkpoint_config()["allocation"] == "owl"
  assert "distill" not in _run_config("--method", "sparsegpt").checkpoint_config()
