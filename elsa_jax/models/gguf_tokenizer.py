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
"""The tokenizer stored in a GGUF file's metadata, built with ``tokenizers`` alone.

A GGUF file has no ``tokenizer.json``: llama.cpp keeps the vocabulary, the
merges, the token types and the special token ids as metadata. This module
reads them with the ``gguf`` package and assembles the same byte-level BPE that
transformers' GGUF loader builds (``transformers.integrations.gguf``), wrapped
in a ``transformers.PreTrainedTokenizerFast``. Unlike that loader it needs no
torch, so the base install can tokenise the built-in model's text.

Supported: ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE: SmolLM2, LLaMA 3,
Qwen2/3, Mistral's Tekken), with the pre-tokenizer split the file names in
``tokenizer.ggml.pre``. Sentencepiece vocabularies (``"llama"``, Gemma) are
left to transformers.

Example::

  tok = gguf_tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
  tok("Hello world")["input_ids"]
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

__all__ = ["PRE_TOKENIZER_SPLITS", "from_gguf", "read_tokenizer_metadata"]

_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ``tokenizer.ggml.pre`` -> the regex that splits text before the byte-level
#: BPE. Names not listed (``"smollm"``, ``"gpt2"``, ...) use GPT-2's own split.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}

_KEYS = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "token_type": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "unk_token_id": "tokenizer.ggml.unknown_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
    "add_bos_token": "tokenizer.ggml.add_bos_token",
    "add_prefix_space": "tokenizer.ggml.add_space_prefix",
    "chat_template": "tokenizer.chat_template",
}


def read_tokenizer_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The tokenizer fields of a GGUF file (``tokens``, ``merges``, ids, ...).

  Raises:
    FileNotFoundError: ``path`` is not a file.
    ValueError: the file is not a readable GGUF or holds no tokenizer.
  """
  from elsa_jax.models.gguf_file import open_gguf

  path = pathlib.Path(path)
  reader = open_gguf(path)
  meta = {name: reader.fields[key].contents() for name, key in _KEYS.items() if key in reader.fields}
  if "tokens" not in meta:
    raise ValueError(f"{path}: the GGUF file stores no tokenizer (no tokenizer.ggml.tokens); "
                     "pass an HF directory with a tokenizer as --model.")
  return meta


@functools.cache
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's printable spelling of each byte (``bytes_to_unicode``)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
      + list(range(ord("®"), ord("ÿ") + 1))
  chars = list(printable)
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def _spelled(token: str, alphabet: set[str]) -> str:
  """``token`` in the byte alphabet (files from some converters store raw text)."""
  if set(token) <= alphabet:
    return token
  spelling = _byte_alphabet()
  return "".join(spelling[b] for b in token.encode("utf-8"))


def _backend(meta: dict[str, Any]):
  """The ``tokenizers.Tokenizer`` of a byte-level BPE vocabulary."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

  alphabet = set(_byte_alphabet().values())
  tokens = list(meta["tokens"])
  vocab = {_spelled(t, alphabet): i for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in meta.get("merges", ())]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False))
  split = PRE_TOKENIZER_SPLITS.get(meta.get("pre"))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("add_prefix_space", False)))
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  types = list(meta.get("token_type", ()))
  control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
  user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
  bos = meta.get("bos_token_id")
  if meta.get("add_bos_token") and bos is not None:
    name = tokens[bos]
    tok.post_processor = processors.TemplateProcessing(single=f"{name}:0 $A:0", pair=f"{name}:0 $A:0 $B:1",
                                                       special_tokens=[(name, bos)])
  else:
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
  return tok


def from_gguf(path: str | os.PathLike[str]) -> Any:
  """The tokenizer of a GGUF file as a ``transformers.PreTrainedTokenizerFast``.

  The ids equal those of ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``
  (tested on the built-in model and real text), without importing torch.

  Raises:
    FileNotFoundError: ``path`` is not a file.
    ValueError: the file is damaged, has no tokenizer, or one that is not
      byte-level BPE.
  """
  from transformers import PreTrainedTokenizerFast

  meta = read_tokenizer_metadata(path)
  if meta.get("model") != "gpt2":
    raise ValueError(f"{path}: the GGUF tokenizer is {meta.get('model')!r}; elsa_jax builds byte-level BPE "
                     "('gpt2') tokenizers only. Pass the model's HF directory (with tokenizer.json) as --model.")
  tokens = meta["tokens"]
  names = {}
  for field in ("bos", "eos", "unk", "pad"):
    token_id = meta.get(f"{field}_token_id")
    if token_id is not None and 0 <= int(token_id) < len(tokens):
      names[f"{field}_token"] = tokens[int(token_id)]
  kwargs = {"chat_template": meta["chat_template"]} if "chat_template" in meta else {}
  return PreTrainedTokenizerFast(tokenizer_object=_backend(meta), add_bos_token=bool(meta.get("add_bos_token")),
                                 **names, **kwargs)
