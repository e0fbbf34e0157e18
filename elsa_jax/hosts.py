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
"""Host copies of global arrays, whole in every process of a multi-host run."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def gather_to_hosts(tree: Any) -> Any:
  """``tree`` as host copies that every process holds whole (the tree itself in a single-process run)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def host_array(x: Any) -> np.ndarray:
  """``x`` as one numpy array on this host, also where it spans other processes' devices."""
  return np.asarray(gather_to_hosts(x))


__all__ = ["gather_to_hosts", "host_array"]
