"""The field's one-shot baselines on a LLaMA: magnitude, Wanda and SparseGPT.

Wanda and SparseGPT run layer by layer, as published: calibration windows are
embedded once; each decoder layer then (1) runs on the current hidden states
and accumulates ``X^T X`` of the input of each of its linear maps, (2) has
its seven matrices pruned from those statistics, and (3) runs again, pruned,
to produce the hidden states the next layer sees. So every layer is fed the
outputs of the already-pruned layers before it. Every step is jitted; one
compilation serves all layers (they share shapes).

The maths of a single matrix lives in :mod:`elsa_jax.oneshot.matrix`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elsa_jax.optim import finalize as finalize_lib
from elsa_jax.sparsity import patterns
from elsa_jax.sparsity import prunable as prunable_lib
from elsa_jax.oneshot import matrix as _oneshot
from elsa_jax.sparsity import topk as _projection
from elsa_jax.models import llama

logger = logging.getLogger(__name__)

#: One-shot methods of :func:`prune_oneshot`.
ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")

#: Which captured input each linear map of a decoder layer reads.
LINEAR_INPUTS = {
    ("self_attn", "q_proj"): "attn_in",
    ("self_attn", "k_proj"): "attn_in",
    ("self_attn", "v_proj"): "attn_in",
    ("self_attn", "o_proj"): "attn_out",
    ("mlp", "gate_proj"): "mlp_in",
    ("mlp", "up_proj"): "mlp_in",
    ("mlp", "down_proj"): "mlp_hidden",
}


def _layer_graphdef(graphdef: Any, params: dict) -> Any:
  model = llama.merge(graphdef, params)
  return nnx.split(model.layers[0])[0]


def _check_method(method: str) -> None:
  if method not in ONESHOT_METHODS:
    raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(ONESHOT_METHODS)}.")


def prune_matrix(method: str, kernel: jax.Array, gram: jax.Array | None, *, sparsity=None,
                 n_m: tuple[int, int] | None = None, damp: float = 0.01, blocksize: int = 128) -> jax.Array:
  """Prunes one ``[in, out]`` kernel by ``method`` (``gram`` = ``X^T X``, unused by magnitude)."""
  _check_method(method)
  if method == "magnitude":
    pattern = "nm" if n_m else "unstructured"
    return _projection.project(kernel, 0.0 if n_m else sparsity, pattern=pattern, **({"n_m": n_m} if n_m else {}))
  if method == "wanda":
    return _oneshot.wanda_prune(kernel, gram, sparsity, n_m=n_m)
  return _oneshot.sparsegpt_prune(kernel, gram, sparsity, n_m=n_m, damp=damp, blocksize=blocksize)


def calibration_statistics(graphdef: Any, params: dict, windows: np.ndarray, *, batch_size: int = 8,
                           compute_dtype=jnp.float32) -> list[dict[str, jax.Array]]:
  """``X^T X`` of every linear map's input in every layer of the *dense* model.

  Used by SAFE+'s projection score (``||X_j||`` per input feature). Returns one
  dict per layer keyed like :data:`LINEAR_INPUTS`' values.
  """
  stats = []
  for _, layer_stats, _ in _layer_walk(graphdef, params, windows, batch_size=batch_size,
                                       compute_dtype=compute_dtype):
    stats.append(layer_stats)
  return stats


def _layer_walk(graphdef, params, windows, *, batch_size, compute_dtype, prune_layer: Callable | None = None):
  """Yields ``(index, stats, layer_params)`` per layer; ``prune_layer`` rewrites a layer before moving on."""
  windows = np.asarray(windows, np.int32)
  n, t = windows.shape
  if n % batch_size:
    batch_size = max(d for d in range(1, batch_size + 1) if n % d == 0)
  layer_gd = _layer_graphdef(graphdef, params)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch_size, t))
  cast = lambda tree: jax.tree.map(lambda p: p.astype(compute_dtype), tree)

  @jax.jit
  def embed(embed_params, ids):
    table = embed_params["embedding"].astype(compute_dtype)
    return jnp.take(table, ids, axis=0)

  @jax.jit
  def layer_stats(layer_params, hidden):
    layer = nnx.merge(layer_gd, cast(layer_params))

    def body(acc, x):
      _, inputs = layer.with_linear_inputs(x, positions)
      flat = {k: v.reshape(-1, v.shape[-1]).astype(jnp.float32) for k, v in inputs.items()}
      return {k: acc[k] + flat[k].T @ flat[k] for k in acc}, None

    dims = {k: v.shape[-1] for k, v in jax.eval_shape(
        lambda x: layer.with_linear_inputs(x, positions)[1], hidden[0]).items()}
    zero = {k: jnp.zeros((d, d), jnp.float32) for k, d in dims.items()}
    return jax.lax.scan(body, zero, hidden)[0]

  @jax.jit
  def layer_forward(layer_params, hidden):
    layer = nnx.merge(layer_gd, cast(layer_params))
    return jax.lax.map(lambda x: layer(x, positions), hidden)

  ids = jnp.asarray(windows.reshape(n // batch_size, batch_size, t))
  hidden = jax.lax.map(lambda b: embed(params["embed_tokens"], b), ids)
  layers = _layer_list(params)
  for i, layer_params in enumerate(layers):
    stats = layer_stats(layer_params, hidden)
    if prune_layer is not None:
      layer_params = prune_layer(i, layer_params, stats)
    yield i, stats, layer_params
    if i + 1 < len(layers):
      hidden = layer_forward(layer_params, hidden)


def _layer_list(params: dict) -> list:
  layers = params["layers"]
  return [layers[k] for k in sorted(layers)] if isinstance(layers, dict) else list(layers)


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
  """Prunes every decoder-layer matrix of a LLaMA by magnitude, Wanda or SparseGPT.

  Embeddings, norms and the LM head stay dense (as in both papers).

  Example::

    graphdef, params = llama.split(model)
    windows = np.stack([calib.batch(i)[0] for i in range(128)])  # [128, seqlen] token ids
    pruned = prune_oneshot(graphdef, params, windows, method="sparsegpt", sparsity=0.7)

  Args:
    graphdef: the model's graph definition (:func:`elsa_jax.models.llama.split`).
    params: its parameters (pure dict); not modified.
    windows: ``[n, seqlen]`` calibration token ids (128 windows is the
      field's default); unused by magnitude.
    method: ``"magnitude"`` (per matrix), ``"wanda"`` or ``"sparsegpt"``.
    sparsity: fraction pruned per matrix (Wanda: per output row), in ``[0, 1)``.
    n_m: ``(n, m)`` for N:M sparsity instead (``sparsity`` ignored).
    batch_size: windows per forward pass.
    damp: SparseGPT's dampening (fraction of the mean Hessian diagonal).
    blocksize: SparseGPT's lazy-update block.
    compute_dtype: dtype of the layer forward passes (statistics are float32).
    progress: called with ``(layers_done, layers)``.

  Returns:
    The pruned parameters (same tree, same dtypes).

  Raises:
    ValueError: for an unknown method, a sparsity outside ``[0, 1)`` or no
      calibration windows for a method that needs them; RuntimeError when
      SparseGPT's damped Hessian is singular even at 100x ``damp``.
  """
  _check_method(method)
  if n_m is None:
    prunable_lib.check_sparsity(sparsity)
  if method == "magnitude":
    pattern = patterns.NM(*n_m) if n_m else patterns.Unstructured()
    return finalize_lib.finalize(params, sparsity=sparsity, pattern=pattern, projection="magnitude")
  if windows is None or len(windows) == 0:
    raise ValueError(f"{method} needs calibration windows (token ids [n, seqlen]); none were given.")
  n_layers = len(_layer_list(params))

  def prune_layer(i, layer_params, stats):
    layer_params = jax.tree.map(lambda x: x, layer_params)  # a copy we may edit
    for (block, name), key in LINEAR_INPUTS.items():
      kernel = layer_params[block][name]["kernel"]
      pruned = prune_matrix(method, kernel, stats[key], sparsity=sparsity, n_m=n_m, damp=damp,
                            blocksize=blocksize)
      tries = 0
      while method == "sparsegpt" and not bool(jnp.all(jnp.isfinite(pruned))):
        tries += 1
        if tries > 2:
          raise RuntimeError(f"SparseGPT: the Hessian of layer {i} {block}.{name} stays singular at "
                             f"damp={damp * 10 ** tries / 10:g}; give more calibration windows.")
        logger.warning("SparseGPT: layer %d %s.%s singular at damp %g; retrying at %g", i, block, name,
                       damp * 10 ** (tries - 1), damp * 10 ** tries)
        pruned = prune_matrix(method, kernel, stats[key], sparsity=sparsity, n_m=n_m,
                              damp=damp * 10 ** tries, blocksize=blocksize)
      layer_params[block][name]["kernel"] = pruned
    return layer_params

  new_layers = []
  for i, _, layer_params in _layer_walk(graphdef, params, windows, batch_size=batch_size,
                                        compute_dtype=compute_dtype, prune_layer=prune_layer):
    new_layers.append(layer_params)
    if progress is not None:
      progress(i + 1, n_layers)
  out = dict(params)
  layers = params["layers"]
  out["layers"] = dict(zip(sorted(layers), new_layers)) if isinstance(layers, dict) else type(layers)(new_layers)
  return out
