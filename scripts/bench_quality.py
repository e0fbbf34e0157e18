#!/usr/bin/env python
"""Perplexity of pruning methods across sparsities, on one model, calibration set and held-out text.

Writes ``results/quality-<preset>.md`` (a markdown table) and, where matplotlib
is installed (the ``bench`` extra), ``results/quality-<preset>.png`` (perplexity vs sparsity, log
scale). Every cell is one ``elsa_jax.cli.jobs.prune`` run with the same
calibration and evaluation text.

  python scripts/bench_quality.py --preset cpu                   # 2-core CPU, short budget (~1 h)
  python scripts/bench_quality.py --preset full                  # one GPU: 1024 x 8 x 1024 tokens
  python scripts/bench_quality.py --methods elsa,magnitude --sparsities 0.7,0.9 --preset full
  python scripts/bench_quality.py --preset full --tasks boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa

With ``--tasks`` (lm-eval task names; needs the ``eval`` extra), every pruned
model and the dense one are also scored zero-shot through the JAX backend
(:mod:`elsa_jax.harness`), and a second table gives each task's accuracy
(``acc``, else the task's first metric) and their mean.

The trained methods (ELSA, SAFE) start from ``--init-method``: the dense
model (the papers' setting, and the default of the GPU presets) or a one-shot
result. The CPU preset's 16 steps are far too few to prune from dense, so
there they start from Wanda and the table shows what the short budget adds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
import time

import jax

from elsa_jax.cli import config as config_lib
from elsa_jax.cli import jobs as pipeline

ALL_METHODS = ("magnitude", "wanda", "sparsegpt", "safe", "elsa")
ALL_PATTERNS = ("0.5", "0.6", "0.7", "0.8", "0.9", "2:4")


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="default")
  ap.add_argument("--calib", default="default", help="calibration text (as elsa-jax prune --calib)")
  ap.add_argument("--eval-text", default="default", help="held-out text (as elsa-jax prune --eval-text)")
  ap.add_argument("--preset", default="cpu", choices=sorted(config_lib.PRESETS))
  ap.add_argument("--methods", default=",".join(ALL_METHODS))
  ap.add_argument("--sparsities", default=",".join(ALL_PATTERNS), help="fractions and/or N:M patterns")
  ap.add_argument("--steps", type=int, help="override the preset's ELSA steps")
  ap.add_argument("--batch-size", type=int, help="override the preset's sequences per step")
  ap.add_argument("--seqlen", type=int, help="override the preset's tokens per sequence (and one-shot window)")
  ap.add_argument("--allocation", choices=("uniform", "owl", "global"), help="how the sparsity is spread")
  ap.add_argument("--finetune-steps", type=int, help="masked recovery after every method (steps)")
  ap.add_argument("--finetune-lr", type=float, help="its learning rate")
  ap.add_argument("--lmda", type=float)
  ap.add_argument("--lr", type=float)
  ap.add_argument("--interval", type=int, help="override the preset's z/u interval")
  ap.add_argument("--score-source", choices=("grad_ema", "base_second_moment"),
                  help="ELSA's projection score (default: the preset's, grad_ema)")
  ap.add_argument("--lmda-schedule", choices=("constant", "residual_balancing"))
  ap.add_argument("--state-dtype", help="z/u storage of elsa/safe (ELSA-L: float8_e4m3fn)")
  ap.add_argument("--moment-dtype", help="Adam moments of elsa/safe (ELSA-L: int8)")
  ap.add_argument("--score-dtype", help="grad_ema score storage (float32 | bfloat16 | int8)")
  ap.add_argument("--tag", default="", help="suffix of the output files, to keep the tables of a sweep apart")
  ap.add_argument("--eval-windows", type=int)
  ap.add_argument("--eval-seqlen", type=int, help="override the preset's perplexity window")
  ap.add_argument("--init-method", help="start of elsa/safe: dense | wanda | sparsegpt | magnitude "
                                        "(default: wanda for the cpu preset, dense otherwise)")
  ap.add_argument("--calib-windows", type=int, help="one-shot calibration windows (default: the preset's)")
  ap.add_argument("--tasks", help="comma-separated lm-eval tasks: adds zero-shot columns (pip install '.[eval]')")
  ap.add_argument("--include-path", help="a folder of extra lm-eval task YAMLs")
  ap.add_argument("--num-fewshot", type=int)
  ap.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
  ap.add_argument("--out-dir", default="results")
  return ap


def _base_run(args: argparse.Namespace) -> config_lib.RunConfig:
  """The preset with the flags given applied: every cell's run but for its method, sparsity and folder."""
  tasks = None
  if args.tasks:
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    tasks = config_lib.TaskSpec(tuple(args.tasks.split(",")), include_path=args.include_path,
                                num_fewshot=args.num_fewshot, limit=limit)
  preset = config_lib.PRESETS[args.preset]
  overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen,
                                     allocation=args.allocation, lmda=args.lmda, lr=args.lr, interval=args.interval,
                                     score_source=args.score_source,
                                     lmda_schedule=args.lmda_schedule, state_dtype=args.state_dtype,
                                     moment_dtype=args.moment_dtype, score_dtype=args.score_dtype).items()
               if v is not None}
  finetune = {k: v for k, v in dict(finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr).items()
              if v is not None}
  return config_lib.override(
      preset, elsa=overrides, model={"path": args.model},
      data={"calib_windows": args.calib_windows or preset.data.calib_windows, "calib": args.calib,
            "eval_text": args.eval_text},
      method=finetune,
      evaluation={"windows": preset.evaluation.windows if args.eval_windows is None else args.eval_windows,
                  "compare_magnitude": False, "seqlen": args.eval_seqlen or preset.evaluation.seqlen,
                  "tasks": tasks},
      output={"overwrite": True, "checkpoint_every": 0},
  )


