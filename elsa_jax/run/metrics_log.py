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
"""The host side of a run's metrics: history, a JSONL file, the progress bar and the finiteness check."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import jax
import optax

from elsa_jax.run import checks


def _to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class MetricsLogger:
  """The host side of a run's metrics: history, JSONL file, progress bar and the finiteness check.

  Metrics stay device arrays until :meth:`flush`, which the loop calls one
  step later, so the device never waits for the host. Only process 0 writes
  the file and shows the bar.

  Args:
    cfg: the run's hyperparameters (:class:`elsa_jax.run.train.ElsaConfig`).
    metrics_path: JSONL file that receives one line per logged step (appended), or None.
    progress: show a progress bar.
    start: the step the run starts (or resumes) from.
  """

  def __init__(self, cfg: Any, metrics_path: str | pathlib.Path | None, *, progress: bool, start: int):
    self.cfg = cfg
    self.history: list[dict[str, float]] = []
    self._lr_at = optax.linear_schedule(cfg.lr, 0.0, cfg.steps)
    self._pending: tuple[int, dict[str, jax.Array], float] | None = None
    self._t_first: float | None = None
    self._steps_timed = 0
    is_main = jax.process_index() == 0
    self._file = None
    if metrics_path is not None and is_main:
      metrics_path = pathlib.Path(metrics_path)
      metrics_path.parent.mkdir(parents=True, exist_ok=True)
      checks.drop_metrics_after(metrics_path, start)
      self._file = open(metrics_path, "a")
    self._bar = None
    if progress and is_main:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)

  def clock(self, metrics: dict[str, jax.Array], *, first: bool) -> None:
    """Times the run from the end of its first step (which includes warm-up) on."""
    if first:
      jax.block_until_ready(metrics)
      self._t_first = time.perf_counter()
    else:
      self._steps_timed += 1

  @property
  def tokens_per_second(self) -> float:
    elapsed = time.perf_counter() - self._t_first if self._t_first else 0.0
    return self._steps_timed * self.cfg.tokens_per_step / elapsed if elapsed > 0 and self._steps_timed else 0.0

  def defer(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Keeps the metrics reached after ``step`` steps for the next :meth:`flush`."""
    self._pending = (step, metrics, time.perf_counter())

  def flush(self) -> None:
    """Reads the deferred metrics (if any) to the host, checks them, and logs them.

    Raises:
      elsa_jax.run.checks.DivergedError: when the loss or the gradient norm is not finite.
    """
    if self._pending is None:
      return
    (step, metrics, t_done), self._pending = self._pending, None
    host = _to_host(metrics)
    if not all(math.isfinite(host[k]) for k in ("loss", "grad_norm")):
      raise checks.DivergedError(step, f"the loss became {host['loss']} (gradient norm {host['grad_norm']})",
                                 lr=self.cfg.lr)
    host["step"] = step
    host["lr"] = float(self._lr_at(step - 1))
    host["time"] = t_done
    self.history.append(host)
    if self._file is not None:
      self._file.write(json.dumps(checks.json_ready(host), allow_nan=False) + "\n")
      self._file.flush()
    if self._bar is not None:
      self._bar.set_postfix(
          loss=f"{host['loss']:.3f}",
          lmda=f"{host.get('lmda', self.cfg.lmda):.3g}",
          gap=f"{host.get('rel_gap', float('nan')):.3f}",
          flips=f"{host.get('mask_flip_fraction', float('nan')):.3f}",
          z_sparsity=f"{host.get('z_sparsity', float('nan')):.3f}",
          tok_s=f"{self.tokens_per_second:.0f}",
          refresh=False,
      )

  def advance(self) -> None:
    """One more step on the progress bar."""
    if self._bar is not None:
      self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._file is not None:
      self._file.close()
