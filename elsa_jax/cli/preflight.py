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
"""The checks a job makes before any heavy work: memory, output folders, N:M shapes, finite weights.

Each refuses bad input in seconds, reading no weight (the model's config at most),
with a message that names the flag or path, the problem and the fix.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax

from elsa_jax import files
from elsa_jax import models
from elsa_jax.errors import InputError
from elsa_jax.run import checks
from elsa_jax.run import memory as memory_lib
from elsa_jax.run import train
from elsa_jax.run.loading import model_config
from elsa_jax.sparsity import patterns
from elsa_jax.sparsity import prunable as prunable_lib

logger = logging.getLogger(__name__)

#: What a run folder (``--output`` of prune) holds; anything else there is not a run's.
RUN_ENTRIES = ("checkpoints", "finetune_checkpoints", "metrics.jsonl", "finetune_metrics.jsonl", "summary.json",
               "model")


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


def check_output_dir(path: pathlib.Path, overwrite: bool) -> None:
  files.recover_directory(path)  # a replacement a killed run left half done, and its debris
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(
        f"{path} already exists and is not empty; pass --overwrite to replace it or choose another --output."
    )


def check_writable(path: pathlib.Path, flag: str = "--output") -> None:
  """Refuses a path that cannot be created or written: its nearest existing folder must be writable."""
  existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
  if not existing.is_dir():
    raise InputError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise InputError(f"{flag} {path} cannot be written: {existing} is not writable (permissions, or a read-only "
                     f"file system); choose another {flag}.")


def check_run_dir(path: pathlib.Path) -> None:
  """Refuses an ``--output`` that cannot be written, or that holds what is not a run's (:data:`RUN_ENTRIES`).

  A folder with only a ``summary.json`` is not a run's either (a run writes it after its model or
  checkpoints), so another tool's summary is never replaced.
  """
  if path.exists() and path.is_dir():
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    foreign = sorted(names - set(RUN_ENTRIES)) or (["summary.json"] if names == {"summary.json"} else [])
    if foreign:
      shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
      raise FileExistsError(f"--output {path} holds files that are not an elsa-jax run's ({shown}); nothing was "
                            f"written there. Choose a new or empty --output.")
  check_writable(path)


def check_pattern_fits(spec: str, pattern: patterns.PatternLike) -> None:
  """Refuses, from the model's config alone, an N:M pattern whose M does not divide every pruned matrix."""
  pattern = patterns.parse(pattern)
  if pattern.n_m is None:
    return
  graphdef, abstract = models.abstract_model(model_config(spec))
  prunable = models.architecture_of(graphdef).prunable
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if prunable(path, leaf):
      try:
        pattern.check_shape(leaf.shape, 0)  # groups along the input features, as elsa_jax.admm's default axis
      except ValueError:
        raise ValueError(f"--pattern {pattern} does not fit the model {spec}: {prunable_lib.path_str(path)} has "
                         f"{leaf.shape[0]} input features, not a multiple of {pattern.m}. Choose an M that "
                         f"divides them, such as 2:4 or 4:8.") from None


def check_finite_weights(params: Any, what: str) -> None:
  """Refuses to evaluate or export weights that hold NaN or inf (:func:`elsa_jax.run.checks.first_nonfinite`)."""
  bad = checks.first_nonfinite(params)
  if bad is not None:
    raise FloatingPointError(f"{what} hold NaN or inf (at {bad}); nothing was exported. The run diverged or the "
                             f"method failed numerically: lower --lr, or use --compute-dtype float32 (SparseGPT: "
                             f"a larger --damp).")
