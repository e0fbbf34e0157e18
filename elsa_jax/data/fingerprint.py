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
"""Where a run's inputs are, spelled one way, and fingerprints of what they hold.

A run's checkpoints record the resolved path (:func:`resolved`) of its model
and calibration text and a fingerprint of each (:func:`text_fingerprint`,
:func:`model_fingerprint`), so that a resume from another working directory,
or with another spelling of the same path, is the same configuration, while
a file changed under the same name is not.

* Text files and folders: the sha256 of every byte (with the relative names).
* Models: the sha256 of their ``*.json`` files and, for each weight file
  (``*.safetensors``, ``.gguf``), its size and its first and last MiB, where
  the headers and the tensor layout live (reading every byte of a 7B model at
  each start would cost a minute).
* ``default`` and ``hf:`` datasets and hub ids: None (pinned by their own
  version, or not local).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

from elsa_jax.data.documents import DEFAULT_SOURCE, HF_PREFIX
from elsa_jax.files import file_sha256

_SAMPLE = 1 << 20


def _local(spec: str) -> pathlib.Path | None:
  if spec == DEFAULT_SOURCE or spec.startswith(HF_PREFIX):
    return None
  path = pathlib.Path(spec).expanduser()
  return path if path.exists() else None


def resolved(spec: str) -> str:
  """``spec`` as an absolute, resolved path when it names a local file or folder; else as given."""
  path = _local(spec)
  return str(path.resolve()) if path is not None else spec


def _tree(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  return sorted(p for p in path.rglob("*") if p.is_file())


def text_fingerprint(spec: str) -> str | None:
  """``sha256:HEX`` of every byte of the text file or folder ``spec``; None for ``default``/``hf:``."""
  path = _local(spec)
  if path is None:
    return None
  digest = hashlib.sha256()
  for file in _tree(path):
    digest.update(f"{file.relative_to(path) if file != path else file.name}\0".encode())
    digest.update(file_sha256(file).encode())
  return "sha256:" + digest.hexdigest()


def _sample(file: pathlib.Path, digest) -> None:
  size = file.stat().st_size
  digest.update(f"{file.name}\0{size}\0".encode())
  with open(file, "rb") as f:
    digest.update(f.read(_SAMPLE))
    if size > _SAMPLE:
      f.seek(max(_SAMPLE, size - _SAMPLE))
      digest.update(f.read(_SAMPLE))


def model_fingerprint(spec: str) -> str | None:
  """``sampled-sha256:HEX`` of the model ``spec`` (a ``.gguf`` file or an HF folder); None when not local."""
  path = _local(spec)
  if path is None:
    return None
  digest = hashlib.sha256()
  for file in _tree(path):
    if file.suffix == ".json":
      digest.update(f"{file.name}\0".encode() + file_sha256(file).encode())
    elif file.suffix in (".safetensors", ".gguf", ".bin"):
      _sample(file, digest)
  return "sampled-sha256:" + digest.hexdigest()


def fingerprints(model: str, calib: str) -> dict[str, dict[str, str] | None]:
  """``{"model": {"path", "fingerprint"}, "calib": ...}`` of a run's inputs (None entries where not local)."""
  out = {}
  for name, spec, fn in (("model", model, model_fingerprint), ("calib", calib, text_fingerprint)):
    value = fn(spec)
    out[name] = None if value is None else {"path": resolved(spec), "fingerprint": value}
  return out
