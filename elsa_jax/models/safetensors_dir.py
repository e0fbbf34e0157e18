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
"""The safetensors of an HF directory, dense or compact sparse: reading by name and slice, compacting, densifying.

Any architecture's loader reads its tensors through :func:`open_checkpoint`
(HF names, HF layout), which decodes compact tensors on the fly, a slice
at a time. A compact directory is a dense one with every matrix that is
smaller so stored as its parts (:mod:`elsa_jax.models.sparse_format`):
``<name>.bitmask`` + ``<name>.values``, or ``<name>.nm_values`` +
``<name>.nm_index``, in the same shard. Its config.json says which, under
:data:`LAYOUT_KEY`::

  "elsa_sparse": {"format": "bitmask", "version": 1,
                  "tensors": {"model.layers.0.mlp.up_proj.weight":
                                  {"format": "bitmask", "shape": [1536, 576], "dtype": "bfloat16", "nnz": 265420},
                              "model.layers.0.mlp.down_proj.weight":
                                  {"format": "nm", "n": 2, "m": 4, "shape": [576, 1536], "dtype": "bfloat16"}}}

Every other tensor (embeddings, norms, a dense matrix) is stored as is.
This module needs numpy and safetensors only (no jax): :func:`densify_directory`
turns a compact directory back into a plain one for any runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from elsa_jax.errors import InputError
from elsa_jax.files import atomic_directory
from elsa_jax.models import hf
from elsa_jax.models import sparse_format as sf

#: The config.json key of a compact directory's layout.
LAYOUT_KEY = "elsa_sparse"
#: The version of the layout this module writes (and the newest it reads).
LAYOUT_VERSION = 1
#: ``save_pretrained(sparse_format=...)`` / ``elsa-jax export --format``: "dense" (every runtime reads it) or
#: "bitmask" (each matrix that is smaller so as bitmask + values, or N:M values + indices).
SPARSE_FORMATS = ("dense", "bitmask")
INDEX_FILE = "model.safetensors.index.json"


def check_sparse_format(sparse_format: str) -> str:
  """``sparse_format`` itself, when it is one of :data:`SPARSE_FORMATS`.

  Raises:
    ValueError: for another value.
  """
  if sparse_format not in SPARSE_FORMATS:
    raise ValueError(f"sparse_format {sparse_format!r} is not one of {', '.join(SPARSE_FORMATS)}; 'dense' "
                     f"writes plain HF weights, 'bitmask' the compact sparse layout.")
  return sparse_format


def parse_size(size: int | str) -> int:
  """Bytes of a shard size such as ``"5GB"``, ``"200MB"`` or an int."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB' or '200MB'.")
  return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def natural_key(name: str):
  """Sort key putting ``layers.2`` before ``layers.10``."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _damaged(where: Any, name: str, err: Exception) -> sf.SparseFormatError:
  return sf.SparseFormatError(f"{where}: compact tensor {name}: {err}. The file is damaged or does not match "
                              f"its config.json; export the model again, or densify an intact copy.")


def read_layout(directory: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The compact tensors of an HF directory (name -> entry), ``{}`` for a dense one.

  Raises:
    ValueError: a layout of a newer version or unknown format, or an entry without its shape/dtype/format.
  """
  config_file = directory / "config.json"
  block = hf.read_config(directory).get(LAYOUT_KEY)
  if block is None:
    return {}
  if block.get("format") != "bitmask" or not isinstance(block.get("version"), int) \
      or block["version"] > LAYOUT_VERSION:
    raise ValueError(f"{config_file}: {LAYOUT_KEY} is format {block.get('format')!r} version "
                     f"{block.get('version')!r}; this elsa_jax reads format 'bitmask' up to version "
                     f"{LAYOUT_VERSION}. Upgrade elsa_jax, or densify the directory with the version that wrote it.")
  tensors = block.get("tensors", {})
  for name, entry in tensors.items():
    shape = entry.get("shape")
    fmt_ok = entry.get("format") in sf.COMPONENTS and (entry["format"] != "nm" or {"n", "m"} <= set(entry))
    if not fmt_ok or not isinstance(shape, list) or len(shape) != 2 or "dtype" not in entry:
      raise sf.SparseFormatError(f"{config_file}: {LAYOUT_KEY} entry of {name} is {entry}; it needs a format "
                                 f"({', '.join(sf.COMPONENTS)}; nm with n and m), a 2-D shape and a dtype.")
  return tensors


