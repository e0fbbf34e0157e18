"""Test-session setup shared by all test modules.

The host platform is split into 8 CPU devices so that sharded code paths can be
tested on one machine. This must happen before JAX initialises its backends,
hence here (pytest imports conftest.py before any test module). Tests that do
not care about devices are unaffected.

The session also shares one persistent XLA compilation cache (its pytest-xdist
workers and the CLI processes the tests start inherit it): the suite compiles
the same tiny-model programs many times over, and compiling is most of its time.
A cache the caller sets (``JAX_COMPILATION_CACHE_DIR``) is used as it is.
"""

import os
import shutil
import tempfile
import uuid

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
  _OWN_CACHE = os.path.join(tempfile.gettempdir(), f"elsa_jax-tests-xla-cache-{uuid.uuid4().hex[:12]}")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
