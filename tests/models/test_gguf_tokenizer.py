"""The torch-free GGUF tokenizer against transformers' GGUF loader, and a torch-free import of the package."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from elsa_jax.data import assets
from elsa_jax.models import gguf_tokenizer


def _reference(path: pathlib.Path):
  pytest.importorskip("torch")  # transformers' GGUF loader imports torch
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _sample(docs: list[str], n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [docs[i] for i in rng.choice(len(docs), size=min(n, len(docs)), replace=False)]


def test_builtin_tokenizer_ids_equal_transformers_on_real_text():
  path = assets.default_model_path()
  ref = _reference(path)
  tok = gguf_tokenizer.from_gguf(path)
  seed = int(np.random.default_rng().integers(1 << 30))
  texts = _sample(assets.default_text("evaluation"), 12, seed) + _sample(assets.default_text("calibration"), 12, seed)
  texts += ["<|im_start|>user\nHi there<|im_end|>\n", "  leading spaces,\ttabs\r\nand 12345 digits", "é ü 日本語 🙂"]
  for text in texts:
    assert tok(text)["input_ids"] == ref(text)["input_ids"], text[:80]
    assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
  joined = "\n\n".join(texts)
  assert tok(joined)["input_ids"] == ref(joined)["input_ids"]
  for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    assert getattr(tok, name) == getattr(ref, name), name
  assert tok.decode(tok(texts[0])["input_ids"]) == ref.decode(ref(texts[0])["input_ids"])


def _write_tiny_gguf(path: pathlib.Path, *, pre: str, add_bos: bool) -> None:
  """A byte-level BPE vocabulary over a few words, with control and user-defined tokens."""
  alphabet = gguf_tokenizer._byte_alphabet()
  base = [alphabet[b] for b in range(256)]
  merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "1 2", "o r", "w or"]
  words = ["Ġt", "he", "Ġthe", "in", "Ġa", "Ġan", "Ġand", "12", "or", "wor"]
  tokens = ["<s>", "</s>", "<think>"] + base + words
  types = [3, 3, 4] + [1] * (len(tokens) - 3)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  w.add_add_bos_token(add_bos)
  w.add_block_count(1)
  w.add_context_length(64)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("pre,add_bos", [("gpt2", False), ("llama-bpe", True), ("qwen2", False)])
def test_tiny_gguf_tokenizer_matches_transformers(tmp_path, pre, add_bos):
  path = tmp_path / "tiny.gguf"
  _write_tiny_gguf(path, pre=pre, add_bos=add_bos)
  ref = _reference(path)
  tok = gguf_tokenizer.from_gguf(path)
  for text in ["the and in the world 1234", "<think>the</think> and</s>", " tHE  wor\n\nor 12 12"]:
    assert tok(text)["input_ids"] == ref(text)["input_ids"], text
  assert (tok("the")["input_ids"][0] == 0) == add_bos


def test_damaged_gguf_is_named(tmp_path):
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"GGUF" + b"\x00" * 7)
  with pytest.raises(ValueError, match="broken.gguf"):
    gguf_tokenizer.from_gguf(bad)
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    gguf_tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_package_imports_and_tokenizes_without_torch():
  """Every module of elsa_jax imports, and the built-in tokenizer works, with torch unimportable."""
  script = textwrap.dedent("""
      import importlib, importlib.machinery, pkgutil, sys

      class NoTorch(importlib.machinery.PathFinder):  # torch is invisible, as in a venv without it
        @classmethod
        def find_spec(cls, name, path=None, target=None):
          return None if name.split(".")[0] == "torch" else super().find_spec(name, path, target)

      sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
      import elsa_jax
      for info in pkgutil.walk_packages(elsa_jax.__path__, "elsa_jax."):
        if not info.name.endswith(".__main__"):  # that one runs the command line
          importlib.import_module(info.name)
      tok = elsa_jax.data.assets.default_tokenizer()
      ids = tok("The quick brown fox.")["input_ids"]
      assert len(ids) > 3 and tok.eos_token_id == 2, ids
      assert elsa_jax.models.llama.from_pretrained is not None
      assert "torch" not in sys.modules
      print("ok", len(ids))
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("ok")
