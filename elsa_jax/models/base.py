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
"""What an architecture provides: :class:`Architecture`, a frozen dataclass of functions.

An architecture is a module or subpackage ``elsa_jax.models.<arch>`` that builds an
``ARCHITECTURE = Architecture(...)`` from its own functions (or LLaMA's, see
:func:`elsa_jax.models.llama.architecture.family_architecture`), plus one line in
:data:`elsa_jax.models.registry.ARCHITECTURES`. Everything above ``models/``
(the one-shot layer walk, the memory predictor, the train step, the jobs)
reaches the model only through these fields, so none of it names an
architecture.

Conventions every architecture keeps:

* params are a nested pure dict (``nnx.to_pure_dict``), linear kernels
  ``[in, out]`` under a ``"kernel"`` key, split and merged with
  :func:`split` / :func:`merge`;
* a model built or loaded with ``remat`` / ``scan_layers`` options keeps
  them as mutable attributes of the same names, read at call time (a loader
  may build with the defaults and the caller set them afterwards);
* ``remat`` is False, True or a key of :data:`REMAT_POLICIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

#: Rematerialisation policies of an architecture's ``remat`` option (None: save nothing inside a layer).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: bool | str):
  """The ``jax.checkpoint`` policy of a ``remat`` setting (None for full remat or none).

  Raises:
    ValueError: for a string that is not a key of :data:`REMAT_POLICIES`.
  """
  if remat is True or remat is False:
    return None
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; use True/False or one of {', '.join(REMAT_POLICIES)}.")
  return REMAT_POLICIES[remat]


def split(model: nnx.Module) -> tuple[Any, dict]:
  """``(graphdef, params)``: params a nested pure dict of arrays (list indices as ints)."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def merge(graphdef: Any, params: dict) -> nnx.Module:
  """The inverse of :func:`split`; works on traced arrays inside ``jit``/``grad``."""
  return nnx.merge(graphdef, params)


@dataclasses.dataclass(frozen=True, repr=False)
class Architecture:
  """One model family: its NNX model, its file formats and what layer-wise pruning needs.

  Model and configuration:
    model_type: Hugging Face's ``model_type`` (config.json), the registry key.
    model_class: the NNX module class; a model, or a graphdef of one, is
      mapped back to its architecture by this class (subclasses included).
    config_class: the frozen config dataclass ``build`` takes; configs are
      mapped back to their architecture by it.
    build: ``build(config, *, dtype=None, param_dtype=float32, remat=False,
      scan_layers=False, rngs=None) -> model``.
    apply: ``apply(graphdef, params, input_ids) -> logits [B, T, vocab]``
      float32, a pure function for jit/grad.
    logical_axes: ``logical_axes(model) -> dict`` of logical axis names per
      parameter, shaped like the params (for sharding).

  Files:
    config_from_hf: ``config_from_hf(config_json_dict) -> config``.
    config_from_gguf: ``config_from_gguf(gguf.GGUFReader) -> config``, or None.
    from_pretrained: ``from_pretrained(directory, *, dtype=None,
      param_dtype=float32, shardings=None) -> (model, config)``: an HF
      directory (config.json + safetensors); ``shardings`` is None or
      ``(abstract_params, logical_axes) -> tree of jax.sharding.Sharding``.
      It reads the tensors through
      :func:`elsa_jax.models.safetensors_dir.open_checkpoint` (HF names,
      slices), so that compact sparse directories load like dense ones.
    from_gguf: ``from_gguf(path, *, param_dtype=float32) -> (model, config)``, or None.
    save_pretrained: ``save_pretrained(model or (graphdef, params), config,
      path, *, dtype=None, overwrite=False) -> path``: an HF directory that
      transformers loads (dense; the registry's ``save_pretrained`` compacts
      it for ``sparse_format="bitmask"``).
    gguf_architecture: GGUF's ``general.architecture`` of this family (None:
      ``model_type``).

  Distillation (:mod:`elsa_jax.run.teacher`):
    apply_with_blocks: ``apply_with_blocks(graphdef, params, input_ids) ->
      (logits, blocks)``, ``blocks [layers, B, T, hidden]`` every decoder
      block's output (SquareHead's features); or None (no ``--squarehead``).

  Decoding (:mod:`elsa_jax.models.generate`):
    init_cache: ``init_cache(model, *, batch, length) -> None``: gives every
      attention module of ``model`` an empty :class:`elsa_jax.models.kv_cache.KVCache`
      of ``length`` slots, in place, after which ``model(input_ids, positions)``
      decodes through it; or None (generation then recomputes the whole prefix
      at every step).

  One-shot layer walk (:mod:`elsa_jax.oneshot.walk`):
    embed: ``embed(params, input_ids, compute_dtype) -> hidden [B, T, D]``,
      what the first decoder layer reads.
    decoder_layers: ``decoder_layers(params) -> list`` of every decoder
      layer's params, in order.
    replace_decoder_layers: ``replace_decoder_layers(params, layers) ->
      params``, the inverse (a new tree; ``params`` is not modified).
    layer_graphdefs: ``layer_graphdefs(graphdef, params) -> list`` of the
      graphdef of every decoder layer (equal for layers of one kind; a family
      with alternating local and global layers has two).
    layer_forward: ``layer_forward(layer, hidden) -> (hidden, inputs)``: one
      layer module on ``hidden [B, T, D]``, with the input of each of its
      linear maps keyed like ``linear_inputs``' values.
    linear_inputs: path of each prunable linear map inside a layer's params
      (its kernel at ``path + ("kernel",)``) -> the key of its input in
      ``layer_forward``'s ``inputs``.
    prunable: ``prunable(key_path, leaf) -> bool``, the matrices pruned (the
      decoder layers' linear kernels); a predicate for
      :func:`elsa_jax.finalize` and :func:`elsa_jax.sparsity_report`.
  """

  model_type: str
  model_class: type
  config_class: type
  build: Callable[..., Any]
  apply: Callable[..., jax.Array]
  logical_axes: Callable[[Any], dict]
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  from_pretrained: Callable[..., tuple[Any, Any]]
  save_pretrained: Callable[..., Any]
  embed: Callable[..., jax.Array]
  decoder_layers: Callable[[dict], list]
  replace_decoder_layers: Callable[[dict, list], dict]
  layer_graphdefs: Callable[[Any, dict], list]
  layer_forward: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  linear_inputs: Mapping[tuple[str, ...], str]
  prunable: Callable[[tuple, Any], bool]
  config_from_gguf: Callable[[Any], Any] | None = None
  from_gguf: Callable[..., tuple[Any, Any]] | None = None
  gguf_architecture: str | None = None
  init_cache: Callable[..., None] | None = None
  apply_with_blocks: Callable[..., tuple[jax.Array, jax.Array]] | None = None

  def __repr__(self) -> str:
    return f"Architecture(model_type={self.model_type!r}, model_class={self.model_class.__qualname__})"

  def abstract_model(self, config: Any, *, remat: bool | str = False, scan_layers: bool = False
                     ) -> tuple[Any, dict]:
    """``(graphdef, abstract params)`` of a model of ``config``, without allocating its weights."""
    abstract = nnx.eval_shape(lambda: self.build(config, remat=remat, scan_layers=scan_layers,
                                                 rngs=nnx.Rngs(0)))
    return split(abstract)
