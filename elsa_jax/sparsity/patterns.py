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
"""Sparsity patterns as types: :class:`Unstructured`, :class:`PerRow`, :class:`NM`.

A pattern says which entries of a matrix compete for the kept slots:

* :class:`Unstructured`: all entries of the matrix (one count per matrix);
* :class:`PerRow`: the entries of each slice along ``axis`` (one count per
  output unit of a Flax ``[in, out]`` kernel with ``axis=0``);
* :class:`NM`: ``n`` kept in every group of ``m`` consecutive entries along
  ``axis``; it implies the sparsity ``1 - n / m``.

:func:`parse` turns the command line's spelling (``"unstructured"``, ``"row"``,
``"2:4"``) into a pattern; every function of the package that takes a pattern
accepts either and checks it once, through :func:`parse`.

Example:
  >>> from elsa_jax.sparsity import patterns
  >>> patterns.parse("2:4")
  NM(n=2, m=4)
  >>> patterns.parse("2:4").sparsity, patterns.parse("row").kind
  (0.5, 'row')
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Union


class _Counted:
  """A pattern whose count of kept entries is given as a sparsity (one count per matrix or per slice)."""

  kind: ClassVar[str]
  n_m: ClassVar[None] = None
  sparsity: ClassVar[None] = None  # given separately

  def __str__(self) -> str:
    return self.kind

  def check_shape(self, shape: tuple[int, ...], axis: int = 0) -> None:
    del shape, axis  # every shape has a count


@dataclasses.dataclass(frozen=True)
class Unstructured(_Counted):
  """One count per matrix: the top entries of the whole matrix are kept."""

  kind: ClassVar[str] = "unstructured"


@dataclasses.dataclass(frozen=True)
class PerRow(_Counted):
  """One count per slice along ``axis``: the top entries of each output unit are kept."""

  kind: ClassVar[str] = "row"


@dataclasses.dataclass(frozen=True)
class NM:
  """``n`` kept in every group of ``m`` consecutive entries along ``axis`` (e.g. 2:4).

  Raises:
    ValueError: unless ``0 < n < m``.
  """

  n: int
  m: int
  kind: ClassVar[str] = "nm"

  def __post_init__(self):
    if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
      raise ValueError(f"N:M pattern {self.n}:{self.m} needs integers 0 < N < M, e.g. 2:4.")

  def __str__(self) -> str:
    return f"{self.n}:{self.m}"

  @property
  def n_m(self) -> tuple[int, int]:
    return (self.n, self.m)

  @property
  def sparsity(self) -> float:
    """The sparsity the pattern implies: ``1 - n / m``."""
    return 1.0 - self.n / self.m

  def check_shape(self, shape: tuple[int, ...], axis: int = 0) -> None:
    """Raises ValueError when ``m`` does not divide the matrix along ``axis``."""
    from elsa_jax.sparsity import topk

    topk.check_nm(tuple(shape), self.n, self.m, axis)


Pattern = Union[Unstructured, PerRow, NM]
#: What :func:`parse` accepts: a pattern, or its spelling.
PatternLike = Union[Pattern, str]


def parse(pattern: PatternLike, n_m: tuple[int, int] | None = None) -> Pattern:
  """A pattern from ``"unstructured"``, ``"row"``, ``"N:M"`` or a pattern instance.

  ``("nm", n_m=(2, 4))`` is the spelling of earlier releases and is accepted too.

  Example:
    >>> from elsa_jax.sparsity.patterns import parse
    >>> parse("unstructured"), parse("4:8"), parse("nm", n_m=(2, 4))
    (Unstructured(), NM(n=4, m=8), NM(n=2, m=4))

  Raises:
    ValueError: for any other spelling.
  """
  if isinstance(pattern, (Unstructured, PerRow, NM)):
    return pattern
  if pattern == "unstructured":
    return Unstructured()
  if pattern == "row":
    return PerRow()
  if pattern == "nm":
    return NM(*(tuple(n_m) if n_m is not None else (2, 4)))
  if isinstance(pattern, str) and ":" in pattern:
    try:
      n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
      pass
    else:
      return NM(n, m)
  raise ValueError(f"unknown sparsity pattern {pattern!r}; use 'unstructured', 'row' or N:M such as '2:4' "
                   "(or elsa_jax.sparsity.patterns.Unstructured(), PerRow(), NM(2, 4)).")
