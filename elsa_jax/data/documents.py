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
"""Calibration text: loading documents, tokenising them once, drawing windows.

Three steps, each usable on its own:

1. :func:`load_documents` turns a source string into a list of documents:
   ``"default"`` (the built-in text of :mod:`elsa_jax.data.assets`), a ``.txt`` /
   ``.jsonl`` / ``.json`` file or a folder of them, a folder written by
   ``datasets.Dataset.save_to_disk``, or ``"hf:NAME[:CONFIG][@SPLIT]"`` for
   ``datasets.load_dataset``.
2. :func:`tokenize_documents` tokenises them once and caches the ids on disk,
   keyed by a hash of the tokenizer and of the text.
3. :class:`CalibrationWindows` draws random fixed-length windows of
   ``seqlen + 1`` tokens (inputs and their next-token targets), so that batch
   ``i`` is a pure function of ``(seed, i)``: a resumed run gets exactly the
   data it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from elsa_jax.data import assets
from elsa_jax.errors import InputError, MissingFieldError

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "default"
HF_PREFIX = "hf:"
#: ``load_documents`` split names mapped to ``datasets`` split names.
DATASET_SPLITS = {"calibration": "train", "evaluation": "validation"}
_TOKEN_CACHE_VERSION = 1
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


# ----------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------


def _nonempty(docs: Sequence[Any]) -> list[str]:
  return [d for d in docs if isinstance(d, str) and d.strip()]


def split_sections(text: str) -> list[str]:
  """Splits a text on blank lines into its non-empty sections."""
  return _nonempty([s.strip("\n") for s in _BLANK_LINES.split(text)])


def read_utf8(path: pathlib.Path) -> str:
  """The text of a UTF-8 file (a BOM is dropped).

  Raises:
    elsa_jax.errors.InputError: naming the file and the line of the first byte that is not UTF-8.
  """
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as err:
    line = data.count(b"\n", 0, err.start) + 1
    raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                     f"convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8.") from None


def read_txt(path: pathlib.Path, *, sections: bool = False) -> list[str]:
  """Reads a UTF-8 text file as one document, or one per blank-line section."""
  text = read_utf8(path)
  return split_sections(text) if sections else _nonempty([text])


def _field(record: Any, text_field: str, where: str) -> Any:
  if not isinstance(record, dict) or text_field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise MissingFieldError(f"{where} has no field {text_field!r} (it has {keys}); name the field that holds "
                            f"the text with --text-field (text_field=...).")
  return record[text_field]


def _json(text: str, path: pathlib.Path, lineno: int = 1) -> Any:
  """``json.loads(text)``, the text found at line ``lineno`` of ``path``; errors name the file and the line."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as err:
    raise InputError(f"{path}:{lineno + err.lineno - 1}:{err.colno}: not valid JSON ({err.msg}); fix that "
                     f"line, or give the text as a .txt file.") from None


def read_jsonl(path: pathlib.Path, *, text_field: str = "text") -> list[str]:
  """Reads the ``text_field`` of every record of a JSON-lines file.

  A ``.json`` file holding one JSON list of records is read as well.
  """
  text = read_utf8(path)
  if path.suffix == ".json" and text.lstrip().startswith("["):
    records = _json(text, path)
    return _nonempty([_field(r, text_field, f"{path} record {i}") for i, r in enumerate(records)])
  docs = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if line.strip():
      docs.append(_field(_json(line, path, lineno), text_field, f"{path}:{lineno}"))
  return _nonempty(docs)


def _is_saved_dataset(path: pathlib.Path) -> bool:
  return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_path(path: pathlib.Path, *, split: str, text_field: str, sections: bool) -> list[str]:
  if path.is_dir():
    if _is_saved_dataset(path):
      import datasets

      ds = datasets.load_from_disk(str(path))
      if isinstance(ds, datasets.DatasetDict):
        ds = ds[DATASET_SPLITS.get(split, split)]
      return _dataset_texts(ds, text_field, str(path))
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json") and p.is_file())
    return [doc for p in files for doc in _read_path(p, split=split, text_field=text_field, sections=sections)]
  if path.suffix in (".jsonl", ".json"):
    return read_jsonl(path, text_field=text_field)
  return read_txt(path, sections=sections)


def _dataset_texts(ds: Any, text_field: str, where: str) -> list[str]:
  if text_field not in ds.column_names:
    raise MissingFieldError(f"{where} has no column {text_field!r} (it has {ds.column_names}); name the column "
                            f"that holds the text with --text-field (text_field=...).")
  return _nonempty(ds[text_field])


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
  """Parses ``"hf:NAME[:CONFIG][@SPLIT]"`` into ``(name, config, split)``."""
  spec = source[len(HF_PREFIX):]
  spec, _, split = spec.partition("@")
  name, _, config = spec.partition(":")
  if not name:
    raise ValueError(f"no dataset name in {source!r}; write hf:NAME[:CONFIG][@SPLIT].")
  return name, config or None, split or None


