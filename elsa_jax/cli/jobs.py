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
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elsa_jax import models
from elsa_jax.optim import finalize as finalize_lib
from elsa_jax.files import atomic_directory
from elsa_jax.data import assets
from elsa_jax.oneshot import registry as oneshot_registry
from elsa_jax.oneshot import walk as baselines
from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.data import documents as data_lib
from elsa_jax.data import evaluation as evaluate_lib
from elsa_jax.run import memory as memory_lib
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import train
from elsa_jax.sparsity import patterns

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
#: Pruning methods of :func:`prune`: the ADMM family (trained on the model's
#: loss) and the one-shot baselines (:data:`elsa_jax.oneshot.registry.METHODS`).
ADMM_METHODS = ("elsa", "safe", "safe+")
METHODS = ADMM_METHODS + oneshot_registry.ONESHOT_METHODS
#: Starting points of an ADMM method: the dense model or a one-shot baseline.
INIT_METHODS = ("dense",) + oneshot_registry.ONESHOT_METHODS
#: SAFE's SAM radius when ``--sam-rho`` is not given.
SAFE_RHO = 0.05
DEFAULT_TEXT = "default"

#: Presets. ``cpu``: the short run that fits ~10 minutes on a 2-core CPU.
#: ``full``: the budget of the measured prototype (1024 x 8 x 1024 tokens) for
#: one GPU. ``paper``: the authors' LLaMA-2-7B recipe (4096 x 8 x 2048, lr 2e-4,
#: Adam's own second moment as the score).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(steps=16, batch_size=2, seqlen=256, interval=4, lr=1e-3, eval_seqlen=512, eval_windows=8,
                oneshot_windows=32,
                compute_dtype="float32"),
    "full": dict(steps=1024, batch_size=8, seqlen=1024, interval=32, lr=1e-3, eval_seqlen=1024, eval_windows=0),
    "paper": dict(steps=4096, batch_size=8, seqlen=2048, interval=32, lr=2e-4, eval_seqlen=2048, eval_windows=0,
                  score_source="base_second_moment"),
}


def method_config(cfg: train.ElsaConfig, method: str) -> train.ElsaConfig:
  """The run config of an ADMM method: ELSA as given; SAFE = magnitude projection +
  sharpness-aware x-update; SAFE+ = SAFE with the activation-weighted projection."""
  if method == "safe":
    return dataclasses.replace(cfg, projection="magnitude", sam_rho=cfg.sam_rho or SAFE_RHO)
  if method == "safe+":
    return dataclasses.replace(cfg, projection="objective_aware", score_source="activations",
                               sam_rho=cfg.sam_rho or SAFE_RHO)
  return cfg


def calibration_ids(tokens, *, windows: int, seqlen: int, seed: int) -> np.ndarray:
  """``[windows, seqlen]`` token ids for one-shot pruning, the same on every process."""
  sampler = data_lib.CalibrationWindows(tokens, seqlen=seqlen - 1, batch_size=windows, seed=seed + 7919)
  return sampler.batch(0)


def resolve_preset(name: str) -> dict[str, Any]:
  """'auto' picks 'cpu' when JAX runs on the CPU and 'full' on an accelerator."""
  if name == "auto":
    name = "cpu" if jax.default_backend() == "cpu" else "full"
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of auto, {', '.join(PRESETS)}.")
  return dict(PRESETS[name])


@dataclasses.dataclass
class LoadedModel:
  """A model as the jobs use it: split, with its config (of its architecture) and tokenizer."""

  graphdef: Any
  params: Any
  config: Any
  tokenizer: Any
  source: str

  @property
  def architecture(self) -> models.Architecture:
    """The model's registered architecture (:func:`elsa_jax.models.architecture_of`)."""
    return models.architecture_of(self.graphdef)


def model_config(spec: str) -> Any:
  """The shape of the model ``spec`` names (see :func:`load_model`), without loading its weights."""
  if spec == DEFAULT_MODEL:
    return models.config_from_gguf_file(assets.default_model_path())
  if spec.endswith(".gguf"):
    if not os.path.exists(spec):
      raise FileNotFoundError(f"no GGUF file at {spec}; check the --model path.")
    return models.config_from_gguf_file(spec)
  return models.config_from_pretrained(spec)


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


