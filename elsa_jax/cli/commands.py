# Copyright 2026 The elsa_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
"""Command line: ``elsa-jax prune | eval | export``.

``elsa-jax prune`` with no arguments prunes the built-in SmolLM2-135M to 50%
on the built-in text with the preset for the backend it finds (``cpu``: about
ten minutes on two cores; ``full`` on a GPU/TPU), prints dense, magnitude and
ELSA perplexity, and writes the pruned HF model to ``runs/elsa/model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from elsa_jax.cli import config as config_lib
from elsa_jax.run import train

_ELSA_FIELDS = tuple(f.name for f in dataclasses.fields(train.ElsaConfig))
#: The flags of ``prune`` (argparse dests) -> the (section, field) of the RunConfig they set; the ELSA flags
#: (``_ELSA_FIELDS``) set the fields of its ``method.elsa``.
_RUN_FLAGS = {
    "model": ("model", "path"), "remat": ("model", "remat"), "scan_layers": ("model", "scan_layers"),
    "mesh": ("model", "mesh"),
    "calib": ("data", "calib"), "eval_text": ("data", "eval_text"), "text_field": ("data", "text_field"),
    "calib_windows": ("data", "calib_windows"), "calib_seqlen": ("data", "calib_seqlen"),
    "method": ("method", "name"), "init_method": ("method", "init"), "damp": ("method", "damp"),
    "finetune_steps": ("method", "finetune_steps"), "finetune_lr": ("method", "finetune_lr"),
    "eval_seqlen": ("evaluation", "seqlen"), "eval_windows": ("evaluation", "windows"),
    "no_compare_magnitude": ("evaluation", "compare_magnitude"), "no_dense_eval": ("evaluation", "dense"),
    "output": ("output", "dir"), "checkpoint_every": ("output", "checkpoint_every"), "keep": ("output", "keep"),
    "overwrite": ("output", "overwrite"),
}
#: ``--no-X`` flags: given, they set X to False.
_NEGATED = ("no_compare_magnitude", "no_dense_eval")
#: Flags whose 0 means "the preset's value", as it always has.
_ZERO_IS_UNSET = ("eval_seqlen", "calib_windows", "calib_seqlen")


def _mesh(text: str) -> tuple[int, int]:
  try:
    data, model = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh takes DATAxMODEL such as 4x2 or -1x1, got {text!r}") from None
  return data, model


def _add_elsa_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("ELSA (defaults: the preset's, else ElsaConfig's)")
  g.add_argument("--sparsity", type=float, help="fraction of each prunable matrix set to zero (default 0.5)")
  g.add_argument("--pattern", help="unstructured | row | N:M such as 2:4 (default unstructured)")
  g.add_argument("--lmda", type=float, help="ADMM penalty (default 0.01, the paper's)")
  g.add_argument("--lmda-schedule", help="constant | residual_balancing")
  g.add_argument("--interval", type=int, help="optimizer steps between z/u updates (paper: 32)")
  g.add_argument("--projection", help="objective_aware (v*y^2) | magnitude (|y|)")
  g.add_argument("--score-source", help="grad_ema (default) | base_second_moment (the paper's) | activations")
  g.add_argument("--sam-rho", type=float, help="SAM radius of SAFE's x-update (safe/safe+ default 0.05; 0: off)")
  g.add_argument("--steps", type=int)
  g.add_argument("--batch-size", type=int, help="sequences per micro-batch (global)")
  g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
  g.add_argument("--seqlen", type=int, help="tokens per calibration sequence")
  g.add_argument("--lr", type=float, help="Adam learning rate, linear decay to 0 (default 1e-3)")
  g.add_argument("--b1", type=float)
  g.add_argument("--b2", type=float)
  g.add_argument("--clip", type=float, help="global gradient-norm clip (1.0)")
  g.add_argument("--state-dtype", help="z/u storage (ELSA-L): float32 | bfloat16 | float8_e4m3fn | float8_e5m2")
  g.add_argument("--moment-dtype", help="Adam moments: float32 | bfloat16 | int8")
  g.add_argument("--score-dtype", help="grad_ema score: float32 | bfloat16 | int8 (default: the state's width, "
                                       "int8 with float8 state)")
  g.add_argument("--compute-dtype", help="bfloat16 | float32 (master weights stay float32)")
  g.add_argument("--seed", type=int)
  g.add_argument("--allocation", help="uniform (every matrix at --sparsity, default) | owl (per layer from its outlier "
                                      "ratio, any method) | global (ELSA: one threshold over every matrix)")
  g.add_argument("--owl-m", type=float, help="OWL's outlier threshold, times a layer's mean Wanda score (5)")
  g.add_argument("--owl-lambda", type=float, help="OWL's half-width of the layer sparsities (0.08)")


def _given(args: argparse.Namespace, dest: str) -> bool:
  value = getattr(args, dest, None)
  if value is None or value is False:  # not given (a store_true flag is False when absent)
    return False
  return not (dest in _ZERO_IS_UNSET and value == 0)


def run_config(args: argparse.Namespace) -> config_lib.RunConfig:
  """The RunConfig of parsed ``prune`` flags: the preset's, with the flags given in its place.

  Raises:
    ValueError: for an unknown preset or a value a section of the RunConfig refuses.
  """
  sections: dict[str, dict] = {}
  for dest, (section, name) in _RUN_FLAGS.items():
    if _given(args, dest):
      value = getattr(args, dest)
      sections.setdefault(section, {})[name] = not value if dest in _NEGATED else value
  elsa = {name: getattr(args, name) for name in _ELSA_FIELDS if _given(args, name)}
  return config_lib.override(config_lib.resolve_preset(args.preset), elsa=elsa, **sections)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="elsa-jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command")

  p = sub.add_parser("prune", help="prune a model (ELSA or a baseline) and export it")
  p.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a .gguf, an HF dir or hub id")
  p.add_argument("--calib", default="default", help="calibration text: 'default', .txt/.jsonl, dir, or hf:NAME")
  p.add_argument("--eval-text", default="default", help="evaluation text, same forms as --calib")
  p.add_argument("--text-field", default="text", help="field of JSONL/datasets records holding the text")
  p.add_argument("--output", default="runs/elsa", help="run directory (checkpoints, metrics, model/)")
  p.add_argument("--method", default="elsa",
                 help="elsa | safe | safe+ (trained, ADMM) | magnitude | wanda | sparsegpt (one-shot)")
  p.add_argument("--init-method", default="dense",
                 help="starting point of elsa/safe/safe+: dense | magnitude | wanda | sparsegpt")
  p.add_argument("--calib-windows", type=int, help="calibration windows of wanda/sparsegpt/safe+ (default 128)")
  p.add_argument("--calib-seqlen", type=int, help="tokens per such window (default: --seqlen)")
  p.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean diag(H)")
  p.add_argument("--finetune-steps", type=int,
                 help="masked recovery after the method: train the surviving weights N steps, mask frozen (0)")
  p.add_argument("--finetune-lr", type=float, help="its Adam learning rate, linear decay to 0 (1e-4)")
  p.add_argument("--preset", default="auto", help="auto | cpu | full | paper")
  p.add_argument("--mesh", type=_mesh, default=(-1, 1), help="DATAxMODEL device mesh, e.g. 4x2 (default -1x1)")
  p.add_argument("--eval-seqlen", type=int)
  p.add_argument("--eval-windows", type=int, help="evaluate at most this many windows (0: all)")
  p.add_argument("--checkpoint-every", type=int, default=100, help="save every N steps (0: only at the end)")
  p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
  p.add_argument("--no-compare-magnitude", action="store_true", help="skip the magnitude baseline evaluation")
  p.add_argument("--no-dense-eval", action="store_true", help="skip the dense model's evaluation")
  p.add_argument("--overwrite", action="store_true", help="replace an existing exported model")
  p.add_argument("--distributed", action="store_true",
                 help="join a multi-process run (jax.distributed; see elsa_jax.run.distributed)")
  p.add_argument("--remat", nargs="?", const="full", default=False,
                 help="rematerialise each decoder layer in the backward pass: full (the default of the bare flag; "
                      "least memory, ~1/3 more compute) | dots | dots_no_batch")
  p.add_argument("--scan-layers", action="store_true",
                 help="run the decoder layers as one lax.scan (compile time independent of depth)")
  _add_elsa_args(p)

  e = sub.add_parser("eval", help="perplexity and sparsity of a model")
  e.add_argument("--model", default="default")
  e.add_argument("--eval-text", default="default")
  e.add_argument("--text-field", default="text")
  e.add_argument("--seqlen", type=int, default=1024)
  e.add_argument("--windows", type=int, default=0, help="at most this many windows (0: all)")
  e.add_argument("--compute-dtype", default="float32")

  x = sub.add_parser("export", help="finalize the latest checkpoint of a run and write an HF model")
  x.add_argument("--run-dir", required=True)
  x.add_argument("--output", help="default: RUN_DIR/model")
  x.add_argument("--overwrite", action="store_true")
  return parser


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  argv = sys.argv[1:] if argv is None else argv
  parser = build_parser()
  args = parser.parse_args(argv or ["prune"])
  if getattr(args, "distributed", False):
    from elsa_jax.run import distributed

    distributed.initialize()
  from elsa_jax.cli import jobs as pipeline

  try:
    if args.command == "prune":
      summary = pipeline.prune(run_config(args))
      keys = [k for k in summary if k.endswith("_ppl")]
      print(json.dumps({k: round(summary[k], 3) for k in keys}))
    elif args.command == "eval":
      result = pipeline.evaluate(args.model, args.eval_text, seqlen=args.seqlen, windows=args.windows,
                                 text_field=args.text_field, compute_dtype=args.compute_dtype)
      print(json.dumps(result, indent=2, default=float))
    elif args.command == "export":
      path = pipeline.export_run(args.run_dir, args.output, overwrite=args.overwrite)
      print(f"wrote {path}")
    else:
      parser.print_help()
      return 2
  except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
    print(f"elsa-jax: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
