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
"""The registry of architectures, and loading/saving a model of any of them.

:data:`ARCHITECTURES` maps Hugging Face's ``model_type`` to an
:class:`elsa_jax.models.base.Architecture`. The functions here pick the
architecture from the file (config.json's ``model_type``, GGUF's
``general.architecture``) or from the object (a model, its graphdef or its
config), and call its own function. Adding an architecture is one line in
:data:`ARCHITECTURES`.

Example:
  >>> import os, tempfile
  >>> from elsa_jax import models
  >>> config = models.llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
  ...                                   num_hidden_layers=1, num_attention_heads=2)
  >>> graphdef, params = models.abstract_model(config)
  >>> models.architecture_of(graphdef).model_type, params["layers"][0]["mlp"]["up_proj"]["kernel"].shape
  ('llama', (32, 48))
  >>> models.architecture("gpt2")
  Traceback (most recent call last):
  ...
  ValueError: model_type 'gpt2' is not supported; elsa_jax.models supports: gemma2, gemma3_text, llama, mistral, ...
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import jax.numpy as jnp
from flax import nnx

from elsa_jax.models import gemma
from elsa_jax.models import hf
from elsa_jax.models import llama
from elsa_jax.models import mistral
from elsa_jax.models import qwen2
from elsa_jax.models import qwen3
from elsa_jax.models import safetensors_dir
from elsa_jax.models.base import Architecture, merge
from elsa_jax.models.gguf_file import open_gguf
from elsa_jax.models.gguf_tokenizer import from_gguf as tokenizer_from_gguf  # any architecture's GGUF

#: HF ``model_type`` -> its architecture.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": llama.ARCHITECTURE,
    "qwen2": qwen2.ARCHITECTURE,
    "qwen3": qwen3.ARCHITECTURE,
    "mistral": mistral.ARCHITECTURE,
    "gemma2": gemma.GEMMA2,
    "gemma3_text": gemma.GEMMA3_TEXT,
}

#: ``model_type`` values refused with a pointer to what to load instead.
REFUSED = {
    "gemma3": ("a Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration, a text_config and a vision "
               "tower); elsa_jax prunes Gemma 3's text model (model_type 'gemma3_text'). Save the text model "
               "alone with transformers (Gemma3ForCausalLM) or choose a text-only Gemma 3 (gemma-3-1b)"),
}

#: The ``model_type`` of a config.json that names none (exports of early transformers versions).
DEFAULT_MODEL_TYPE = "llama"


def _supported() -> str:
  return ", ".join(sorted(ARCHITECTURES))


def architecture(model_type: str, *, source: str | os.PathLike | None = None) -> Architecture:
  """The architecture registered under HF's ``model_type``.

  Raises:
    ValueError: for a ``model_type`` with no architecture (naming ``source``, the file it came from).
  """
  where = f" ({source})" if source is not None else ""
  if model_type in REFUSED:
    raise ValueError(f"model_type {model_type!r}{where} is {REFUSED[model_type]}.")
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"model_type {model_type!r}{where} is not supported; elsa_jax.models supports: {_supported()}. "
        f"Choose a checkpoint of one of these, or register its architecture in "
        f"elsa_jax.models.registry.ARCHITECTURES."
    )
  return ARCHITECTURES[model_type]


def architecture_of(obj: Any) -> Architecture:
  """The architecture of a model, its graphdef, its config, or of a ``model_type`` string.

  A subclass of a registered model (or config) class belongs to the closest
  registered class in its method resolution order.

  Raises:
    ValueError: for an object of no registered architecture.
  """
  if isinstance(obj, Architecture):
    return obj
  if isinstance(obj, str):
    return architecture(obj)
  if isinstance(obj, nnx.GraphDef):
    cls, field = obj.nodes[0].type, "model_class"
  elif isinstance(obj, nnx.Module):
    cls, field = type(obj), "model_class"
  else:
    cls, field = type(obj), "config_class"
  for klass in cls.__mro__:
    for arch in ARCHITECTURES.values():
      if getattr(arch, field) is klass:
        return arch
  raise ValueError(f"{cls.__qualname__} is not the model or config of a registered architecture "
                   f"({_supported()}); register its Architecture in elsa_jax.models.registry.ARCHITECTURES.")


def config_from_pretrained(path_or_hub_id: str | os.PathLike) -> Any:
  """The config of an HF directory (or hub id) of any registered architecture, reading no weight."""
  directory = hf.resolve(path_or_hub_id)
  config = hf.read_config(directory)
  return _hf_architecture(config, directory).config_from_hf(config)


def _hf_architecture(config: dict, directory: pathlib.Path) -> Architecture:
  return architecture(config.get("model_type", DEFAULT_MODEL_TYPE), source=directory / "config.json")


def from_pretrained(path_or_hub_id: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
                    shardings: Any = None) -> tuple[Any, Any]:
  """Loads an HF directory (or hub id) as the NNX model of the architecture its config.json names.

  Args:
    path_or_hub_id: a local HF directory (config.json + safetensors), or a hub id.
    dtype: compute dtype of the model (None: that of its parameters).
    param_dtype: dtype the weights are stored in.
    shardings: None, or ``(abstract_params, logical_axes) -> tree of jax.sharding.Sharding``
      (see :func:`elsa_jax.models.llama.from_pretrained`).

  Returns:
    ``(model, config)``.

  Raises:
    ValueError: a ``model_type`` no architecture is registered for, or the architecture's own errors.
    FileNotFoundError: no such directory, no config.json, or the hub id cannot be downloaded.
  """
  directory = hf.resolve(path_or_hub_id)
  arch = _hf_architecture(hf.read_config(directory), directory)
  return arch.from_pretrained(directory, dtype=dtype, param_dtype=param_dtype, shardings=shardings)


def save_pretrained(model: Any, config: Any, path: str | os.PathLike, *, sparse_format: str = "dense",
                    **kwargs) -> pathlib.Path:
  """Writes ``model`` (an NNX model or ``(graphdef, params)``) as an HF directory, by its architecture.

  Args:
    model: the model.
    config: its config.
    path: the output directory.
    sparse_format: "dense" (the default: plain HF weights every runtime reads) or "bitmask": each
      matrix stored in the fewest bytes of dense, bitmask + nonzero values, or N:M values + indices,
      the layout in config.json (:mod:`elsa_jax.models.safetensors_dir`). :func:`from_pretrained`
      reads both; :func:`elsa_jax.models.safetensors_dir.densify_directory` turns the compact one
      back into a dense one.
    **kwargs: ``dtype``, ``overwrite``, ``max_shard_size``, ... of the architecture's ``save_pretrained``.

  Raises:
    ValueError: an unknown ``sparse_format``.
    FileExistsError: ``path`` is not empty and not ``overwrite``.
  """
  arch = architecture_of(model[0] if isinstance(model, tuple) else model)
  if safetensors_dir.check_sparse_format(sparse_format) == "dense":
    return arch.save_pretrained(model, config, path, **kwargs)
  path = pathlib.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())) and not kwargs.get("overwrite", False):
    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or choose another directory.")
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{path.name}.dense.", dir=path.parent) as dense:
    arch.save_pretrained(model, config, dense, **{**kwargs, "overwrite": True})
    return safetensors_dir.compact_directory(dense, path, overwrite=True,
                                             max_shard_size=kwargs.get("max_shard_size", "5GB"))


def _gguf_architecture(reader: Any, path: pathlib.Path) -> Architecture:
  field = reader.fields.get("general.architecture")
  name = None if field is None else field.contents()
  by_name = {arch.gguf_architecture or arch.model_type: arch for arch in ARCHITECTURES.values()
             if arch.from_gguf is not None}
  if name not in by_name:
    raise ValueError(f"{path} holds a GGUF model of architecture {name!r}; elsa_jax.models reads GGUF files of "
                     f"{', '.join(sorted(by_name))}. Choose such a file, or load the model's HF checkpoint.")
  return by_name[name]


def _gguf_reader(path: str | os.PathLike) -> tuple[Any, pathlib.Path]:
  path = pathlib.Path(path)
  return open_gguf(path), path


def config_from_gguf_file(path: str | os.PathLike) -> Any:
  """The config of a GGUF file of any registered architecture, from its metadata (no tensor is read)."""
  reader, path = _gguf_reader(path)
  return _gguf_architecture(reader, path).config_from_gguf(reader)


def from_gguf(path: str | os.PathLike, *, param_dtype=jnp.float32) -> tuple[Any, Any]:
  """Loads a GGUF file as the NNX model of its ``general.architecture``: ``(model, config)``."""
  reader, path = _gguf_reader(path)
  return _gguf_architecture(reader, path).from_gguf(path, param_dtype=param_dtype)


def abstract_model(config: Any, *, remat: bool | str = False, scan_layers: bool = False) -> tuple[Any, dict]:
  """``(graphdef, abstract params)`` of the model of ``config``'s architecture, allocating no weight."""
  return architecture_of(config).abstract_model(config, remat=remat, scan_layers=scan_layers)


def logical_axes_of(graphdef: Any, params: dict) -> dict:
  """The logical axis names of every parameter of ``merge(graphdef, params)``, by its architecture."""
  return architecture_of(graphdef).logical_axes(merge(graphdef, params))
