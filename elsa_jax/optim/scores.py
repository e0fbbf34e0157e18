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
"""Score sources of the projection: where the ``v`` of ``v * y**2`` comes from.

The projection keeps the top entries of ``y = w + u`` by a score: ``|y|``
(:class:`Magnitude`), or ``v * y**2`` with a per-entry weight ``v``, the
minimiser of ``sum v (z - y)**2`` over the sparse set. A source is a small
object behind one interface:

* ``init(param)``: its stored state for one prunable leaf, ``(stored,
  scale)`` (empty placeholders when it keeps none);
* ``observe(grad, stored, scale, after)``: the new state after seeing the
  step's incoming (clipped, not yet penalised) gradient;
* ``weights(score, score_scale, base_state, flat_params, treedef)``: the raw
  weight of every leaf for a z-update (``None`` for the magnitude score);
* ``decode(raw)``: that weight in float32 (done inside each group of the
  z-update, so that only one group's copy is alive).

Adding a score is one class here, one line in :data:`SCORE_SOURCES` and its
tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from elsa_jax.lowp import adam as adam_lowp_lib
from elsa_jax.lowp import codecs
from elsa_jax.sparsity import prunable as prunable_lib


@dataclasses.dataclass(frozen=True)
class Magnitude:
  """``|y|``: the plain magnitude projection (SAFE's, and ELSA's ``projection="magnitude"``)."""

  name: ClassVar[str] = "magnitude"
  stateful: ClassVar[bool] = False

  @classmethod
  def make(cls, *, decay, dtype, fixed_score):
    """The source from :func:`elsa_jax.admm`'s arguments."""
    del decay, dtype, fixed_score
    return cls()

  def init(self, param: jax.Array) -> tuple[jax.Array, jax.Array]:
    del param
    return codecs.empty(), codecs.empty()

  def observe(self, grad, stored, scale, after):
    del grad, after
    return stored, scale

  def weights(self, score, score_scale, base_state, flat_params, treedef) -> list:
    del score, score_scale, base_state, treedef
    return [None] * len(flat_params)

  def decode(self, raw):
    return raw


@dataclasses.dataclass(frozen=True)
class GradEma(Magnitude):
  """An EMA of the squared incoming gradient, taken *before* the penalty is added.

  The default: the penalty cannot revive pruned entries through the score
  (elsa-notes: 77.0 vs 345.9 at 70% on SmolLM2). ``dtype`` is the storage:
  float32, bfloat16 or int8 (block-wise, square-root domain).
  """

  decay: Any = 0.95
  dtype: Any = jnp.float32
  name: ClassVar[str] = "grad_ema"
  stateful: ClassVar[bool] = True

  @classmethod
  def make(cls, *, decay, dtype, fixed_score):
    del fixed_score
    return cls(decay, dtype)

  def init(self, param):
    return codecs.zeros_moment(param.shape, self.dtype, square=True)

  def observe(self, grad, stored, scale, after):
    g = grad.astype(jnp.float32) + after
    v = self.decay * codecs.decode_moment(stored, scale) + (1.0 - self.decay) * g * g
    return codecs.encode_moment(v, self.dtype, square=True)

  def weights(self, score, score_scale, base_state, flat_params, treedef) -> list:
    del base_state, flat_params
    return list(zip(treedef.flatten_up_to(score), treedef.flatten_up_to(score_scale)))  # decoded per group

  def decode(self, raw):
    return codecs.decode_moment(*raw)


@dataclasses.dataclass(frozen=True)
class BaseSecondMoment(Magnitude):
  """The ``nu`` of an Adam-family base optimizer (the paper's choice; it includes the penalty)."""

  name: ClassVar[str] = "base_second_moment"

  def weights(self, score, score_scale, base_state, flat_params, treedef) -> list:
    del score, score_scale, flat_params
    found, nu = adam_lowp_lib.find_second_moment(base_state)
    if not found:
      raise no_second_moment_error(base_state)
    return treedef.flatten_up_to(nu)


@dataclasses.dataclass(frozen=True, eq=False)
class Fixed(Magnitude):
  """A constant per-entry importance (SAFE+: ``||X_j||**2`` of the input activations).

  ``score`` is a (prefix) pytree of non-negative arrays broadcastable to each
  prunable leaf (e.g. ``[in, 1]`` for a kernel). It is a constant of the
  transform, never part of its state. Compared by identity.
  """

  score: Any = None
  name: ClassVar[str] = "fixed"

  @classmethod
  def make(cls, *, decay, dtype, fixed_score):
    del decay, dtype
    if fixed_score is None:
      raise ValueError("score_source='fixed' needs fixed_score=, a pytree of importances per prunable leaf "
                       "(e.g. squared input-activation norms [in, 1] per kernel).")
    return cls(fixed_score)

  def weights(self, score, score_scale, base_state, flat_params, treedef) -> list:
    del score, score_scale, base_state, treedef
    lookup = prunable_lib.PathLookup(self.score)
    return [fixed_leaf(lookup, path, w) for path, w in flat_params]


#: ``score_source`` name -> class (``projection="magnitude"`` means :class:`Magnitude`).
SCORE_SOURCES = {cls.name: cls for cls in (Magnitude, GradEma, BaseSecondMoment, Fixed)}


def make_score(projection: str, score_source: str, *, decay=0.95, dtype=jnp.float32, fixed_score=None):
  """The source that ``admm``'s ``projection``/``score_source`` arguments name (from :data:`SCORE_SOURCES`)."""
  prunable_lib.check_choice("projection", projection, ("objective_aware", "magnitude"))
  prunable_lib.check_choice("score_source", score_source, tuple(n for n in SCORE_SOURCES if n != "magnitude"))
  name = "magnitude" if projection == "magnitude" else score_source
  return SCORE_SOURCES[name].make(decay=decay, dtype=dtype, fixed_score=fixed_score)


def fixed_leaf(lookup: prunable_lib.PathLookup, path: tuple, leaf: Any) -> Any:
  """The fixed score of a prunable leaf, checked to broadcast to it (None elsewhere)."""
  value = lookup(path)
  if value is prunable_lib.MISSING or value is None:
    return None
  try:
    np.broadcast_shapes(np.shape(value), leaf.shape)
  except ValueError:
    raise ValueError(
        f"fixed_score for {prunable_lib.path_str(path)!r} has shape {np.shape(value)}, which does not broadcast "
        f"to the leaf's {leaf.shape}; give [in, 1] per-input importances for a [in, out] kernel."
    ) from None
  return jnp.asarray(value, jnp.float32)


def no_second_moment_error(base_state) -> ValueError:
  return ValueError(
      "score_source='base_second_moment' needs a base optimizer with an Adam-style "
      f"second moment `nu` in its state, found none in {type(base_state).__name__}; "
      "use an Adam-family base (optax.adam, elsa_jax.adam_lowp, ...) or "
      "score_source='grad_ema'."
  )
