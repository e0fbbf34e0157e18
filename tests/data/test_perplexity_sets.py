"""The standard perplexity sets (wikitext2, c4) on local copies with the Hub's schema."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from elsa_jax.data import evaluation, perplexity_sets

_WORDS = "the a of and to in river city king music war film team school north house".split()


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("ELSA_JAX_CACHE", str(tmp_path / "cache"))


def _tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([" ".join(_WORDS)] * 4, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def _sentences(rng, n):
  return [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def test_wikitext2_joins_every_test_record_with_blank_lines(tmp_path):
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  rng = np.random.default_rng()
  texts = [t if rng.random() > 0.3 else "" for t in _sentences(rng, 40)]  # the raw set has empty lines
  path = tmp_path / "test-00000-of-00001.parquet"
  pq.write_table(pa.table({"text": texts}), path)
  assert perplexity_sets.load_texts("wikitext2", data_files=str(path)) == texts
  tokenizer = _tokenizer()
  got = perplexity_sets.evaluation_text("wikitext2", tokenizer, data_files=str(path), text_field="ignored")
  np.testing.assert_array_equal(got.ids, tokenizer("\n\n".join(texts))["input_ids"])
  assert got.name == "wikitext2" and got.max_windows is None
  assert got.windows(4) == len(got.ids) // 4 and got.label(2048) == "wikitext2 perplexity @2048"


def test_c4_takes_1100_documents_joined_by_spaces_and_256_windows(tmp_path):
  rng = np.random.default_rng()
  texts = _sentences(rng, 1150)
  path = tmp_path / "c4-validation.00000-of-00008.json.gz"
  with gzip.open(path, "wt") as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
  assert perplexity_sets.load_texts("c4", data_files=[str(path)]) == texts[:1100]
  tokenizer = _tokenizer()
  got = perplexity_sets.evaluation_text("c4", tokenizer, data_files=str(path))
  want = tokenizer(" ".join(texts[:1100]))["input_ids"]
  np.testing.assert_array_equal(got.ids, want)
  assert len(want) > 256 * 8  # so that the cap binds: valenc[:, :256 * seqlen] of the Wanda/SparseGPT code
  assert got.windows(8) == 256 and got.windows(8, requested=10) == 10 and got.windows(len(want)) == 1
  windows = evaluation.eval_windows(got.ids, 8, max_windows=got.windows(8))
  np.testing.assert_array_equal(windows.reshape(-1), np.asarray(want[: 256 * 8]))


def test_other_sources_and_bad_local_copies(tmp_path):
  tokenizer = _tokenizer()
  doc = tmp_path / "held_out.jsonl"
  doc.write_text(json.dumps({"body": "the river"}) + "\n" + json.dumps({"body": "a king"}) + "\n")
  got = perplexity_sets.evaluation_text(str(doc), tokenizer, text_field="body")
  np.testing.assert_array_equal(got.ids, tokenizer("the river\n\na king")["input_ids"])
  assert got.name is None and got.label(512) == "perplexity @512"
  with pytest.raises(FileNotFoundError, match="no such local copy of c4"):
    perplexity_sets.load_texts("c4", data_files=str(tmp_path / "missing.json.gz"))
  txt = tmp_path / "test.txt"
  txt.write_text("the river")
  with pytest.raises(ValueError, match="parquet or .json"):
    perplexity_sets.load_texts("wikitext2", data_files=str(txt))
  with pytest.raises(KeyError, match="no 'text' column"):
    perplexity_sets.load_texts("wikitext2", data_files=str(doc))
  with pytest.raises(ValueError, match="unknown perplexity set"):
    perplexity_sets.load_texts("ptb")
