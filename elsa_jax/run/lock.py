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
"""An exclusive lock on a run folder, so that two runs never write the same one.

The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``, which holds the owner's pid
and host. The kernel drops it when its process ends, however it ends, so a lock
file left by a killed run is stale by construction: the next run takes it over
(and says so). Only process 0 of a multi-host run locks; its other processes
write only what orbax coordinates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import socket
import time

from elsa_jax.run import distributed

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunFolderInUseError(FileExistsError):
  """Another live run holds the run folder's lock."""


def _read_owner(fd: int) -> dict:
  with contextlib.suppress(OSError, ValueError):
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or "{}")
  return {}


def _missing_ancestors(path: pathlib.Path) -> list[pathlib.Path]:
  """``path`` and those of its parents that do not exist yet, deepest first."""
  missing = []
  while not path.exists() and path != path.parent:
    missing.append(path)
    path = path.parent
  return missing


class RunLock:
  """Holds ``directory``'s lock from :meth:`acquire` (or ``with``) to :meth:`release`.

  Folders the lock had to create are removed again on release when they are
  still empty, so a run that fails before its first checkpoint leaves nothing.

  Args:
    directory: the run folder (``--output`` of ``prune``, ``--run-dir`` of ``export``).
    flag: the flag that names it, for the message.

  Raises:
    RunFolderInUseError: from :meth:`acquire`, at once, when another live run holds it.
  """

  def __init__(self, directory: str | os.PathLike, *, flag: str = "--output"):
    self.directory = pathlib.Path(directory).absolute()
    self.path = self.directory / LOCK_FILE
    self._flag = flag
    self._fd: int | None = None
    self._created: list[pathlib.Path] = []

  def acquire(self) -> RunLock:
    if not distributed.is_main_process() or self._fd is not None:
      return self
    self._created = _missing_ancestors(self.directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = _read_owner(fd)
        os.close(fd)
        self._remove_created()
        raise RunFolderInUseError(
            f"{self.directory} is in use by another elsa-jax run (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {owner.get('since', '?')}); wait for it to end, or give another "
            f"{self._flag}.") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:  # its owner removed it as we opened it: lock the new one
        same = False
      if same:
        break
      os.close(fd)
    stale = _read_owner(fd)
    if stale:
      logger.warning("taking over the lock of %s from pid %s on %s, which ended without releasing it",
                     self.directory, stale.get("pid"), stale.get("host"))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      self.path.unlink()  # still locked: a run that opened it before now retries on the new file
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    self._remove_created()

  def _remove_created(self) -> None:
    for folder in self._created:
      with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty
    self._created = []

  def __enter__(self) -> RunLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
