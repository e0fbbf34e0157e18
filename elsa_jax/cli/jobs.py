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
import json
import logging
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elsa_jax import models
from elsa_jax.cli import config as config_lib
from elsa_jax.optim import finalize as finalize_lib
from elsa_jax.files import atomic_directory
from elsa_jax.oneshot import registry as oneshot_registry
from elsa_jax.oneshot import walk as baselines
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run.loading import LoadedModel, load_model, model_config
from elsa_jax.data import documents as data_lib
from elsa_jax.data import evaluation as evaluate_lib
from elsa_jax.data import assets
from elsa_jax.data import perplexity_sets
from elsa_jax.run import memory as memory_lib
from elsa_jax.run import sharding as sharding_lib
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


def calibration_ids(tokens, *, windows: int, seqlen: int, seed: int) -> np.ndarray:
  """``[windows, seqlen]`` token ids for one-shot pruning, the same on every process."""
  sampler = data_lib.CalibrationWindows(tokens, seqlen=seqlen - 1, batch_size=windows, seed=seed + 7919)
  return sampler.batch(0)


def check_memory(
    spec: str,
    cfg: train.ElsaConfig,
    mesh: jax.sharding.Mesh,
    *,
    remat: bool | str = False,
    scan_layers: bool = False,
    capacity_bytes: int | None = None,
) -> memory_lib.MemoryPrediction | None:
  """Refuses, before any weight is read, an ELSA run that will not fit a device.

  Compiles the train step abstractly (:func:`elsa_jax.run.memory.predict_memory`)
  and raises ``MemoryError`` with the numbers and the ways out when it needs
  more than the device holds. Returns the prediction, or None where the
  runtime reports no device memory (the CPU) and nothing is checked.
  """
  capacity_bytes = capacity_bytes or memory_lib.device_memory_bytes()
  if capacity_bytes is None:
    return None
  prediction = memory_lib.predict_memory(model_config(spec), cfg, mesh, remat=remat, scan_layers=scan_layers)
  logger.info("predicted per-device memory: %s", prediction.breakdown())
  memory_lib.check_fits(prediction, capacity_bytes)
  return prediction


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


def check_output_dir(path: pathlib.Path, overwrite: bool) -> None:
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(
        f"{path} already exists and is not empty; pass --overwrite to replace it or choose another --output."
    )


