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
"""The jobs a user runs: prune a model, evaluate it, export it.

Each job validates every input before doing any work (model path, sparsity,
text long enough, mesh shape, checkpoint configuration, output directory), so
bad input fails in seconds and never leaves a half-written output.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elsa_jax import models
from elsa_jax.cli import config as config_lib
from elsa_jax.cli import output
from elsa_jax.cli.preflight import (  # noqa: F401  (re-exported: the jobs' checks)
    RUN_ENTRIES,
    check_finite_weights,
    check_memory,
    check_output_dir,
    check_pattern_fits,
    check_run_dir,
    check_writable,
)
from elsa_jax.optim import finalize as finalize_lib
from elsa_jax.files import atomic_directory
from elsa_jax.data import assets
from elsa_jax.data import fingerprint
from elsa_jax.data import perplexity_sets
from elsa_jax.oneshot import registry as oneshot_registry
from elsa_jax.oneshot import owl as owl_lib
from elsa_jax.oneshot import walk as baselines
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run import lock as lock_lib
from elsa_jax.run.loading import LoadedModel, load_model, model_config  # noqa: F401  (model_config re-exported)
from elsa_jax.data import documents as data_lib
from elsa_jax.data import evaluation as evaluate_lib
from elsa_jax.run import checks
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import teacher as teacher_lib
from elsa_jax.run import train
from elsa_jax.sparsity import patterns

logger = logging.getLogger(__name__)

# The names of the methods and defaults, defined in elsa_jax.cli.config.
DEFAULT_MODEL = config_lib.DEFAULT_MODEL
DEFAULT_TEXT = config_lib.DEFAULT_TEXT
ADMM_METHODS = config_lib.ADMM_METHODS
METHODS = config_lib.METHODS
INIT_METHODS = config_lib.INIT_METHODS
SAFE_RHO = config_lib.SAFE_RHO
#: What a run directory of ours holds, besides hidden temporaries (``.name.*``).


def calibration_ids(tokens, *, windows: int, seqlen: int, seed: int) -> np.ndarray:
  """``[windows, seqlen]`` token ids for one-shot pruning, the same on every process."""
  sampler = data_lib.CalibrationWindows(tokens, seqlen=seqlen - 1, batch_size=windows, seed=seed + 7919)
  return sampler.batch(0)


def _logits_fn(graphdef, compute_dtype, params=None):
  # Params sharded over a mesh (possibly across processes): every process gets the whole logits.
  first = jax.tree.leaves(params)[0] if params is not None else None
  sharding = getattr(first, "sharding", None)
  out = sharding_lib.replicated(sharding.mesh) if isinstance(sharding, jax.sharding.NamedSharding) else None
  apply = models.architecture_of(graphdef).apply

  @functools.partial(jax.jit, out_shardings=out)
  def logits_fn(params, ids):
    cparams = jax.tree.map(lambda p: p.astype(compute_dtype), params)
    return apply(graphdef, cparams, ids)

  return logits_fn


def perplexity_of(model: LoadedModel, params: Any, eval_ids: np.ndarray, *, seqlen: int,
                  max_windows: int = 0, batch_size: int = 4, compute_dtype="float32") -> float:
  fn = _logits_fn(model.graphdef, jnp.dtype(compute_dtype), params)
  result = evaluate_lib.perplexity(
      lambda ids: fn(params, ids), eval_ids, seqlen=seqlen, batch_size=batch_size,
      max_windows=max_windows or None,
  )
  return float(result)


def export(model: LoadedModel, params: Any, out: str | pathlib.Path, *, overwrite: bool = False,
           extra: dict[str, Any] | None = None, sparse_format: str = "dense") -> pathlib.Path:
  """Writes an HF directory (config, safetensors, tokenizer, sparsity report) atomically.

  ``sparse_format`` is :func:`elsa_jax.models.save_pretrained`'s: "dense" or "bitmask" (compact).

  Raises:
    OSError: the directory could not be written (a full disk...); nothing is left at ``out``.
  """
  out = pathlib.Path(out)
  check_output_dir(out, overwrite)
  models.safetensors_dir.check_sparse_format(sparse_format)
  check_writable(out)
  host_params = jax.device_get(params)
  from safetensors import SafetensorError

  try:
    with atomic_directory(out) as tmp:
      models.save_pretrained((model.graphdef, host_params), model.config, tmp, overwrite=True,
                             sparse_format=sparse_format)
      model.tokenizer.save_pretrained(tmp)
      report = finalize_lib.sparsity_report(host_params, model.architecture.prunable)
      info = {"source_model": model.source, "sparsity_report": report}
      info.update(extra or {})
      (tmp / "elsa_jax.json").write_text(output.dumps(info, indent=2))
  except (OSError, SafetensorError) as err:  # safetensors reports a full disk as "... (os error 28)"
    code = getattr(err, "errno", None) or next((int(m) for m in re.findall(r"os error (\d+)", str(err))), None)
    if code is None:
      raise
    raise OSError(code, f"{os.strerror(code)} while writing the model (nothing was left there)", str(out)) from err
  return out


class _Inputs(NamedTuple):
  """What :func:`prune` reads before any work: the model, its text, and the one-shot calibration windows."""

  loaded: LoadedModel
  windows: data_lib.CalibrationWindows
  eval_text: perplexity_sets.EvalText
  oneshot_ids: np.ndarray | None


def _check_run(run: config_lib.RunConfig) -> jax.sharding.Mesh:
  """The checks that need the disk or the devices, before any weight is read; returns the mesh.

  The values themselves were checked when ``run`` was built.
  """
  check_run_dir(pathlib.Path(run.output.dir))
  check_output_dir(pathlib.Path(run.output.dir) / "model", run.output.overwrite)
  for source in (run.data.calib, run.data.eval_text):
    if source not in perplexity_sets.SETS:
      data_lib.check_source(source)
  mesh = sharding_lib.make_mesh(*run.model.mesh)
  if run.evaluation.tasks is not None:
    check_tasks(run.evaluation.tasks)
  cfg = run.method.hyperparameters
  sharding_lib.fits_mesh(cfg.batch_size, mesh)
  check_pattern_fits(run.model.path, cfg.pattern)
  if run.method.trained:
    check_memory(run.model.path, cfg, mesh, remat=run.model.remat, scan_layers=run.model.scan_layers)
  return mesh


def _needs_calibration(method: config_lib.MethodSpec) -> bool:
  """Whether a method reads one-shot calibration windows (Wanda, SparseGPT, SAFE+'s activation norms)."""
  return (oneshot_registry.needs_calibration(method.name) or oneshot_registry.needs_calibration(method.init)
          or method.hyperparameters.score_source == "activations" or method.hyperparameters.allocation == "owl")


def _load_inputs(run: config_lib.RunConfig, mesh: jax.sharding.Mesh) -> _Inputs:
  """Loads the model and tokenises the text; refuses an evaluation text shorter than one window."""
  cfg, data, eval_seqlen = run.method.hyperparameters, run.data, run.evaluation.seqlen
  loaded = load_model(run.model.path, remat=run.model.remat, scan_layers=run.model.scan_layers, mesh=mesh)
  calib_docs = data_lib.load_documents(data.calib, split="calibration", text_field=data.text_field)
  calib_tokens = data_lib.tokenize_documents(loaded.tokenizer, calib_docs)
  windows = data_lib.CalibrationWindows(
      calib_tokens, seqlen=cfg.seqlen, batch_size=cfg.batch_size * cfg.grad_accum, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
  )
  eval_text = _evaluation_text(data.eval_text, loaded.tokenizer, seqlen=eval_seqlen, text_field=data.text_field,
                               data_files=data.eval_data_files, flag="--eval-seqlen")
  oneshot_ids = None
  if _needs_calibration(run.method):
    oneshot_ids = calibration_ids(calib_tokens, windows=data.calib_windows, seqlen=run.calib_seqlen, seed=cfg.seed)
  return _Inputs(loaded, windows, eval_text, oneshot_ids)


def _open_checkpointer(run: config_lib.RunConfig) -> checkpoint_lib.RunCheckpointer | None:
  """The run's checkpoints (an ADMM method's; a one-shot run has nothing to resume)."""
  if not run.method.trained:
    return None
  config = {**run.checkpoint_config(), "fingerprints": fingerprint.fingerprints(run.model.path, run.data.calib),
            checkpoint_lib.ENVIRONMENT_KEY: output.environment()}
  return checkpoint_lib.RunCheckpointer(
      pathlib.Path(run.output.dir) / "checkpoints", config=config,
      save_every=run.output.checkpoint_every, keep=run.output.keep, restart=run.output.overwrite,
  )


def _start_summary(run: config_lib.RunConfig, inputs: _Inputs) -> dict[str, Any]:
  summary: dict[str, Any] = {"model": run.model.path, "method": run.method.name,
                             "config": dataclasses.asdict(run.method.hyperparameters),
                             "eval_seqlen": run.evaluation.seqlen}
  if run.method.trained:
    summary["init_method"] = run.method.init
  if inputs.oneshot_ids is not None:
    summary["oneshot_calibration"] = {"windows": run.data.calib_windows, "seqlen": run.calib_seqlen,
                                      "damp": run.method.damp}
  summary["environment"] = output.environment()
  return summary


def _evaluation_text(source: str, tokenizer: Any, *, seqlen: int, text_field: str, data_files: Any,
                     flag: str) -> perplexity_sets.EvalText:
  """The evaluation text's ids (a standard set by name, or any text source); refuses one shorter than a window."""
  text = perplexity_sets.evaluation_text(source, tokenizer, text_field=text_field, data_files=data_files)
  if len(text.ids) < seqlen:
    raise ValueError(f"the evaluation text has {len(text.ids)} tokens, fewer than one window of {seqlen}; "
                     f"give more text or a smaller {flag}.")
  return text


def _perplexity(run: config_lib.RunConfig, inputs: _Inputs, params: Any) -> float:
  seqlen = run.evaluation.seqlen
  return perplexity_of(inputs.loaded, params, inputs.eval_text.ids, seqlen=seqlen,
                       max_windows=inputs.eval_text.windows(seqlen, run.evaluation.windows))


def _ppl_line(inputs: _Inputs, run: config_lib.RunConfig, what: str, value: float) -> str:
  """``"dense wikitext2 perplexity @2048: 5.678"``: every printed figure names its text and seqlen."""
  return f"{what} {inputs.eval_text.label(run.evaluation.seqlen)}: {value:.3f}"


def _sparsity_target(cfg: train.ElsaConfig) -> tuple[float, tuple[int, int] | None]:
  """``(sparsity, (n, m) or None)`` of a config's pattern."""
  return train.pattern_sparsity(cfg), patterns.parse(cfg.pattern).n_m


def allocate(loaded: LoadedModel, cfg: train.ElsaConfig, oneshot_ids: np.ndarray | None) -> tuple[Any, Any]:
  """``(sparsity, info)``: the run's per-matrix sparsity tree and its summary under ``--allocation owl``
  (:func:`elsa_jax.oneshot.owl.owl_sparsities`, from the dense model's Wanda scores on the one-shot
  calibration windows); ``(None, None)`` for uniform; ``(None, bounds)`` for global, which ELSA's
  projection computes at every z-update (:func:`elsa_jax.optim.steps.global_counts`)."""
  if cfg.allocation == "global":
    return None, {"name": "global", "min": cfg.global_bounds[0], "max": cfg.global_bounds[1]}
  if cfg.allocation != "owl":
    return None, None
  tree, layers = owl_lib.owl_sparsities(loaded.graphdef, loaded.params, oneshot_ids, target=cfg.sparsity,
                                        m=cfg.owl_m, lmda=cfg.owl_lambda)
  return tree, {"name": "owl", "m": cfg.owl_m, "lambda": cfg.owl_lambda, "layer_sparsities": layers}


def _evaluate_baselines(run: config_lib.RunConfig, inputs: _Inputs, summary: dict[str, Any]) -> None:
  """The dense and the magnitude-pruned model's perplexity, where asked, printed as they come."""
  cfg, loaded = run.method.hyperparameters, inputs.loaded
  if run.evaluation.dense:
    summary["dense_ppl"] = _perplexity(run, inputs, loaded.params)
    print(_ppl_line(inputs, run, "dense", summary["dense_ppl"]), flush=True)
  sparsity, _ = _sparsity_target(cfg)
  if run.evaluation.compare_magnitude and run.method.name != "magnitude":
    mag = finalize_lib.finalize(loaded.params, sparsity=sparsity, pattern=cfg.pattern, projection="magnitude")
    summary["magnitude_ppl"] = _perplexity(run, inputs, mag)
    print(_ppl_line(inputs, run, f"magnitude {cfg.pattern} {output.percent(sparsity)}", summary["magnitude_ppl"]),
          flush=True)
    del mag


def _oneshot(run: config_lib.RunConfig, inputs: _Inputs, name: str, summary: dict[str, Any],
             allocation: Any = None) -> Any:
  """The one-shot method ``name`` applied to the dense model (at the ``allocation`` tree's per-matrix
  sparsities when given), timed into the summary."""
  loaded = inputs.loaded
  sparsity, nm = _sparsity_target(run.method.hyperparameters)
  sparsity = sparsity if allocation is None else allocation
  t = time.perf_counter()
  pruned = baselines.prune_oneshot(loaded.graphdef, loaded.params, inputs.oneshot_ids, method=name,
                                   sparsity=sparsity, n_m=nm, damp=run.method.damp)
  summary[f"{name}_seconds"] = time.perf_counter() - t
  return pruned


def _train(run: config_lib.RunConfig, inputs: _Inputs, mesh: jax.sharding.Mesh,
           checkpointer: checkpoint_lib.RunCheckpointer, summary: dict[str, Any], *,
           stop_after: int | None, progress: bool, allocation: Any = None, teacher: Any = None) -> Any | None:
  """Trains an ADMM method from its starting point (distilling from ``teacher``, the dense model, with
  ``--distill``) and finalizes it; None when stopped early."""
  cfg, loaded, init_method = run.method.hyperparameters, inputs.loaded, run.method.init
  sparsity, _ = _sparsity_target(cfg)
  fixed_score = None
  if cfg.score_source == "activations":
    fixed_score = train.activation_scores(
        baselines.calibration_statistics(loaded.graphdef, loaded.params, inputs.oneshot_ids), loaded.graphdef)
  start_params = loaded.params
  if init_method != "dense":
    start_params = _oneshot(run, inputs, init_method, summary, allocation)
    if init_method != "magnitude" or not run.evaluation.compare_magnitude:
      summary[f"{init_method}_ppl"] = _perplexity(run, inputs, start_params)
      print(_ppl_line(inputs, run, f"{init_method} (the starting point) {cfg.pattern} {output.percent(sparsity)}",
                      summary[f"{init_method}_ppl"]), flush=True)
  try:
    result = train.run(
        loaded.graphdef, start_params, cfg, inputs.windows.batch, mesh=mesh,
        logical_axes=models.logical_axes_of(loaded.graphdef, loaded.params),
        checkpointer=checkpointer, metrics_path=pathlib.Path(run.output.dir) / "metrics.jsonl", progress=progress,
        stop_after=stop_after, fixed_score=fixed_score, sparsity=allocation, teacher=teacher,
    )
  finally:
    checkpointer.close()
  del start_params
  if result.final_step < cfg.steps:  # interrupted on purpose (stop_after)
    summary["stopped_at"] = result.final_step
    return None
  pruned = finalize_lib.finalize(result.params, result.opt_state)  # the run's target, from its state
  summary["train_tokens_per_second"] = result.tokens_per_second
  if result.history:
    summary["final_metrics"] = result.history[-1]
  return pruned


def _finetune(run: config_lib.RunConfig, inputs: _Inputs, mesh: jax.sharding.Mesh, pruned: Any,
              summary: dict[str, Any], *, stop_after: int | None, progress: bool, teacher: Any = None) -> Any | None:
  """Masked recovery of ``pruned`` (``--finetune-steps``) with its own checkpoints; None when stopped early.

  The loop is :func:`elsa_jax.run.train.run` with :func:`~elsa_jax.run.train.make_finetune_optimizer`;
  it reads the calibration batches after those the method used, and resumes from
  ``output/finetune_checkpoints``.
  """
  cfg, loaded, out = run.finetune_config, inputs.loaded, pathlib.Path(run.output.dir)
  summary[f"{run.method.name}_before_finetune_ppl"] = _perplexity(run, inputs, pruned)
  print(f"{run.method.name} before the masked recovery perplexity: "
        f"{summary[f'{run.method.name}_before_finetune_ppl']:.3f}", flush=True)
  offset = run.method.hyperparameters.steps if run.method.trained else 0
  checkpointer = checkpoint_lib.RunCheckpointer(
      out / "finetune_checkpoints", config=run.finetune_checkpoint_config(),
      save_every=run.output.checkpoint_every, keep=run.output.keep)
  t = time.perf_counter()
  result = train.run(
      loaded.graphdef, pruned, cfg, lambda step: inputs.windows.batch(offset + step), mesh=mesh,
      logical_axes=models.logical_axes_of(loaded.graphdef, loaded.params), checkpointer=checkpointer,
      metrics_path=out / "finetune_metrics.jsonl", progress=progress, stop_after=stop_after,
      tx=train.make_finetune_optimizer(cfg, loaded.architecture.prunable), teacher=teacher)
  checkpointer.close()
  summary["finetune"] = {"steps": cfg.steps, "lr": cfg.lr, "seconds": time.perf_counter() - t,
                         "tokens_per_second": result.tokens_per_second,
                         "final_metrics": result.history[-1] if result.history else None}
  if result.final_step < cfg.steps:
    summary["finetune_stopped_at"] = result.final_step
    return None
  return result.params


def _export_pruned(run: config_lib.RunConfig, inputs: _Inputs, pruned: Any, summary: dict[str, Any]) -> None:
  """Evaluates the pruned model and writes it (process 0: every process holds it whole) to ``output/model``."""
  cfg, name = run.method.hyperparameters, run.method.name
  check_finite_weights(pruned, f"the {name}-pruned weights")
  summary[f"{name}_ppl"] = _perplexity(run, inputs, pruned)
  print(_ppl_line(inputs, run, f"{name} {cfg.pattern} {output.percent(train.pattern_sparsity(cfg))}",
                  summary[f"{name}_ppl"]), flush=True)
  report = finalize_lib.sparsity_report(jax.device_get(pruned), inputs.loaded.architecture.prunable)
  summary["sparsity"], summary["sparsity_per_matrix"] = report["overall"], report["per_matrix"]
  if jax.process_index() == 0:
    export(inputs.loaded, pruned, pathlib.Path(run.output.dir) / "model", overwrite=run.output.overwrite,
           extra={"summary": summary})


def harness():
  """:mod:`elsa_jax.harness`, or a ValueError that says how to install lm-eval (the optional extra)."""
  try:
    from elsa_jax import harness as harness_lib
  except ImportError as err:
    raise ValueError(f"zero-shot tasks run through lm-evaluation-harness, which is not installed ({err}); "
                     f"pip install 'elsa_jax[eval]'.") from None
  return harness_lib


def check_tasks(spec: config_lib.TaskSpec) -> None:
  """Refuses, before any weight is read, tasks that lm-eval does not know (or a missing lm-eval)."""
  harness().zero_shot.task_manager(spec.tasks, spec.include_path)


def zero_shot(model: LoadedModel, params: Any, spec: config_lib.TaskSpec, *, mesh: jax.sharding.Mesh | None = None,
              compute_dtype: str = "float32") -> dict[str, Any]:
  """lm-eval's results of ``spec``'s tasks on ``model`` with ``params`` (the JAX backend, in memory)."""
  lib = harness()
  lm = lib.ElsaLM(model=model, params=params, batch_size=spec.batch_size, dtype=compute_dtype, mesh=mesh)
  return lib.evaluate(lm, spec.tasks, include_path=spec.include_path, num_fewshot=spec.num_fewshot,
                      limit=spec.limit)


def _zero_shot_pruned(run: config_lib.RunConfig, inputs: _Inputs, pruned: Any, mesh: jax.sharding.Mesh,
                      summary: dict[str, Any]) -> None:
  """The ``--eval-tasks`` of the pruned model: lm-eval's table printed, scores in the summary and
  lm-eval's whole results in ``output/zero_shot.json``."""
  spec = run.evaluation.tasks
  if spec is None:
    return
  results = zero_shot(inputs.loaded, pruned, spec, mesh=mesh)
  lib = harness()
  summary["zero_shot"] = lib.task_scores(results)
  print(lib.results_table(results), flush=True)
  if jax.process_index() == 0:
    assets.atomic_write_bytes(pathlib.Path(run.output.dir) / "zero_shot.json", lib.zero_shot.to_json(results).encode())


def _write_summary(run: config_lib.RunConfig, summary: dict[str, Any], t0: float) -> None:
  out = pathlib.Path(run.output.dir)
  summary["wall_seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    output.write_json(out / "summary.json", summary)
  print(f"wrote the pruned model to {out / 'model'}", flush=True)


def prune(run: config_lib.RunConfig, *, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Prunes ``run.model`` with ``run.method`` and writes the pruned HF model to ``run.output.dir/model``.

  ELSA, SAFE and SAFE+ train from the dense model or from a one-shot result
  (``run.method.init``); Wanda and SparseGPT (and SAFE+'s activation norms)
  read ``run.data.calib_windows`` windows of ``run.calib_seqlen`` tokens of
  the calibration text. Every input is checked before any work.

  The run directory ``run.output.dir`` holds ``checkpoints/`` (resumed
  automatically when the same command runs again), ``metrics.jsonl``,
  ``summary.json`` and the exported ``model/``.

  Args:
    run: the run's configuration (:mod:`elsa_jax.cli.config`).
    stop_after: stop (after saving a checkpoint) once this many optimizer
      steps have run; the summary then says ``stopped_at`` and nothing is exported.
    progress: show a progress bar.

  Returns:
    The summary (also written to ``summary.json``): perplexities, sparsity, timings.
  """
  t0 = time.perf_counter()
  mesh = _check_run(run)
  with lock_lib.RunLock(run.output.dir, flag="--output"):  # refuses at once a second run on the folder
    return _prune_locked(run, mesh, t0, stop_after=stop_after, progress=progress)


def _prune_locked(run: config_lib.RunConfig, mesh: jax.sharding.Mesh, t0: float, *, stop_after: int | None,
                  progress: bool) -> dict[str, Any]:
  """:func:`prune` once the run folder is locked."""
  inputs = _load_inputs(run, mesh)
  checkpointer = _open_checkpointer(run)
  summary = _start_summary(run, inputs)
  allocation, info = allocate(inputs.loaded, run.method.hyperparameters, inputs.oneshot_ids)
  if info is not None:  # uniform runs keep the summary they always had
    summary["allocation"] = info
  _evaluate_baselines(run, inputs, summary)
  # --distill's frozen dense model (a copy: training from it donates the loaded params), for both stages.
  teacher = teacher_lib.make_teacher(inputs.loaded.graphdef, inputs.loaded.params, run.method.hyperparameters, mesh)
  if run.method.trained:
    pruned = _train(run, inputs, mesh, checkpointer, summary, stop_after=stop_after, progress=progress,
                    allocation=allocation, teacher=teacher)
  else:
    pruned = _oneshot(run, inputs, run.method.name, summary, allocation)
  if pruned is not None and run.finetune_config is not None:
    pruned = _finetune(run, inputs, mesh, pruned, summary, stop_after=stop_after, progress=progress,
                       teacher=teacher)
  if pruned is None:
    return summary
  _export_pruned(run, inputs, pruned, summary)
  _zero_shot_pruned(run, inputs, pruned, mesh, summary)
  _write_summary(run, summary, t0)
  return summary


def evaluate(model: str = DEFAULT_MODEL, eval_text: str | None = DEFAULT_TEXT, *, seqlen: int = 1024,
             windows: int = 0, text_field: str = "text", compute_dtype: str = "float32",
             eval_data_files: str | None = None, tasks: config_lib.TaskSpec | None = None,
             mesh: tuple[int, int] | None = None) -> dict[str, Any]:
  """Perplexity (the field's protocol), zero-shot tasks (lm-eval) and sparsity report of a model.

  Args:
    model: What :func:`load_model` loads.
    eval_text: The perplexity text (a standard set by name, or any text source); None: no perplexity.
    seqlen, windows: Tokens per perplexity window, and at most this many windows (0: all, or the set's cap).
    text_field, eval_data_files: See :func:`elsa_jax.data.perplexity_sets.evaluation_text`.
    compute_dtype: Dtype the parameters compute in.
    tasks: lm-eval tasks to run, or None.
    mesh: ``(data, model)`` mesh sizes for the zero-shot tasks, or None for one device.

  Returns:
    ``model``, ``sparsity``; with a text ``perplexity``, ``seqlen``, ``windows``, ``eval_text``; with
    tasks ``zero_shot`` (the scores per task) and ``lm_eval`` (lm-eval's whole results).
  """
  config_lib.positive("--seqlen", seqlen)
  config_lib.positive("--windows", windows, allow_zero=True)
  checks.check_choice("compute_dtype", compute_dtype, train.CHOICES["compute_dtype"])
  if eval_text is not None and eval_text not in perplexity_sets.SETS:
    data_lib.check_source(eval_text)
  if tasks is not None:
    check_tasks(tasks)
  device_mesh = sharding_lib.make_mesh(*mesh) if mesh is not None else None
  loaded = load_model(model)
  out: dict[str, Any] = {"model": model}
  if eval_text is not None:
    text = _evaluation_text(eval_text, loaded.tokenizer, seqlen=seqlen, text_field=text_field,
                            data_files=eval_data_files, flag="--seqlen")
    n_windows = text.windows(seqlen, windows)
    out.update(eval_text=eval_text, label=text.label(seqlen), seqlen=seqlen, windows=n_windows,
               perplexity=perplexity_of(loaded, loaded.params, text.ids, seqlen=seqlen, max_windows=n_windows,
                                        compute_dtype=compute_dtype))
  out["sparsity"] = finalize_lib.sparsity_report(jax.device_get(loaded.params))["overall"]
  if tasks is not None:
    results = zero_shot(loaded, loaded.params, tasks, mesh=device_mesh, compute_dtype=compute_dtype)
    out.update(zero_shot=harness().task_scores(results), lm_eval=results)
  return out


def _restore(directory: pathlib.Path, run_config: dict[str, Any], params: Any, tx) -> tuple[int, Any, Any]:
  """The latest finished checkpoint in ``directory`` of a run of ``run_config`` with optimizer ``tx``."""
  checkpointer = checkpoint_lib.RunCheckpointer(directory, config=run_config, save_every=0, read_only=True)
  step, params, opt_state = checkpointer.restore_or(params, jax.eval_shape(tx.init, params))
  checkpointer.close()
  if step == 0:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint yet.")
  return step, params, opt_state


def export_run(run_dir: str | pathlib.Path, output: str | pathlib.Path | None = None, *,
               overwrite: bool = False, sparse_format: str = "dense") -> pathlib.Path:
  """Writes the latest checkpoint of a run as an HF model: the masked recovery's when the run has one
  (``finetune_checkpoints/``; its weights are already sparse), else the ADMM run's, finalized
  (``sparse_format``: see :func:`export`)."""
  models.safetensors_dir.check_sparse_format(sparse_format)
  run_dir = pathlib.Path(run_dir).resolve()
  checkpoints = run_dir / "finetune_checkpoints"
  run_config = checkpoint_lib.saved_config(checkpoints)
  if run_config is None:
    checkpoints = run_dir / "checkpoints"
    run_config = checkpoint_lib.saved_config(checkpoints)
  if run_config is None:
    raise FileNotFoundError(f"no checkpoints of a run in {run_dir} (no {run_dir / 'checkpoints'} with a "
                            f"{checkpoint_lib.CONFIG_FILE}); point --run-dir at the --output of an elsa-jax prune run.")
  out = pathlib.Path(output) if output else run_dir / "model"
  check_output_dir(out, overwrite)
  with lock_lib.RunLock(run_dir, flag="--run-dir"):  # no run writes these checkpoints meanwhile
    return _export_locked(run_dir, checkpoints, run_config, out, overwrite=overwrite,
                          sparse_format=sparse_format)


def _check_calibration_unchanged(run_config: dict[str, Any]) -> None:
  """SAFE+'s export recomputes its activation norms from the calibration text, which must be the run's."""
  saved = (run_config.get("fingerprints") or {}).get("calib")
  if saved and fingerprint.text_fingerprint(saved["path"]) != saved["fingerprint"]:
    raise ValueError(f"the calibration file {saved['path']} changed since the run; SAFE+'s export recomputes its "
                     f"activation norms from it, so restore the original file to export this run.")


def _export_locked(run_dir: pathlib.Path, checkpoints: pathlib.Path, run_config: dict[str, Any],
                   out: pathlib.Path, *, overwrite: bool, sparse_format: str) -> pathlib.Path:
  """:func:`export_run` once the run folder is locked."""
  cfg = train.ElsaConfig(**{k: v for k, v in run_config.items()
                            if k in {f.name for f in dataclasses.fields(train.ElsaConfig)}})
  if cfg.score_source == "activations":
    _check_calibration_unchanged(run_config)
  loaded = load_model(run_config["model"])
  if checkpoints.name == "finetune_checkpoints":
    cfg = dataclasses.replace(cfg, steps=run_config["finetune_steps"], lr=run_config["finetune_lr"], sam_rho=0.0)
    tx = train.make_finetune_optimizer(cfg, loaded.architecture.prunable)
    step, params, _ = _restore(checkpoints, run_config, loaded.params, tx)
    check_finite_weights(params, f"the weights of checkpoint step {step} in {checkpoints}")
    return export(loaded, params, out, overwrite=overwrite, extra={"finetune_checkpoint_step": step},
                  sparse_format=sparse_format)
  fixed_score = sparsity = None
  if cfg.score_source == "activations" or cfg.allocation == "owl":  # recompute them (deterministic)
    docs = data_lib.load_documents(run_config["calib"], split="calibration")
    ids = calibration_ids(data_lib.tokenize_documents(loaded.tokenizer, docs),
                          windows=run_config["oneshot_windows"], seqlen=run_config["oneshot_seqlen"],
                          seed=cfg.seed)
    sparsity, _ = allocate(loaded, cfg, ids)
    if cfg.score_source == "activations":  # SAFE+'s activation norms
      fixed_score = train.activation_scores(baselines.calibration_statistics(loaded.graphdef, loaded.params, ids),
                                            loaded.graphdef)
  tx = train.make_optimizer(cfg, fixed_score, sparsity)
  step, params, opt_state = _restore(run_dir / "checkpoints", run_config, loaded.params, tx)
  pruned = finalize_lib.finalize(params, opt_state)  # the run's target, from its state
  check_finite_weights(pruned, f"the weights of checkpoint step {step} in {run_dir / 'checkpoints'}")
  return export(loaded, pruned, out, overwrite=overwrite, extra={"checkpoint_step": step},
                sparse_format=sparse_format)
