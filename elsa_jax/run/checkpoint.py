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
"""Orbax checkpoints of a pruning run: params, optimizer state, step and config, checksummed.

Checkpoints are written asynchronously by every process together (orbax
coordinates multi-host writes) and committed atomically: orbax writes into a
temporary directory and renames it only once every array is on disk. Just
before that rename, process 0 adds the run's configuration
(``STEP/elsa_run_config.json``) and a manifest of the size and sha256 of every
file (:mod:`elsa_jax.run.checksums`), so both are part of the commit; the run's
``run_config.json`` beside the steps is written only after the first commit,
so a run that fails before it leaves nothing that would refuse the next one.

On restore every step is checked against its manifest, newest first: a damaged
step (a changed byte, a missing file, no manifest) is named in a warning, set
aside as ``.damaged-STEP``, and the run falls back to the newest intact step,
or refuses (:class:`DamagedCheckpointError`) when none is intact.

The data position and the random state of a run are functions of the step
alone (see :class:`elsa_jax.data.documents.CalibrationWindows`), so ``step`` plus the
run's configuration is all that resuming needs besides the arrays.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from elsa_jax import files
from elsa_jax.run import checksums
from elsa_jax.run import distributed

logger = logging.getLogger(__name__)

CONFIG_FILE = "run_config.json"
STEP_CONFIG_FILE = "elsa_run_config.json"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
#: What orbax rewrites in a step after our callback: its step metadata (times, not arrays).
_REWRITTEN_AFTER_COMMIT = ("_CHECKPOINT_METADATA",)
_FRESH = "pass --overwrite to start afresh (deleting them)"
#: The key of run_config.json that records the software and devices a run started on (jax version, device
#: kind and count): recorded, not required to match on resume (a mismatch is logged as a warning, because
#: the resumed run's figures may then differ in their last bits from an uninterrupted run's).
ENVIRONMENT_KEY = "environment"


class ConfigMismatchError(ValueError):
  """The checkpoint directory belongs to a run with another configuration."""


class DamagedCheckpointError(ValueError):
  """No checkpoint step of the run is intact."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (the steps before it are kept)."""


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


def _first_line(err: BaseException) -> str:
  """A one-line account of ``err`` (tensorstore's are pages long)."""
  text = str(err).strip()
  return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _no_space(err: BaseException) -> bool:
  while err is not None:
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
      return True
    err = err.__cause__ or err.__context__
  return False


