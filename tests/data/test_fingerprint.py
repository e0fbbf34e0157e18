"""Resolved input paths and content fingerprints of a run's inputs."""

from __future__ import annotations

import os

from elsa_jax.data import fingerprint


def test_spellings_of_one_path_resolve_alike_and_special_sources_stay(tmp_path, monkeypatch):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "calib.txt").write_text("some text")
  monkeypatch.chdir(tmp_path)
  absolute = str(tmp_path / "data" / "calib.txt")
  assert fingerprint.resolved("data/calib.txt") == fingerprint.resolved("./data/../data/calib.txt") == absolute
  for spec in ("default", "hf:allenai/c4:en", "HuggingFaceTB/SmolLM2-135M"):
    assert fingerprint.resolved(spec) == spec
    assert fingerprint.text_fingerprint(spec) is None


def test_a_changed_text_changes_its_fingerprint(tmp_path):
  text = tmp_path / "calib.jsonl"
  text.write_text('{"text": "one"}\n')
  before = fingerprint.text_fingerprint(str(text))
  mtime = text.stat().st_mtime
  text.write_text('{"text": "two"}\n')  # same size, same name
  os.utime(text, (mtime, mtime))
  assert fingerprint.text_fingerprint(str(text)) != before
  folder = tmp_path / "texts"
  folder.mkdir()
  (folder / "a.txt").write_text("a")
  before = fingerprint.text_fingerprint(str(folder))
  (folder / "b.txt").write_text("b")
  assert fingerprint.text_fingerprint(str(folder)) != before


def test_a_model_fingerprint_sees_its_config_and_weights_not_their_mtimes(tmp_path):
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text('{"hidden_size": 64}')
  weights = model / "model.safetensors"
  weights.write_bytes(os.urandom(3 << 20))
  first = fingerprint.model_fingerprint(str(model))
  os.utime(weights, (1, 1))
  assert fingerprint.model_fingerprint(str(model)) == first  # a copy without -p is the same model
  data = bytearray(weights.read_bytes())
  data[-10] ^= 1  # the tail is sampled
  weights.write_bytes(bytes(data))
  assert fingerprint.model_fingerprint(str(model)) != first
  (model / "config.json").write_text('{"hidden_size": 65}')
  prints = fingerprint.fingerprints(str(model), "default")
  assert prints["calib"] is None and prints["model"]["path"] == str(model.resolve())
