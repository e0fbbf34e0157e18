"""One-shot baselines (magnitude, Wanda, SparseGPT) and SAFE's pieces against their definitions."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import elsa_jax
from elsa_jax import oneshot
from elsa_jax.oneshot import sparsegpt
from elsa_jax.oneshot import wanda
from elsa_jax.oneshot import walk as baselines
from elsa_jax.models import llama
from elsa_jax.run import train


def _fresh_seed() -> int:
  return int(np.random.default_rng().integers(1 << 30))


def _activations(rng: np.random.Generator, tokens: int, features: int, rank: int = 32) -> np.ndarray:
  """LLM-like inputs: strongly correlated (low rank plus noise), log-normal feature
  scales and a few outlier features."""
  x = rng.normal(size=(tokens, rank)) @ rng.normal(size=(rank, features)) / np.sqrt(rank)
  x += 0.3 * rng.normal(size=(tokens, features))
  scales = np.exp(rng.normal(0.0, 1.0, size=features))
  scales[rng.choice(features, 3, replace=False)] *= 4.0
  return (x * scales).astype(np.float32)


def _sparsegpt_reference(w, h, sparsity, n=0, m=0, blocksize=128, percdamp=0.01):
  """A float64 NumPy transcription of SparseGPT's published ``fasterprune`` (W ``[out, in]``).

  Blocks of ``blocksize`` columns from the left, the last one holding the
  rest. The unstructured mask prunes the block's share of the matrix's
  count, ``round(s * rows * i2) - round(s * rows * i1)`` (the published code
  prunes the scores ``<=`` the ``int(s * block size)``-th, one more per block).
  """
  w = w.astype(np.float64).copy()
  h = h.astype(np.float64).copy()
  rows, cols = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += percdamp * np.mean(np.diag(h)) * np.eye(cols)
  hinv = np.linalg.cholesky(np.linalg.inv(h)).T
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    w1 = w[:, i1:i2].copy()
    q1, err1 = np.zeros_like(w1), np.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    mask1 = np.zeros_like(w1, dtype=bool)
    if n == 0:
      tmp = (w1 ** 2 / np.diag(hinv1)[None] ** 2).ravel()
      flat = np.zeros(tmp.size, bool)
      k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
      flat[np.argsort(tmp, kind="stable")[:k]] = True
      mask1 = flat.reshape(w1.shape)
    for i in range(i2 - i1):
      col = w1[:, i]
      d = hinv1[i, i]
      if n and i % m == 0:
        tmp = w1[:, i:i + m] ** 2 / np.diag(hinv1)[i:i + m][None] ** 2
        idx = np.argsort(tmp, axis=1, kind="stable")[:, :m - n]
        np.put_along_axis(mask1[:, i:i + m], idx, True, axis=1)
      q = col.copy()
      q[mask1[:, i]] = 0
      q1[:, i] = q
      e = (col - q) / d
      w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
      err1[:, i] = e
    w[:, i1:i2] = q1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  return w


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.8), dict(n_m=(2, 4))])
def test_sparsegpt_matches_the_published_algorithm(kw):
  rng = np.random.default_rng(_fresh_seed())
  x = _activations(rng, 512, 48)
  x[:, 7] = 0.0  # a dead input
  w = rng.normal(size=(20, 48)).astype(np.float32)  # [out, in]; 20 x 16 per block: whole counts
  h = x.T @ x
  ref = _sparsegpt_reference(w, h, kw.get("sparsity", 0.0), *((2, 4) if "n_m" in kw else (0, 0)), blocksize=16)
  got = jax.jit(lambda k, g: sparsegpt.sparsegpt_prune(k, g, kw.get("sparsity"), n_m=kw.get("n_m"),
                                                        blocksize=16))(jnp.asarray(w.T), jnp.asarray(h))
  chex.assert_shape(got, (48, 20))
  got = np.asarray(got).T
  assert np.all(got[:, 7] == 0)
  assert (got == 0).sum() == (ref == 0).sum() == round(kw.get("sparsity", 0.5) * got.size)
  # float32 against float64: a near-tie in a mask choice may go the other way,
  # and then the later updates differ slightly; the objective must agree.
  assert np.mean((got == 0) != (ref == 0)) < 0.01
  err = lambda v: float(np.sum(np.square(x @ (w - v).T)))
  np.testing.assert_allclose(err(got), err(ref), rtol=1e-2)
  same = ((got == 0) == (ref == 0)).all(axis=1)  # rows whose masks all agree
  np.testing.assert_allclose(got[same], ref[same], atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n_m=(2, 4))])
def test_sparsegpt_blocks_are_the_references_when_128_does_not_divide_the_inputs(kw):
  # 200 inputs: the reference's blocks are columns 0-127 and 128-199 (not
  # two of 100, the largest divisor under 128), with the mask chosen per block.
  rng = np.random.default_rng(_fresh_seed())
  x = _activations(rng, 512, 200)
  x[:, 5] = 0.0  # a dead input
  w = rng.normal(size=(24, 200)).astype(np.float32)  # [out, in]
  h = x.T @ x
  sparsity = kw.get("sparsity", 0.0)
  ref = _sparsegpt_reference(w, h, sparsity, *((2, 4) if "n_m" in kw else (0, 0)), blocksize=128)
  got = jax.jit(lambda k, g: sparsegpt.sparsegpt_prune(k, g, kw.get("sparsity"), n_m=kw.get("n_m")))(
      jnp.asarray(w.T), jnp.asarray(h))
  got = np.asarray(got).T
  assert (got == 0).sum() == (ref == 0).sum() == round(kw.get("sparsity", 0.5) * got.size)
  # Other blocks choose ~4% of the mask differently; float32 against float64
  # flips a near-tie in about one draw of 300.
  assert np.mean((got == 0) != (ref == 0)) < 2e-3
  same = ((got == 0) == (ref == 0)).all(axis=1)
  assert same.mean() > 0.9
  np.testing.assert_allclose(got[same], ref[same], atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n_m=(2, 4))])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(kw):
  # (At 90% on such a layer SparseGPT and Wanda come within ~1% of each other,
  # in either order, so 90% is not asserted.)
  rng = np.random.default_rng(_fresh_seed())
  x = jnp.asarray(_activations(rng, 1024, 128))
  kernel = jnp.asarray(rng.normal(size=(128, 96)).astype(np.float32))
  gram = x.T @ x
  sparsity, n_m = kw.get("sparsity"), kw.get("n_m")
  prune = jax.jit(lambda method, k, g: baselines.prune_matrix(method, k, g, sparsity=sparsity, n_m=n_m),
                  static_argnums=0)
  errors = {}
  for method in oneshot.METHODS:
    pruned = prune(method, kernel, gram)
    expected = round((sparsity if n_m is None else 0.5) * kernel.size)
    assert abs(int(jnp.sum(pruned == 0)) - expected) <= kernel.shape[1] // 2, method
    # Same objective computed two ways: ||X W - X W'||^2.
    direct = float(jnp.sum(jnp.square(x @ kernel - x @ pruned)))
    errors[method] = float(sparsegpt.reconstruction_error(kernel, pruned, gram))
    np.testing.assert_allclose(errors[method], direct, rtol=1e-3)
  assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_wanda_keeps_the_top_scores_of_every_output_row():
  rng = np.random.default_rng(_fresh_seed())
  x = _activations(rng, 256, 32)
  kernel = rng.normal(size=(32, 12)).astype(np.float32)
  pruned = np.asarray(jax.jit(lambda k, g: wanda.wanda_prune(k, g, 0.75))(kernel, x.T @ x))
  score = np.abs(kernel) * np.linalg.norm(x, axis=0)[:, None]
  for j in range(kernel.shape[1]):  # output j = column j of the [in, out] kernel
    kept = np.sort(np.argsort(-score[:, j], kind="stable")[:8])
    np.testing.assert_array_equal(np.flatnonzero(pruned[:, j]), kept)
    np.testing.assert_array_equal(pruned[kept, j], kernel[kept, j])
  nm = np.asarray(wanda.wanda_prune(kernel, x.T @ x, n_m=(2, 4)))
  np.testing.assert_array_equal((nm.reshape(8, 4, 12) != 0).sum(1), 2)


def _tiny_llama(seed):
  config = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  return llama.split(llama.Llama(config, rngs=nnx.Rngs(seed)))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_each_layer_is_pruned_on_the_outputs_of_the_pruned_layers_before_it(method):
  seed = _fresh_seed()
  graphdef, params = _tiny_llama(seed)
  windows = np.random.default_rng(seed).integers(0, 97, size=(6, 16)).astype(np.int32)
  pruned = baselines.prune_oneshot(graphdef, params, windows, method=method, sparsity=0.6, batch_size=2)

  # By hand: run the model with layers 0..i-1 taken from the result, collect
  # layer i's inputs, prune it, and compare.
  model = llama.merge(graphdef, pruned)
  x = model.embed(jnp.asarray(windows))
  pos = jnp.broadcast_to(jnp.arange(16), windows.shape)
  dense_layers = llama.merge(graphdef, params).layers
  for i in range(3):
    _, inputs = dense_layers[i].with_linear_inputs(x, pos)
    for (block, name), key in llama.LINEAR_INPUTS.items():
      v = inputs[key].reshape(-1, inputs[key].shape[-1])
      expected = baselines.prune_matrix(method, params["layers"][i][block][name]["kernel"], v.T @ v,
                                        sparsity=0.6)
      got = pruned["layers"][i][block][name]["kernel"]
      np.testing.assert_array_equal(got == 0, expected == 0, err_msg=f"layer {i} {name}")
      np.testing.assert_allclose(got, expected, atol=1e-4)
    x = model.layers[i](x, pos)
  # Not the same as pruning every layer on dense activations.
  dense_stats = baselines.calibration_statistics(graphdef, params, windows, batch_size=2)
  k = params["layers"][2]["mlp"]["down_proj"]["kernel"]
  on_dense = baselines.prune_matrix(method, k, dense_stats[2]["mlp_hidden"], sparsity=0.6)
  assert not np.allclose(on_dense, pruned["layers"][2]["mlp"]["down_proj"]["kernel"], atol=1e-4)
  # Everything but the decoder-layer matrices is untouched.
  for name in ("embed_tokens", "lm_head", "norm"):
    chex.assert_trees_all_equal(pruned[name], params[name])


def test_oneshot_rejects_bad_input():
  graphdef, params = _tiny_llama(0)
  with pytest.raises(ValueError, match="one-shot method"):
    baselines.prune_oneshot(graphdef, params, None, method="obs", sparsity=0.5)
  with pytest.raises(ValueError, match="sparsity"):
    baselines.prune_oneshot(graphdef, params, np.zeros((2, 8), np.int32), method="wanda", sparsity=1.0)
  with pytest.raises(ValueError, match="calibration windows"):
    baselines.prune_oneshot(graphdef, params, None, method="sparsegpt", sparsity=0.5)


def test_sam_gradient_is_the_gradient_at_the_ascent_point():
  rng = np.random.default_rng(_fresh_seed())
  a = rng.normal(size=(6, 6)).astype(np.float32)
  a = jnp.asarray(a @ a.T + np.eye(6, dtype=np.float32))
  w = jnp.asarray(rng.normal(size=6).astype(np.float32))
  f = lambda p: 0.5 * p["w"] @ a @ p["w"]
  loss, g = jax.jit(elsa_jax.sam_gradient(jax.value_and_grad(f), rho=0.3))({"w": w})
  g0 = a @ w
  np.testing.assert_allclose(loss, f({"w": w}), rtol=1e-6)
  np.testing.assert_allclose(g["w"], a @ (w + 0.3 * g0 / jnp.linalg.norm(g0)), rtol=1e-5)


def test_fixed_score_projection_ranks_by_activation_weighted_magnitude():
  """SAFE+'s generalized projection: z keeps the top |w| * ||X_j|| (Wanda's score) per matrix."""
  rng = np.random.default_rng(_fresh_seed())
  kernel = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))
  norms2 = jnp.asarray(np.exp(rng.normal(size=(16, 1))).astype(np.float32))
  params = {"layers": {0: {"kernel": kernel}}}
  tx = elsa_jax.admm(optax.sgd(0.0), sparsity=0.75, interval=1, score_source="fixed",
                     fixed_score={"layers": {0: {"kernel": norms2}}})
  state = jax.jit(tx.init)(params)
  _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  z = elsa_jax.find_admm_state(state).z["layers"][0]["kernel"]
  score = np.abs(np.asarray(kernel)) * np.sqrt(np.asarray(norms2))
  keep = np.zeros(score.size, bool)
  keep[np.argsort(-score.ravel(), kind="stable")[:32]] = True
  np.testing.assert_array_equal(np.asarray(z).ravel() != 0, keep)
  final = elsa_jax.finalize(params, sparsity=0.75, score={"layers": {0: {"kernel": norms2}}})
  np.testing.assert_array_equal(np.asarray(final["layers"][0]["kernel"]).ravel() != 0, keep)
  with pytest.raises(ValueError, match="fixed_score"):
    elsa_jax.admm(optax.sgd(0.1), sparsity=0.5, score_source="fixed")
  with pytest.raises(ValueError, match="broadcast"):
    bad = elsa_jax.admm(optax.sgd(0.1), sparsity=0.5, interval=1, score_source="fixed",
                        fixed_score={"layers": {0: {"kernel": jnp.ones((3, 1))}}})
    bad.update(params, bad.init(params), params)


def test_activation_scores_follow_the_linear_inputs():
  graphdef, params = _tiny_llama(_fresh_seed())
  windows = np.random.default_rng().integers(0, 97, size=(4, 8)).astype(np.int32)
  stats = baselines.calibration_statistics(graphdef, params, windows, batch_size=2)
  scores = train.activation_scores(stats)
  model = llama.merge(graphdef, params)
  x = model.embed(jnp.asarray(windows))
  _, inputs = model.layers[0].with_linear_inputs(x, jnp.broadcast_to(jnp.arange(8), windows.shape))
  down_in = inputs["mlp_hidden"].reshape(-1, 64)
  np.testing.assert_allclose(scores["layers"][0]["mlp"]["down_proj"]["kernel"][:, 0],
                             jnp.sum(down_in * down_in, axis=0), rtol=1e-4)
  chex.assert_shape(scores["layers"][2]["self_attn"]["q_proj"]["kernel"], (32, 1))
