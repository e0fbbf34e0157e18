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
"""One-shot pruning of a whole model, layer by layer, by any method of :mod:`elsa_jax.oneshot.registry`.

Methods with calibration (Wanda, SparseGPT) run layer by layer, as
published: calibration windows are embedded once; each decoder layer then
(1) runs on the current hidden states and accumulates ``X^T X`` of the input
of each of its linear maps, (2) has its matrices pruned from those
statistics, and (3) runs again, pruned, to produce the hidden states the next
layer sees. So every layer is fed the outputs of the already-pruned layers
before it. Every step is jitted; one compilation serves all layers (they
share shapes). What a layer is, and which input each of its linear maps
reads, is the model's architecture's (:class:`elsa_jax.models.base.Architecture`).

The maths of a single matrix lives in the method modules
(:mod:`elsa_jax.oneshot.magnitude`, :mod:`~elsa_jax.oneshot.wanda`,
:mod:`~elsa_jax.oneshot.sparsegpt`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax import models
from elsa_jax.oneshot import registry
from elsa_jax.oneshot.registry import ONESHOT_METHODS  # noqa: F401  (the names, for callers)
from elsa_jax.sparsity import patterns
from elsa_jax.sparsity import prunable as prunable_lib


def _options(spec: registry.Method, damp: float, blocksize: int) -> dict[str, Any]:
  return {k: v for k, v in dict(damp=damp, blocksize=blocksize).items() if k in spec.options}


def prune_matrix(method: str, kernel: jax.Array, gram: jax.Array | None, *, sparsity=None,
                 n_m: tuple[int, int] | None = None, damp: float = 0.01, blocksize: int = 128) -> jax.Array:
  """Prunes one ``[in, out]`` kernel by ``method`` (``gram`` = ``X^T X``, unused by magnitude).

  Raises:
    ValueError: for a method that is not in :data:`elsa_jax.oneshot.registry.METHODS`.
  """
  spec = registry.method(method)
  return spec.prune(kernel, gram, sparsity=sparsity, n_m=n_m, **_options(spec, damp, blocksize))


def calibration_statistics(graphdef: Any, params: dict, windows: np.ndarray, *, batch_size: int = 8,
                           compute_dtype=jnp.float32) -> list[dict[str, jax.Array]]:
  """``X^T X`` of every linear map's input in every layer of the *dense* model.

  Used by SAFE+'s projection score (``||X_j||`` per input feature). Returns one
  dict per layer keyed like the architecture's ``linear_inputs`` values.
  """
  arch = models.architecture_of(graphdef)
  stats = []
  for _, layer_stats, _ in _layer_walk(arch, graphdef, params, windows, batch_size=batch_size,
                                       compute_dtype=compute_dtype):
    stats.append(layer_stats)
  return stats


def _layer_steps(arch, layer_gd, compute_dtype) -> tuple[Callable, Callable]:
  """Jitted ``(stats, forward)`` of the decoder layers of graphdef ``layer_gd`` on batches of hidden states."""
  cast = lambda tree: jax.tree.map(lambda p: p.astype(compute_dtype), tree)

  @jax.jit
  def layer_stats(layer_params, hidden):
    layer = nnx.merge(layer_gd, cast(layer_params))

    def body(acc, x):
      _, inputs = arch.layer_forward(layer, x)
      flat = {k: v.reshape(-1, v.shape[-1]).astype(jnp.float32) for k, v in inputs.items()}
      return {k: acc[k] + flat[k].T @ flat[k] for k in acc}, None

    dims = {k: v.shape[-1] for k, v in jax.eval_shape(lambda x: arch.layer_forward(layer, x)[1], hidden[0]).items()}
    zero = {k: jnp.zeros((d, d), jnp.float32) for k, d in dims.items()}
    return jax.lax.scan(body, zero, hidden)[0]

  @jax.jit
  def layer_forward(layer_params, hidden):
    layer = nnx.merge(layer_gd, cast(layer_params))
    return jax.lax.map(lambda x: arch.layer_forward(layer, x)[0], hidden)

  return layer_stats, layer_forward


def _layer_walk(arch, graphdef, params, windows, *, batch_size, compute_dtype,
                prune_layer: Callable | None = None):
  """Yields ``(index, stats, layer_params)`` per layer; ``prune_layer`` rewrites a layer before moving on.

  Layers of one graphdef (one layer type) share one compilation.
  """
  windows = np.asarray(windows, np.int32)
  n, t = windows.shape
  if n % batch_size:
    batch_size = max(d for d in range(1, batch_size + 1) if n % d == 0)
  compiled: list[tuple[Any, tuple[Callable, Callable]]] = []  # graphdefs are comparable, not hashable

  def steps(layer_gd):
    for known, fns in compiled:
      if known == layer_gd:
        return fns
    compiled.append((layer_gd, _layer_steps(arch, layer_gd, compute_dtype)))
    return compiled[-1][1]

  @jax.jit
  def embed(params, ids):
    return arch.embed(params, ids, compute_dtype)

  ids = jnp.asarray(windows.reshape(n // batch_size, batch_size, t))
  hidden = jax.lax.map(lambda b: embed(params, b), ids)
  layers = arch.decoder_layers(params)
  layer_gds = arch.layer_graphdefs(graphdef, params)
  for i, layer_params in enumerate(layers):
    layer_stats, layer_forward = steps(layer_gds[i])
    stats = layer_stats(layer_params, hidden)
    if prune_layer is not None:
      layer_params = prune_layer(i, layer_params, stats)
    yield i, stats, layer_params
    if i + 1 < len(layers):
      hidden = layer_forward(layer_params, hidden)


def get_path(tree: dict, path: tuple) -> Any:
  """``tree[path[0]][path[1]]...``."""
  for k in path:
    tree = tree[k]
  return tree


def prune_oneshot(
    graphdef: Any,
    params: dict,
    windows: np.ndarray | None,
    *,
    method: str,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    batch_size: int = 8,
    damp: float = 0.01,
    blocksize: int = 128,
    compute_dtype=jnp.float32,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
  """Prunes every decoder-layer matrix of a model by a one-shot method (magnitude, Wanda, SparseGPT).

  The matrices are the architecture's (:func:`elsa_jax.models.architecture_of`
  ``(graphdef)``): its ``prunable`` predicate without calibration, its
  ``linear_inputs`` with. Embeddings, norms and the LM head stay dense (as in
  both papers).

  Example::

    graphdef, params = elsa_jax.models.split(model)
    windows = np.stack([calib.batch(i)[0] for i in range(128)])  # [128, seqlen] token ids
    pruned = prune_oneshot(graphdef, params, windows, method="sparsegpt", sparsity=0.7)

  Args:
    graphdef: the model's graph definition (:func:`elsa_jax.models.split`).
    params: its parameters (pure dict); not modified.
    windows: ``[n, seqlen]`` calibration token ids (128 windows is the
      field's default); unused by magnitude.
    method: a name in :data:`elsa_jax.oneshot.registry.METHODS`: ``"magnitude"``
      (per matrix), ``"wanda"`` or ``"sparsegpt"``.
    sparsity: fraction pruned per matrix (Wanda: per output row), in
      ``[0, 1)``: one for every matrix, or a params-shaped tree of them
      (None off the prunable matrices), e.g. OWL's
      (:func:`elsa_jax.oneshot.owl.owl_sparsities`).
    n_m: ``(n, m)`` for N:M sparsity instead (``sparsity`` ignored).
    batch_size: windows per forward pass.
    damp: SparseGPT's dampening (fraction of the mean Hessian diagonal).
    blocksize: SparseGPT's lazy-update block.
    compute_dtype: dtype of the layer forward passes (statistics are float32).
    progress: called with ``(layers_done, layers)``.

  Returns:
    The pruned parameters (same tree, same dtypes).

  Raises:
    ValueError: for an unknown method, a sparsity outside ``[0, 1)``, no
      calibration windows for a method that needs them, or a model of no
      registered architecture; RuntimeError when SparseGPT's damped Hessian
      is singular even at 100x ``damp``.
  """
  spec = registry.method(method)
  arch = models.architecture_of(graphdef)
  layer_sparsity = _layer_sparsities(arch, sparsity, n_m, len(arch.decoder_layers(params)))
  if not spec.needs_calibration:
    return _prune_each_matrix(spec, params, sparsity=sparsity, n_m=n_m, prunable=arch.prunable,
                              options=_options(spec, damp, blocksize))
  if windows is None or len(windows) == 0:
    raise ValueError(f"{method} needs calibration windows (token ids [n, seqlen]); none were given.")
  n_layers = len(arch.decoder_layers(params))
  walk_prune = spec.walk_prune or (lambda *a, where, **k: spec.prune(*a, **k))
  options = _options(spec, damp, blocksize)

  def prune_layer(i, layer_params, stats):
    layer_params = jax.tree.map(lambda x: x, layer_params)  # a copy we may edit
    for path, key in arch.linear_inputs.items():
      linear = get_path(layer_params, path)
      linear["kernel"] = walk_prune(linear["kernel"], stats[key], sparsity=layer_sparsity[i](path), n_m=n_m,
                                    where=f"layer {i} {'.'.join(path)}", **options)
    return layer_params

  new_layers = []
  for i, _, layer_params in _layer_walk(arch, graphdef, params, windows, batch_size=batch_size,
                                        compute_dtype=compute_dtype, prune_layer=prune_layer):
    new_layers.append(layer_params)
    if progress is not None:
      progress(i + 1, n_layers)
  return arch.replace_decoder_layers(params, new_layers)


def _layer_sparsities(arch, sparsity, n_m, n_layers: int) -> list[Callable[[tuple], Any]]:
  """Per decoder layer, ``path -> sparsity`` of its linear maps, from one float or a params-shaped tree.

  Raises:
    ValueError: for a sparsity outside ``[0, 1)``, or a tree without a value at a matrix.
  """
  if n_m is not None or sparsity is None or prunable_lib.is_python_scalar(sparsity):
    if n_m is None:
      prunable_lib.check_sparsity(sparsity)
    return [lambda path: sparsity] * n_layers
  for p, s in jax.tree_util.tree_flatten_with_path(sparsity)[0]:
    prunable_lib.check_sparsity(s, f" at {prunable_lib.path_str(p)!r}")

  def lookup(tree, i):
    def at(path):
      value = get_path(tree, path)["kernel"] if tree is not None else None
      if value is None:
        raise ValueError(f"the sparsity tree has no value for layer {i} {'.'.join(path)}; give one per "
                         f"prunable matrix (elsa_jax.oneshot.owl.owl_sparsities builds such a tree).")
      return value
    return at

  return [lookup(tree, i) for i, tree in enumerate(arch.decoder_layers(sparsity))]


def _prune_each_matrix(spec: registry.Method, params: dict, *, sparsity, n_m, prunable, options) -> dict:
  """A method without calibration on every prunable matrix (its ``prune_tree`` when it has one)."""
  if spec.prune_tree is not None:
    return spec.prune_tree(params, sparsity=sparsity, n_m=n_m, prunable=prunable)
  at = (lambda path: sparsity) if sparsity is None or prunable_lib.is_python_scalar(sparsity) else \
      prunable_lib.resolve_sparsity(sparsity, patterns.Unstructured())
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: spec.prune(leaf, None, sparsity=at(path), n_m=n_m, **options)
      if prunable(path, leaf) else leaf, params)
