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
"""Per-device memory of an ELSA run, predicted before any weight is loaded.

:func:`predict_memory` lowers and compiles the real train step on abstract
arrays (``jax.ShapeDtypeStruct`` with the target shardings) and reads XLA's
own buffer assignment (``compiled.memory_analysis()``): arguments (params and
optimizer state, donated), outputs, and the temporaries of the step
(activations, gradients, logits). Nothing is allocated, so a configuration
that will not fit is refused in seconds, with the numbers, by
:func:`check_fits`.

Example::

  mem = predict_memory(config, train.ElsaConfig(batch_size=8, seqlen=2048), mesh)
  print(mem.total_gib, mem.breakdown())
  check_fits(mem)  # raises MemoryError when it exceeds the device's memory
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from elsa_jax import models
from elsa_jax.models import abstract_model  # noqa: F401  (kept here: scripts/bench_memory.py uses it)
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import teacher as teacher_lib
from elsa_jax.run import train

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryPrediction:
  """Bytes per device of one train step (the largest device of the mesh)."""

  argument_bytes: int  # params + optimizer state + batch (donated: updated in place)
  output_bytes: int  # what the step returns that is not aliased to a donated input
  temp_bytes: int  # activations, gradients, logits, scratch
  alias_bytes: int
  n_params: int
  state_bytes_per_param: float

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def total_gib(self) -> float:
    return self.total_bytes / GiB

  def breakdown(self) -> str:
    return (f"{self.total_gib:.2f} GiB per device = arguments {self.argument_bytes / GiB:.2f} + "
            f"temporaries {self.temp_bytes / GiB:.2f} + outputs {self.output_bytes / GiB:.2f} "
            f"- aliased {self.alias_bytes / GiB:.2f}")


def predict_memory(
    config: Any,
    cfg: train.ElsaConfig,
    mesh: jax.sharding.Mesh,
    *,
    remat: bool | str = False,
    scan_layers: bool = False,
    rules: dict[str, str | None] | None = None,
    z_update: bool | str = True,
    separate_z_update: bool = True,
) -> MemoryPrediction:
  """Compiles the ELSA train step abstractly and returns its per-device memory.

  ``config`` is the model's config, of any registered architecture
  (:func:`elsa_jax.models.abstract_model`).

  By default (``z_update=True``) this is the run's peak: with
  ``separate_z_update`` (how :func:`elsa_jax.run.train.run` runs by default) the
  larger of the plain step and the separate z/u program
  (:func:`elsa_jax.run.train.make_zu_step`), otherwise the step with the z/u update
  fused in. ``z_update=False`` gives the plain step alone, which does the same
  work as the others without the projection and dual update, and
  ``z_update="program"`` the separate z/u program alone. With ``cfg.distill > 0`` the step takes the
  frozen teacher (in the compute dtype, the params' shardings) as an argument, so its bytes, and those
  of its forward, are in the prediction (:mod:`elsa_jax.run.teacher`).
  """
  if z_update not in (True, False, "program"):
    raise ValueError(f"z_update must be True, False or 'program', got {z_update!r}.")
  rules = dict(sharding_lib.DEFAULT_RULES if rules is None else rules)
  graphdef, params = models.abstract_model(config, remat=remat, scan_layers=scan_layers)
  axes = models.logical_axes_of(graphdef, params)
  p_shard = sharding_lib.param_shardings(axes, params, mesh, rules)
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, p_shard)
  tx = train.make_optimizer(cfg)
  s_shard = sharding_lib.opt_state_shardings(tx, params, p_shard, mesh)
  state = jax.eval_shape(tx.init, params)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, s_shard)
  data_shard = sharding_lib.batch_sharding(mesh)
  batch = jax.ShapeDtypeStruct((cfg.grad_accum, cfg.batch_size, cfg.seqlen + 1), jnp.int32, sharding=data_shard)
  n_params = sum(int(p.size) for p in jax.tree.leaves(params))
  state_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state))

  def measure(fn, in_shardings, out_shardings, donate, *args) -> MemoryPrediction:
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate)
    stats = jitted.lower(*args).compile().memory_analysis()
    return MemoryPrediction(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        n_params=n_params,
        state_bytes_per_param=state_bytes / n_params,
    )

  zu_program = lambda: measure(train.make_zu_step(tx), (p_shard, s_shard),
                               (s_shard, sharding_lib.replicated(mesh)), (1,), params, state)
  if z_update == "program":
    return zu_program()
  fused = z_update and not separate_z_update
  distill = teacher_lib.spec(cfg)
  teacher = () if distill is None else (teacher_lib.abstract_teacher(params, cfg.compute_dtype),)
  step = measure(
      train.make_train_step(graphdef, tx, compute_dtype=jnp.dtype(cfg.compute_dtype), z_update=fused,
                            distill=distill),
      (p_shard, s_shard, data_shard) + (p_shard,) * len(teacher), (p_shard, s_shard, sharding_lib.replicated(mesh)),
      (0, 1), params, state, batch, *teacher,
  )
  if not (z_update and separate_z_update):
    return step
  return max(step, zu_program(), key=lambda m: m.total_bytes)


def device_memory_bytes(device: Any | None = None) -> int | None:
  """The memory of one device as its runtime reports it (None on the CPU)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def check_fits(prediction: MemoryPrediction, capacity_bytes: int | None = None, *, headroom: float = 0.95) -> None:
  """Raises ``MemoryError`` (with the numbers) when a run will not fit one device."""
  capacity_bytes = capacity_bytes or device_memory_bytes()
  if capacity_bytes is None:
    return
  if prediction.total_bytes > headroom * capacity_bytes:
    raise MemoryError(
        f"this configuration needs {prediction.breakdown()}, more than {headroom:.0%} of the "
        f"{capacity_bytes / GiB:.1f} GiB a device has; use a larger mesh (more FSDP/model shards), "
        f"--remat, a smaller --batch-size with --grad-accum, or ELSA-L state "
        f"(--state-dtype float8_e4m3fn --moment-dtype int8)."
    )
