"""The atomic directory writer behind save_pretrained and export."""

import pytest

from elsa_jax.files import atomic_directory


def test_a_failed_write_leaves_the_old_directory_and_no_debris(tmp_path):
  target = tmp_path / "model"
  target.mkdir()
  (target / "old.txt").write_text("old")
  with pytest.raises(RuntimeError, match="disk full"):
    with atomic_directory(target) as tmp:
      (tmp / "half.safetensors").write_text("partial")
      raise RuntimeError("disk full")
  assert [p.name for p in tmp_path.iterdir()] == ["model"]
  assert [p.name for p in target.iterdir()] == ["old.txt"]
  with atomic_directory(target) as tmp:
    (tmp / "new.txt").write_text("new")
  assert [p.name for p in target.iterdir()] == ["new.txt"]
  assert [p.name for p in tmp_path.iterdir()] == ["model"]
