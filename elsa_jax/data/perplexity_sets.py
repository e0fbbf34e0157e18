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
"""The field's standard perplexity sets by name, with the published preprocessing.

Perplexities of pruned LLMs only compare when the text, its split, how its
records are joined and the window length are the same. The SparseGPT and Wanda
code (``datautils.get_wikitext2`` / ``get_c4``) fixes them as follows, and
:data:`SETS` reproduces exactly that:

* ``wikitext2``: WikiText-2 raw (``Salesforce/wikitext``, config
  ``wikitext-2-raw-v1``), the ``test`` split, every record of its ``text``
  column (the empty lines included) joined with ``"\\n\\n"``, tokenised once.
* ``c4``: the first validation shard of C4 English
  (``allenai/c4``, ``en/c4-validation.00000-of-00008.json.gz``), its first
  1100 documents joined with ``" "``, tokenised once, cut to the first
  ``256 * seqlen`` tokens: 256 windows.

The ids are then cut into non-overlapping ``seqlen`` windows and scored as in
:mod:`elsa_jax.data.evaluation`; the ``seqlen`` is part of every figure.

Both come through ``datasets`` from the Hub where a network exists. Offline,
``data_files`` points at a local copy with the same schema (a ``.parquet``,
``.json``/``.jsonl`` or ``.json.gz`` file or list of them with a ``text``
column), e.g. the Hub's own ``wikitext-2-raw-v1/test-00000-of-00001.parquet``
or ``en/c4-validation.00000-of-00008.json.gz`` downloaded elsewhere.

Example:
  >>> from elsa_jax.data import perplexity_sets
  >>> sorted(perplexity_sets.SETS), perplexity_sets.SETS["c4"].max_windows
  (['c4', 'wikitext2'], 256)
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from elsa_jax.data import documents as documents_lib
from elsa_jax.data import evaluation as evaluation_lib


@dataclasses.dataclass(frozen=True)
class PerplexitySet:
  """One standard perplexity text and its preprocessing.

  Attributes:
    name: The name users give (``--eval-text NAME``).
    path: The ``datasets.load_dataset`` path on the Hub.
    config: Its configuration name, or None.
    split: The split evaluated.
    data_files: The Hub files of that split (None: the configuration's own).
    separator: What joins the records before tokenising.
    max_documents: Only the first this many records (None: all).
    max_windows: Only the first this many ``seqlen`` windows (None: all).
  """

  name: str
  path: str
  config: str | None
  split: str
  data_files: Mapping[str, str] | None
  separator: str
  max_documents: int | None = None
  max_windows: int | None = None


#: The sets by name.
SETS: dict[str, PerplexitySet] = {
    "wikitext2": PerplexitySet("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", None, "\n\n"),
    "c4": PerplexitySet("c4", "allenai/c4", None, "validation",
                        {"validation": "en/c4-validation.00000-of-00008.json.gz"}, " ",
                        max_documents=1100, max_windows=256),
}
TEXT_COLUMN = "text"


def _local_builder(files: Sequence[str]) -> str:
  """The ``datasets`` builder of local files: parquet or json (json.gz and jsonl included)."""
  suffixes = {"".join(pathlib.Path(f).suffixes[-2:]) if str(f).endswith(".gz") else pathlib.Path(f).suffix
              for f in files}
  if suffixes <= {".parquet"}:
    return "parquet"
  if suffixes <= {".json", ".jsonl", ".json.gz", ".jsonl.gz"}:
    return "json"
  raise ValueError(f"local copies must be .parquet or .json/.jsonl(.gz) files, got {sorted(map(str, files))}.")


def load_texts(name: str, *, data_files: str | Sequence[str] | None = None) -> list[str]:
  """The records of a standard set, in order, before joining (empty records kept).

  Args:
    name: A key of :data:`SETS`.
    data_files: Local copies of the set's files (same schema) to read instead of the Hub.

  Returns:
    The ``text`` column, the first ``max_documents`` records.

  Raises:
    ValueError: an unknown name or local files of another format.
    FileNotFoundError: a local file that does not exist, or the Hub could not be reached.
    KeyError: the records have no ``text`` column.
  """
  import datasets

  spec = SETS.get(name)
  if spec is None:
    raise ValueError(f"unknown perplexity set {name!r}; choose one of {', '.join(SETS)}.")
  if data_files is not None:
    files = [data_files] if isinstance(data_files, (str, pathlib.Path)) else list(data_files)
    missing = [str(f) for f in files if not pathlib.Path(f).is_file()]
    if missing:
      raise FileNotFoundError(f"no such local copy of {name}: {', '.join(missing)}.")
    ds = datasets.load_dataset(_local_builder(files), data_files={spec.split: [str(f) for f in files]},
                               split=spec.split)
    where = f"the local copy of {name} ({', '.join(map(str, files))})"
  else:
    try:
      ds = datasets.load_dataset(spec.path, spec.config, data_files=dict(spec.data_files or {}) or None,
                                 split=spec.split)
    except (ConnectionError, OSError) as err:
      raise FileNotFoundError(
          f"could not load {name} ({spec.path} {spec.config or ''} {spec.split}) from the Hub "
          f"({type(err).__name__}: {err}); without a network, download it elsewhere and pass the file "
          f"(--eval-data-files)."
      ) from err
    where = f"{spec.path} split {spec.split}"
  if TEXT_COLUMN not in ds.column_names:
    raise KeyError(f"{where} has no {TEXT_COLUMN!r} column (it has {ds.column_names}).")
  texts = ds[TEXT_COLUMN] if spec.max_documents is None else ds[: spec.max_documents][TEXT_COLUMN]
  return list(texts)


class EvalText(NamedTuple):
  """The token ids of an evaluation text and how much of it a perplexity reads.

  Attributes:
    ids: 1-D int32 ids of the whole (joined) text.
    max_windows: The set's window cap (C4: 256), None for all.
    name: The set's name, or None for a text that is not a standard set.
  """

  ids: np.ndarray
  max_windows: int | None
  name: str | None

  def windows(self, seqlen: int, requested: int = 0) -> int:
    """How many ``seqlen`` windows are evaluated: all, capped by the set and by ``requested`` (0: none)."""
    caps = [len(self.ids) // seqlen] + [c for c in (self.max_windows, requested or None) if c]
    return min(caps)

  def label(self, seqlen: int) -> str:
    """``"wikitext2 perplexity @2048"``, or ``"perplexity @2048"`` for a text of no set."""
    return f"{self.name + ' ' if self.name else ''}perplexity @{seqlen}"


def evaluation_text(source: str, tokenizer: Any, *, text_field: str = "text",
                    data_files: str | Sequence[str] | None = None) -> EvalText:
  """The ids of an evaluation source: a standard set by name, else :func:`~elsa_jax.data.documents.load_documents`.

  Args:
    source: A key of :data:`SETS` (``wikitext2``, ``c4``), or any source of ``load_documents``
      (``default``, a file or folder, ``hf:NAME``); a path that is also a set's name is read as
      the set, write ``./c4`` for the path.
    tokenizer: A ``transformers`` tokenizer.
    text_field: The text field of a non-standard source.
    data_files: Local copies of a standard set (:func:`load_texts`), or ``data_files`` of an ``hf:`` source.

  Returns:
    The joined text's ids, the set's window cap and its name.
  """
  spec = SETS.get(source)
  if spec is not None:
    texts = load_texts(source, data_files=data_files)
    return EvalText(evaluation_lib.eval_tokens(tokenizer, texts, separator=spec.separator), spec.max_windows,
                    spec.name)
  docs = documents_lib.load_documents(source, split="evaluation", text_field=text_field, data_files=data_files)
  return EvalText(evaluation_lib.eval_tokens(tokenizer, docs), None, None)
