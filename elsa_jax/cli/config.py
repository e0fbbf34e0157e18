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
"""The configuration of one ``elsa-jax prune`` run: a frozen :class:`RunConfig`.

A run is described by five small frozen sections, each validated once, when it
is built (``__post_init__``), with messages that name the command-line flag:

* :class:`ModelSpec`: which model, how its layers run, over which device mesh;
* :class:`DataSpec`: the calibration and evaluation text, and the one-shot
  calibration windows (Wanda, SparseGPT, SAFE+'s activation norms);
* :class:`MethodSpec`: the pruning method, its starting point and its
  hyperparameters (:class:`elsa_jax.run.train.ElsaConfig`, the resumable part);
* :class:`EvalSpec`: the perplexity protocol and the baselines evaluated;
* :class:`OutputSpec`: the run directory, checkpoint cadence and overwriting.

The presets (:data:`PRESETS`) are RunConfigs; the command line replaces the
fields whose flags are given (:func:`override`).

Example:
  >>> from elsa_jax.cli import config
  >>> run = config.override(config.PRESETS["cpu"], method={"name": "safe"}, elsa={"sparsity": 0.7})
  >>> run.method.elsa.steps, run.method.hyperparameters.sam_rho, run.data.calib_windows
  (16, 0.05, 32)
  >>> config.MethodSpec(name="sparse")
  Traceback (most recent call last):
  ...
  ValueError: unknown --method 'sparse'; choose one of elsa, safe, safe+, magnitude, wanda, sparsegpt.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import jax

from elsa_jax import models
from elsa_jax.data import fingerprint
from elsa_jax.oneshot import registry as oneshot_registry
from elsa_jax.run import train
from elsa_jax.run.loading import DEFAULT_MODEL
from elsa_jax.sparsity import patterns

DEFAULT_TEXT = "default"
#: Pruning methods: the ADMM family (trained on the model's loss) and the
#: one-shot baselines (:mod:`elsa_jax.oneshot.walk`).
ADMM_METHODS = ("elsa", "safe", "safe+")
METHODS = ADMM_METHODS + oneshot_registry.ONESHOT_METHODS
#: Starting points of an ADMM method: the dense model or a one-shot baseline.
INIT_METHODS = ("dense",) + oneshot_registry.ONESHOT_METHODS
#: SAFE's SAM radius when ``--sam-rho`` is not given.
SAFE_RHO = 0.05
#: ``--method elsa``'s settings beyond the paper, chosen by measurement (BENCHMARKS.md, "Quality levers":
#: each won at 70% and at 90% sparsity on the same tokens): distillation from the dense model
#: (``--distill 0.5``) and OWL's per-layer sparsity (``--allocation owl``). The ``cpu`` and ``full``
#: presets apply them where their flag is not given (``--distill 0 --allocation uniform`` is the paper's
#: ELSA, as is the ``paper`` preset); the baselines run as published.
ELSA_LEVERS = (("distill", 0.5), ("allocation", "owl"))


def method_config(cfg: train.ElsaConfig, method: str) -> train.ElsaConfig:
  """The run config of an ADMM method: ELSA as given; SAFE = magnitude projection +
  sharpness-aware x-update; SAFE+ = SAFE with the activation-weighted projection."""
  if method == "safe":
    return dataclasses.replace(cfg, projection="magnitude", sam_rho=cfg.sam_rho or SAFE_RHO)
  if method == "safe+":
    return dataclasses.replace(cfg, projection="objective_aware", score_source="activations",
                               sam_rho=cfg.sam_rho or SAFE_RHO)
  return cfg


def with_levers(cfg: train.ElsaConfig, levers: tuple[tuple[str, Any], ...]) -> train.ElsaConfig:
  """``cfg`` with the ``levers`` (``(field, value)`` pairs, e.g. :data:`ELSA_LEVERS`) that it can take:
  OWL only where its layer range fits (``--sparsity -+ --owl-lambda`` inside ``[0, 1)``) and the
  pattern leaves the counts free (not N:M); elsewhere the allocation stays as it is."""
  take = dict(levers)
  if take.get("allocation") == "owl":
    free = patterns.parse(cfg.pattern).n_m is None
    if not (free and 0.0 <= cfg.sparsity - cfg.owl_lambda and cfg.sparsity + cfg.owl_lambda < 1.0):
      del take["allocation"]
  return dataclasses.replace(cfg, **take) if take else cfg


def positive(flag: str, value: int | None, *, allow_none: bool = False, allow_zero: bool = False) -> None:
  """Raises ValueError naming ``flag`` unless ``value`` is a positive (or, ``allow_zero``, non-negative) integer."""
  if value is None and allow_none:
    return
  if value is None or value < (0 if allow_zero else 1):
    bound = "a non-negative" if allow_zero else "a positive"
    raise ValueError(f"{flag} must be {bound} integer, got {value}.")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model and how it runs.

  Attributes:
    path: ``--model``: 'default', a ``.gguf`` file, an HF directory or a hub id.
    remat: ``--remat``: False, True or a policy of
      :data:`elsa_jax.models.REMAT_POLICIES` ('full', 'dots', 'dots_no_batch').
    scan_layers: ``--scan-layers``: the decoder layers as one ``lax.scan``.
    mesh: ``--mesh``: ``(data, model)`` device mesh sizes, data -1 for all devices.
  """

  path: str = DEFAULT_MODEL
  remat: bool | str = False
  scan_layers: bool = False
  mesh: tuple[int, int] = (-1, 1)

  def __post_init__(self):
    if not self.path:
      raise ValueError("--model is empty; give 'default', a .gguf file, an HF directory or a hub id.")
    if not isinstance(self.remat, bool) and self.remat not in models.REMAT_POLICIES:
      raise ValueError(f"unknown --remat {self.remat!r}; choose one of {', '.join(models.REMAT_POLICIES)} "
                       f"(the bare flag means full).")
    data, model = self.mesh
    if model < 1 or (data < 1 and data != -1):
      raise ValueError(f"--mesh {data}x{model} is not a mesh; give DATAxMODEL with MODEL >= 1 and DATA >= 1 "
                       f"(or -1 for every device), such as 4x2 or -1x1.")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The text of a run.

  Attributes:
    calib: ``--calib``: the calibration text ('default', ``.txt``/``.jsonl``,
      a folder, a ``datasets`` folder or ``hf:NAME``).
    eval_text: ``--eval-text``: the held-out text, in the same forms, or a standard
      perplexity set by name (``wikitext2``, ``c4``: :mod:`elsa_jax.data.perplexity_sets`).
    eval_data_files: ``--eval-data-files``: a local copy of a standard set's file (offline), or the
      ``data_files`` of an ``hf:`` evaluation text.
    text_field: ``--text-field``: the field of JSONL/datasets records holding the text.
    calib_windows: ``--calib-windows``: one-shot calibration windows (Wanda,
      SparseGPT, SAFE+'s activation norms).
    calib_seqlen: ``--calib-seqlen``: tokens per such window (None: the ELSA ``seqlen``).
  """

  calib: str = DEFAULT_TEXT
  eval_text: str = DEFAULT_TEXT
  text_field: str = "text"
  calib_windows: int = 128
  calib_seqlen: int | None = None
  eval_data_files: str | None = None

  def __post_init__(self):
    if not self.calib or not self.eval_text:
      raise ValueError("--calib and --eval-text must name a text; 'default' is the built-in one.")
    positive("--calib-windows", self.calib_windows)
    positive("--calib-seqlen", self.calib_seqlen, allow_none=True)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """The pruning method.

  Attributes:
    name: ``--method``: one of :data:`METHODS`.
    init: ``--init-method``: the starting point of an ADMM method, one of :data:`INIT_METHODS`.
    damp: ``--damp``: SparseGPT's dampening, a fraction of the mean of ``diag(H)``.
    elsa: the hyperparameters as given (the ELSA flags); see :attr:`hyperparameters`.
    finetune_steps: ``--finetune-steps``: masked recovery after the method (0: none): Adam on the
      surviving weights with the mask frozen, on the next-token loss (distilled from the dense model
      with ``--distill``, as the method's), ``batch_size x seqlen`` tokens a step.
    finetune_lr: ``--finetune-lr``: its learning rate (linear decay to 0).
    levers: the preset's settings for ``--method elsa`` whose flags were not given (:data:`ELSA_LEVERS`),
      applied by :attr:`hyperparameters` (to ELSA and its masked recovery, not to the baselines).
  """

  name: str = "elsa"
  init: str = "dense"
  damp: float = 0.01
  elsa: train.ElsaConfig = train.ElsaConfig()
  finetune_steps: int = 0
  finetune_lr: float = 1e-4
  levers: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"unknown --method {self.name!r}; choose one of {', '.join(METHODS)}.")
    if self.init not in INIT_METHODS:
      raise ValueError(f"unknown --init-method {self.init!r}; choose one of {', '.join(INIT_METHODS)}.")
    if not self.damp >= 0:
      raise ValueError(f"--damp must be >= 0 (a fraction of the mean of diag(H)), got {self.damp}.")
    if not self.trained and self.elsa.allocation == "global":
      raise ValueError(f"--allocation global thresholds ELSA's projection score, which --method {self.name} does "
                       f"not have; use it with {', '.join(ADMM_METHODS)}, or --allocation owl.")
    positive("--finetune-steps", self.finetune_steps, allow_zero=True)
    if self.elsa.distill > 0 and not (self.trained or self.finetune_steps):
      raise ValueError(f"--distill trains against the dense model, which --method {self.name} (one-shot) does not; "
                       f"use it with {', '.join(ADMM_METHODS)} or with --finetune-steps N (the masked recovery).")
    if not self.finetune_lr > 0:
      raise ValueError(f"--finetune-lr must be positive, got {self.finetune_lr}.")
    self.hyperparameters  # pylint: disable=pointless-statement  (validates the levers' result now)

  @property
  def trained(self) -> bool:
    """Whether the method trains (ADMM) rather than pruning in one shot."""
    return self.name in ADMM_METHODS

  @functools.cached_property
  def hyperparameters(self) -> train.ElsaConfig:
    """The ElsaConfig the method runs with: ELSA's :attr:`levers` or SAFE's and SAFE+'s settings applied
    (:func:`with_levers`, :func:`method_config`)."""
    if not self.trained:
      return self.elsa
    return method_config(with_levers(self.elsa, self.levers) if self.name == "elsa" else self.elsa, self.name)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Zero-shot tasks run through lm-evaluation-harness (:mod:`elsa_jax.harness`).

  Attributes:
    tasks: ``--tasks`` / ``--eval-tasks``: lm-eval task names or globs.
    include_path: ``--include-path``: a folder of extra task YAMLs.
    num_fewshot: ``--num-fewshot``: few-shot examples per request (None: each task's default).
    limit: ``--limit``: at most this many documents per task (a fraction if below 1).
    batch_size: ``--task-batch-size``: rows per compiled batch.
  """

  tasks: tuple[str, ...]
  include_path: str | None = None
  num_fewshot: int | None = None
  limit: int | float | None = None
  batch_size: int = 8

  def __post_init__(self):
    if not self.tasks:
      raise ValueError("--tasks / --eval-tasks names no task; give lm-eval task names such as boolq,rte.")
    if self.include_path is not None and not pathlib.Path(self.include_path).is_dir():
      raise ValueError(f"--include-path {self.include_path} is not a folder; give the folder of your task YAMLs.")
    positive("--num-fewshot", self.num_fewshot, allow_none=True, allow_zero=True)
    positive("--task-batch-size", self.batch_size)
    if self.limit is not None and not self.limit > 0:
      raise ValueError(f"--limit must be positive, got {self.limit}.")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """The evaluation of a run.

  Attributes:
    seqlen: ``--eval-seqlen``: tokens per perplexity window.
    windows: ``--eval-windows``: at most this many windows (0: the whole text).
    compare_magnitude: not ``--no-compare-magnitude``: evaluate the magnitude baseline too.
    dense: not ``--no-dense-eval``: evaluate the dense model first.
    tasks: ``--eval-tasks`` and its flags: zero-shot tasks of the pruned model, or None.
  """

  seqlen: int = 1024
  windows: int = 0
  compare_magnitude: bool = True
  dense: bool = True
  tasks: TaskSpec | None = None

  def __post_init__(self):
    positive("--eval-seqlen", self.seqlen)
    positive("--eval-windows", self.windows, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """Where a run writes.

  Attributes:
    dir: ``--output``: the run directory (``checkpoints/``, ``metrics.jsonl``,
      ``summary.json``, ``model/``).
    checkpoint_every: ``--checkpoint-every``: save every N steps (0: only at the end).
    keep: ``--keep``: checkpoints to keep.
    overwrite: ``--overwrite``: replace an existing exported model, and delete and start afresh
      checkpoints that cannot be resumed (another configuration, none intact).
  """

  dir: str | pathlib.Path = "runs/elsa"
  checkpoint_every: int = 0
  keep: int = 2
  overwrite: bool = False

  def __post_init__(self):
    if not str(self.dir):
      raise ValueError("--output is empty; give the run directory, e.g. runs/elsa.")
    positive("--checkpoint-every", self.checkpoint_every, allow_zero=True)
    positive("--keep", self.keep)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one ``elsa-jax prune`` run needs (see the module docstring)."""

  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  method: MethodSpec = MethodSpec()
  evaluation: EvalSpec = EvalSpec()
  output: OutputSpec = OutputSpec()

  @property
  def finetune_config(self) -> train.ElsaConfig | None:
    """The hyperparameters of the masked recovery (``--finetune-steps``), None without one."""
    if not self.method.finetune_steps:
      return None
    return dataclasses.replace(self.method.hyperparameters, steps=self.method.finetune_steps,
                               lr=self.method.finetune_lr, sam_rho=0.0)

  def finetune_checkpoint_config(self) -> dict[str, Any]:
    """The resumable configuration of the masked recovery: the run's, and its steps and lr."""
    return {**self.checkpoint_config(), "finetune_steps": self.method.finetune_steps,
            "finetune_lr": self.method.finetune_lr}

  @property
  def calib_seqlen(self) -> int:
    """Tokens per one-shot calibration window: ``--calib-seqlen``, else the ELSA ``seqlen``."""
    return self.data.calib_seqlen or self.method.hyperparameters.seqlen

  def checkpoint_config(self) -> dict[str, Any]:
    """The resumable configuration (``checkpoints/run_config.json``): a run resumes only
    from checkpoints of an equal one, and ``elsa-jax export --run-dir`` rebuilds the run from it."""
    return {"model": fingerprint.resolved(self.model.path), "calib": fingerprint.resolved(self.data.calib),
            "method": self.method.name,
            "init_method": self.method.init, "oneshot_windows": self.data.calib_windows,
            "oneshot_seqlen": self.calib_seqlen, "damp": self.method.damp,
            **_recorded_fields(self.method.hyperparameters)}


#: ElsaConfig fields newer than the first run_config.json format: recorded only when set, so that the
#: checkpoints of older runs (which lack them) still resume.
_RECORDED_WHEN_SET = ("allocation", "owl_m", "owl_lambda", "global_min", "global_max", "distill", "distill_temp",
                      "squarehead")


def _recorded_fields(cfg: Any) -> dict[str, Any]:
  defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RECORDED_WHEN_SET or v != defaults[k]}


_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


def override(run: RunConfig, *, elsa: Mapping[str, Any] | None = None,
             **sections: Mapping[str, Any]) -> RunConfig:
  """``run`` with some fields replaced, each section rebuilt (and so validated) once.

  Args:
    run: the base, e.g. a preset.
    elsa: fields of the method's :class:`elsa_jax.run.train.ElsaConfig`.
    **sections: per section of :class:`RunConfig` (``model``, ``data``,
      ``method``, ``evaluation``, ``output``), its fields to replace.

  Returns:
    The new RunConfig.

  Raises:
    ValueError: for an unknown section or field, or a value a section refuses.
  """
  unknown = set(sections) - set(_SECTIONS)
  if unknown:
    raise ValueError(f"RunConfig has no section {sorted(unknown)}; use {', '.join(_SECTIONS)}.")
  sections = {name: dict(fields) for name, fields in sections.items() if fields}
  if elsa:
    method = sections.setdefault("method", {})
    levers = dict(method.get("levers", run.method.levers))
    if elsa.get("squarehead") and "distill" not in elsa and "distill" in levers:
      elsa = {**elsa, "distill": levers["distill"]}  # SquareHead joins the distillation the preset turns on
    method["elsa"] = dataclasses.replace(method.get("elsa", run.method.elsa), **elsa)
    method["levers"] = tuple((k, v) for k, v in levers.items() if k not in elsa)
  return dataclasses.replace(run, **{name: dataclasses.replace(getattr(run, name), **fields)
                                     for name, fields in sections.items()})


def _preset(*, elsa: dict[str, Any], evaluation: dict[str, Any], calib_windows: int = 128,
            levers: tuple[tuple[str, Any], ...] = ELSA_LEVERS) -> RunConfig:
  return RunConfig(method=MethodSpec(elsa=train.ElsaConfig(**elsa), levers=levers),
                   data=DataSpec(calib_windows=calib_windows), evaluation=EvalSpec(**evaluation))


#: Presets. ``cpu``: the short run that fits ~10 minutes on a 2-core CPU.
#: ``full``: the budget of the measured prototype (1024 x 8 x 1024 tokens) for
#: one GPU; both with :data:`ELSA_LEVERS`. ``paper``: the authors' LLaMA-2-7B recipe (4096 x 8 x 2048,
#: lr 2e-4, Adam's own second moment as the score), without them.
PRESETS: dict[str, RunConfig] = {
    "cpu": _preset(elsa=dict(steps=16, batch_size=2, seqlen=256, interval=4, lr=1e-3, compute_dtype="float32"),
                   evaluation=dict(seqlen=512, windows=8), calib_windows=32),
    "full": _preset(elsa=dict(steps=1024, batch_size=8, seqlen=1024, interval=32, lr=1e-3),
                    evaluation=dict(seqlen=1024, windows=0)),
    "paper": _preset(elsa=dict(steps=4096, batch_size=8, seqlen=2048, interval=32, lr=2e-4,
                               score_source="base_second_moment"),
                     evaluation=dict(seqlen=2048, windows=0), levers=()),
}


def resolve_preset(name: str) -> RunConfig:
  """The preset ``name``; 'auto' picks 'cpu' when JAX runs on the CPU and 'full' on an accelerator."""
  if name == "auto":
    name = "cpu" if jax.default_backend() == "cpu" else "full"
  if name not in PRESETS:
    raise ValueError(f"unknown --preset {name!r}; choose one of auto, {', '.join(PRESETS)}.")
  return PRESETS[name]