class _OrbaxFailureFilter(logging.Filter):
  """Drops orbax's own tracebacks of a failed save (tensorstore's, pages long): :meth:`RunCheckpointer.wait`
  raises the failure instead, in one line that names the step and what to do."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_orbax_failures() -> None:
  absl = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxFailureFilter) for f in absl.filters):
    absl.addFilter(_OrbaxFailureFilter())


def _sync(name: str) -> None:
  """All processes meet here (after process 0 changed files they are about to read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _step_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
  """The committed step folders in ``directory``, newest first."""
  if not directory.is_dir():
    return []
  return sorted((p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                key=lambda p: int(p.name), reverse=True)


def saved_config(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The configuration of the run whose checkpoints are in ``directory``, or None when there are none.

  ``run_config.json``, else (a run killed between its first commit and writing
  that file) the newest step's own copy.
  """
  directory = pathlib.Path(directory)
  with contextlib.suppress(FileNotFoundError):
    try:
      return json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as err:
      logger.warning("%s is unreadable (%s); reading the configuration from the newest step", directory / CONFIG_FILE,
                     err)
  for step_dir in _step_dirs(directory):
    with contextlib.suppress(OSError, ValueError):
      return json.loads((step_dir / STEP_CONFIG_FILE).read_text())
  return None


def config_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
  """What differs between a run's saved configuration and ``now`` (None: the same run).

  ``fingerprints`` (``{name: {"path", "fingerprint"}}``, see
  :mod:`elsa_jax.data.fingerprint`) are compared where the saved config has them,
  and a file changed under the same path is named as such.
  """
  for name, was in (saved.get("fingerprints") or {}).items():
    is_ = (now.get("fingerprints") or {}).get(name)
    if was and is_ and was["path"] == is_["path"] and was["fingerprint"] != is_["fingerprint"]:
      return (f"the {name} file {is_['path']} changed since they were written "
              f"({was['fingerprint'][:23]}... then, {is_['fingerprint'][:23]}... now)")
  keys = sorted((set(saved) | set(now)) - {"fingerprints", ENVIRONMENT_KEY})
  diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
  return ", ".join(diff) or None


class RunCheckpointer:
  """Saves and restores ``(params, opt_state, step)`` of one run.

  Args:
    directory: where the checkpoints live (one sub-directory per step).
    config: the run's resumable configuration (a JSON-serialisable dict).
      Every key in it must match on resume (:func:`config_difference`), else
      :class:`ConfigMismatchError`.
    save_every: save every this many steps (and always at the final step).
    keep: how many of the most recent checkpoints to keep.
    async_save: write in a background thread while training continues.
    restart: where the checkpoints cannot be resumed (another configuration,
      no intact step), delete them and start afresh instead of refusing
      (``--overwrite``).
    read_only: only restore (``elsa-jax export``): nothing in ``directory`` is
      changed, damaged steps are skipped but not set aside.

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
      restart: bool = False,
      read_only: bool = False,
  ):
    self.directory = pathlib.Path(directory).resolve()
    self.config = json.loads(json.dumps(config))
    self.save_every = save_every
    self._async, self._restart, self._read_only = async_save, restart and not read_only, read_only
    self._saving: int | None = None
    self._config_written = (self.directory / CONFIG_FILE).exists()
    self._check_config()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=True,  # also for async_save=False (then waited for), for the callback
        create=False,  # the folder appears with the first step
        cleanup_tmp_directories=not read_only,  # a killed run's partial step (the run folder is locked)
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
    )
    _quiet_orbax_failures()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _check_config(self) -> None:
    saved = saved_config(self.directory)
    problem = None if saved is None else config_difference(saved, self.config)
    if problem is None:
      if saved is not None and saved.get(ENVIRONMENT_KEY, {}) != self.config.get(ENVIRONMENT_KEY, {}):
        logger.warning("resuming a run started in another environment (%s, now %s); its figures may differ in "
                       "their last bits from an uninterrupted run's.", saved.get(ENVIRONMENT_KEY),
                       self.config.get(ENVIRONMENT_KEY))
      return
    if self._restart:
      self._discard(f"they come from a run with another configuration ({problem})")
      return
    raise ConfigMismatchError(
        f"the checkpoints in {self.directory} come from a run with another configuration: {problem}. "
        f"Resume with the same settings, {_FRESH}, or give another --output."
    )

  def _discard(self, why: str) -> None:
    if distributed.is_main_process():
      logger.warning("deleting the checkpoints in %s and starting afresh, as --overwrite asks: %s", self.directory, why)
      files.remove_directory(self.directory)
    _sync("elsa_jax_checkpoints_discarded")
    self._config_written = False

  def _seal(self) -> None:
    """orbax's post-finalization callback (process 0, just before the step's temporary
    directory is renamed into place): the run's configuration and the checksum manifest."""
    step = self._saving
    tmps = [p for p in self.directory.glob(f"{step}{_ORBAX_TMP}*") if p.is_dir()]
    if len(tmps) != 1:
      raise CheckpointWriteError(f"cannot tell which of {tmps} in {self.directory} holds checkpoint step {step}.")
    (tmps[0] / STEP_CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True))
    checksums.write_manifest(tmps[0], exclude=_REWRITTEN_AFTER_COMMIT)

  def _record_config(self) -> None:
    """``run_config.json`` beside the steps, once the first step has committed."""
    if self._config_written or self._read_only or not distributed.is_main_process():
      return
    if any((d / checksums.MANIFEST).exists() for d in _step_dirs(self.directory)):
      path = self.directory / CONFIG_FILE
      tmp = path.with_name(path.name + ".tmp")
      tmp.write_text(json.dumps(self.config, indent=2, sort_keys=True))
      os.replace(tmp, path)
      self._config_written = True

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (one still being written included), or None."""
    return self._manager.latest_step()

  def _damage(self, step: int) -> str | None:
    """What is wrong with ``step`` (checked by process 0, which tells the others), or None."""
    problem = checksums.find_damage(self.directory / str(step)) if distributed.is_main_process() else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
      problem = problem or ("process 0 found it damaged" if bad else None)
    return problem

  def _set_aside(self, step: int, problem: str) -> None:
    step_dir = self.directory / str(step)
    if self._read_only:
      logger.warning("checkpoint step %d (%s) is damaged: %s; skipping it", step, step_dir, problem)
      return
    aside = self.directory / f".damaged-{step}"
    logger.warning("checkpoint step %d (%s) is damaged: %s; moving it aside to %s and falling back to an earlier "
                   "step", step, step_dir, problem, aside.name)
    if distributed.is_main_process():
      files.remove_directory(aside)
      os.rename(step_dir, aside)
    _sync(f"elsa_jax_checkpoint_{step}_set_aside")
    self._manager.reload()

  def _restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any]:
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(_flat_nonempty(opt_state))),
        ),
    )
    return restored["params"], _unflatten_nonempty(restored["opt_state"], opt_state)

  def restore_or(self, params: Any, opt_state: Any) -> tuple[int, Any, Any]:
    """Restores the newest intact checkpoint into the shardings of the given trees.

    Returns ``(step, params, opt_state)``; the given trees themselves and step 0
    when there is no checkpoint yet.

    Raises:
      DamagedCheckpointError: when there are checkpoints but none is intact
        (unless ``restart``, which then deletes them and returns step 0).
    """
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = self._damage(step)
      if problem is None:
        try:
          return (step, *self._restore(step, params, opt_state))
        except Exception as err:  # a tensorstore error, pages long: name the step and the cause instead
          problem = f"it cannot be read ({_first_line(err)})"
      damaged.append(f"step {step}: {problem}")
      self._set_aside(step, problem)
    if damaged and self._restart:
      self._discard(f"no checkpoint is intact ({'; '.join(damaged)})")
      self._manager.reload()
    elif damaged:
      raise DamagedCheckpointError(
          f"no checkpoint in {self.directory} is intact ({'; '.join(damaged)}); the damaged ones are set aside as "
          f".damaged-STEP. Restore them from a backup, or {_FRESH}."
      )
    return 0, params, opt_state

  def should_save(self, step: int, final_step: int) -> bool:
    return step == final_step or (self.save_every > 0 and step % self.save_every == 0)

  def save(self, step: int, params: Any, opt_state: Any) -> None:
    """Starts saving the state reached after ``step`` optimizer steps (waits for the previous save first)."""
    if self._read_only:
      raise ValueError(f"{self.directory} was opened read-only (for export); it takes no new checkpoint.")
    self.wait()
    self._saving = step
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              params=ocp.args.StandardSave(params),
              opt_state=ocp.args.StandardSave(_flat_nonempty(opt_state)),
          ),
          force=True,
      )
    except Exception as err:  # pylint: disable=broad-except
      raise self._write_error(err) from None
    if os.environ.get("ELSA_JAX_TEST_CRASH_IN_SAVE") == str(step):
      os._exit(17)  # test hook: die while the asynchronous write is still in flight
    if not self._async:
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight.

    Raises:
      CheckpointWriteError: when it failed (a full disk, say); its partial
        folder is removed and the steps before it are kept.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise self._write_error(err) from None
    self._record_config()

  def _write_error(self, err: Exception) -> CheckpointWriteError:
    step, kept = self._saving, [int(d.name) for d in _step_dirs(self.directory) if d.name != str(self._saving)]
    if distributed.is_main_process():
      for tmp in self.directory.glob(f"{step}{_ORBAX_TMP}*"):
        files.remove_directory(tmp)
    hint = "free disk space" if _no_space(err) else "fix the cause"
    return CheckpointWriteError(
        errno.ENOSPC if _no_space(err) else errno.EIO,
        f"writing checkpoint step {step} to {self.directory} failed ({_first_line(err)}); "
        f"{f'step {max(kept)} is kept' if kept else 'no earlier step was saved'}. "
        f"{hint.capitalize()} and run the same command again to resume.",
    )

  def close(self) -> None:
    try:
      self.wait()
    finally:
      with contextlib.suppress(Exception):
        self._manager.close()