def load_model(spec: str, *, param_dtype=jnp.float32, remat: bool | str = False,
               scan_layers: bool = False, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """Loads 'default', a ``.gguf`` file, an HF directory or a hub id, with its tokenizer.

  ``remat`` rematerialises each decoder layer in the backward pass;
  ``scan_layers`` runs the layers as one ``lax.scan`` (both options of every architecture, see
  :mod:`elsa_jax.models.base`). The architecture is the file's (:mod:`elsa_jax.models.registry`). With a
  ``mesh``, safetensors weights are read shard by shard straight into their
  training shardings (each process reads only its devices' slices); GGUF
  files (block-quantised) are read whole and placed later.
  """
  from transformers import AutoTokenizer

  if spec == DEFAULT_MODEL:
    path = assets.default_model_path()
    model, config = models.from_gguf(path, param_dtype=param_dtype)
    tokenizer = assets.default_tokenizer()
  elif spec.endswith(".gguf"):
    if not os.path.exists(spec):
      raise FileNotFoundError(f"no GGUF file at {spec}; check the --model path.")
    model, config = models.from_gguf(spec, param_dtype=param_dtype)
    tokenizer = models.tokenizer_from_gguf(spec)
  else:
    shardings = None
    if mesh is not None:
      shardings = lambda p, axes: sharding_lib.param_shardings(axes, p, mesh, sharding_lib.DEFAULT_RULES)
    model, config = models.from_pretrained(spec, param_dtype=param_dtype, shardings=shardings)
    tokenizer = AutoTokenizer.from_pretrained(spec)
  model.remat = remat
  model.scan_layers = scan_layers
  graphdef, params = models.split(model)
  return LoadedModel(graphdef, params, config, tokenizer, spec)


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


def prune(
    *,
    model: str = DEFAULT_MODEL,
    calib: str = DEFAULT_TEXT,
    eval_text: str = DEFAULT_TEXT,
    output: str | pathlib.Path = "runs/elsa",
    cfg: train.ElsaConfig,
    method: str = "elsa",
    mesh_shape: tuple[int, int] = (-1, 1),
    eval_seqlen: int = 1024,
    eval_windows: int = 0,
    checkpoint_every: int = 0,
    keep: int = 2,
    overwrite: bool = False,
    compare_magnitude: bool = True,
    evaluate_dense: bool = True,
    text_field: str = "text",
    stop_after: int | None = None,
    progress: bool = True,
    init_method: str = "dense",
    oneshot_windows: int = 128,
    oneshot_seqlen: int | None = None,
    damp: float = 0.01,
    remat: bool | str = False,
    scan_layers: bool = False,
) -> dict[str, Any]:
  """Prunes ``model`` to ``cfg.sparsity`` and writes the pruned HF model to ``output/model``.

  ``method`` is one of :data:`METHODS`. ELSA, SAFE and SAFE+ train from the
  dense model or from a one-shot result (``init_method``); Wanda and
  SparseGPT (and SAFE+'s activation norms) read ``oneshot_windows`` windows
  of ``oneshot_seqlen`` tokens (default ``cfg.seqlen``) of the calibration text.

  The run directory ``output`` holds ``checkpoints/`` (resumed automatically
  when the same command runs again), ``metrics.jsonl``, ``summary.json`` and
  the exported ``model/``.
  """
  t0 = time.perf_counter()
  out = pathlib.Path(output)
  model_dir = out / "model"
  check_output_dir(model_dir, overwrite)
  mesh = sharding_lib.make_mesh(*mesh_shape)
  sharding_lib.fits_mesh(cfg.batch_size, mesh)
  if method not in METHODS:
    raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}.")
  if init_method not in INIT_METHODS:
    raise ValueError(f"unknown --init-method {init_method!r}; choose one of {', '.join(INIT_METHODS)}.")
  if oneshot_windows < 1:
    raise ValueError(f"--calib-windows must be positive, got {oneshot_windows}.")
  cfg = method_config(cfg, method) if method in ADMM_METHODS else cfg
  oneshot_seqlen = oneshot_seqlen or cfg.seqlen

  models.remat_policy(remat)  # an unknown policy fails before any work
  if method in ADMM_METHODS:
    check_memory(model, cfg, mesh, remat=remat, scan_layers=scan_layers)
  loaded = load_model(model, remat=remat, scan_layers=scan_layers, mesh=mesh)
  calib_docs = data_lib.load_documents(calib, split="calibration", text_field=text_field)
  calib_tokens = data_lib.tokenize_documents(loaded.tokenizer, calib_docs)
  windows = data_lib.CalibrationWindows(
      calib_tokens, seqlen=cfg.seqlen, batch_size=cfg.batch_size * cfg.grad_accum, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
  )
  eval_docs = data_lib.load_documents(eval_text, split="evaluation", text_field=text_field)
  eval_ids = evaluate_lib.eval_tokens(loaded.tokenizer, eval_docs)
  if len(eval_ids) < eval_seqlen:
    raise ValueError(
        f"the evaluation text has {len(eval_ids)} tokens, fewer than one window of {eval_seqlen}; "
        f"give more text or a smaller --eval-seqlen."
    )

  oneshot_ids = None
  if (oneshot_registry.needs_calibration(method) or oneshot_registry.needs_calibration(init_method)
      or cfg.score_source == "activations"):
    oneshot_ids = calibration_ids(calib_tokens, windows=oneshot_windows, seqlen=oneshot_seqlen, seed=cfg.seed)

  checkpointer = None
  if method in ADMM_METHODS:
    run_config = {"model": model, "calib": calib, "method": method, "init_method": init_method,
                  "oneshot_windows": oneshot_windows, "oneshot_seqlen": oneshot_seqlen, "damp": damp,
                  **dataclasses.asdict(cfg)}
    checkpointer = checkpoint_lib.RunCheckpointer(
        out / "checkpoints", config=run_config, save_every=checkpoint_every, keep=keep,
    )

  summary: dict[str, Any] = {"model": model, "method": method, "config": dataclasses.asdict(cfg),
                             "eval_seqlen": eval_seqlen}
  if method in ADMM_METHODS:
    summary["init_method"] = init_method
  if oneshot_ids is not None:
    summary["oneshot_calibration"] = {"windows": oneshot_windows, "seqlen": oneshot_seqlen, "damp": damp}
  ppl = lambda p: perplexity_of(loaded, p, eval_ids, seqlen=eval_seqlen, max_windows=eval_windows)
  if evaluate_dense:
    summary["dense_ppl"] = ppl(loaded.params)
    print(f"dense perplexity: {summary['dense_ppl']:.3f}", flush=True)
  sparsity = train.pattern_sparsity(cfg)
  nm = patterns.parse(cfg.pattern).n_m
  if compare_magnitude and method != "magnitude":
    mag = finalize_lib.finalize(loaded.params, sparsity=sparsity, pattern=cfg.pattern, projection="magnitude")
    summary["magnitude_ppl"] = ppl(mag)
    print(f"magnitude {cfg.pattern} {sparsity:.0%} perplexity: {summary['magnitude_ppl']:.3f}", flush=True)
    del mag

  def oneshot(name):
    t = time.perf_counter()
    pruned = baselines.prune_oneshot(loaded.graphdef, loaded.params, oneshot_ids, method=name,
                                     sparsity=sparsity, n_m=nm, damp=damp)
    summary[f"{name}_seconds"] = time.perf_counter() - t
    return pruned

  if method in ADMM_METHODS:
    fixed_score = None
    if cfg.score_source == "activations":
      fixed_score = train.activation_scores(
          baselines.calibration_statistics(loaded.graphdef, loaded.params, oneshot_ids), loaded.graphdef)
    start_params = loaded.params
    if init_method != "dense":
      start_params = oneshot(init_method)
      if init_method != "magnitude" or not compare_magnitude:
        summary[f"{init_method}_ppl"] = ppl(start_params)
        print(f"{init_method} (the starting point) {cfg.pattern} {sparsity:.0%} perplexity: "
              f"{summary[f'{init_method}_ppl']:.3f}", flush=True)
    result = train.run(
        loaded.graphdef, start_params, cfg, windows.batch, mesh=mesh,
        logical_axes=models.logical_axes_of(loaded.graphdef, loaded.params),
        checkpointer=checkpointer, metrics_path=out / "metrics.jsonl", progress=progress,
        stop_after=stop_after, fixed_score=fixed_score,
    )
    del start_params
    checkpointer.close()
    if result.final_step < cfg.steps:  # interrupted on purpose (stop_after)
      summary["stopped_at"] = result.final_step
      return summary
    pruned = finalize_lib.finalize(result.params, result.opt_state)  # the run's target, from its state
    summary["train_tokens_per_second"] = result.tokens_per_second
    if result.history:
      summary["final_metrics"] = result.history[-1]
  else:
    pruned = oneshot(method)
  summary[f"{method}_ppl"] = ppl(pruned)
  print(f"{method} {cfg.pattern} {sparsity:.0%} perplexity: {summary[f'{method}_ppl']:.3f}", flush=True)
  summary["sparsity"] = finalize_lib.sparsity_report(jax.device_get(pruned))["overall"]
  if jax.process_index() == 0:  # every process holds the whole pruned model; one writes it
    export(loaded, pruned, model_dir, overwrite=overwrite, extra={"summary": summary})
  summary["wall_seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
  print(f"wrote the pruned model to {model_dir}", flush=True)
  return summary


def evaluate(model: str = DEFAULT_MODEL, eval_text: str = DEFAULT_TEXT, *, seqlen: int = 1024,
             windows: int = 0, text_field: str = "text", compute_dtype: str = "float32") -> dict[str, Any]:
  """Perplexity (the field's protocol) and sparsity report of a model."""
  loaded = load_model(model)
  docs = data_lib.load_documents(eval_text, split="evaluation", text_field=text_field)
  ids = evaluate_lib.eval_tokens(loaded.tokenizer, docs)
  if len(ids) < seqlen:
    raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}; "
                     f"give more text or a smaller --seqlen.")
  n_windows = len(ids) // seqlen if not windows else min(windows, len(ids) // seqlen)
  ppl = perplexity_of(loaded, loaded.params, ids, seqlen=seqlen, max_windows=windows,
                      compute_dtype=compute_dtype)
  report = finalize_lib.sparsity_report(jax.device_get(loaded.params))
  return {"model": model, "perplexity": ppl, "seqlen": seqlen, "windows": n_windows,
          "sparsity": report["overall"]}


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
