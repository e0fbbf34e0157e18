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
"""Hugging Face <-> elsa_jax conversion: safetensors directories and hub ids.

The mapping is a rename plus a transpose of Linear weights (HF ``[out, in]``,
Flax ``[in, out]``); values are copied bit for bit, so HF -> elsa_jax -> HF is
exact in any dtype.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.files import atomic_directory
from elsa_jax.models import hf
from elsa_jax.models.safetensors_dir import natural_key as _natural_key
from elsa_jax.models.safetensors_dir import open_checkpoint
from elsa_jax.models.safetensors_dir import parse_size as _parse_size
from elsa_jax.models.llama.config import LlamaConfig
from elsa_jax.models.llama.model import Llama, merge, split

_SUFFIX = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_name(path: tuple) -> str:
  """HF tensor name of a param path, e.g. ('layers', 0, 'mlp', 'up_proj', 'kernel') ->
  'model.layers.0.mlp.up_proj.weight'."""
  *module, leaf = (str(p) for p in path)
  prefix = "" if module[0] == "lm_head" else "model."
  return prefix + ".".join(module) + "." + _SUFFIX[leaf]


def flax_path(params: dict) -> dict[str, tuple]:
  """HF name -> param path for every leaf of ``params``."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(k.key for k in path)
    out[hf_name(keys)] = keys
  return out


