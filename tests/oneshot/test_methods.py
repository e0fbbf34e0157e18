"""The one-shot method registry: dispatch, and a new method added by one entry from a test."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import elsa_jax
from elsa_jax import oneshot
from elsa_jax.cli import jobs
from elsa_jax.models import llama
from elsa_jax.oneshot import registry
from elsa_jax.sparsity import topk


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 30))


def test_the_registry_lists_the_methods_and_what_they_need():
  assert tuple(registry.METHODS) == registry.ONESHOT_METHODS == ("magnitude", "wanda", "sparsegpt")
  assert [registry.needs_calibration(m) for m in ("magnitude", "wanda", "sparsegpt", "dense", "elsa")] == [
      False, True, True, False, False]
  assert jobs.METHODS[-3:] == jobs.INIT_METHODS[1:] == registry.ONESHOT_METHODS
  with pytest.raises(ValueError, match="unknown one-shot method 'obs'; choose one of magnitude, wanda, sparsegpt"):
    registry.method("obs")
  # The public names still point at the methods' modules.
  assert elsa_jax.wanda_prune is oneshot.wanda.wanda_prune
  assert elsa_jax.sparsegpt_prune is oneshot.sparsegpt.sparsegpt_prune
  assert elsa_jax.activation_norms is oneshot.wanda.activation_norms


@pytest.mark.parametrize("kw", [dict(sparsity=0.6), dict(n_m=(2, 4))])
def test_prune_matrix_is_the_registered_function(kw):
  rng = np.random.default_rng(_seed())
  x = jnp.asarray(rng.normal(size=(128, 32)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(32, 24)).astype(np.float32))
  gram = x.T @ x
  direct = {
      "magnitude": topk.project(kernel, 0.0 if "n_m" in kw else kw["sparsity"],
                                **({"pattern": "nm", "n_m": kw["n_m"]} if "n_m" in kw else {})),
      "wanda": oneshot.wanda.wanda_prune(kernel, gram, kw.get("sparsity"), n_m=kw.get("n_m")),
      "sparsegpt": oneshot.sparsegpt.sparsegpt_prune(kernel, gram, kw.get("sparsity"), n_m=kw.get("n_m"),
                                                     damp=0.05, blocksize=8),
  }
  for name, want in direct.items():
    got = oneshot.prune_matrix(name, kernel, gram, damp=0.05, blocksize=8, **kw)
    np.testing.assert_array_equal(got, want, err_msg=name)


def _squared_wanda(kernel, gram, *, sparsity=None, n_m=None):
  """``(|W| ||X||)^2``: Wanda's ranking, computed another way."""
  score = jnp.square(kernel.astype(jnp.float32)) * jnp.diagonal(gram).astype(jnp.float32)[:, None]
  keep = topk.nm_mask(score, *n_m, axis=0) if n_m else topk.row_mask(score, sparsity, axis=0)
  return jnp.where(keep, kernel, 0.0)


def test_a_new_method_is_one_registry_entry(monkeypatch):
  monkeypatch.setitem(registry.METHODS, "wanda2", registry.Method(_squared_wanda, needs_calibration=True))
  seed = _seed()
  config = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  graphdef, params = llama.split(llama.Llama(config, rngs=nnx.Rngs(seed)))
  windows = np.random.default_rng(seed).integers(0, 97, size=(4, 16)).astype(np.int32)
  assert registry.needs_calibration("wanda2")
  got = oneshot.prune_oneshot(graphdef, params, windows, method="wanda2", sparsity=0.5, batch_size=2)
  want = oneshot.prune_oneshot(graphdef, params, windows, method="wanda", sparsity=0.5, batch_size=2)
  for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
    np.testing.assert_array_equal(leaf != 0, _at(got, path) != 0, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(leaf, _at(got, path), err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="wanda2 needs calibration windows"):
    oneshot.prune_oneshot(graphdef, params, None, method="wanda2", sparsity=0.5)
  # A method without calibration and without a whole-tree function: each prunable matrix on its own.
  monkeypatch.setitem(registry.METHODS, "mag2", registry.Method(oneshot.magnitude.magnitude_prune,
                                                                needs_calibration=False))
  chex.assert_trees_all_equal(oneshot.prune_oneshot(graphdef, params, None, method="mag2", sparsity=0.5),
                              oneshot.prune_oneshot(graphdef, params, None, method="magnitude", sparsity=0.5))


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_sparsegpt_retries_a_singular_hessian_then_says_so(caplog):
  rng = np.random.default_rng(_seed())
  kernel = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
  good = oneshot.sparsegpt.sparsegpt_prune_retrying(kernel, x.T @ x, 0.5, where="layer 0 mlp.up_proj")
  np.testing.assert_array_equal(good, oneshot.sparsegpt.sparsegpt_prune(kernel, x.T @ x, 0.5))
  bad = -jnp.eye(16, dtype=jnp.float32)  # negative definite at every damp: never factorisable
  with pytest.raises(RuntimeError, match="Hessian of layer 3 mlp.up_proj stays singular at damp=1"):
    oneshot.sparsegpt.sparsegpt_prune_retrying(kernel, bad, 0.5, where="layer 3 mlp.up_proj")
  assert sum("retrying" in r.getMessage() for r in caplog.records) == 2
