"""Batched, bucketed, sharded continuation scoring against a one-request-at-a-time computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from elsa_jax import models  # noqa: E402
from elsa_jax.harness import scoring  # noqa: E402
from elsa_jax.run import sharding as sharding_lib  # noqa: E402


@pytest.fixture(scope="module")
def model():
  config = models.llama.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
  return models.split(models.llama.Llama(config, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30)))))


_apply = jax.jit(models.llama.apply, static_argnums=0)


def _logits(graphdef, params, ids):
  """Logits of one sequence, run alone (right-padded to 64 tokens: one program for every length)."""
  padded = np.zeros((1, 64), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(_apply(graphdef, params, jnp.asarray(padded)))[0, :len(ids)]


def _reference(graphdef, params, context, continuation, max_length):
  whole = (context + continuation)[-(max_length + 1):]
  logp = np.asarray(jax.nn.log_softmax(_logits(graphdef, params, whole[:-1]), axis=-1))
  positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
  targets = whole[-len(continuation):]
  total = sum(logp[p, t] for p, t in zip(positions, targets))
  return total, all(int(np.argmax(logp[p])) == t for p, t in zip(positions, targets))


def _requests(rng, n, max_len=40):
  return [(rng.integers(0, 61, size=int(rng.integers(1, max_len))).tolist(),
           rng.integers(0, 61, size=int(rng.integers(1, 6))).tolist()) for _ in range(n)]


def test_batched_scores_equal_one_request_at_a_time_and_compile_once_per_bucket(model):
  graphdef, params = model
  rng = np.random.default_rng()
  requests = _requests(rng, 11) + [([5] * 50, [6, 7])]  # one longer than max_length: left-truncated
  # A request whose continuation is its own greedy argmax.
  ctx = rng.integers(0, 61, size=7).tolist()
  greedy = int(np.argmax(_logits(graphdef, params, ctx)[-1]))
  requests.append((ctx, [greedy]))
  scorer = scoring.Scorer(graphdef, params, mesh=None, batch_size=3, max_length=48)
  got = scorer.loglikelihoods(requests)
  for (context, continuation), (logp, is_greedy) in zip(requests, got):
    want_logp, want_greedy = _reference(graphdef, params, context, continuation, 48)
    np.testing.assert_allclose(logp, want_logp, atol=1e-5)
    assert is_greedy == want_greedy
  assert got[-1][1]
  lengths = {scoring.bucket(len(c) + len(k) - 1) if len(c) + len(k) <= 49 else scoring.bucket(48)
             for c, k in requests}
  assert scorer._score._cache_size() <= len(lengths) <= 3  # 16, 32, 64: a handful of programs


def test_model_input_and_batch_layout():
  whole, n = scoring.model_input([1, 2, 3, 4, 5], [6, 7], max_length=4)
  assert (whole, n) == ([3, 4, 5, 6, 7], 2)  # the last max_length + 1 tokens, as lm-eval's hf backend
  batch = scoring.make_batch([(whole, n)], batch_size=2, length=8)
  np.testing.assert_array_equal(batch.ids[0, :4], [3, 4, 5, 6])
  np.testing.assert_array_equal(batch.targets[0, :4], [4, 5, 6, 7])
  np.testing.assert_array_equal(batch.mask[0], [False, False, True, True, False, False, False, False])
  assert not batch.mask[1].any()
  with pytest.raises(ValueError, match="non-empty context"):
    scoring.model_input([], [1], max_length=4)
  with pytest.raises(ValueError, match="does not fit max_length"):
    scoring.model_input([1], [2] * 5, max_length=4)


def test_sharded_over_a_mesh_gives_the_same_scores(model):
  if jax.device_count() < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  graphdef, params = model
  requests = _requests(np.random.default_rng(), 9)
  one = scoring.Scorer(graphdef, params, mesh=None, batch_size=4, max_length=64).loglikelihoods(requests)
  mesh = sharding_lib.make_mesh(4, 2)
  sharded = scoring.Scorer(graphdef, params, mesh=mesh, batch_size=6, max_length=64)
  assert sharded.batch_size == 8  # rounded up to the data axis
  kernel = sharded.params["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert tuple(kernel.sharding.spec) == ("data", "model")
  got = sharded.loglikelihoods(requests)
  np.testing.assert_allclose([g[0] for g in got], [o[0] for o in one], atol=1e-5)
  assert [g[1] for g in got] == [o[1] for o in one]
