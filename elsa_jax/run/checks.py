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
"""The checks of a run: its options, the finiteness of its state, and the records it writes.

* :func:`check_bound` and :func:`check_choice` refuse an option's value with a
  message naming its flag (:func:`flag`); :class:`elsa_jax.run.train.ElsaConfig`
  checks each of its fields with them.
* :func:`all_finite` is one jitted reduction over a pytree (params, optimizer
  state, or both): True when every floating-point entry is finite. The loop
  calls it before every checkpoint and the jobs before every export, so a
  diverged state is never saved nor written as a model.
* :func:`first_nonfinite` names the first leaf that is not finite (for the message);
  :func:`check_state` and :func:`check_restored` raise with it.
* :class:`DivergedError` is what a run that stops on a non-finite loss or
  state raises: it names the step, the last good checkpoint and the flags that help.
* :func:`json_ready` turns a record (metrics, summary) into strict JSON values:
  NaN and infinities become ``null``, so ``json.dumps(..., allow_nan=False)`` holds;
  :func:`drop_metrics_after` keeps a resumed run's metrics file free of repeated steps.

Example:
  >>> import jax.numpy as jnp
  >>> from elsa_jax.run import checks
  >>> bool(checks.all_finite({"w": jnp.ones(3), "count": jnp.int32(2)}))
  True
  >>> checks.first_nonfinite({"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.nan])}})
  "['b']['c']"
  >>> checks.json_ready({"ppl": float("inf"), "steps": [1, float("nan")]})
  {'ppl': None, 'steps': [1, None]}
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elsa_jax.errors import UserError
from elsa_jax.lowp import codecs


def flag(name: str) -> str:
  """The command-line flag of an option (an ElsaConfig field): ``lmda_schedule`` -> ``--lmda-schedule``."""
  return "--" + name.replace("_", "-")


def check_bound(name: str, value: float, low: float, high: float | None, closed: bool) -> None:
  """Raises ValueError naming ``flag(name)`` unless ``value`` is finite and in ``[low, high)``
  (``(low, high)`` when not ``closed``; no upper bound when ``high`` is None)."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    x = math.nan
  if not (math.isfinite(x) and (x >= low if closed else x > low) and (high is None or x < high)):
    where = f"{'[' if closed else '('}{low:g}, {'inf' if high is None else f'{high:g}'})"
    raise ValueError(f"{flag(name)} must be a finite number in {where}, got {value}.")


def check_choice(name: str, value: Any, choices: tuple) -> None:
  """Raises ValueError naming ``flag(name)`` unless ``value`` is one of ``choices`` (dtypes by their name)."""
  canonical = value
  try:
    if name in ("state_dtype", "score_dtype") and value is not None:
      canonical = codecs.canonical_dtype(value).name  # the aliases the codecs accept (bf16, e4m3, ...)
    elif name == "compute_dtype" and not isinstance(value, str):
      canonical = jnp.dtype(value).name  # a dtype object
  except (TypeError, ValueError):
    pass
  if canonical not in choices:
    names = ", ".join(str(c) for c in choices if c is not None)
    raise ValueError(f"unknown {flag(name)} {value!r}; choose one of {names}.")


def _floating(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every entry of every floating-point leaf of ``tree`` is finite (a scalar bool array).

  Integer leaves (step counts) and empty leaves count as finite; float8 and
  complex leaves are checked like float32 ones.
  """
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _floating(x)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def first_nonfinite(tree: Any) -> str | None:
  """None when ``tree`` is finite (:func:`all_finite`); else the key path of its first non-finite leaf."""
  if bool(all_finite(tree)):
    return None
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _floating(leaf) and not bool(all_finite(leaf)):
      return jax.tree_util.keystr(path)
  return "?"  # all_finite said no, but no single leaf is non-finite: cannot happen


def check_state(step: int, params: Any, opt_state: Any, *, lr: float) -> None:
  """Raises :class:`DivergedError` unless the params and the optimizer state are finite."""
  bad = first_nonfinite({"params": params, "opt_state": opt_state})
  if bad is not None:
    raise DivergedError(step, f"{bad} holds NaN or inf", lr=lr)


def check_restored(step: int, directory: Any, params: Any, opt_state: Any) -> None:
  """Refuses to resume from a checkpoint whose params or optimizer state are not finite."""
  bad = first_nonfinite({"params": params, "opt_state": opt_state})
  if bad is not None:
    raise UserError(f"the checkpoint of step {step} in {directory} holds NaN or inf (at {bad}); it cannot be "
                    f"resumed. Start over with a new --output.")


class DivergedError(UserError, FloatingPointError):
  """A run whose loss or state became NaN or infinite; nothing from that step on was saved.

  Attributes:
    step: the optimizer step (1-based) after which the problem was seen.
    what: what was not finite, e.g. "the loss became nan" or "params['w'] holds NaN or inf".
    lr: the run's learning rate (the message suggests lowering it).
    last_good: the newest checkpoint kept (all saved ones are finite), or None.
  """

  def __init__(self, step: int, what: str, *, lr: float, last_good: int | None = None):
    super().__init__(step, what, lr, last_good)
    self.step, self.what, self.lr, self.last_good = step, what, lr, last_good

  def __str__(self) -> str:
    kept = (f"the last good checkpoint, step {self.last_good}, is kept" if self.last_good
            else "no checkpoint of this run holds a good state")
    return (f"{self.what} at step {self.step}: the run diverged, so nothing from this step on was saved and "
            f"no model was exported ({kept}). Lower --lr (now {self.lr:g}) or --lmda, or compute in float32 "
            f"(--compute-dtype float32), and run again with a new --output.")


def json_ready(value: Any) -> Any:
  """``value`` with NaN and infinities replaced by None and numpy scalars/arrays by Python values, recursively."""
  if isinstance(value, Mapping):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return json_ready(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def drop_metrics_after(path: pathlib.Path, step: int) -> None:
  """Keeps the lines of a metrics file up to ``step`` (where a run resumes), so that no step appears twice.

  Lines that do not parse (one cut by a kill in mid-write) are dropped too;
  the file is rewritten (atomically) only when something is dropped.
  """
  if not path.is_file():
    return
  lines = path.read_text().splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
      kept.append(line)
  if len(kept) != len(lines):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
