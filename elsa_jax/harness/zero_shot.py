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
"""Running lm-eval tasks on an :class:`~elsa_jax.harness.lm.ElsaLM`: task checks, the run, its table.

The zero-shot suite of the pruning literature (:data:`PAPER_TASKS`) is
lm-eval's ``boolq rte hellaswag winogrande arc_easy arc_challenge openbookqa``;
any lm-eval task name or glob works, and ``include_path`` adds a folder of
local task YAMLs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import lm_eval
from lm_eval import utils as lm_utils
from lm_eval.tasks import TaskManager

#: The 7 zero-shot tasks of the ELSA paper (and of Wanda, SparseGPT, ALPS).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@functools.lru_cache(maxsize=8)
def _index(include_path: str | None, include_defaults: bool) -> TaskManager:
  """lm-eval's task index (building the whole of it reads ~15k YAMLs: seconds to a minute)."""
  return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(tasks: Sequence[str], include_path: str | None = None) -> TaskManager:
  """lm-eval's task index (with ``include_path``), after checking that every task is in it.

  When ``include_path`` holds every task, only that folder is indexed (lm-eval's own ~15k task
  YAMLs are not read); otherwise the whole index is built. Indexes are cached per process.

  Raises:
    ValueError: no task, or a name that matches no task (the message names them).
  """
  if not tasks:
    raise ValueError("no task given; pass --tasks such as boolq,rte (lm-eval task names).")
  if include_path is not None:
    local = _index(str(include_path), False)
    if all(local.match_tasks([t]) for t in tasks):
      return local
  manager = _index(None if include_path is None else str(include_path), True)
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    where = f" or in --include-path {include_path}" if include_path else ""
    raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}. "
                     f"List them with `lm-eval ls tasks`, or give the folder of your task YAMLs with --include-path.")
  return manager


def evaluate(lm: Any, tasks: Sequence[str], *, include_path: str | None = None, num_fewshot: int | None = None,
             limit: int | float | None = None, manager: TaskManager | None = None, log_samples: bool = False,
             bootstrap_iters: int = 100000) -> dict[str, Any]:
  """``lm_eval.simple_evaluate`` of ``lm`` (an LM, or the registered name "elsa_jax") on ``tasks``.

  Args:
    lm: The model, e.g. :class:`~elsa_jax.harness.lm.ElsaLM`.
    tasks: lm-eval task names or globs.
    include_path: A folder of extra task YAMLs.
    num_fewshot: Few-shot examples per request (None: each task's default, 0 for the paper's suite).
    limit: At most this many documents per task (a fraction below 1).
    manager: A task index already built by :func:`task_manager` (else one is built and checked).
    log_samples: Keep every request and response in ``results["samples"]``.
    bootstrap_iters: Bootstrap resamples of the standard errors that have no closed form (0: none).

  Returns:
    lm-eval's results dict (``results``, ``versions``, ``n-shot``, ``configs``, ...).
  """
  manager = manager or task_manager(tasks, include_path)
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                 task_manager=manager, log_samples=log_samples, bootstrap_iters=bootstrap_iters)


def results_table(results: dict[str, Any]) -> str:
  """lm-eval's own Markdown table of the results (and of the groups, if any)."""
  table = lm_utils.make_table(results)
  if results.get("groups"):
    table += "\n" + lm_utils.make_table(results, "groups")
  return table


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
  """``{task: {"acc,none": 0.61, "acc_stderr,none": 0.02, ...}}``: the numeric metrics of every task."""
  return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
          for task, metrics in results.get("results", {}).items()}


def to_json(results: dict[str, Any]) -> str:
  """The results as JSON (what lm-eval writes: numpy scalars and other objects made serialisable)."""
  return json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                    default=lm_utils.handle_non_serializable)
