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
"""Orbax checkpoints of a pruning run: params, optimizer state, step and config.

Checkpoints are written asynchronously by every process together (orbax
coordinates multi-host writes) and committed atomically: orbax writes into a
temporary directory and renames it only once every array is on disk, so a run
killed in the middle of a save leaves no checkpoint that :func:`latest_step`
would take for a good one.

The data position and the random state of a run are functions of the step
alone (see :class:`elsa_jax.data.documents.CalibrationWindows`), so ``step`` plus the
run's configuration is all that resuming needs besides the arrays.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

_CONFIG_FILE = "run_config.json"
#: The key of run_config.json that records the software and devices a run started on (jax version, device
#: kind and count): recorded, not required to match on resume (a mismatch is logged as a warning, because
#: the resumed run's figures may then differ in their last bits from an uninterrupted run's).
ENVIRONMENT_KEY = "environment"
logger = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
  """The checkpoint directory belongs to a run with another configuration."""


def _flat_nonempty(tree: Any) -> dict[str, Any]:
  """The non-empty leaves of ``tree`` keyed by position (orbax refuses zero-size arrays,
  which optimizer states use as placeholders for non-prunable leaves)."""
  return {str(i): x for i, x in enumerate(jax.tree.leaves(tree)) if x.size}


def _unflatten_nonempty(flat: dict[str, Any], template: Any) -> Any:
  leaves, treedef = jax.tree.flatten(template)
  return treedef.unflatten([flat[str(i)] if x.size else x for i, x in enumerate(leaves)])


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree`` for restoring into place."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


class RunCheckpointer:
  """Saves and restores ``(params, opt_state, step)`` of one run.

  Args:
    directory: where the checkpoints live (one sub-directory per step).
    config: the run's resumable configuration (a JSON-serialisable dict).
      Every key in it must match on resume, else :class:`ConfigMismatchError`.
    save_every: save every this many steps (and always at the final step).
    keep: how many of the most recent checkpoints to keep.
    async_save: write in a background thread while training continues.

  Example::

    ckpt = RunCheckpointer("runs/x/ckpt", config=cfg, save_every=100)
    start, params, opt_state = ckpt.restore_or(params, opt_state)
    for step in range(start, steps):
      ...
      ckpt.save(step + 1, params, opt_state)
    ckpt.close()
  """

  def __init__(
      self,
      directory: str | pathlib.Path,
      *,
      config: dict[str, Any],
      save_every: int,
      keep: int = 2,
      async_save: bool = True,
  ):
    self.directory = pathlib.Path(directory).absolute()
    self.config = json.loads(json.dumps(config))
    self.save_every = save_every
    self._check_config()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _check_config(self) -> None:
    path = self.directory / _CONFIG_FILE
    if path.exists():
      saved = json.loads(path.read_text())
      diff = {
          k: (saved.get(k), self.config.get(k))
          for k in sorted(set(saved) | set(self.config))
          if saved.get(k) != self.config.get(k) and k != ENVIRONMENT_KEY
      }
      if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatchError(
            f"the checkpoints in {self.directory} come from a run with another configuration "
            f"({details}); resume with the same settings, or pick a new --output."
        )
      if saved.get(ENVIRONMENT_KEY, {}) != self.config.get(ENVIRONMENT_KEY, {}):
        logger.warning("resuming a run started in another environment (%s, now %s); its figures may differ in "
                       "their last bits from an uninterrupted run's.", saved.get(ENVIRONMENT_KEY),
                       self.config.get(ENVIRONMENT_KEY))
    elif jax.process_index() == 0:
      self.directory.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(".tmp")
      tmp.write_text(json.dumps(self.config, indent=2, sort_keys=True))
      tmp.replace(path)

  def latest_step(self) -> int | None:
    """The newest fully committed checkpoint's step, or None."""
    return self._manager.latest_step()

  def restore_or(self, params: Any, opt_state: Any) -> tuple[int, Any, Any]:
    """Restores the latest checkpoint into the shardings of the given trees.

    Returns ``(step, params, opt_state)``; the given trees themselves and step 0
    when there is no checkpoint yet.
    """
    step = self.latest_step()
    if step is None:
      return 0, params, opt_state
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(_flat_nonempty(opt_state))),
        ),
    )
    return step, restored["params"], _unflatten_nonempty(restored["opt_state"], opt_state)

  def should_save(self, step: int, final_step: int) -> bool:
    return step == final_step or (self.save_every > 0 and step % self.save_every == 0)

  def save(self, step: int, params: Any, opt_state: Any) -> None:
    """Starts saving the state reached after ``step`` optimizer steps."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(_flat_nonempty(opt_state)),
        ),
        force=True,
    )
    if os.environ.get("ELSA_JAX_TEST_CRASH_IN_SAVE") == str(step):
      os._exit(17)  # test hook: die while the asynchronous write is still in flight

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
