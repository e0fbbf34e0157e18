"""Sparsity patterns as types: parsed once from their spelling, checked once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elsa_jax
from elsa_jax.sparsity import patterns


@pytest.mark.parametrize("spelling,expected", [
    ("unstructured", patterns.Unstructured()), ("row", patterns.PerRow()), ("2:4", patterns.NM(2, 4)),
    ("4:8", patterns.NM(4, 8)), (patterns.NM(1, 4), patterns.NM(1, 4)),
])
def test_parse_and_round_trip(spelling, expected):
  pattern = patterns.parse(spelling)
  assert pattern == expected
  assert patterns.parse(str(pattern)) == pattern  # the CLI spelling round-trips


def test_nm_implies_its_sparsity_and_checks_shapes():
  assert patterns.NM(2, 4).sparsity == 0.5 and patterns.NM(1, 8).sparsity == 0.875
  assert patterns.parse("nm", n_m=(4, 8)) == patterns.NM(4, 8)  # the earlier spelling
  with pytest.raises(ValueError, match="0 < N < M"):
    patterns.NM(4, 4)
  with pytest.raises(ValueError, match="does not divide|divid"):
    patterns.NM(2, 4).check_shape((6, 3), axis=0)
  for bad in ("blocks", "2:x", "2-4", ""):
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
      patterns.parse(bad)


def test_every_spelling_gives_the_same_transform():
  """admm takes a pattern or its spelling; the masks are the same (and 2:4 keeps 2 of every 4)."""
  r = np.random.default_rng()
  params = {"layers": {"0": {"kernel": jnp.asarray(r.normal(size=(16, 8)), jnp.float32)}}}
  grads = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
  zs = []
  for pattern in (patterns.NM(2, 4), "2:4"):
    tx = elsa_jax.admm(optax.adam(1e-2), pattern=pattern, interval=1)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    zs.append(state.z["layers"]["0"]["kernel"])
  np.testing.assert_array_equal(zs[0], zs[1])
  kept = (np.asarray(zs[0]) != 0).reshape(4, 4, 8).sum(1)
  np.testing.assert_array_equal(kept, 2)
