"""The run-folder lock: a second run is refused at once, a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from elsa_jax.run import lock as lock_lib


def test_a_second_holder_is_refused_with_the_folder_and_the_pid(tmp_path):
  run = tmp_path / "runs" / "x"
  with lock_lib.RunLock(run):
    owner = json.loads((run / lock_lib.LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid()
    with pytest.raises(lock_lib.RunFolderInUseError, match=rf"{run} is in use .*pid {os.getpid()}.*--output"):
      lock_lib.RunLock(run).acquire()
  # Released: the next run gets it, and the folders the lock made are gone again (they stayed empty).
  assert not (tmp_path / "runs").exists()
  with lock_lib.RunLock(run):
    (run / "metrics.jsonl").write_text("{}")
  assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  run = tmp_path / "run"
  child = textwrap.dedent(f"""
      import fcntl, json, os, signal
      os.makedirs({str(run)!r}, exist_ok=True)
      fd = os.open({str(run / lock_lib.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
      fcntl.flock(fd, fcntl.LOCK_EX)
      os.write(fd, json.dumps({{"pid": os.getpid(), "host": "h"}}).encode())
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  assert subprocess.run([sys.executable, "-c", child]).returncode == -9
  assert (run / lock_lib.LOCK_FILE).exists()
  with lock_lib.RunLock(run):
    assert json.loads((run / lock_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert "ended without releasing it" in caplog.text
