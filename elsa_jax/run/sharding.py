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
"""Device meshes and the placement of parameters, optimizer state and batches.

A mesh has two named axes: ``data`` (data parallelism and FSDP: batches are
split over it, and so are the ``embed`` dimensions of the weights) and
``model`` (tensor parallelism: heads, MLP width and vocabulary are split over
it). Parameters carry logical axis names (see :func:`elsa_jax.models.llama.logical_axes`);
a table of rules maps each logical name to a mesh axis, exactly like
``flax.linen.logical_to_mesh_axes``.

Example (on any number of devices):
  >>> import jax
  >>> from flax import nnx
  >>> from elsa_jax.models import llama
  >>> from elsa_jax.run import sharding
  >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
  ...                            num_hidden_layers=1, num_attention_heads=2)
  >>> model = llama.Llama(config, rngs=nnx.Rngs(0))
  >>> graphdef, params = llama.split(model)
  >>> mesh = sharding.make_mesh(data=-1, model=1)
  >>> params = jax.device_put(params, sharding.param_shardings(llama.logical_axes(model), params, mesh))
  >>> tuple(params["layers"][0]["mlp"]["up_proj"]["kernel"].sharding.spec)
  ('data', 'model')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
MODEL = "model"

#: Logical axis name -> mesh axis (or None for replicated). FSDP over ``data``
#: on the hidden dimension, tensor parallelism over ``model`` on heads, MLP
#: width and vocabulary.
DEFAULT_RULES: Mapping[str, str | None] = {
    "vocab": MODEL,
    "embed": DATA,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "norm": None,
}


def make_mesh(data: int = -1, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a ``(data, model)`` mesh over all (global) devices.

  Args:
    data: size of the data/FSDP axis; -1 takes every device not used by
      ``model``.
    model: size of the tensor-parallel axis.
    devices: devices to use; defaults to ``jax.devices()`` (all processes').

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``("data", "model")``.

  A mesh smaller than the device count uses the first ``data * model`` devices.

  Raises:
    ValueError: if the mesh shape does not divide the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(
        f"mesh model={model} does not divide the {n} available devices; pick a "
        f"model-parallel size among the divisors of {n}."
    )
  if data == -1:
    data = n // model
  if data < 1 or n % (data * model):
    raise ValueError(
        f"mesh data={data} x model={model} = {data * model} does not divide the {n} "
        f"available devices; choose sizes whose product divides {n} (or data=-1 for all)."
    )
  devices = devices[: data * model]
  device_array = np.asarray(devices, dtype=object).reshape(data, model)
  return Mesh(device_array, (DATA, MODEL))


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> P:
  """Maps logical axis names to a ``PartitionSpec``.

  A dimension that the mesh axis size does not divide is replicated instead,
  and a mesh axis is used at most once per array.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axis = rules.get(name) if name is not None else None
    if axis is None or axis in used or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      used.add(axis)
      spec.append(axis)
  return P(*spec)


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def param_shardings(
    logical_axes: Any,
    params: Any,
    mesh: Mesh,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> Any:
  """Returns a tree of ``NamedSharding`` for ``params`` from their logical axes.

  Args:
    logical_axes: tree with the structure of ``params`` whose leaves are tuples
      of logical axis names.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    mesh: the device mesh.
    rules: logical name -> mesh axis.
  """
  return jax.tree.map(
      lambda names, p: NamedSharding(mesh, logical_to_spec(names, p.shape, mesh, rules)),
      logical_axes,
      params,
      is_leaf=_is_axes,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a train step's batch ``[grad_accum, batch, seqlen + 1]``: the batch over ``data``.

  The micro-batches (the leading axis, scanned over inside the step) and the
  tokens stay whole on every device.
  """
  return NamedSharding(mesh, P(None, DATA))


def opt_state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    shardings: Any,
    mesh: Mesh,
) -> Any:
  """Derives optimizer-state shardings from parameter shardings.

  Every state leaf that ``tx.init`` builds by tree-mapping over the params
  takes its parameter's sharding (``optax.tree_utils.tree_map_params``); the
  rest (counters, scalars, per-row scales) is replicated. A state leaf whose
  shape differs from its parameter's also falls back to replication.
  """
  abstract_state = jax.eval_shape(tx.init, params)
  rep = replicated(mesh)
  pairs = jax.tree.map(lambda s, p: (s, tuple(p.shape)), shardings, params)

  def pick(leaf, pair):
    sharding, shape = pair
    return sharding if tuple(getattr(leaf, "shape", ())) == shape else rep

  def non_param(leaf):
    return jax.tree.map(lambda _: rep, leaf)

  return optax.tree_utils.tree_map_params(
      tx,
      pick,
      abstract_state,
      pairs,
      transform_non_params=non_param,
      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], NamedSharding),
  )


def fits_mesh(global_batch: int, mesh: Mesh) -> None:
  """Raises a clear error when the global batch does not split over ``data``."""
  d = mesh.shape[DATA]
  if global_batch % d:
    raise ValueError(
        f"the global batch of {global_batch} sequences does not split over the data axis "
        f"of size {d}; use a batch size that is a multiple of {d}."
    )


def num_devices(mesh: Mesh) -> int:
  return math.prod(mesh.shape.values())