def load_dataset_documents(name: str, config: str | None = None, *, split: str = "train",
                           text_field: str = "text", data_files: Any = None) -> list[str]:
  """The ``text_field`` column of ``datasets.load_dataset(name, config, split=split)``.

  Args:
    name: A hub dataset name, or a builder such as ``"json"`` / ``"text"``
      used with ``data_files``.
    config: The dataset configuration, if any.
    split: The ``datasets`` split, e.g. ``"train"``.
    text_field: The column holding the text.
    data_files: Passed to ``load_dataset`` (local files or hub paths).

  Returns:
    The non-empty texts, in dataset order.
  """
  import datasets

  ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
  return _dataset_texts(ds, text_field, f"dataset {name!r} split {split!r}")


def check_source(source: str) -> None:
  """Refuses, reading nothing, a text source that names no existing file or folder (see :func:`load_documents`).

  Raises:
    FileNotFoundError: ``source`` is neither special nor an existing path.
    ValueError: an ``hf:`` source without a dataset name.
  """
  if source == DEFAULT_SOURCE:
    return
  if source.startswith(HF_PREFIX):
    parse_hf_source(source)
  elif not pathlib.Path(source).expanduser().exists():
    raise FileNotFoundError(
        f"no text file or folder at {source!r}; give a .txt/.jsonl/.json file, a folder of them, "
        f"{DEFAULT_SOURCE!r}, or {HF_PREFIX}NAME[:CONFIG][@SPLIT]."
    )


def load_documents(source: str, *, split: str = "calibration", text_field: str = "text",
                   sections: bool = False, data_files: Any = None) -> list[str]:
  """Loads the documents of a text source.

  Args:
    source: One of

      * ``"default"``: the built-in text (:func:`elsa_jax.data.assets.default_text`);
      * a path: a ``.txt`` file (one document, or one per blank-line section
        with ``sections=True``), a ``.jsonl`` file (one record per line) or a
        ``.json`` file (JSON lines, or one list of records), a folder of such
        files (read recursively, in sorted order), or a folder written by
        ``datasets`` ``save_to_disk``;
      * ``"hf:NAME[:CONFIG][@SPLIT]"``: ``datasets.load_dataset(NAME, CONFIG,
        split=SPLIT, data_files=data_files)``, e.g. ``"hf:allenai/c4:en"`` or,
        for local files, ``"hf:json@train"`` with ``data_files="x.jsonl"``.
    split: ``"calibration"`` or ``"evaluation"``: picks the split of the
      default text; for datasets without an ``@SPLIT``, it maps to ``"train"``
      and ``"validation"`` (other names are passed through). Ignored for
      plain files.
    text_field: The record field / dataset column holding the text.
    sections: Split ``.txt`` files on blank lines.
    data_files: ``data_files`` of ``datasets.load_dataset`` (``hf:`` only).

  Returns:
    The non-empty documents, in source order.

  Raises:
    FileNotFoundError: ``source`` is neither special nor an existing path.
    KeyError: The records have no ``text_field`` (:class:`elsa_jax.errors.MissingFieldError`).
    ValueError: The source holds no non-empty document, or a file is not UTF-8 or not valid JSON
      (:class:`elsa_jax.errors.InputError`, naming the file and the line).
  """
  check_source(source)
  if source == DEFAULT_SOURCE:
    docs = assets.default_text(split)
  elif source.startswith(HF_PREFIX):
    name, config, hf_split = parse_hf_source(source)
    docs = load_dataset_documents(name, config, split=hf_split or DATASET_SPLITS.get(split, split),
                                  text_field=text_field, data_files=data_files)
  else:
    docs = _read_path(pathlib.Path(source).expanduser(), split=split, text_field=text_field, sections=sections)
  if not docs:
    raise ValueError(f"{source!r} holds no non-empty document (text field {text_field!r}).")
  return docs