def _sweep(base_run: config_lib.RunConfig, methods: list[str], targets: list[str], init_method: str,
           out_dir: pathlib.Path, name: str) -> tuple[float | None, dict, dict, dict]:
  """``(dense, perplexities, zero-shot scores, wall seconds)`` of every (method, target) cell, one run each."""
  results: dict[tuple[str, str], float] = {}
  zero_shot: dict[tuple[str, str], dict] = {}
  seconds: dict[str, float] = {}
  dense = None
  t0 = time.time()
  for target in targets:
    elsa = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    for method in methods:
      run_dir = out_dir / "runs" / f"{name}-{method}-{target.replace(':', 'of')}"
      try:
        run = config_lib.override(
            base_run, elsa=elsa, output={"dir": run_dir}, evaluation={"dense": dense is None},
            method={"name": method, "init": init_method if method in config_lib.ADMM_METHODS else "dense"},
        )
        summary = pipeline.prune(run, progress=False)
      except ValueError as err:
        print(f"skipping {method}: {err}", file=sys.stderr)
        continue
      if dense is None:
        dense = summary["dense_ppl"]
      results[(method, target)] = summary[f"{method}_ppl"]
      if "zero_shot" in summary:
        zero_shot[(method, target)] = summary["zero_shot"]
      seconds[f"{method}@{target}"] = summary["wall_seconds"]
      print(f"{method:10s} {target:5s} ppl {results[(method, target)]:.2f} ({time.time() - t0:.0f}s)", flush=True)
  return dense, results, zero_shot, seconds


def _header(args: argparse.Namespace, base_run: config_lib.RunConfig, init_method: str, dense: float) -> str:
  """The table's first line: the budget, ELSA's levers and the evaluation of every cell."""
  base, evaluation = base_run.method.elsa, base_run.evaluation
  elsa = config_lib.override(base_run, method={"name": "elsa"}).method.hyperparameters
  finetune = "" if not args.finetune_steps else \
      f"; then {args.finetune_steps} masked-recovery steps at lr {base_run.method.finetune_lr}"
  return (f"model {args.model}, preset {args.preset} (ELSA/SAFE {base.steps} steps x {base.batch_size} x "
          f"{base.seqlen} tokens from {init_method}, lr {base.lr}, lmda {base.lmda}, interval {base.interval}, "
          f"score {base.score_source}, lmda schedule {base.lmda_schedule}, SAFE rho {config_lib.SAFE_RHO}; "
          f"ELSA distill {elsa.distill:g}, allocation {elsa.allocation}; Wanda/SparseGPT "
          f"{base_run.data.calib_windows} windows x {base.seqlen}; their allocation {base.allocation}{finetune}), "
          f"eval seqlen {evaluation.seqlen}, windows {evaluation.windows or 'all'}, device "
          f"{jax.devices()[0].device_kind}, {datetime.date.today()}, dense perplexity {dense:.3f}")


