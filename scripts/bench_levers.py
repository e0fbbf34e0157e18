#!/usr/bin/env python
"""ELSA's quality levers side by side: distillation, OWL and global allocation, masked recovery.

Every row is prune runs at each sparsity on the same tokens (the ``cpu`` preset's data, ``--steps`` x
``--batch-size`` x ``--seqlen``), evaluated on the same held-out windows. The one-shot rows get the same
tokens as ELSA's as masked recovery (``--finetune-steps`` = ``--steps``), the fair comparison. Writes
``results/levers<-tag>.md`` and ``.json`` with the perplexities and each cell's wall time.

  python scripts/bench_levers.py                                  # every row, 70% and 90% (2-core CPU: ~1 h)
  python scripts/bench_levers.py --rows elsa,owl,global --sparsities 0.7
  python scripts/bench_levers.py --rows elsa,distill,combo --tag distill

Rows (``--rows``): ``elsa`` (today's ELSA), ``distill`` (KL to the dense model, ``--distill-alpha``),
``owl`` (OWL's per-layer sparsities), ``global`` (one threshold over every matrix), ``combo`` (every lever
of ``--combo``, default the ones that beat ``elsa`` at every sparsity of this run, else skipped),
``sparsegpt``, ``sparsegpt-ft`` (then masked recovery), ``sparsegpt-ft-distill`` (recovery with distillation).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import time

import jax

from elsa_jax.cli import config as config_lib
from elsa_jax.cli import jobs as pipeline
from elsa_jax.run import train

LEVERS = ("distill", "owl", "global")
ROWS = ("elsa", *LEVERS, "combo", "sparsegpt", "sparsegpt-ft", "sparsegpt-ft-distill")


def lever_fields(lever: str, args: argparse.Namespace) -> dict:
  """The ElsaConfig fields one lever sets."""
  if lever == "distill":
    return {"distill": args.distill_alpha, "distill_temp": args.distill_temp}
  if lever == "owl":
    return {"allocation": "owl"}
  return {"allocation": "global"}


def row_config(row: str, args: argparse.Namespace, combo: tuple[str, ...]) -> tuple[str, dict, dict]:
  """``(method, elsa fields, method fields)`` of a row."""
  if row == "elsa":
    return "elsa", {}, {"init": args.init_method}
  if row in LEVERS:
    return "elsa", lever_fields(row, args), {"init": args.init_method}
  if row == "combo":
    if "owl" in combo and "global" in combo:  # one allocation: the global one, ELSA's own
      combo = tuple(c for c in combo if c != "owl")
    fields = {}
    for lever in combo:
      fields.update(lever_fields(lever, args))
    return "elsa", fields, {"init": args.init_method}
  if row == "sparsegpt":
    return "sparsegpt", {}, {}
  recovery = {"finetune_steps": args.steps, "finetune_lr": args.finetune_lr}
  return "sparsegpt", lever_fields("distill", args) if row.endswith("distill") else {}, recovery


def cell(base: config_lib.RunConfig, row: str, target: str, args, combo, out_dir: pathlib.Path) -> dict:
  """One prune run: its perplexity and wall time."""
  method, elsa, method_fields = row_config(row, args, combo)
  elsa = {**elsa, "sparsity": float(target)}
  run = config_lib.override(base, elsa=elsa, method={"name": method, **method_fields},
                            output={"dir": out_dir / "runs" / f"levers-{row}-{target}"})
  t0 = time.perf_counter()
  summary = pipeline.prune(run, progress=False)
  return {"ppl": summary[f"{method}_ppl"], "seconds": time.perf_counter() - t0, "dense": summary.get("dense_ppl")}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="default")
  ap.add_argument("--rows", default=",".join(ROWS))
  ap.add_argument("--sparsities", default="0.7,0.9")
  ap.add_argument("--steps", type=int, default=64)
  ap.add_argument("--batch-size", type=int, default=2)
  ap.add_argument("--seqlen", type=int, default=256)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--interval", type=int, default=4)
  ap.add_argument("--init-method", default="wanda", help="start of the ELSA rows")
  ap.add_argument("--calib-windows", type=int, default=32, help="one-shot calibration windows")
  ap.add_argument("--eval-windows", type=int, default=32)
  ap.add_argument("--eval-seqlen", type=int, default=512)
  ap.add_argument("--distill-alpha", type=float, default=0.5)
  ap.add_argument("--distill-temp", type=float, default=1.0)
  ap.add_argument("--finetune-lr", type=float, default=1e-4, help="masked recovery's learning rate")
  ap.add_argument("--combo", help="levers of the combo row (default: those that beat elsa everywhere)")
  ap.add_argument("--tag", default="")
  ap.add_argument("--out-dir", default="results")
  args = ap.parse_args()
  rows, targets = args.rows.split(","), args.sparsities.split(",")
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    ap.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
  missing = [f for f in ("distill", "distill_temp") if f not in {x.name for x in dataclasses.fields(train.ElsaConfig)}]
  if missing and any("distill" in r for r in rows):
    ap.error("this build has no distillation (ElsaConfig lacks distill); drop the distill rows")
  base = config_lib.override(
      config_lib.PRESETS["cpu"], model={"path": args.model},
      elsa={"steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen, "lr": args.lr,
            "interval": args.interval},
      data={"calib_windows": args.calib_windows}, method={"levers": ()},  # the paper's ELSA, each lever by its row
      evaluation={"windows": args.eval_windows, "seqlen": args.eval_seqlen, "compare_magnitude": False},
      output={"overwrite": True, "checkpoint_every": 0})
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  results: dict[str, dict[str, dict]] = {}
  dense = None
  for row in rows:
    combo = tuple(args.combo.split(",")) if args.combo else tuple(
        lever for lever in LEVERS if lever in results and all(
            results[lever][t]["ppl"] < results["elsa"][t]["ppl"] for t in targets if "elsa" in results))
    if row == "combo" and len(combo) < 2:
      print(f"combo: skipped (levers that win everywhere: {', '.join(combo) or 'none'})", flush=True)
      continue
    results[row] = {}
    for target in targets:
      results[row][target] = cell(config_lib.override(base, evaluation={"dense": dense is None}), row, target,
                                  args, combo, out_dir)
      dense = dense or results[row][target]["dense"]
      print(f"{row:22s} {target}: ppl {results[row][target]['ppl']:.2f} "
            f"({results[row][target]['seconds']:.0f} s)", flush=True)
    if row == "combo":
      results[row]["levers"] = list(combo)
  table = _table(results, targets, args, dense)
  print(table)
  stem = "levers" + (f"-{args.tag}" if args.tag else "")
  (out_dir / f"{stem}.md").write_text(table + "\n")
  (out_dir / f"{stem}.json").write_text(json.dumps({"dense": dense, "results": results, "args": vars(args),
                                                    "device": jax.devices()[0].device_kind}, indent=2))


def _table(results, targets, args, dense) -> str:
  head = (f"model {args.model}: {args.steps} steps x {args.batch_size} x {args.seqlen} tokens (ELSA rows from "
          f"{args.init_method}, lr {args.lr}, interval {args.interval}; masked recovery {args.steps} steps at lr "
          f"{args.finetune_lr}; distillation alpha {args.distill_alpha}, T {args.distill_temp}); one-shot "
          f"{args.calib_windows} x {args.seqlen}; eval {args.eval_windows} x {args.eval_seqlen}; device "
          f"{jax.devices()[0].device_kind}, {datetime.date.today()}; dense {dense:.3f}")
  lines = [head, "", "| row | " + " | ".join(f"{float(t):.0%}" for t in targets) + " | " +
           " | ".join(f"s @ {float(t):.0%}" for t in targets) + " |", "|---" * (2 * len(targets) + 1) + "|"]
  for row, cells in results.items():
    label = row + (f" ({' + '.join(cells['levers'])})" if row == "combo" else "")
    ppl = [_fmt(cells[t]["ppl"]) for t in targets]
    secs = [f"{cells[t]['seconds']:.0f}" for t in targets]
    lines.append(f"| {label} | " + " | ".join(ppl + secs) + " |")
  return "\n".join(lines)


def _fmt(x: float) -> str:
  return "inf" if not math.isfinite(x) else (f"{x:,.1f}" if x < 1e5 else f"{x:.2e}")


if __name__ == "__main__":
  main()
