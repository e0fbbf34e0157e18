"""OWL's per-matrix sparsities of a model, and every one-shot method pruning at them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elsa_jax.models import llama
from elsa_jax.oneshot import owl
from elsa_jax.oneshot import walk
from elsa_jax.optim import finalize
from elsa_jax.sparsity import allocation


def _model_and_windows():
  seed = int(np.random.default_rng().integers(1 << 30))
  config = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  graphdef, params = llama.split(llama.Llama(config, rngs=nnx.Rngs(seed)))
  # Outliers in two layers' inputs of the MLP, so the layers' ratios differ.
  for i in (1, 3):
    k = params["layers"][i]["mlp"]["down_proj"]["kernel"]
    params["layers"][i]["mlp"]["down_proj"]["kernel"] = k.at[:3].multiply(30.0)
  windows = np.random.default_rng(seed).integers(0, 97, size=(4, 16)).astype(np.int32)
  return graphdef, params, windows


def test_owl_sparsities_follow_the_dense_wanda_scores_and_keep_the_count():
  graphdef, params, windows = _model_and_windows()
  tree, layer_s = owl.owl_sparsities(graphdef, params, windows, target=0.6, m=3.0, lmda=0.1, batch_size=2)
  # By hand: the dense model's X^T X per layer, Wanda's |W| * ||X|| per matrix.
  stats = walk.calibration_statistics(graphdef, params, windows, batch_size=2)
  scores = [[np.abs(np.asarray(params["layers"][i][b][n]["kernel"])) *
             np.sqrt(np.diagonal(np.asarray(stats[i][key])))[:, None]
             for (b, n), key in llama.LINEAR_INPUTS.items()] for i in range(4)]
  np.testing.assert_allclose(layer_s, allocation.owl_layer_sparsities(scores, 0.6, m=3.0, lmda=0.1), atol=1e-6)
  assert max(layer_s) - min(layer_s) == pytest.approx(0.2)
  # Every prunable matrix has a value; nothing else does; each is its layer's up to whole counts.
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert len(flat) == 4 * len(llama.LINEAR_INPUTS)
  for path, s in flat:
    i = int(path[1].key)
    kernel = params["layers"][i][path[2].key][path[3].key]["kernel"]
    assert abs(s - layer_s[i]) <= 2 / kernel.size
  sizes = [params["layers"][int(p[1].key)][p[2].key][p[3].key]["kernel"].size for p, _ in flat]
  assert allocation.mean_sparsity(sizes, [s for _, s in flat]) == round(0.6 * sum(sizes)) / sum(sizes)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_oneshot_method_prunes_each_matrix_at_its_owl_sparsity(method):
  graphdef, params, windows = _model_and_windows()
  tree, _ = owl.owl_sparsities(graphdef, params, windows, target=0.6, m=3.0, lmda=0.1, batch_size=2)
  pruned = walk.prune_oneshot(graphdef, params, windows, method=method, sparsity=tree, batch_size=2)
  report = finalize.sparsity_report(pruned)
  want = {"/".join(str(k.key) for k in p): s for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert set(report["per_matrix"]) == set(want)
  for name, s in report["per_matrix"].items():
    # Wanda prunes per output row, round(s * in) of each: within half an input of the share.
    inputs = int(np.prod(np.shape(walk.get_path(params, tuple(
        int(k) if k.isdigit() else k for k in name.split("/")[:-1]))["kernel"])[:1]))
    tol = 0.5 / inputs + 1e-9 if method == "wanda" else 1e-9
    assert abs(s - want[name]) <= tol, (name, s, want[name])
  if method != "wanda":
    assert report["zeros"] == round(0.6 * report["total"])
  # The same method at one sparsity for every matrix differs.
  uniform = walk.prune_oneshot(graphdef, params, windows, method=method, sparsity=0.6, batch_size=2)
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), uniform, pruned)))
  for name in ("embed_tokens", "lm_head", "norm"):
    chex.assert_trees_all_equal(pruned[name], params[name])


def test_a_tree_without_a_matrix_is_refused_by_name():
  graphdef, params, windows = _model_and_windows()
  tree, _ = owl.owl_sparsities(graphdef, params, windows, target=0.5, batch_size=2)
  tree["layers"][2]["mlp"]["up_proj"]["kernel"] = None
  with pytest.raises(ValueError, match="no value for layer 2 mlp.up_proj"):
    walk.prune_oneshot(graphdef, params, windows, method="wanda", sparsity=tree, batch_size=2)
  tree["layers"][2]["mlp"]["up_proj"]["kernel"] = 1.5
  with pytest.raises(ValueError, match="sparsity at 'layers/2/mlp/up_proj/kernel' must lie in"):
    walk.prune_oneshot(graphdef, params, windows, method="wanda", sparsity=tree, batch_size=2)
