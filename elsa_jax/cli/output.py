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
"""What the command line writes: strict JSON files, percentages, log lines on stderr, error messages.

Example:
  >>> from elsa_jax.cli import output
  >>> output.percent(0.5), output.percent(0.999), output.percent(0.875), output.percent(2 / 3)
  ('50%', '99.9%', '87.5%', '66.67%')
  >>> output.dumps({"elsa_ppl": float("inf"), "dense_ppl": 19.98})
  '{"elsa_ppl": null, "dense_ppl": 19.98}'
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import sys
from typing import Any

from elsa_jax.run import checks

#: The most decimals :func:`percent` shows.
_MAX_DECIMALS = 2


def percent(fraction: float) -> str:
  """``fraction`` as a percentage with as few decimals as show it (at most two, never rounded to 100%)."""
  value = 100 * fraction
  for decimals in range(_MAX_DECIMALS + 1):
    text = f"{value:.{decimals}f}"
    if abs(float(text) - value) < 1e-9 * max(1.0, abs(value)):
      return f"{text}%"
  text = f"{value:.{_MAX_DECIMALS}f}"
  if float(text) >= 100 > value:  # 99.999% is not 100%
    text = f"{100 - 10 ** -_MAX_DECIMALS:.{_MAX_DECIMALS}f}"
  return f"{text}%"


def dumps(record: Any, **kwargs) -> str:
  """Strict JSON of ``record``: NaN and infinities as null (:func:`elsa_jax.run.checks.json_ready`)."""
  return json.dumps(checks.json_ready(record), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, record: Any) -> None:
  """Writes ``record`` as strict, indented JSON through a temporary file, replacing ``path`` whole."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(dumps(record, indent=2) + "\n")
  tmp.replace(path)


def environment() -> dict[str, Any]:
  """What a run's figures depend on besides its configuration and seed (README, "Reproducibility").

  The JAX and jaxlib releases and the devices (kind, count, processes); the ``XLA_FLAGS`` and the CPUs
  this process may use are recorded too.
  """
  import jax
  import jaxlib

  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "process_count": jax.process_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


class _StderrHandler(logging.StreamHandler):
  """A handler that writes to ``sys.stderr`` as it is at each record (so redirections of it apply)."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


def configure_logging(level: int = logging.INFO) -> None:
  """Sends the ``elsa_jax`` loggers' records (INFO and up) to stderr.

  The package's logger gets its own handler and does not propagate: libraries
  (orbax, absl) install handlers on the root logger when imported, after which
  ``logging.basicConfig`` does nothing, so the root logger cannot be relied on.
  """
  logger = logging.getLogger("elsa_jax")
  if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
  logger.setLevel(level)
  logger.propagate = False
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


#: What to do about an OSError of the system, by errno.
_OS_FIXES = {
    errno.ENOSPC: "free space on that disk, or choose an --output on another one",
    errno.EDQUOT: "free space within your quota, or choose an --output elsewhere",
    errno.EROFS: "that file system is read-only; choose a writable --output",
    errno.EACCES: "fix that path's permissions, or choose another path (the --output must be writable)",
    errno.EPERM: "fix that path's permissions, or choose another path (the --output must be writable)",
}


def error_message(err: BaseException) -> str:
  """The one-line message the command line prints for a user error (see :mod:`elsa_jax.errors`)."""
  if isinstance(err, OSError) and err.errno in _OS_FIXES:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}; {_OS_FIXES[err.errno]}."
  return str(err)
