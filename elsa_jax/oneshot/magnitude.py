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
"""Magnitude pruning: keep the largest ``|W|`` of every matrix (N:M: of every group), no data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from elsa_jax.optim import finalize as finalize_lib
from elsa_jax.sparsity import patterns
from elsa_jax.sparsity import topk as _projection


def _pattern(n_m: tuple[int, int] | None) -> patterns.Pattern:
  return patterns.NM(*n_m) if n_m else patterns.Unstructured()


def magnitude_prune(kernel: jax.Array, gram: jax.Array | None = None, sparsity=None, *,
                    n_m: tuple[int, int] | None = None) -> jax.Array:
  """Zero the lowest ``|W|`` of a kernel (``gram`` is not read: magnitude needs no data).

  Example:
    >>> import jax.numpy as jnp
    >>> magnitude_prune(jnp.array([[1.0, -4.0], [3.0, 0.5]]), sparsity=0.5)
    Array([[ 0., -4.],
           [ 3.,  0.]], dtype=float32)

  Args:
    kernel: ``[in, out]`` weights.
    gram: unused.
    sparsity: fraction of the matrix's weights zeroed (unstructured).
    n_m: ``(n, m)``: instead keep ``n`` of every ``m`` consecutive inputs.

  Returns:
    The pruned kernel, in the kernel's dtype.
  """
  del gram
  pattern = _pattern(n_m)
  return _projection.project(kernel, 0.0 if n_m else sparsity, pattern=pattern.kind, n_m=pattern.n_m or (2, 4))


def magnitude_prune_tree(params: Any, *, sparsity=None, n_m: tuple[int, int] | None = None,
                         prunable: Callable[[tuple, Any], bool] | None = None) -> Any:
  """Every ``prunable`` matrix of ``params`` pruned by magnitude at once (:func:`elsa_jax.finalize`)."""
  return finalize_lib.finalize(params, sparsity=sparsity, projection="magnitude", prunable=prunable,
                               pattern=_pattern(n_m))


__all__ = ["magnitude_prune", "magnitude_prune_tree"]