def _stored_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Stored tensor name -> safetensors file, from the shard index if there is one."""
  index = directory / INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: directory / file for name, file in weight_map.items()}
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{directory} holds no *.safetensors weights (PyTorch .bin checkpoints are "
                            f"not read; re-save the model with safe_serialization=True).")
  out = {}
  for f in files:
    with safe_open(f) as fh:
      out.update({name: f for name in fh.keys()})
  return out


@contextlib.contextmanager
def safe_open(file: pathlib.Path) -> Iterator[Any]:
  """``safetensors.safe_open(file)`` for numpy, with a message that names a truncated or damaged file."""
  import safetensors

  try:
    with safetensors.safe_open(file, framework="numpy") as fh:
      yield fh
  except safetensors.SafetensorError as err:
    raise InputError(f"{file} is not a complete safetensors file ({err}); it is truncated or damaged: download "
                     f"or save the model again.") from None


class _CompactSlice:
  """A compact tensor read like safetensors' slice: ``get_shape()``, ``get_dtype()``, ``[rows, cols]``.

  A bitmask tensor reads its whole mask once (1/8 byte an entry) and then,
  per slice, only the values of the rows asked for; an N:M tensor reads only
  those rows of its parts.
  """

  def __init__(self, handle: Any, where: Any, name: str, entry: dict[str, Any]):
    self._handle, self._where, self._name, self._entry = handle, where, name, entry
    self._parts = {s: handle.get_slice(f"{name}.{s}") for s in sf.COMPONENTS[entry["format"]]}
    rows, cols = entry["shape"]
    try:
      values = self._parts["values" if entry["format"] == "bitmask" else "nm_values"]
      self._dtype = values[0:0].dtype
      if self._dtype.name != entry["dtype"]:
        raise sf.SparseFormatError(f"values are {self._dtype.name} but the layout says {entry['dtype']}")
      if entry["format"] == "bitmask":
        mask = self._parts["bitmask"][:]
        if mask.shape[:1] != (rows,) or len(values.get_shape()) != 1:
          raise sf.SparseFormatError(f"bitmask {list(mask.shape)} / values {values.get_shape()} do not fit "
                                     f"the layout's shape {entry['shape']}")
        self._mask, self._offsets = mask, np.concatenate([[0], np.cumsum(sf.row_counts(mask, cols))])
        if self._offsets[-1] != values.get_shape()[0]:
          raise sf.SparseFormatError(f"the mask has {self._offsets[-1]} set bits but there are "
                                     f"{values.get_shape()[0]} values")
      elif values.get_shape()[:1] != [rows] or self._parts["nm_index"].get_shape()[:1] != [rows]:
        raise sf.SparseFormatError(f"nm_values {values.get_shape()} / nm_index "
                                   f"{self._parts['nm_index'].get_shape()} do not have the layout's {rows} rows")
    except sf.SparseFormatError as err:
      raise _damaged(where, name, err) from None

  def get_shape(self) -> list[int]:
    return list(self._entry["shape"])

  def get_dtype(self) -> str:
    return self._parts["values" if self._entry["format"] == "bitmask" else "nm_values"].get_dtype()

  def _read(self, part: str, start: int, stop: int) -> np.ndarray:
    """Entries ``start:stop`` of a part (safetensors refuses an empty slice at the end)."""
    if stop > start:
      return self._parts[part][start:stop]
    shape = [0] + self._parts[part].get_shape()[1:]
    return np.zeros(shape, self._dtype if part in ("values", "nm_values") else np.uint8)

  def _rows(self, start: int, stop: int) -> np.ndarray:
    entry, cols = self._entry, self._entry["shape"][1]
    if entry["format"] == "bitmask":
      values = self._read("values", int(self._offsets[start]), int(self._offsets[stop]))
      return sf.scatter(sf.unpack_bitmask(self._mask[start:stop], cols), values)
    return sf.decode_nm(self._read("nm_values", start, stop), self._read("nm_index", start, stop),
                        entry["n"], entry["m"], cols)

  def __getitem__(self, index: Any) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (2 - len(index))
    rows = index[0] if isinstance(index[0], slice) else slice(index[0], index[0] + 1 or None)
    start, stop, step = rows.indices(self._entry["shape"][0])
    try:
      block = self._rows(start, max(start, stop))[::step]
    except sf.SparseFormatError as err:
      raise _damaged(self._where, self._name, err) from None
    return block[(slice(None) if isinstance(index[0], slice) else 0, index[1])]


class TensorFile:
  """One safetensors file of a checkpoint, by HF name: ``keys()``, ``get_slice(name)``, ``get_tensor(name)``.

  Dense tensors come from safetensors itself; compact ones are decoded (numpy arrays, HF layout).
  """

  def __init__(self, handle: Any, file: pathlib.Path, names: list[str], layout: dict[str, dict[str, Any]]):
    self._handle, self._file, self._names, self._layout = handle, file, names, layout
    self._slices: dict[str, _CompactSlice] = {}

  def keys(self) -> list[str]:
    return list(self._names)

  def get_slice(self, name: str) -> Any:
    if name not in self._layout:
      return self._handle.get_slice(name)
    if name not in self._slices:
      self._slices[name] = _CompactSlice(self._handle, self._file, name, self._layout[name])
    return self._slices[name]

  def get_tensor(self, name: str) -> np.ndarray:
    return self._handle.get_tensor(name) if name not in self._layout else self.get_slice(name)[:]


class Checkpoint(NamedTuple):
  """The tensors of an HF directory: ``files`` (HF name -> its file) and ``layout`` (compact name -> entry)."""

  directory: pathlib.Path
  files: dict[str, pathlib.Path]
  layout: dict[str, dict[str, Any]]

  @contextlib.contextmanager
  def open(self, file: pathlib.Path) -> Iterator[TensorFile]:
    """The tensors of ``file`` (one of ``files``' values), dense or decoded, as numpy arrays."""
    with safe_open(file) as handle:
      yield TensorFile(handle, file, [n for n, f in self.files.items() if f == file], self.layout)

  def by_file(self) -> dict[pathlib.Path, list[str]]:
    """Each file and its tensor names, in natural order."""
    out: dict[pathlib.Path, list[str]] = {}
    for name in sorted(self.files, key=natural_key):
      out.setdefault(self.files[name], []).append(name)
    return out


def open_checkpoint(directory: str | os.PathLike) -> Checkpoint:
  """The tensors of an HF directory, dense or compact, by HF name (no tensor is read).

  Raises:
    FileNotFoundError: no config.json or no safetensors.
    ValueError: a layout this version cannot read, or a compact tensor with a part missing or
      its parts in different files (:class:`~elsa_jax.models.sparse_format.SparseFormatError`).
  """
  directory = pathlib.Path(directory)
  layout = read_layout(directory)
  stored = _stored_files(directory)
  parts = {name: [f"{name}.{s}" for s in sf.COMPONENTS[entry["format"]]] for name, entry in layout.items()}
  component_names = {p for ps in parts.values() for p in ps}
  files = {name: file for name, file in stored.items() if name not in component_names}
  for name, ps in parts.items():
    missing = [p for p in ps if p not in stored]
    if missing or len({stored[p] for p in ps}) != 1:
      why = f"lacks {missing}" if missing else "has its parts in different files"
      raise _damaged(directory, name, sf.SparseFormatError(f"the checkpoint {why}"))
    files[name] = stored[ps[0]]
  return Checkpoint(directory, files, layout)


class _ShardWriter:
  """Writes tensors into safetensors shards of at most ``limit`` bytes, and the index when there are several."""

  def __init__(self, directory: pathlib.Path, limit: int):
    self._directory, self._limit = directory, limit
    self._pending: dict[str, np.ndarray] = {}
    self._shards: list[tuple[pathlib.Path, list[str]]] = []
    self._total = 0

  def add(self, tensors: dict[str, np.ndarray]) -> None:
    """Adds tensors that stay together in one shard."""
    nbytes = sum(t.nbytes for t in tensors.values())
    if self._pending and sum(t.nbytes for t in self._pending.values()) + nbytes > self._limit:
      self._flush()
    self._pending.update(tensors)
    self._total += nbytes

  def _flush(self) -> None:
    from safetensors.numpy import save_file

    file = self._directory / f".shard-{len(self._shards) + 1:05d}"
    save_file({k: np.ascontiguousarray(v) for k, v in self._pending.items()}, str(file), metadata={"format": "pt"})
    self._shards.append((file, list(self._pending)))
    self._pending = {}

  def close(self) -> None:
    """Writes the last shard and names the files as transformers does."""
    if self._pending or not self._shards:
      self._flush()
    if len(self._shards) == 1:
      os.replace(self._shards[0][0], self._directory / "model.safetensors")
      return
    weight_map = {}
    for i, (file, names) in enumerate(self._shards, 1):
      final = f"model-{i:05d}-of-{len(self._shards):05d}.safetensors"
      os.replace(file, self._directory / final)
      weight_map.update({name: final for name in names})
    (self._directory / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": self._total}, "weight_map": weight_map}, indent=2))


def _rewrite(src: pathlib.Path, dst: pathlib.Path, config: dict[str, Any],
             convert: Callable[[str, np.ndarray], dict[str, np.ndarray]], *, max_shard_size: int | str,
             overwrite: bool) -> pathlib.Path:
  """``dst``: ``src`` with each tensor replaced by ``convert(name, tensor)``, ``config`` as config.json.

  One tensor is read at a time, and at most one shard is held; every other
  file of ``src`` (tokenizer, generation config...) is copied. ``dst``
  appears whole or not at all.
  """
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
    raise FileExistsError(f"{dst} exists and is not empty; pass overwrite (--overwrite) or choose another output.")
  if dst.exists() and dst.resolve() == src.resolve():
    raise ValueError(f"{dst} is the input directory itself; write to another directory.")
  limit = parse_size(max_shard_size)
  checkpoint = open_checkpoint(src)
  with atomic_directory(dst) as tmp:
    writer = _ShardWriter(tmp, limit)
    with contextlib.ExitStack() as stack:
      handles = {file: stack.enter_context(checkpoint.open(file)) for file in checkpoint.by_file()}
      for name in sorted(checkpoint.files, key=natural_key):
        writer.add(convert(name, handles[checkpoint.files[name]].get_tensor(name)))
    writer.close()
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for item in src.iterdir():
      if item.name in ("config.json", INDEX_FILE) or item.suffix == ".safetensors" or item.name.startswith("."):
        continue
      (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
  return dst


def compact_directory(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                      overwrite: bool = False) -> pathlib.Path:
  """Writes the dense HF directory ``src`` as a compact one at ``dst``, bit-exact.

  Each 2-D tensor is stored in the fewest bytes of dense, bitmask and N:M
  (:func:`elsa_jax.models.sparse_format.choose_encoding`); the others as they are.

  Raises:
    FileExistsError: ``dst`` is not empty and not ``overwrite``.
    ValueError: ``src`` is already compact, or is ``dst``.
  """
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  config = hf.read_config(src)
  if LAYOUT_KEY in config:
    raise ValueError(f"{src} is already a compact sparse directory (its config.json has {LAYOUT_KEY}).")
  tensors: dict[str, dict[str, Any]] = {}

  def convert(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    entry, parts = sf.encode(x)
    if not parts:
      return {name: x}
    tensors[name] = entry
    return {f"{name}.{suffix}": part for suffix, part in parts.items()}

  # The layout is filled while the tensors are written, before config.json is.
  config[LAYOUT_KEY] = {"format": "bitmask", "version": LAYOUT_VERSION, "tensors": tensors}
  return _rewrite(src, dst, config, convert, max_shard_size=max_shard_size, overwrite=overwrite)


def densify_directory(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                      overwrite: bool = False) -> pathlib.Path:
  """Writes the compact HF directory ``src`` as a plain dense one at ``dst`` (config.json without the layout).

  Raises:
    FileExistsError: ``dst`` is not empty and not ``overwrite``.
    ValueError: ``src`` is not compact (it is dense already), or is ``dst``; a damaged compact tensor
      (:class:`~elsa_jax.models.sparse_format.SparseFormatError`, naming the file and the tensor).
  """
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  config = hf.read_config(src)
  if LAYOUT_KEY not in config:
    raise ValueError(f"{src} is not a compact sparse directory (its config.json has no {LAYOUT_KEY}); "
                     f"it is already dense and every runtime reads it as it is.")
  del config[LAYOUT_KEY]
  return _rewrite(src, dst, config, lambda name, x: {name: x}, max_shard_size=max_shard_size, overwrite=overwrite)
