"""The atomic directory writer behind save_pretrained and export: crash-safe at every instant."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from elsa_jax import files
from elsa_jax.files import atomic_directory

_FILES_PY = pathlib.Path(files.__file__)


def _write(directory: pathlib.Path, label: str) -> None:
  (directory / "weights.bin").write_bytes(label.encode() * 1000)
  (directory / "sub").mkdir()
  (directory / "sub" / "config.json").write_text(label)


def _holds(directory: pathlib.Path, label: str) -> bool:
  return ((directory / "weights.bin").read_bytes() == label.encode() * 1000
          and (directory / "sub" / "config.json").read_text() == label)


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


def test_the_result_has_the_permissions_of_the_umask(tmp_path):
  old = os.umask(0o027)
  try:
    with atomic_directory(tmp_path / "model") as tmp:
      fd = os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp writes
      os.close(fd)
      (tmp / "sub").mkdir(mode=0o700)
  finally:
    os.umask(old)
  assert (tmp_path / "model").stat().st_mode & 0o777 == 0o750
  assert (tmp_path / "model" / "sub").stat().st_mode & 0o777 == 0o750
  assert (tmp_path / "model" / "private.bin").stat().st_mode & 0o777 == 0o640


# A child process replaces `old` by `new` and SIGKILLs itself just before or after its k-th rename.
_CHILD = textwrap.dedent("""
    import importlib.util, os, pathlib, signal, sys
    spec = importlib.util.spec_from_file_location("elsa_files", sys.argv[1])
    files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
    target, kill_at, when, exchange = pathlib.Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
    if not exchange:
        files._exchange = lambda a, b: False
    real_rename, count = os.rename, [0]
    def rename(a, b):
        count[0] += 1
        if count[0] == kill_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(a, b)
        if count[0] == kill_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    with files.atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"new" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("new")
        if kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # killed while writing
    print("finished", count[0])
""")


@pytest.mark.parametrize("exchange", [True, False])
def test_a_kill_at_any_instant_leaves_the_old_or_the_new_directory(tmp_path, exchange):
  results = set()
  for kill_at in range(5):
    for when in ("before", "after"):
      case = tmp_path / f"{kill_at}-{when}"
      target = case / "model"
      target.mkdir(parents=True)
      _write(target, "old")
      proc = subprocess.run([sys.executable, "-c", _CHILD, str(_FILES_PY), str(target), str(kill_at), when,
                             "1" if exchange else "0"], capture_output=True, text=True)
      finished = proc.returncode == 0
      assert finished or proc.returncode == -9, proc.stderr
      # At the instant of the kill: the complete old or new directory, or (between the two renames of
      # the fallback only) no directory but a complete .new- sibling.
      if target.exists():
        assert _holds(target, "old") or _holds(target, "new"), (kill_at, when)
      else:
        assert not exchange
        (new,) = [p for p in case.iterdir() if ".new-" in p.name]
        assert _holds(new, "new")
      files.recover_directory(target)
      assert [p.name for p in case.iterdir()] == ["model"], (kill_at, when)  # no debris after recovery
      state = "new" if _holds(target, "new") else "old"
      assert _holds(target, state)
      results.add((finished, state))
  # Early kills keep the old directory, late ones the new; past the last rename the child finishes.
  assert {(False, "old"), (False, "new"), (True, "new")} <= results


def test_debris_of_a_live_writer_is_left_alone(tmp_path):
  target = tmp_path / "model"
  live = tmp_path / f".model.tmp-{files.socket.gethostname()}-{os.getppid()}-0123abcd"
  other_host = tmp_path / ".model.new-elsewhere-1-0123abcd"
  live.mkdir()
  other_host.mkdir()
  files.recover_directory(target)
  assert live.exists() and other_host.exists() and not target.exists()


def test_remove_directory_is_all_or_nothing(tmp_path):
  target = tmp_path / "ckpt"
  target.mkdir()
  _write(target, "x")
  files.remove_directory(target)
  assert list(tmp_path.iterdir()) == []
  files.remove_directory(target)  # nothing there: a no-op


def test_debris_of_a_nested_write_is_removed_with_its_parent(tmp_path):
  # An export writes save_pretrained's atomic directory into its own temporary one; both die.
  target = tmp_path / "model"
  outer = tmp_path / f".model.tmp-{files.socket.gethostname()}-999999999-0123abcd"
  inner = tmp_path / f".{outer.name}.new-{files.socket.gethostname()}-999999999-4567cdef"
  outer.mkdir()
  inner.mkdir()
  files.recover_directory(target)
  assert list(tmp_path.iterdir()) == []
