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
"""Gemma 2 and Gemma 3 text as :class:`elsa_jax.models.base.Architecture` s (LLaMA's tensor layout).

Example:
  >>> from elsa_jax.models import gemma
  >>> gemma.GEMMA2.model_type, gemma.GEMMA3_TEXT.model_type
  ('gemma2', 'gemma3_text')
"""

from __future__ import annotations

import jax

from elsa_jax.models.gemma.config import Gemma2Config, Gemma3TextConfig
from elsa_jax.models.gemma.model import Gemma2, Gemma3Text
from elsa_jax.models.llama.architecture import family_architecture
from elsa_jax.models.llama.model import embed_tokens


def embed(params: dict, input_ids: jax.Array, compute_dtype) -> jax.Array:
  """Gemma's embeddings that the first decoder layer reads: rows times ``sqrt(hidden)`` in ``compute_dtype``."""
  table = params["embed_tokens"]["embedding"]
  return embed_tokens(table, input_ids, compute_dtype, table.shape[-1] ** 0.5)


GEMMA2 = family_architecture("gemma2", Gemma2, Gemma2Config, embed=embed)
GEMMA3_TEXT = family_architecture("gemma3_text", Gemma3Text, Gemma3TextConfig, embed=embed)
