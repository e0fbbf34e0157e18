"""Test-session setup shared by all test modules.

The host platform is split into 8 CPU devices so that sharded code paths can be
tested on one machine. This must happen before JAX initialises its backends,
hence here (pytest imports conftest.py before any test module). Tests that do
not care about devices are unaffected.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