def _set(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _get(tree: dict, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def config_from_pretrained(path_or_hub_id: str | os.PathLike) -> LlamaConfig:
  """The :class:`LlamaConfig` of an HF directory (or hub id), without reading any weight."""
  return LlamaConfig.from_hf(hf.read_config(hf.resolve(path_or_hub_id)))


def from_pretrained(path_or_hub_id: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
                    remat: bool = False, shardings: Any = None) -> tuple[Llama, LlamaConfig]:
  """Loads an HF LLaMA (config.json + safetensors, sharded or not) as an NNX model.

  With ``shardings``, every weight is built by
  :func:`jax.make_array_from_callback` straight into its target sharding:
  each process reads, from the safetensors files, only the slices its own
  devices hold (no process ever holds a whole copy of the model).

  Args:
    path_or_hub_id: a local HF directory, or a hub id where a network exists.
    dtype: compute dtype of the model.
    param_dtype: dtype the weights are stored in.
    remat: rematerialise decoder layers in the backward pass.
    shardings: None (whole arrays on the default device), or a function
      ``(abstract_params, logical_axes) -> tree of jax.sharding.Sharding``,
      e.g. ``lambda p, axes: elsa_jax.run.sharding.param_shardings(axes, p, mesh)``.

  Returns:
    ``(model, config)``.

  Raises:
    FileNotFoundError: no such directory / hub id unreachable / no weights.
    ValueError: not a LLaMA config, a missing or unexpected tensor, a shape mismatch.

  Example (``directory`` holds an HF LLaMA: config.json and safetensors):
    >>> import tempfile
    >>> from flax import nnx
    >>> from elsa_jax.models import llama
    >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...                            num_hidden_layers=1, num_attention_heads=2)
    >>> directory = llama.save_pretrained(llama.Llama(config, rngs=nnx.Rngs(0)), config, tempfile.mkdtemp())
    >>> model, loaded = llama.from_pretrained(directory)
    >>> loaded == config, model.layers[0].mlp.up_proj.kernel.shape
    (True, (32, 48))
  """
  directory = hf.resolve(path_or_hub_id)
  return load_weights(directory, config_from_pretrained(directory), dtype=dtype, param_dtype=param_dtype,
                      remat=remat, shardings=shardings)


def pretrained_loader(config_class: type, model_class: type) -> Callable[..., tuple[Any, Any]]:
  """The ``from_pretrained`` of a family with LLaMA's HF tensor layout: ``config_class`` reads its
  config.json, ``model_class`` is built; arguments and errors as :func:`from_pretrained`."""

  def from_pretrained(path_or_hub_id: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
                      remat: bool = False, shardings: Any = None) -> tuple[Any, Any]:
    directory = hf.resolve(path_or_hub_id)
    return load_weights(directory, config_class.from_hf(hf.read_config(directory)), build=model_class,
                        dtype=dtype, param_dtype=param_dtype, remat=remat, shardings=shardings)

  from_pretrained.__doc__ = (f"Loads an HF {config_class.FAMILY} directory (or hub id) as a "
                             f":class:`{model_class.__qualname__}`; see :func:`elsa_jax.models.llama.from_pretrained`.")
  return from_pretrained


def load_weights(directory: pathlib.Path, config: LlamaConfig, *, build: Callable[..., Llama] = Llama,
                 dtype=None, param_dtype=jnp.float32, remat: bool = False,
                 shardings: Any = None) -> tuple[Llama, LlamaConfig]:
  """The safetensors weights of ``directory`` in ``build(config, ...)`` (a :class:`Llama` or a subclass).

  :func:`from_pretrained` once the directory and its config are known; a
  LLaMA-layout architecture with its own config.json (another ``model_type``)
  loads its weights with it. Arguments and errors as :func:`from_pretrained`.
  """
  abstract = nnx.eval_shape(lambda: build(config, dtype=dtype, param_dtype=param_dtype, remat=remat))
  graphdef, shapes = split(abstract)
  names = flax_path(shapes)
  checkpoint = open_checkpoint(directory)  # dense, or compact sparse (decoded a slice at a time)
  files = checkpoint.files
  missing = sorted(set(names) - set(files))
  if missing:
    raise ValueError(f"{directory} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} that a "
                     f"{config.FAMILY} with this config.json needs; the checkpoint is incomplete or of another model.")
  extra = sorted(n for n in set(files) - set(names)
                 if not _IGNORED.search(n) and not (n == "lm_head.weight" and config.tie_word_embeddings))
  if extra:
    raise ValueError(f"{directory} holds tensor(s) {extra[:5]} that this {config.FAMILY} does not use; the config.json "
                     f"does not describe these weights (another architecture, or biases not declared).")
  params = jax.tree.map(lambda s: None, shapes)
  if shardings is not None:
    from elsa_jax.models.llama.model import logical_axes

    shardings = shardings(shapes, logical_axes(abstract))
  by_file: dict[pathlib.Path, list[str]] = {}
  for name in names:
    by_file.setdefault(files[name], []).append(name)
  for file, file_names in by_file.items():
    with checkpoint.open(file) as fh:
      for name in file_names:
        path = names[name]
        want = tuple(_get(shapes, path).shape)
        transpose = path[-1] == "kernel"
        stored = tuple(fh.get_slice(name).get_shape())
        if (stored[::-1] if transpose else stored) != want:
          raise ValueError(f"tensor {name} has shape {stored} (HF layout; Linear weights are [out, in]) "
                           f"but the config.json implies {want[::-1] if transpose else want}; the weights "
                           f"and config do not match.")
        if shardings is None:
          tensor = fh.get_tensor(name)
          _set(params, path, jnp.asarray(tensor.T if transpose else tensor, dtype=param_dtype))
        else:
          _set(params, path, _load_sharded(fh.get_slice(name), want, _get(shardings, path), transpose,
                                           param_dtype))
  return merge(graphdef, params), config


def _load_sharded(tensor_slice, shape, sharding, transpose: bool, dtype) -> jax.Array:
  """A global array whose every addressable shard is read from its own slice of the file."""

  def read(index: tuple) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if transpose:  # our [in, out] shard (i, o) is the file's [out, in] slice (o, i), transposed
      return np.asarray(tensor_slice[index[::-1]]).T.astype(dtype)
    return np.asarray(tensor_slice[index]).astype(dtype)

  return jax.make_array_from_callback(shape, sharding, read)


def save_pretrained(model: Llama | tuple[Any, dict], config: LlamaConfig, path: str | os.PathLike, *,
                    dtype=None, max_shard_size: int | str = "5GB", overwrite: bool = False) -> pathlib.Path:
  """Writes an HF directory (config.json + safetensors) that LlamaForCausalLM (the config's
  ``HF_CLASS``: every family sharing LLaMA's tensor names) loads.

  The directory appears whole or not at all: it is written beside the target
  and renamed at the end.

  Args:
    model: an NNX :class:`Llama` (or a subclass) or ``(graphdef, params)``.
    config: its config.
    path: the output directory (must not exist or be empty unless ``overwrite``).
    dtype: cast the weights to this dtype (default: keep theirs).
    max_shard_size: shard into several files with an index above this size.
    overwrite: replace a non-empty existing directory.

  Example (``transformers.LlamaForCausalLM.from_pretrained(out)`` then loads it):
    >>> import os, tempfile
    >>> from flax import nnx
    >>> from elsa_jax.models import llama
    >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...                            num_hidden_layers=1, num_attention_heads=2)
    >>> out = llama.save_pretrained(llama.Llama(config, rngs=nnx.Rngs(0)), config,
    ...                             os.path.join(tempfile.mkdtemp(), "pruned"))
    >>> sorted(os.listdir(out))
    ['config.json', 'model.safetensors']
  """
  from safetensors.flax import save_file

  path = pathlib.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or choose another directory.")
  params = model[1] if isinstance(model, tuple) else split(model)[1]
  tensors = {}
  for name, p in flax_path(params).items():
    value = jnp.asarray(jax.device_get(_get(params, p)))
    if dtype is not None:
      value = value.astype(dtype)
    tensors[name] = value.T if p[-1] == "kernel" else value
  limit = _parse_size(max_shard_size)
  shards: list[dict[str, Any]] = [{}]
  size = 0
  for name in sorted(tensors, key=_natural_key):
    nbytes = tensors[name].size * tensors[name].dtype.itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  with atomic_directory(path) as tmp:
    hf_config = config.to_hf_dict()
    first = next(iter(tensors.values()))
    hf_config["torch_dtype"] = str(first.dtype)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if len(shards) == 1:
      save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
      weight_map = {}
      for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
      total = sum(t.size * t.dtype.itemsize for t in tensors.values())
      (tmp / "model.safetensors.index.json").write_text(
          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return path
