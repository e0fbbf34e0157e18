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
"""Hugging Face model directories of any architecture: where they are and their config.json."""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from elsa_jax.errors import InputError


def resolve(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
  """The local directory of an HF model: ``path_or_hub_id`` itself, or the hub id downloaded.

  Raises:
    ValueError: when the path is a file (a ``.gguf`` goes to ``from_gguf``).
    FileNotFoundError: no such directory, and not a hub id that could be downloaded.
  """
  path = pathlib.Path(path_or_hub_id)
  if path.is_dir():
    return path
  if path.exists():
    raise ValueError(f"{path} is a file; from_pretrained takes an HF model directory "
                     f"(config.json + *.safetensors). For a .gguf file use elsa_jax.models.from_gguf.")
  name = str(path_or_hub_id)
  if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
    try:
      from huggingface_hub import snapshot_download

      return pathlib.Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # no network, unknown repo, gated model...
      raise FileNotFoundError(
          f"no local directory {name!r}, and the hub id {name!r} could not be downloaded ({type(err).__name__}: "
          f"{err}); check the network and the id, or pass a local HF directory."
      ) from err
  raise FileNotFoundError(f"no such file or directory: {name!r}; pass an HF model directory, a hub id "
                          f"(org/name) or a .gguf file.")


def read_config(directory: pathlib.Path) -> dict[str, Any]:
  """The config.json dict of an HF model directory.

  Raises:
    FileNotFoundError: the directory has no config.json.
  """
  config_file = directory / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{directory} has no config.json; it is not an HF model directory.")
  return read_json(config_file)


def read_json(path: pathlib.Path) -> Any:
  """A JSON file of a model directory; a damaged one is named, with its line.

  Raises:
    elsa_jax.errors.InputError: the file is not UTF-8 JSON.
  """
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as err:
    raise InputError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); the model directory is "
                     f"damaged: download or save the model again.") from None
  except UnicodeDecodeError as err:
    raise InputError(f"{path}: not UTF-8 ({err.reason} at byte {err.start}); the model directory is damaged: "
                     f"download or save the model again.") from None
