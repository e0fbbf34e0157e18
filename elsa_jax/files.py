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
"""Writing a directory so that it appears whole or not at all, crash-safe at every instant.

:func:`atomic_directory` writes the new directory complete in a hidden sibling
``.NAME.tmp-HOST-PID-TOKEN``, renames it to ``.NAME.new-...`` (so a ``.new-``
sibling is always complete), and then swaps it in: with ``renameat2(RENAME_EXCHANGE)``
where the kernel and file system have it, else by renaming the old directory
to ``.NAME.old-...`` and the new one to ``NAME``. At every instant ``NAME`` holds
the complete old or the complete new directory, or, for the moment between the
two renames of the fallback, is missing while a complete ``.new-`` sibling exists.
:func:`recover_directory` (run first by every :func:`atomic_directory`) puts
such a sibling back and removes the hidden siblings of processes that are no
longer running.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import pathlib
import re
import secrets
import shutil
import socket
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_SIBLING = re.compile(r"(?P<kind>tmp|new|old|del)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_BLOCK = 1 << 22


def file_sha256(path: str | os.PathLike, *, limit: int | None = None) -> str:
  """The sha256 of a file's bytes (of its first ``limit`` bytes, when given)."""
  digest = hashlib.sha256()
  left = limit
  with open(path, "rb") as f:
    while block := f.read(_BLOCK if left is None else min(_BLOCK, left)):
      digest.update(block)
      if left is not None:
        left -= len(block)
        if not left:
          break
  return digest.hexdigest()


def _tag() -> str:
  """``HOST-PID-TOKEN``: who writes a hidden sibling, so that a later run can tell whether it is still alive."""
  return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _sibling(path: pathlib.Path, kind: str, tag: str) -> pathlib.Path:
  return path.with_name(f".{path.name}.{kind}-{tag}")


def _owner_is_gone(host: str, pid: int) -> bool:
  """Whether the process that named a sibling has ended (False when it may still run, or runs on another host)."""
  if host != socket.gethostname():
    return False
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def _siblings(path: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  """``(kind, sibling)`` of the hidden siblings of ``path`` whose writer has ended, newest first."""
  prefix = f".{path.name}."
  found = []
  with contextlib.suppress(FileNotFoundError):
    for entry in path.parent.iterdir():
      if not entry.name.startswith(prefix):
        continue
      match = _SIBLING.fullmatch(entry.name[len(prefix):])
      if match and _owner_is_gone(match["host"], int(match["pid"])):
        found.append((entry.lstat().st_mtime, match["kind"], entry))
  return [(kind, entry) for _, kind, entry in sorted(found, reverse=True)]


def _remove_tree(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def recover_directory(path: str | os.PathLike) -> None:
  """Finishes or undoes a replacement of ``path`` that a killed process left, and removes its debris.

  When ``path`` is missing and a complete ``.new-`` (else ``.old-``) sibling of a
  process that has ended exists, it is renamed back to ``path``; the other
  hidden siblings of ended processes are deleted. Siblings of live processes,
  and of other hosts, are left alone.
  """
  path = pathlib.Path(path)
  siblings = _siblings(path)
  if not os.path.lexists(path):
    complete = [s for kind, s in siblings if kind == "new"] or [s for kind, s in siblings if kind == "old"]
    if complete:
      os.rename(complete[0], path)
      logger.warning("restored %s from %s, left by an interrupted replacement", path, complete[0].name)
      siblings = [(kind, s) for kind, s in siblings if s != complete[0]]
  for kind, sibling in siblings:
    logger.info("removing %s, left by a killed writer of %s", sibling.name, path)
    _remove_debris(sibling)


def _remove_debris(sibling: pathlib.Path) -> None:
  """Removes a dead writer's sibling and, as it may itself have been the target of a nested
  :func:`atomic_directory` (``save_pretrained`` into an export's temporary), that one's siblings."""
  _remove_tree(sibling)
  for _, nested in _siblings(sibling):
    _remove_debris(nested)


def remove_directory(path: str | os.PathLike) -> None:
  """Deletes ``path`` so that it is gone at once (renamed to a hidden sibling, then removed)."""
  path = pathlib.Path(path)
  if not os.path.lexists(path):
    return
  doomed = _sibling(path, "del", _tag())
  os.rename(path, doomed)
  _remove_tree(doomed)


def _umask() -> int:
  """The process's umask, read without changing it where Linux reports it."""
  with contextlib.suppress(OSError, ValueError):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _normal_permissions_and_sync(root: pathlib.Path) -> None:
  """Gives ``root``'s tree the permissions of the umask (temporary files are often 0600) and syncs it to disk."""
  mask = _umask()
  for dirpath, dirnames, filenames in os.walk(root):
    for name in filenames:
      file = os.path.join(dirpath, name)
      if os.path.islink(file):
        continue
      os.chmod(file, 0o666 & ~mask)
      fd = os.open(file, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    for name in dirnames:
      if not os.path.islink(os.path.join(dirpath, name)):
        os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
  os.chmod(root, 0o777 & ~mask)
  sync_directory(root)


def sync_directory(path: str | os.PathLike) -> None:
  """fsync of a directory, so that the renames and files in it survive a power cut (no-op where unsupported)."""
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps two paths in one step with ``renameat2(RENAME_EXCHANGE)``; False where that is not available."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(new: pathlib.Path, path: pathlib.Path, tag: str) -> None:
  """Puts the complete directory ``new`` at ``path``; the old one, if any, leaves only after."""
  if not os.path.lexists(path):
    os.rename(new, path)
    return
  old = _sibling(path, "old", tag)
  if _exchange(new, path):
    os.rename(new, old)
  else:
    os.rename(path, old)
    try:
      os.rename(new, path)
    except BaseException:
      os.rename(old, path)
      raise
  _remove_tree(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a fresh directory beside ``path`` that replaces ``path`` when the block succeeds.

  ``path`` holds the complete old or the complete new directory at every
  instant (see the module docstring); on an exception the partial directory is
  removed and ``path`` is untouched, and a crash leaves hidden siblings that the
  next call (or :func:`recover_directory`) cleans. The result has the
  permissions of the umask. Callers check for overwriting first.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  recover_directory(path)
  tag = _tag()
  work, new = _sibling(path, "tmp", tag), _sibling(path, "new", tag)
  os.mkdir(work)
  try:
    yield work
    _normal_permissions_and_sync(work)
    os.rename(work, new)
    _swap_in(new, path, tag)
    sync_directory(path.parent)
  finally:
    for leftover in (work, new):
      if os.path.lexists(leftover):
        _remove_tree(leftover)
