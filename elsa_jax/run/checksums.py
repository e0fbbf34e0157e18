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
"""Checksums of a checkpoint step: a manifest of every file's size and sha256, written last.

:func:`write_manifest` records every file under a directory in ``MANIFEST``
(through a temporary file and a rename, so the manifest is whole or absent);
:func:`find_damage` re-reads them and says what no longer matches: a changed
byte, a missing or truncated file, a missing or unreadable manifest. Files
added after the manifest, or left out of it, are not checked.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Collection

from elsa_jax.files import file_sha256, sync_directory

MANIFEST = "elsa_checksums.json"
_FORMAT = 1


def _files(directory: pathlib.Path, exclude: Collection[str]) -> list[str]:
  names = (str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
  return sorted(name for name in names if name != MANIFEST and name not in exclude)


def write_manifest(directory: str | os.PathLike, *, exclude: Collection[str] = ()) -> pathlib.Path:
  """Writes ``directory/MANIFEST`` with the size and sha256 of every file below ``directory``.

  ``exclude``: relative paths left out (files that are rewritten after the manifest).
  """
  directory = pathlib.Path(directory)
  entries = {name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in _files(directory, exclude)}
  path = directory / MANIFEST
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": _FORMAT, "files": entries}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  sync_directory(directory)
  return path


def find_damage(directory: str | os.PathLike) -> str | None:
  """What is wrong with ``directory`` against its manifest (the first problem found), or None when intact."""
  directory = pathlib.Path(directory)
  path = directory / MANIFEST
  try:
    manifest = json.loads(path.read_text())
    entries = manifest["files"]
  except FileNotFoundError:
    return f"it has no checksum manifest ({MANIFEST}): it was not written whole, or by an older elsa_jax"
  except (OSError, ValueError, KeyError, TypeError) as err:
    return f"its checksum manifest {MANIFEST} is unreadable ({err})"
  for name, entry in sorted(entries.items()):
    file = directory / name
    try:
      size = file.stat().st_size
    except FileNotFoundError:
      return f"{name} is missing"
    if size != entry["size"]:
      return f"{name} has {size} bytes, not the {entry['size']} written"
    if file_sha256(file) != entry["sha256"]:
      return f"{name} does not match its checksum (changed on disk)"
  return None
