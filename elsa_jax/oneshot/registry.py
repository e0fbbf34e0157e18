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
"""The registry of one-shot methods: :data:`METHODS`, name -> :class:`Method`.

A method is a module of ``oneshot/`` with a per-matrix function, plus one
line here; :mod:`elsa_jax.oneshot.walk` runs it layer by layer and the CLI
offers it (``--method``, ``--init-method``).

Example:
  >>> from elsa_jax.oneshot import registry
  >>> [(name, m.needs_calibration) for name, m in registry.METHODS.items()]
  [('magnitude', False), ('wanda', True), ('sparsegpt', True)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from elsa_jax.oneshot import magnitude, sparsegpt, wanda


@dataclasses.dataclass(frozen=True)
class Method:
  """One one-shot pruning method.

  Attributes:
    prune: ``prune(kernel, gram, *, sparsity, n_m, **options) -> kernel``:
      one ``[in, out]`` kernel pruned from ``gram`` = ``X^T X`` of its input
      (None for a method that needs no calibration). Pure and jittable.
    needs_calibration: whether ``prune`` reads ``gram``; such methods run
      layer by layer on calibration windows (:func:`elsa_jax.oneshot.walk.prune_oneshot`).
    options: the hyperparameters of ``prune_oneshot`` that ``prune`` takes
      (e.g. ``("damp", "blocksize")``).
    walk_prune: what the layer walk calls instead of ``prune`` (same
      arguments plus ``where=``, the matrix's name for messages), e.g. to
      recover from a numerical failure on the host; None: ``prune``.
    prune_tree: for a method without calibration, ``prune_tree(params, *,
      sparsity, n_m, prunable) -> params``, every prunable matrix at once;
      None: ``prune`` on each.
  """

  prune: Callable[..., jax.Array]
  needs_calibration: bool
  options: tuple[str, ...] = ()
  walk_prune: Callable[..., jax.Array] | None = None
  prune_tree: Callable[..., Any] | None = None


#: One-shot method name -> :class:`Method`.
METHODS: dict[str, Method] = {
    "magnitude": Method(magnitude.magnitude_prune, needs_calibration=False,
                        prune_tree=magnitude.magnitude_prune_tree),
    "wanda": Method(wanda.wanda_prune, needs_calibration=True),
    "sparsegpt": Method(sparsegpt.sparsegpt_prune, needs_calibration=True, options=("damp", "blocksize"),
                        walk_prune=sparsegpt.sparsegpt_prune_retrying),
}

#: The names of :data:`METHODS`, in order.
ONESHOT_METHODS = tuple(METHODS)


def method(name: str) -> Method:
  """The method registered as ``name``.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in METHODS:
    raise ValueError(f"unknown one-shot method {name!r}; choose one of {', '.join(METHODS)}.")
  return METHODS[name]


def needs_calibration(name: str) -> bool:
  """Whether the method ``name`` reads calibration statistics (False for "dense" and ADMM methods)."""
  return name in METHODS and METHODS[name].needs_calibration
