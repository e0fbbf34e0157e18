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
"""Command line: ``elsa-jax prune | eval | export | densify``.

``elsa-jax prune`` with no arguments prunes the built-in SmolLM2-135M to 50%
on the built-in text with the preset for the backend it finds (``cpu``: about
ten minutes on two cores; ``full`` on a GPU/TPU), prints dense, magnitude and
ELSA perplexity, and writes the pruned HF model to ``runs/elsa/model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any

from elsa_jax.cli import config as config_lib
from elsa_jax.cli import output
from elsa_jax.data import assets
from elsa_jax.errors import UserError
from elsa_jax.run import train
from elsa_jax.sparsity import patterns

_ELSA_FIELDS = tuple(f.name for f in dataclasses.fields(train.ElsaConfig))
#: The flags of ``prune`` (argparse dests) -> the (section, field) of the RunConfig they set; the ELSA flags
#: (``_ELSA_FIELDS``) set the fields of its ``method.elsa``.
_RUN_FLAGS = {
    "model": ("model", "path"), "remat": ("model", "remat"), "scan_layers": ("model", "scan_layers"),
    "mesh": ("model", "mesh"),
    "calib": ("data", "calib"), "eval_text": ("data", "eval_text"), "eval_data_files": ("data", "eval_data_files"),
    "text_field": ("data", "text_field"),
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
_ZERO_IS_UNSET = ("calib_windows", "calib_seqlen")
#: The errors the command line reports as a message (exit 2, no traceback): bad input, a diverged run,
#: a run that will not fit, a file that cannot be read or written. Anything else is a bug.
USER_ERRORS = (UserError, ValueError, OSError, FloatingPointError, MemoryError)


def _mesh(text: str) -> tuple[int, int]:
  try:
    data, model = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh takes DATAxMODEL such as 4x2 or -1x1, got {text!r}") from None
  return data, model


def _limit(text: str) -> int | float:
  value = float(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"--limit must be positive (documents per task, or a fraction < 1), got {text}")
  return value if value < 1 else int(value)


def _add_task_args(p: argparse.ArgumentParser, flag: str) -> None:
  g = p.add_argument_group("zero-shot tasks (lm-evaluation-harness: pip install 'elsa_jax[eval]')")
  g.add_argument(flag, dest="tasks", help="comma-separated lm-eval tasks, e.g. boolq,rte,hellaswag,winogrande,"
                                          "arc_easy,arc_challenge,openbookqa (the paper's 7)")
  g.add_argument("--include-path", help="a folder of extra lm-eval task YAMLs")
  g.add_argument("--num-fewshot", type=int, help="few-shot examples per request (default: each task's, 0 here)")
  g.add_argument("--limit", type=_limit, help="at most N documents per task (or a fraction < 1)")
  g.add_argument("--task-batch-size", type=int, default=8, help="rows per compiled batch of the harness")


def _task_spec(args: argparse.Namespace) -> config_lib.TaskSpec | None:
  """The zero-shot tasks of ``--tasks``/``--eval-tasks`` and their flags, or None."""
  if not args.tasks:
    for flag in ("include_path", "num_fewshot", "limit"):
      if getattr(args, flag) is not None:
        raise ValueError(f"--{flag.replace('_', '-')} only applies with --tasks / --eval-tasks.")
    return None
  return config_lib.TaskSpec(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                             include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=args.task_batch_size)


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
  g.add_argument("--allocation", help="uniform (every matrix at --sparsity) | owl (per layer from its outlier ratio, any "
                                      "method) | global (ELSA: one threshold over every matrix); default owl for "
                                      "--method elsa except with --preset paper or N:M, else uniform")
  g.add_argument("--owl-m", type=float, help="OWL's outlier threshold, times a layer's mean Wanda score (5)")
  g.add_argument("--owl-lambda", type=float, help="OWL's half-width of the layer sparsities (0.08)")
  g.add_argument("--global-min", type=float, help="--allocation global: the least sparsity of a matrix "
                                                  "(default --sparsity - 0.1)")
  g.add_argument("--global-max", type=float, help="--allocation global: the most sparsity of a matrix "
                                                  "(default the smaller of --sparsity + 0.1 and (1 + --sparsity) / 2)")
  g.add_argument("--distill", type=float, help="A in [0, 1]: train on (1 - A) CE + A T^2 KL(dense || pruned), the "
                                             "dense model a frozen teacher (ADMM methods and --finetune-steps; 0.5 for "
                                             "--method elsa except with --preset paper, else 0)")
  g.add_argument("--distill-temp", type=float, help="T > 0, the softmax temperature of --distill (1)")
  g.add_argument("--squarehead", action="store_true",
                 help="add SquareHead's per-block loss, mean ||h - h_dense||^2 / ||h_dense||^2, to the distillation "
                      "term (needs --distill)")


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
  if "sparsity" in elsa and "pattern" in elsa:
    pattern = patterns.parse(elsa["pattern"])
    if pattern.n_m is not None and elsa["sparsity"] != pattern.sparsity:
      raise ValueError(f"--sparsity {elsa['sparsity']} contradicts --pattern {pattern}, which prunes "
                       f"{output.percent(pattern.sparsity)} of every matrix ({pattern.n} of every {pattern.m} "
                       f"kept); drop --sparsity.")
  tasks = _task_spec(args)
  if tasks is not None:
    sections.setdefault("evaluation", {})["tasks"] = tasks
  return config_lib.override(config_lib.resolve_preset(args.preset), elsa=elsa, **sections)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="elsa-jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command")

  p = sub.add_parser("prune", help="prune a model (ELSA or a baseline) and export it")
  p.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a .gguf, an HF dir or hub id")
  p.add_argument("--calib", default="default", help="calibration text: 'default', .txt/.jsonl, dir, or hf:NAME")
  p.add_argument("--eval-text", default="default",
                 help="evaluation text, same forms as --calib, or a standard set: wikitext2 | c4")
  p.add_argument("--eval-data-files", help="a local copy of the --eval-text set's file (offline; same schema)")
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
  _add_task_args(p, "--eval-tasks")
  p.add_argument("--checkpoint-every", type=int, default=100, help="save every N steps (0: only at the end)")
  p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
  p.add_argument("--no-compare-magnitude", action="store_true", help="skip the magnitude baseline evaluation")
  p.add_argument("--no-dense-eval", action="store_true", help="skip the dense model's evaluation")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing exported model, and start afresh where the checkpoints cannot be "
                      "resumed (other settings, damaged)")
  p.add_argument("--distributed", action="store_true",
                 help="join a multi-process run (jax.distributed; see elsa_jax.run.distributed)")
  p.add_argument("--remat", nargs="?", const="full", default=False,
                 help="rematerialise each decoder layer in the backward pass: full (the default of the bare flag; "
                      "least memory, ~1/3 more compute) | dots | dots_no_batch")
  p.add_argument("--scan-layers", action="store_true",
                 help="run the decoder layers as one lax.scan (compile time independent of depth)")
  _add_elsa_args(p)

  e = sub.add_parser("eval", help="perplexity, zero-shot tasks (lm-eval) and sparsity of a model")
  e.add_argument("--model", default="default")
  e.add_argument("--eval-text", help="perplexity text: default | .txt/.jsonl | hf:NAME | wikitext2 | c4 "
                                     "(default: 'default', none when --tasks is given)")
  e.add_argument("--eval-data-files", help="a local copy of the --eval-text set's file (offline; same schema)")
  e.add_argument("--text-field", default="text")
  e.add_argument("--seqlen", "--eval-seqlen", dest="seqlen", type=int, default=1024, help="tokens per window")
  e.add_argument("--windows", type=int, default=0, help="at most this many windows (0: all)")
  e.add_argument("--compute-dtype", default="float32")
  e.add_argument("--mesh", type=_mesh, help="DATAxMODEL device mesh of the zero-shot tasks (default: one device)")
  _add_task_args(e, "--tasks")
  e.add_argument("--output", help="JSON file of the results (default with --tasks: eval.json)")

  x = sub.add_parser("export", help="finalize the latest checkpoint of a run and write an HF model")
  x.add_argument("--run-dir", required=True)
  x.add_argument("--output", help="default: RUN_DIR/model")
  x.add_argument("--overwrite", action="store_true")
  x.add_argument("--format", choices=("dense", "bitmask"), default="dense",
                 help="dense (default: plain HF weights every runtime reads) | bitmask (each pruned matrix as a "
                      "bitmask + its nonzeros, or N:M values + indices, whichever is smaller; "
                      "elsa-jax densify turns it back)")

  d = sub.add_parser("densify", help="turn a compact (--format bitmask) model directory into a plain dense HF one")
  d.add_argument("input", help="the compact HF directory")
  d.add_argument("output", help="the dense HF directory to write")
  d.add_argument("--overwrite", action="store_true")
  d.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
  return parser


def _evaluate(args: argparse.Namespace, pipeline: Any) -> None:
  """``elsa-jax eval``: perplexity (when a text is given, or no task), lm-eval's table, the JSON."""
  tasks = _task_spec(args)
  eval_text = args.eval_text if args.eval_text is not None or tasks is not None else config_lib.DEFAULT_TEXT
  out_path = args.output or ("eval.json" if tasks is not None else None)
  result = pipeline.evaluate(args.model, eval_text, seqlen=args.seqlen, windows=args.windows,
                             text_field=args.text_field, compute_dtype=args.compute_dtype,
                             eval_data_files=args.eval_data_files, tasks=tasks, mesh=args.mesh)
  lm_eval_results = result.pop("lm_eval", None)
  if lm_eval_results is not None:
    print(pipeline.harness().results_table(lm_eval_results))
  if "perplexity" in result:
    print(f"{result['label']}: {result['perplexity']:.3f}")
  print(output.dumps(result, indent=2))
  if out_path:
    body = dict(result, lm_eval=lm_eval_results) if lm_eval_results is not None else result
    text = (pipeline.harness().zero_shot.to_json(body) if lm_eval_results is not None
            else output.dumps(body, indent=2))
    assets.atomic_write_bytes(pathlib.Path(out_path), text.encode())
    print(f"wrote {out_path}")


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns 0, or 2 after printing the message of a user error (:data:`USER_ERRORS`)."""
  output.configure_logging()
  argv = sys.argv[1:] if argv is None else argv
  parser = build_parser()
  args = parser.parse_args(argv or ["prune"])
  try:
    if getattr(args, "distributed", False):
      from elsa_jax.run import distributed

      distributed.initialize()
    if args.command == "densify":  # numpy and safetensors only
      from elsa_jax.models import safetensors_dir

      path = safetensors_dir.densify_directory(args.input, args.output, max_shard_size=args.max_shard_size,
                                               overwrite=args.overwrite)
      print(f"wrote {path}")
      return 0
    from elsa_jax.cli import jobs as pipeline

    if args.command == "prune":
      summary = pipeline.prune(run_config(args))
      keys = [k for k in summary if k.endswith("_ppl")]
      print(output.dumps({k: round(summary[k], 3) for k in keys}))
    elif args.command == "eval":
      _evaluate(args, pipeline)
    elif args.command == "export":
      path = pipeline.export_run(args.run_dir, args.output, overwrite=args.overwrite, sparse_format=args.format)
      print(f"wrote {path}")
    else:
      parser.print_help()
      return 2
  except USER_ERRORS as err:
    print(f"elsa-jax: error: {output.error_message(err)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