def main() -> None:
  args = _parser().parse_args()
  base_run = _base_run(args)
  init_method = args.init_method or ("wanda" if args.preset == "cpu" else "dense")
  out_dir = pathlib.Path(args.out_dir)
  name = args.preset + (f"-{args.tag}" if args.tag else "")  # of every file and run folder written
  out_dir.mkdir(parents=True, exist_ok=True)
  methods, targets = args.methods.split(","), args.sparsities.split(",")
  dense, results, zero_shot, seconds = _sweep(base_run, methods, targets, init_method, out_dir, name)
  header = ("| method | " + " | ".join(t if ":" in t else f"{float(t):.0%}" for t in targets) + " |")
  lines = [_header(args, base_run, init_method, dense), "", header, "|---" * (len(targets) + 1) + "|"]
  for method in methods:
    cells = [results.get((method, t)) for t in targets]
    if all(c is None for c in cells):
      continue
    label = method if method not in config_lib.ADMM_METHODS or init_method == "dense" else \
        f"{method} (from {init_method})"
    lines.append(f"| {label} | " + " | ".join("-" if c is None else _fmt(c) for c in cells) + " |")
  if base_run.evaluation.tasks is not None:
    zero_shot[("dense", "0%")] = pipeline.evaluate(args.model, None, tasks=base_run.evaluation.tasks)["zero_shot"]
    lines += ["", *_zero_shot_table(zero_shot, base_run.evaluation.tasks.tasks)]
  table = "\n".join(lines)
  print(table)
  stem = f"quality-{name}"
  (out_dir / f"{stem}.md").write_text(table + "\n")
  (out_dir / f"{stem}.json").write_text(json.dumps(
      {"dense": dense, "init_method": init_method, "results": {f"{m}@{t}": v for (m, t), v in results.items()},
       "zero_shot": {f"{m}@{t}": v for (m, t), v in zero_shot.items()}, "wall_seconds": seconds,
       "eval_seqlen": base_run.evaluation.seqlen, "eval_windows": base_run.evaluation.windows,
       "device": jax.devices()[0].device_kind, "date": str(datetime.date.today())}, indent=2))
  _plot(results, dense, methods, [t for t in targets if ":" not in t], out_dir / f"{stem}.png")


def _main_metric(scores: dict[str, float]) -> tuple[str, float] | None:
  """A task's accuracy (``acc``), else its first metric that is not a standard error: (name, value)."""
  if "acc,none" in scores:
    return "acc", scores["acc,none"]
  return next(((k.split(",")[0], v) for k, v in scores.items() if "stderr" not in k and k != "sample_len"), None)


def _zero_shot_table(zero_shot: dict[tuple[str, str], dict], tasks: tuple[str, ...]) -> list[str]:
  """Markdown rows: one per (method, sparsity), one column per task, and the mean of the accuracies."""
  lines = ["| method | sparsity | " + " | ".join(tasks) + " | mean acc |", "|---" * (len(tasks) + 3) + "|"]
  for (method, target), scores in sorted(zero_shot.items(), key=lambda kv: kv[0] != ("dense", "0%")):
    values = [_main_metric(scores.get(t, {})) for t in tasks]
    accs = [v for name, v in filter(None, values) if name == "acc"]
    mean = f"{sum(accs) / len(accs):.3f}" if accs else "-"
    cells = ["-" if v is None else (f"{v[1]:.3f}" if v[0] == "acc" else f"{v[0]} {v[1]:.4g}") for v in values]
    label = target if ":" in target or target.endswith("%") else f"{float(target):.0%}"
    lines.append(f"| {method} | {label} | " + " | ".join(cells) + f" | {mean} |")
  return lines


def _fmt(x: float) -> str:
  if not math.isfinite(x):
    return "inf"
  return f"{x:,.1f}" if x < 1e5 else f"{x:.2e}"


def _plot(results, dense, methods, fractions, path) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = [float(t) for t in fractions]
  for method in methods:
    ys = [results.get((method, t), float("nan")) for t in fractions]
    if any(math.isfinite(y) for y in ys):
      ax.plot(xs, ys, marker="o", label=method)
  ax.axhline(dense, color="gray", linestyle="--", label="dense")
  ax.set_yscale("log")
  ax.set_xlabel("sparsity")
  ax.set_ylabel("perplexity (held-out)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
