#!/usr/bin/env python
"""elsa_jax's Wanda and SparseGPT against llm-compressor's, on the same calibration windows and one evaluator.

  python scripts/bench_baseline_fidelity.py --torch-python /path/to/venv/bin/python

elsa_jax prunes the built-in model (``elsa-jax prune --method wanda|sparsegpt``,
``--calib-windows 32 --calib-seqlen 512``) and exports it; the calibration
windows it read and the first held-out windows are written beside it. Then, in
``--torch-python`` (a venv with ``llmcompressor==0.14.0`` and torch, e.g.
``pip install llmcompressor==0.14.0 torch==2.13.0``), llm-compressor's
``WandaPruningModifier`` and ``SparseGPTModifier`` prune the dense export on
those same windows, and one plain PyTorch evaluator (transformers' forward,
float32, the next-token NLL of each window) scores every model on the same
held-out windows. Writes ``<out-dir>/fidelity.md`` and ``fidelity.json``.
elsa_jax itself never imports torch: only the child in ``--torch-python`` does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

METHODS = ("wanda", "sparsegpt")


def _prepare(args: argparse.Namespace, out: pathlib.Path) -> dict:
  """elsa_jax's side: the dense export, the windows, and elsa_jax's pruned exports with their own perplexity."""
  import jax

  from elsa_jax.cli import config as config_lib
  from elsa_jax.cli import jobs
  from elsa_jax.data import evaluation as evaluate_lib
  from elsa_jax.run import sharding as sharding_lib

  base = config_lib.override(
      config_lib.PRESETS["cpu"], method={"name": "sparsegpt", "damp": args.damp},
      data={"calib_windows": args.windows, "calib_seqlen": args.seqlen},
      evaluation={"seqlen": args.seqlen, "windows": args.windows, "compare_magnitude": False, "dense": False},
      output={"overwrite": True, "checkpoint_every": 0})
  inputs = jobs._load_inputs(base, sharding_lib.make_mesh(*base.model.mesh))
  np.save(out / "calib.npy", inputs.oneshot_ids)
  np.save(out / "eval.npy", evaluate_lib.eval_windows(inputs.eval_text.ids, args.seqlen, max_windows=args.windows))
  jobs.export(inputs.loaded, inputs.loaded.params, out / "dense", overwrite=True)
  own = {"dense": jobs.perplexity_of(inputs.loaded, inputs.loaded.params, inputs.eval_text.ids, seqlen=args.seqlen,
                                     max_windows=args.windows)}
  for method in METHODS:
    for s in args.sparsities:
      run = config_lib.override(base, method={"name": method}, elsa={"sparsity": s},
                                output={"dir": out / f"elsa_jax-{method}-{s:g}"})
      t = time.perf_counter()
      own[f"{method}@{s:g}"] = jobs.prune(run, progress=False)[f"{method}_ppl"]
      print(f"elsa_jax {method} {s:.0%}: {own[f'{method}@{s:g}']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
  return {"elsa_jax_own": own, "device": jax.devices()[0].device_kind}


def _torch_perplexity(model, windows: np.ndarray) -> float:
  """exp of the mean next-token NLL over ``windows`` ([n, seqlen] ids), one window at a time, float32."""
  import torch

  total, count = 0.0, 0
  with torch.no_grad():
    for row in windows:
      ids = torch.from_numpy(row[None].astype(np.int64))
      logits = model(ids).logits[0, :-1].float()
      nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
      total, count = total + float(nll), count + ids.shape[1] - 1
  return float(np.exp(total / count))


def _child(out: pathlib.Path, sparsities: list[float], damp: float) -> None:
  """The torch side: llm-compressor prunes the dense export; one evaluator scores every model."""
  import datasets
  import torch
  import transformers
  from llmcompressor import oneshot
  from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

  calib, held_out = np.load(out / "calib.npy"), np.load(out / "eval.npy")

  def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

  scores = {"dense": _torch_perplexity(load(out / "dense"), held_out)}
  for method in METHODS:
    for s in sparsities:
      key = f"{method}@{s:g}"
      scores[f"elsa_jax {key}"] = _torch_perplexity(load(out / f"elsa_jax-{method}-{s:g}" / "model"), held_out)
      common = dict(sparsity=s, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
      recipe = (WandaPruningModifier(**common) if method == "wanda" else
                SparseGPTModifier(**common, block_size=128, dampening_frac=damp))
      data = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()})
      t = time.perf_counter()
      model = oneshot(model=load(out / "dense"), dataset=data, recipe=recipe, num_calibration_samples=len(calib),
                      max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
      scores[f"llm-compressor {key}"] = _torch_perplexity(model, held_out)
      print(f"llm-compressor {key}: {scores[f'llm-compressor {key}']:.3f} ({time.perf_counter() - t:.0f} s)",
            flush=True)
  (out / "torch_scores.json").write_text(json.dumps(scores, indent=2))


def _table(figures: dict, args: argparse.Namespace) -> str:
  scores, own = figures["torch"], figures["elsa_jax_own"]
  lines = [f"SmolLM2-135M (built-in), calibration {args.windows} x {args.seqlen} windows (the same ids for both), "
           f"SparseGPT damp {args.damp}, block 128; perplexity on the first {args.windows} x {args.seqlen} held-out "
           f"windows by one PyTorch evaluator (float32); device {figures['device']}, {datetime.date.today()}; "
           f"dense {scores['dense']:.3f} (elsa_jax's own evaluator: {own['dense']:.3f})", "",
           "| method | sparsity | elsa_jax | llm-compressor 0.14 | elsa_jax / llm-compressor | elsa_jax, its own evaluator |",
           "|---|---|---|---|---|---|"]
  for method in METHODS:
    for s in args.sparsities:
      key = f"{method}@{s:g}"
      ours, ref = scores[f"elsa_jax {key}"], scores[f"llm-compressor {key}"]
      lines.append(f"| {method} | {s:.0%} | {ours:.3f} | {ref:.3f} | {ours / ref:.4f} | {own[key]:.3f} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--torch-python", required=True, help="a Python with llmcompressor 0.14 and torch")
  ap.add_argument("--sparsities", default="0.5,0.7")
  ap.add_argument("--windows", type=int, default=32, help="calibration and held-out windows")
  ap.add_argument("--seqlen", type=int, default=512)
  ap.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening (elsa_jax's default)")
  ap.add_argument("--out-dir", default="results/fidelity")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.sparsities = [float(s) for s in args.sparsities.split(",")]
  out = pathlib.Path(args.out_dir)
  if args.child:
    return _child(out, args.sparsities, args.damp)
  if not pathlib.Path(args.torch_python).exists():
    sys.exit(f"--torch-python {args.torch_python} does not exist: give a venv's python with llmcompressor and torch.")
  out.mkdir(parents=True, exist_ok=True)
  figures = _prepare(args, out)
  subprocess.run([args.torch_python, __file__, *sys.argv[1:], "--child"], check=True)
  figures["torch"] = json.loads((out / "torch_scores.json").read_text())
  table = _table(figures, args)
  print(table)
  (out / "fidelity.md").write_text(table + "\n")
  (out / "fidelity.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
  main()
