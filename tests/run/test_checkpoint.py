"""RunCheckpointer: checksummed steps, fallback from damaged ones, the run's config written at commit."""

from __future__ import annotations

import errno
import json
import logging

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from elsa_jax.run import checkpoint as checkpoint_lib
from elsa_jax.run import checksums

_CONFIG = {"model": "/abs/model", "lr": 1e-3, "fingerprints": {"calib": {"path": "/abs/calib.txt",
                                                                         "fingerprint": "sha256:aaaa"}}}


def _state(seed: int):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), "b": jnp.asarray(rng.normal(size=16))}
  opt_state = (jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), jnp.zeros((0,)), jnp.asarray(seed))
  return params, opt_state


def _save_steps(directory, steps, config=_CONFIG, **kw):
  ckpt = checkpoint_lib.RunCheckpointer(directory, config=config, save_every=1, **kw)
  for step in steps:
    ckpt.save(step, *_state(step))
  ckpt.close()


def _restore(directory, config=_CONFIG, **kw):
  ckpt = checkpoint_lib.RunCheckpointer(directory, config=config, save_every=1, **kw)
  try:
    return ckpt.restore_or(*_state(99))
  finally:
    ckpt.close()


def _largest_file(step_dir):
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checksums.MANIFEST
              and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def test_steps_commit_with_their_config_and_checksums_and_nothing_before(tmp_path):
  directory = tmp_path / "run" / "checkpoints"
  ckpt = checkpoint_lib.RunCheckpointer(directory, config=_CONFIG, save_every=1)
  assert not (tmp_path / "run").exists()  # opening writes nothing
  assert ckpt.restore_or(*_state(99))[0] == 0
  ckpt.save(3, *_state(3))
  ckpt.wait()
  assert checksums.find_damage(directory / "3") is None
  assert json.loads((directory / "3" / checkpoint_lib.STEP_CONFIG_FILE).read_text()) == _CONFIG
  assert json.loads((directory / checkpoint_lib.CONFIG_FILE).read_text()) == _CONFIG
  ckpt.close()
  step, params, opt_state = _restore(directory)
  assert step == 3
  chex.assert_trees_all_equal((params, opt_state), _state(3))


@pytest.mark.parametrize("damage", ["bit flip", "deleted file", "no manifest"])
def test_a_damaged_step_is_named_and_set_aside_and_the_previous_one_restored(tmp_path, damage, caplog):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [2, 4])
  newest = directory / "4"
  if damage == "bit flip":
    victim = _largest_file(newest)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1 << int(np.random.default_rng().integers(8))
    victim.write_bytes(bytes(data))
  elif damage == "deleted file":
    _largest_file(newest).unlink()
  else:
    (newest / checksums.MANIFEST).unlink()
  with caplog.at_level(logging.WARNING):
    step, params, opt_state = _restore(directory)
  assert step == 2
  chex.assert_trees_all_equal((params, opt_state), _state(2))
  assert f"checkpoint step 4 ({newest}) is damaged" in caplog.text
  assert not newest.exists() and (directory / ".damaged-4").is_dir()
  # The run goes on from step 2 and writes step 4 afresh.
  _save_steps(directory, [4])
  assert _restore(directory)[0] == 4


def test_no_intact_step_is_refused_or_with_restart_started_afresh(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [2])
  (directory / "2" / checksums.MANIFEST).write_text("{not json")
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match=r"step 2: .*unreadable.*--overwrite"):
    _restore(directory)
  _save_steps(tmp_path / "other", [1])
  _largest_file(tmp_path / "other" / "1").write_bytes(b"")
  step, params, _ = _restore(tmp_path / "other", restart=True)
  assert step == 0
  chex.assert_trees_all_equal(params, _state(99)[0])
  assert not (tmp_path / "other").exists()


def test_read_only_skips_a_damaged_step_and_changes_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  _largest_file(directory / "2").unlink()
  before = sorted(p.name for p in directory.iterdir())
  assert _restore(directory, read_only=True)[0] == 1
  assert sorted(p.name for p in directory.iterdir()) == before


def test_another_configuration_or_a_changed_file_is_refused_by_name(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1])
  with pytest.raises(checkpoint_lib.ConfigMismatchError, match=r"lr: checkpoint 0.001 vs now 0.01.*--overwrite"):
    _restore(directory, config={**_CONFIG, "lr": 1e-2})
  changed = {**_CONFIG, "fingerprints": {"calib": {"path": "/abs/calib.txt", "fingerprint": "sha256:bbbb"}}}
  with pytest.raises(checkpoint_lib.ConfigMismatchError,
                     match=r"the calib file /abs/calib.txt changed since they were written.*--overwrite"):
    _restore(directory, config=changed)
  assert _restore(directory)[0] == 1  # refusing changed nothing
  assert _restore(directory, config=changed, restart=True)[0] == 0  # --overwrite: afresh
  assert not directory.exists()


def test_config_is_read_from_the_step_when_the_run_was_killed_before_writing_it(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1])
  (directory / checkpoint_lib.CONFIG_FILE).unlink()
  assert checkpoint_lib.saved_config(directory) == _CONFIG
  with pytest.raises(checkpoint_lib.ConfigMismatchError):
    _restore(directory, config={**_CONFIG, "lr": 5.0})


def test_a_killed_runs_partial_step_is_cleaned_at_the_next_start(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1])
  partial = directory / "2.orbax-checkpoint-tmp"
  (partial / "params").mkdir(parents=True)
  assert _restore(directory)[0] == 1
  assert not partial.exists()


def test_a_failed_write_keeps_the_previous_step_and_says_what_to_do(tmp_path, monkeypatch, caplog):
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint_lib.RunCheckpointer(directory, config=_CONFIG, save_every=1)
  ckpt.save(1, *_state(1))
  ckpt.wait()

  def full_disk(path, **_):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(checksums, "write_manifest", full_disk)
  ckpt.save(2, *_state(2))
  with pytest.raises(checkpoint_lib.CheckpointWriteError, match=r"step 2 .*step 1 is kept\. Free disk space"):
    ckpt.wait()
  assert not [r for r in caplog.records if r.exc_info]  # orbax's own traceback is not printed
  monkeypatch.undo()
  ckpt.close()
  assert sorted(p.name for p in directory.iterdir()) == ["1", checkpoint_lib.CONFIG_FILE]
  assert _restore(directory)[0] == 1
