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
"""Multi-host runs through JAX's own multi-controller runtime.

Every process runs the same program; :func:`initialize` joins them with
``jax.distributed.initialize``. On TPU pods and SLURM/Open MPI GPU clusters
JAX detects the coordinator, process count and index itself; elsewhere give
them explicitly or through the environment:

* ``ELSA_JAX_COORDINATOR`` (``host:port`` of process 0),
* ``ELSA_JAX_NUM_PROCESSES``,
* ``ELSA_JAX_PROCESS_ID``,
* ``ELSA_JAX_LOCAL_DEVICES`` (optional: CPU devices per process, for tests).

After it, ``jax.devices()`` lists every process's devices, so
:func:`elsa_jax.run.sharding.make_mesh` builds the global mesh; each process feeds
only its rows of the global batch (``CalibrationWindows(process_index=...)``)
and orbax writes checkpoints from all processes together.

Example::

  # on each of 2 hosts
  ELSA_JAX_COORDINATOR=10.0.0.1:1234 ELSA_JAX_NUM_PROCESSES=2 ELSA_JAX_PROCESS_ID=$RANK \\
      elsa-jax prune --distributed --mesh 8x2 ...
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

_ENV_COORDINATOR = "ELSA_JAX_COORDINATOR"
_ENV_NUM = "ELSA_JAX_NUM_PROCESSES"
_ENV_ID = "ELSA_JAX_PROCESS_ID"
_ENV_LOCAL_DEVICES = "ELSA_JAX_LOCAL_DEVICES"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_cpu_devices: int | None = None,
) -> None:
  """Joins this process to the others of the run (a no-op for a single process).

  Args:
    coordinator_address: ``host:port`` of process 0; None reads
      ``ELSA_JAX_COORDINATOR`` and, failing that, lets JAX detect the cluster
      (TPU pod, SLURM, Open MPI).
    num_processes: total processes; None reads ``ELSA_JAX_NUM_PROCESSES``.
    process_id: this process's index; None reads ``ELSA_JAX_PROCESS_ID``.
    local_cpu_devices: CPU devices per process (CPU-only runs and tests);
      None reads ``ELSA_JAX_LOCAL_DEVICES``.

  Raises:
    ValueError: when only some of the explicit settings are given.
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR)
  if num_processes is None and os.environ.get(_ENV_NUM):
    num_processes = int(os.environ[_ENV_NUM])
  if process_id is None and os.environ.get(_ENV_ID):
    process_id = int(os.environ[_ENV_ID])
  if local_cpu_devices is None and os.environ.get(_ENV_LOCAL_DEVICES):
    local_cpu_devices = int(os.environ[_ENV_LOCAL_DEVICES])
  if local_cpu_devices:
    jax.config.update("jax_num_cpu_devices", local_cpu_devices)
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError(
        "a multi-process run needs the coordinator address, the number of processes and this "
        f"process's id together (got {explicit}); set {_ENV_COORDINATOR}, {_ENV_NUM} and {_ENV_ID}, "
        "or none of them on a TPU pod or SLURM cluster where JAX detects them."
    )
  if num_processes == 1:
    return
  if local_cpu_devices or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU devices of several processes talk through gloo; do not touch the backend before this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
  )
  logger.info(
      "process %d of %d: %d local devices, %d global", jax.process_index(), jax.process_count(),
      jax.local_device_count(), jax.device_count(),
  )


def is_main_process() -> bool:
  return jax.process_index() == 0
