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
"""Loading a model by name: ``default``, a ``.gguf`` file, an HF directory or a hub id, with its tokenizer.

Every job (pruning, perplexity, the lm-eval harness) loads its model here, through the
architecture registry (:mod:`elsa_jax.models.registry`), so none of them names an architecture.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from elsa_jax import models
from elsa_jax.data import assets
from elsa_jax.run import sharding as sharding_lib

#: The ``--model`` of the built-in SmolLM2-135M.
DEFAULT_MODEL = "default"


@dataclasses.dataclass
class LoadedModel:
  """A loaded model: split, with its config (of its architecture) and tokenizer."""

  graphdef: Any
  params: Any
  config: Any
  tokenizer: Any
  source: str

  @property
  def architecture(self) -> models.Architecture:
    """The model's registered architecture (:func:`elsa_jax.models.architecture_of`)."""
    return models.architecture_of(self.graphdef)


def model_config(spec: str) -> Any:
  """The shape of the model ``spec`` names (see :func:`load_model`), without loading its weights."""
  if spec == DEFAULT_MODEL:
    return models.config_from_gguf_file(assets.default_model_path())
  if spec.endswith(".gguf"):
    if not os.path.exists(spec):
      raise FileNotFoundError(f"no GGUF file at {spec}; check the --model path.")
    return models.config_from_gguf_file(spec)
  return models.config_from_pretrained(spec)


def load_model(spec: str, *, param_dtype=jnp.float32, remat: bool | str = False,
               scan_layers: bool = False, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """Loads 'default', a ``.gguf`` file, an HF directory or a hub id, with its tokenizer.

  ``remat`` rematerialises each decoder layer in the backward pass;
  ``scan_layers`` runs the layers as one ``lax.scan`` (both options of every architecture, see
  :mod:`elsa_jax.models.base`). The architecture is the file's (:mod:`elsa_jax.models.registry`). With a
  ``mesh``, safetensors weights are read shard by shard straight into their
  training shardings (each process reads only its devices' slices); GGUF
  files (block-quantised) are read whole and placed later.
  """
  from transformers import AutoTokenizer

  if spec == DEFAULT_MODEL:
    path = assets.default_model_path()
    model, config = models.from_gguf(path, param_dtype=param_dtype)
    tokenizer = assets.default_tokenizer()
  elif spec.endswith(".gguf"):
    if not os.path.exists(spec):
      raise FileNotFoundError(f"no GGUF file at {spec}; check the --model path.")
    model, config = models.from_gguf(spec, param_dtype=param_dtype)
    tokenizer = models.tokenizer_from_gguf(spec)
  else:
    shardings = None
    if mesh is not None:
      shardings = lambda p, axes: sharding_lib.param_shardings(axes, p, mesh, sharding_lib.DEFAULT_RULES)
    model, config = models.from_pretrained(spec, param_dtype=param_dtype, shardings=shardings)
    tokenizer = AutoTokenizer.from_pretrained(spec)
  model.remat = remat
  model.scan_layers = scan_layers
  graphdef, params = models.split(model)
  return LoadedModel(graphdef, params, config, tokenizer, spec)
