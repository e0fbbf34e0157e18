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
"""Which leaves are pruned, and the per-leaf settings that go with them.

``prunable`` is None (:func:`default_prunable`: 2-D leaves named ``kernel``
under a ``layers`` key, i.e. the linear layers of the transformer blocks,
never embeddings, norms or the LM head), a predicate ``(path, leaf) -> bool``
on jax key paths, or a pytree of bools (a prefix of the params tree is
enough). Per-leaf settings such as ``sparsity`` may be a scalar or a pytree
(again a prefix is enough) for non-uniform allocations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from elsa_jax.sparsity import patterns as patterns_lib

MISSING = object()

Predicate = Callable[[tuple, Any], bool]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path: tuple) -> tuple[str, ...]:
  """A jax key path as a tuple of strings, e.g. ``('layers', '0', 'mlp', ...)``."""
  return tuple(_key_name(k) for k in path)


def path_str(path: tuple) -> str:
  """A jax key path as ``'layers/0/mlp/up_proj/kernel'``."""
  return "/".join(path_names(path))


def default_prunable(path: tuple, leaf: Any) -> bool:
  """The default prunable set: 2-D ``kernel`` leaves below a ``layers`` key.

  With the project's LLaMA params this selects q, k, v, o, gate, up and down
  projections of every block, and never the embeddings, the norms or the LM
  head.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from elsa_jax import default_prunable
    >>> params = {"layers": {0: {"mlp": {"kernel": jnp.ones((4, 8))}}},
    ...           "lm_head": {"kernel": jnp.ones((4, 16))}}
    >>> jax.tree_util.tree_map_with_path(default_prunable, params)
    {'layers': {0: {'mlp': {'kernel': True}}}, 'lm_head': {'kernel': False}}

  Args:
    path: the leaf's jax key path.
    leaf: the leaf (anything with ``ndim``).

  Returns:
    Whether the leaf is pruned.
  """
  names = path_names(path)
  return (
      len(names) >= 2
      and names[-1] == "kernel"
      and "layers" in names[:-1]
      and getattr(leaf, "ndim", None) == 2
  )


class PathLookup:
  """Finds the value of a (prefix) pytree that applies to a params path."""

  def __init__(self, tree: Any):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    self._entries = [(path_names(p), v) for p, v in flat]

  @classmethod
  def from_entries(cls, entries) -> "PathLookup":
    """A lookup from :func:`frozen_entries`'s ``((path names, value), ...)``."""
    lookup = cls(None)
    lookup._entries = list(entries)
    return lookup

  def __call__(self, path: tuple) -> Any:
    names = path_names(path)
    best, best_len = MISSING, -1
    for prefix, value in self._entries:
      if len(prefix) > best_len and names[: len(prefix)] == prefix:
        best, best_len = value, len(prefix)
    return best


def frozen_entries(tree: Any) -> tuple | None:
  """A (prefix) pytree of Python scalars as hashable ``((path names, float), ...)``; None if any is a jax array."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not all(is_python_scalar(v) for _, v in flat):
    return None
  return tuple((path_names(p), float(np.asarray(v))) for p, v in flat)


def as_predicate(prunable) -> Predicate:
  if prunable is None:
    return default_prunable
  if callable(prunable):
    return prunable
  lookup = PathLookup(prunable)

  def predicate(path, leaf):
    del leaf
    value = lookup(path)
    return False if value is MISSING or value is None else bool(value)

  return predicate


def prunable_mask(params: Any, prunable=None) -> Any:
  """The params tree of bools saying which leaves are pruned.

  Example:
    >>> import jax.numpy as jnp
    >>> from elsa_jax import prunable_mask
    >>> prunable_mask({"layers": {"0": {"kernel": jnp.ones((2, 2))}},
    ...                "norm": {"scale": jnp.ones(2)}})
    {'layers': {'0': {'kernel': True}}, 'norm': {'scale': False}}

  Args:
    params: the params tree.
    prunable: None (:func:`default_prunable`), a predicate ``(path, leaf)``,
      or a (prefix) pytree of bools.

  Returns:
    A tree of Python bools with the params' structure.

  Raises:
    ValueError: when a prunable leaf is not a matrix.
  """
  predicate = as_predicate(prunable)

  def leaf_fn(path, leaf):
    keep = bool(predicate(path, leaf))
    if keep:
      check_matrix(path, leaf)
    return keep

  return jax.tree_util.tree_map_with_path(leaf_fn, params)


def check_matrix(path, leaf):
  if getattr(leaf, "ndim", None) != 2:
    raise ValueError(
        f"prunable leaf {path_str(path)!r} has shape {getattr(leaf, 'shape', None)}, "
        "not a matrix; ELSA prunes 2-D weight matrices only. Exclude it with "
        "`prunable=` (a predicate or a bool tree)."
    )


def is_python_scalar(x) -> bool:
  """A Python or NumPy scalar: a value fixed when a transform is built (never a jax array, traced or not)."""
  return isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0)


def is_concrete(x) -> bool:
  return isinstance(x, (int, float, np.ndarray, np.number)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
  )


def check_sparsity(s, where: str = "") -> None:
  if not is_concrete(s):
    return
  arr = np.asarray(s, dtype=np.float64)
  if arr.shape != ():
    raise ValueError(
        f"sparsity{where} must be a scalar per leaf, got shape {arr.shape}; give a "
        "float or a pytree of floats (one per prunable leaf)."
    )
  value = float(arr)
  if not 0.0 <= value < 1.0:
    raise ValueError(
        f"sparsity{where} must lie in [0, 1), got {value}; e.g. 0.9 prunes 90% of "
        "every prunable matrix."
    )


def resolve_sparsity(sparsity, pattern: patterns_lib.Pattern):
  """Validates ``sparsity`` and returns ``path -> sparsity`` for prunable leaves.

  An N:M pattern implies its sparsity; a ``sparsity`` given with it must agree.
  """
  if isinstance(pattern, patterns_lib.NM):
    implied = pattern.sparsity
    leaves = [] if sparsity is None else jax.tree.leaves(sparsity)
    for s in leaves:
      if is_concrete(s) and abs(float(np.asarray(s)) - implied) > 1e-6:
        raise ValueError(
            f"pattern {pattern} prunes {implied:g}, but sparsity="
            f"{float(np.asarray(s)):g} was given; pass sparsity=None (or {implied:g})."
        )
    return lambda path: implied
  if sparsity is None:
    raise ValueError(
        "sparsity is required for the 'unstructured' and 'row' patterns, e.g. sparsity=0.9."
    )
  if isinstance(sparsity, PathLookup):  # already checked
    lookup = sparsity
  else:
    for p, s in jax.tree_util.tree_flatten_with_path(sparsity)[0]:
      check_sparsity(s, f" at {path_str(p)!r}" if p else "")
    lookup = PathLookup(sparsity)

  def at(path):
    value = lookup(path)
    if value is MISSING or value is None:
      raise ValueError(
          f"no sparsity given for the prunable leaf {path_str(path)!r}; the sparsity "
          "pytree must cover every prunable leaf (a prefix is enough)."
      )
    return value

  return at


def static_int(name: str, value) -> int:
  if not is_concrete(value):
    raise ValueError(
        f"{name} must be a Python int, not a traced value; under "
        f"optax.inject_hyperparams list {name!r} in static_args."
    )
  return int(np.asarray(value))


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, choices))}.")