# ----------------------------------------------------------------------------
# Tokenisation with a disk cache
# ----------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """A hex digest identifying a tokenizer's behaviour (vocabulary, merges, rules).

  Fast tokenizers are hashed through their full serialisation
  (``backend_tokenizer.to_str()``); others through their class and vocabulary.
  """
  h = hashlib.sha256(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    h.update(backend.to_str().encode())
  else:
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id)).encode())
  return h.hexdigest()


def documents_fingerprint(docs: Sequence[str]) -> str:
  """A hex digest of a list of documents (their order and exact text)."""
  h = hashlib.sha256(struct.pack("<q", len(docs)))
  for doc in docs:
    data = doc.encode("utf-8")
    h.update(struct.pack("<q", len(data)))
    h.update(data)
  return h.hexdigest()


def _encode(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool, chunk: int = 256) -> list[list[int]]:
  out: list[list[int]] = []
  for i in range(0, len(texts), chunk):
    enc = tokenizer(list(texts[i:i + chunk]), add_special_tokens=add_special_tokens, verbose=False)
    out.extend(enc["input_ids"])
  return out


def _save_ragged(path: pathlib.Path, arrays: Sequence[np.ndarray]) -> None:
  offsets = np.cumsum([0, *(len(a) for a in arrays)], dtype=np.int64)
  flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, ids=flat, offsets=offsets)
  os.replace(tmp, path)


def _load_ragged(path: pathlib.Path) -> list[np.ndarray]:
  with np.load(path) as z:
    flat, offsets = z["ids"], z["offsets"]
  return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def cached_encode(tokenizer: Any, texts: Sequence[str], *, kind: str, add_special_tokens: bool,
                  append_id: int | None, cache_dir: str | os.PathLike[str] | None = None) -> list[np.ndarray]:
  """Tokenises ``texts`` (each separately), memoised on disk.

  Args:
    tokenizer: A ``transformers`` tokenizer.
    texts: The texts.
    kind: A label that is part of the cache key (what the ids are for).
    add_special_tokens: Passed to the tokenizer.
    append_id: A token id appended to every text's ids, or None.
    cache_dir: Where the ``<sha256>.npz`` files live; None: ``<cache>/tokens``.

  Returns:
    One int32 array per text.
  """
  key = hashlib.sha256(json.dumps([
      _TOKEN_CACHE_VERSION, kind, add_special_tokens, append_id,
      tokenizer_fingerprint(tokenizer), documents_fingerprint(texts),
  ]).encode()).hexdigest()
  folder = pathlib.Path(cache_dir) if cache_dir is not None else assets.cache_dir() / "tokens"
  path = folder / f"{key}.npz"
  if path.is_file():
    return _load_ragged(path)
  tail = [append_id] if append_id is not None else []
  arrays = [np.asarray(ids + tail, dtype=np.int32)
            for ids in _encode(tokenizer, texts, add_special_tokens=add_special_tokens)]
  _save_ragged(path, arrays)
  return arrays


def tokenize_documents(tokenizer: Any, docs: Sequence[str], cache_dir: str | os.PathLike[str] | None = None,
                       *, append_eos: bool = True) -> list[np.ndarray]:
  """Tokenises each document once, with a disk cache.

  Documents are encoded without special tokens (no BOS), and the tokenizer's
  EOS id is appended after every document (when it has one and
  ``append_eos``), so that documents packed together by
  :class:`CalibrationWindows` stay separated, as in pretraining streams.

  The ids are cached in ``cache_dir`` (default ``<cache>/tokens``) under a
  SHA-256 of the tokenizer's full serialisation, the documents' exact text
  and these options; a second call with the same inputs only reads the file.

  Args:
    tokenizer: A ``transformers`` tokenizer.
    docs: The documents.
    cache_dir: Folder of the token cache; None for the default.
    append_eos: Append the EOS id after every document.

  Returns:
    One int32 array of token ids per document.
  """
  eos = tokenizer.eos_token_id if append_eos else None
  return cached_encode(tokenizer, docs, kind="documents", add_special_tokens=False, append_id=eos,
                       cache_dir=cache_dir)


# ----------------------------------------------------------------------------
# Calibration windows
# ----------------------------------------------------------------------------


def pack_segments(lengths: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Groups consecutive documents into segments at least one window long.

  A segment is closed as soon as its length reaches ``window``, so a document
  at least one window long that follows no pending short ones is a segment on
  its own, and short documents are concatenated with their successors. A tail
  shorter than a window is merged into the last segment.

  Args:
    lengths: Token counts of the documents, in order.
    window: The window length.

  Returns:
    ``(starts, sizes)`` of the segments, as offsets into the concatenation of
    the documents. Empty when all documents together are shorter than a window.
  """
  starts, sizes = [], []
  start = run = 0
  for n in lengths.tolist():
    run += n
    if run >= window:
      starts.append(start)
      sizes.append(run)
      start += run
      run = 0
  if run and sizes:
    sizes[-1] += run
  return np.asarray(starts, np.int64), np.asarray(sizes, np.int64)