def export(model: LoadedModel, params: Any, out: str | pathlib.Path, *, overwrite: bool = False,
           extra: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes an HF directory (config, safetensors, tokenizer, sparsity report) atomically."""
  out = pathlib.Path(out)
  check_output_dir(out, overwrite)
  host_params = jax.device_get(params)
  with atomic_directory(out) as tmp:
    models.save_pretrained((model.graphdef, host_params), model.config, tmp, overwrite=True)
    model.tokenizer.save_pretrained(tmp)
    report = finalize_lib.sparsity_report(host_params, model.architecture.prunable)
    info = {"source_model": model.source, "sparsity_report": report}
    info.update(extra or {})
    (tmp / "elsa_jax.json").write_text(json.dumps(info, indent=2, default=float))
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
  check_output_dir(pathlib.Path(run.output.dir) / "model", run.output.overwrite)
  mesh = sharding_lib.make_mesh(*run.model.mesh)
  if run.evaluation.tasks is not None:
    check_tasks(run.evaluation.tasks)
  cfg = run.method.hyperparameters
  sharding_lib.fits_mesh(cfg.batch_size, mesh)
  if run.method.trained:
    check_memory(run.model.path, cfg, mesh, remat=run.model.remat, scan_layers=run.model.scan_layers)
  return mesh


def _needs_calibration(method: config_lib.MethodSpec) -> bool:
  """Whether a method reads one-shot calibration windows (Wanda, SparseGPT, SAFE+'s activation norms)."""
  return (oneshot_registry.needs_calibration(method.name) or oneshot_registry.needs_calibration(method.init)
          or method.hyperparameters.score_source == "activations")


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
  return checkpoint_lib.RunCheckpointer(
      pathlib.Path(run.output.dir) / "checkpoints", config=run.checkpoint_config(),
      save_every=run.output.checkpoint_every, keep=run.output.keep,
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
    print(_ppl_line(inputs, run, f"magnitude {cfg.pattern} {sparsity:.0%}", summary["magnitude_ppl"]), flush=True)
    del mag


def _oneshot(run: config_lib.RunConfig, inputs: _Inputs, name: str, summary: dict[str, Any]) -> Any:
  """The one-shot method ``name`` applied to the dense model, timed into the summary."""
  loaded = inputs.loaded
  sparsity, nm = _sparsity_target(run.method.hyperparameters)
  t = time.perf_counter()
  pruned = baselines.prune_oneshot(loaded.graphdef, loaded.params, inputs.oneshot_ids, method=name,
                                   sparsity=sparsity, n_m=nm, damp=run.method.damp)
  summary[f"{name}_seconds"] = time.perf_counter() - t
  return pruned


def _train(run: config_lib.RunConfig, inputs: _Inputs, mesh: jax.sharding.Mesh,
           checkpointer: checkpoint_lib.RunCheckpointer, summary: dict[str, Any], *,
           stop_after: int | None, progress: bool) -> Any | None:
  """Trains an ADMM method from its starting point and finalizes it; None when stopped early."""
  cfg, loaded, init_method = run.method.hyperparameters, inputs.loaded, run.method.init
  sparsity, _ = _sparsity_target(cfg)
  fixed_score = None
  if cfg.score_source == "activations":
    fixed_score = train.activation_scores(
        baselines.calibration_statistics(loaded.graphdef, loaded.params, inputs.oneshot_ids), loaded.graphdef)
  start_params = loaded.params
  if init_method != "dense":
    start_params = _oneshot(run, inputs, init_method, summary)
    if init_method != "magnitude" or not run.evaluation.compare_magnitude:
      summary[f"{init_method}_ppl"] = _perplexity(run, inputs, start_params)
      print(_ppl_line(inputs, run, f"{init_method} (the starting point) {cfg.pattern} {sparsity:.0%}",
                      summary[f"{init_method}_ppl"]), flush=True)
  result = train.run(
      loaded.graphdef, start_params, cfg, inputs.windows.batch, mesh=mesh,
      logical_axes=models.logical_axes_of(loaded.graphdef, loaded.params),
      checkpointer=checkpointer, metrics_path=pathlib.Path(run.output.dir) / "metrics.jsonl", progress=progress,
      stop_after=stop_after, fixed_score=fixed_score,
  )
  del start_params
  checkpointer.close()
  if result.final_step < cfg.steps:  # interrupted on purpose (stop_after)
    summary["stopped_at"] = result.final_step
    return None
  pruned = finalize_lib.finalize(result.params, result.opt_state)  # the run's target, from its state
  summary["train_tokens_per_second"] = result.tokens_per_second
  if result.history:
    summary["final_metrics"] = result.history[-1]
  return pruned


def _export_pruned(run: config_lib.RunConfig, inputs: _Inputs, pruned: Any, summary: dict[str, Any]) -> None:
  """Evaluates the pruned model and writes it (process 0: every process holds it whole) to ``output/model``."""
  cfg, name = run.method.hyperparameters, run.method.name
  summary[f"{name}_ppl"] = _perplexity(run, inputs, pruned)
  print(_ppl_line(inputs, run, f"{name} {cfg.pattern} {train.pattern_sparsity(cfg):.0%}", summary[f"{name}_ppl"]),
        flush=True)
  summary["sparsity"] = finalize_lib.sparsity_report(jax.device_get(pruned))["overall"]
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
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
  inputs = _load_inputs(run, mesh)
  checkpointer = _open_checkpointer(run)
  summary = _start_summary(run, inputs)
  _evaluate_baselines(run, inputs, summary)
  if run.method.trained:
    pruned = _train(run, inputs, mesh, checkpointer, summary, stop_after=stop_after, progress=progress)
    if pruned is None:
      return summary
  else:
    pruned = _oneshot(run, inputs, run.method.name, summary)
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


def export_run(run_dir: str | pathlib.Path, output: str | pathlib.Path | None = None, *,
               overwrite: bool = False) -> pathlib.Path:
  """Finalizes the latest checkpoint of a run and writes it as an HF model."""
  run_dir = pathlib.Path(run_dir)
  config_path = run_dir / "checkpoints" / "run_config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"no checkpoints of a run in {run_dir} (missing {config_path}); "
                            f"point --run-dir at the --output of an elsa-jax prune run.")
  run_config = json.loads(config_path.read_text())
  out = pathlib.Path(output) if output else run_dir / "model"
  check_output_dir(out, overwrite)
  cfg = train.ElsaConfig(**{k: v for k, v in run_config.items()
                            if k in {f.name for f in dataclasses.fields(train.ElsaConfig)}})
  loaded = load_model(run_config["model"])
  checkpointer = checkpoint_lib.RunCheckpointer(run_dir / "checkpoints", config=run_config, save_every=0)
  fixed_score = None
  if cfg.score_source == "activations":  # SAFE+: recompute the (deterministic) activation norms
    docs = data_lib.load_documents(run_config["calib"], split="calibration")
    ids = calibration_ids(data_lib.tokenize_documents(loaded.tokenizer, docs),
                          windows=run_config["oneshot_windows"], seqlen=run_config["oneshot_seqlen"],
                          seed=cfg.seed)
    fixed_score = train.activation_scores(baselines.calibration_statistics(loaded.graphdef, loaded.params, ids),
                                          loaded.graphdef)
  tx = train.make_optimizer(cfg, fixed_score)
  step, params, opt_state = checkpointer.restore_or(loaded.params, jax.eval_shape(tx.init, loaded.params))
  checkpointer.close()
  if step == 0:
    raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no finished checkpoint yet.")
  pruned = finalize_lib.finalize(params, opt_state)  # the run's target, from its state
  return export(loaded, pruned, out, overwrite=overwrite, extra={"checkpoint_step": step})