class CalibrationWindows:
  """Random calibration windows of ``seqlen + 1`` tokens, a pure function of the step.

  Sampling follows the paper's recipe (a random window per document, each
  sample used once), with two extensions:

  * Documents shorter than a window are packed with their neighbours (see
    :func:`pack_segments`) instead of being skipped; :func:`tokenize_documents`
    puts an EOS between them.
  * A segment of ``L`` tokens yields ``L // window`` non-overlapping windows,
    laid end to end from a random offset in ``[0, L - k * window]``; a document
    shorter than two windows therefore yields exactly one random window.

  One epoch is a random permutation of all these samples. Sample ``g`` of the
  run (``g = step * batch_size + row``) lives in epoch ``g // N`` at position
  ``g % N`` (``N`` = :attr:`samples_per_epoch`); every epoch draws a fresh
  permutation and fresh offsets from ``numpy.random.default_rng([seed,
  epoch])``. When a run needs more than one epoch, a warning is logged once.

  With ``process_count > 1`` each host gets rows
  ``[process_index * b, (process_index + 1) * b)`` of the global batch, where
  ``b = batch_size // process_count``.

  Args:
    tokens: Token ids of each document, in order.
    seqlen: Inputs per sample; a sample holds ``seqlen + 1`` tokens.
    batch_size: The global batch size (all hosts together).
    seed: Seed of the permutations and offsets.
    process_index: This host's index.
    process_count: The number of hosts.

  Raises:
    ValueError: Invalid sizes, or fewer tokens than one window.
  """

  def __init__(self, tokens: Sequence[np.ndarray], *, seqlen: int, batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if seqlen < 1 or batch_size < 1:
      raise ValueError(f"seqlen and batch_size must be positive, got {seqlen} and {batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes.")
    self.seqlen = seqlen
    self.window = seqlen + 1
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch_size = batch_size // process_count
    lengths = np.asarray([len(t) for t in tokens], np.int64)
    self.num_tokens = int(lengths.sum())
    if self.num_tokens < self.window:
      raise ValueError(
          f"the calibration text has {self.num_tokens} tokens, fewer than one window of {self.window} "
          f"tokens (seqlen {seqlen} + 1); give more text or a smaller seqlen."
      )
    self._tokens = np.concatenate([np.asarray(t, np.int32) for t in tokens])
    self._seg_start, seg_size = pack_segments(lengths, self.window)
    per_segment = seg_size // self.window
    self._slack = seg_size - per_segment * self.window
    self._sample_segment = np.repeat(np.arange(len(per_segment)), per_segment)
    first = np.cumsum(per_segment) - per_segment
    self._sample_rank = np.arange(len(self._sample_segment)) - np.repeat(first, per_segment)
    self.samples_per_epoch = len(self._sample_segment)
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._warned = False

  @property
  def num_segments(self) -> int:
    """How many (packed) documents the windows are drawn from."""
    return len(self._seg_start)

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches in one epoch."""
    return self.samples_per_epoch // self.batch_size

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """This epoch's sample order and the start offset of every sample.

    A pure function of ``(seed, epoch)``; the last two epochs are memoised.
    """
    if epoch not in self._epochs:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(self.samples_per_epoch)
      phase = rng.integers(0, self._slack + 1)
      starts = (self._seg_start + phase)[self._sample_segment] + self._sample_rank * self.window
      if len(self._epochs) >= 2:
        self._epochs.pop(min(self._epochs))
      self._epochs[epoch] = (order, starts)
    return self._epochs[epoch]

  def sample_starts(self, indices: np.ndarray) -> np.ndarray:
    """Token offsets of global samples ``indices`` (a pure function of the seed)."""
    indices = np.asarray(indices, np.int64)
    if indices.size and indices.min() < 0:
      raise ValueError(f"sample indices must be non-negative, got {indices.min()}.")
    epochs, positions = np.divmod(indices, self.samples_per_epoch)
    if indices.size and epochs.max() > 0 and not self._warned:
      self._warned = True
      logger.warning(
          "the calibration text holds %d windows of %d tokens; the run needs more, so it re-uses the "
          "text from sample %d on, with a fresh permutation and fresh window offsets per epoch.",
          self.samples_per_epoch, self.window, self.samples_per_epoch,
      )
    out = np.empty(indices.shape, np.int64)
    for epoch in np.unique(epochs).tolist():
      order, starts = self._epoch(epoch)
      mask = epochs == epoch
      out[mask] = starts[order[positions[mask]]]
    return out

  def batch(self, step: int) -> np.ndarray:
    """This host's rows of global batch ``step``: int32 ``[local_batch_size, seqlen + 1]``."""
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}.")
    first = step * self.batch_size + self.process_index * self.local_batch_size
    starts = self.sample_starts(np.arange(first, first + self.local_batch_size))
    return self._tokens[starts[:, None] + np.arange(self.window)]

  __call__ = batch

  def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
    """Yields ``batch(start_step)``, ``batch(start_step + 1)``, ... without end."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1
