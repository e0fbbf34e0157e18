"""Greedy decoding with the KV cache against transformers' generate, and the cache against the full forward."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from elsa_jax import models
from elsa_jax.models import generate, registry

import decoding_checks  # tests/models/decoding_checks.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random HF LLaMA (GQA, random norms) and the same model loaded in JAX."""
  seed = int(np.random.default_rng().integers(1 << 30))
  torch.manual_seed(seed)
  hf = LlamaForCausalLM(HFLlamaConfig(
      vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=2)).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("gen") / "hf"
  hf.save_pretrained(path)
  model, _ = models.from_pretrained(path)
  graphdef, params = models.split(model)
  return hf, graphdef, params, np.random.default_rng(seed)


def _prompts(rng, n=3):
  return [rng.integers(3, 97, size=int(rng.integers(1, 20))).tolist() for _ in range(n)]


def test_greedy_equals_transformers_greedy_generate(tiny):
  hf, graphdef, params, rng = tiny
  decoding_checks.assert_greedy_is_transformers_greedy(hf, graphdef, params, _prompts(rng), max_new_tokens=12,
                                                       eos_id=2)


def test_cache_gives_the_full_forward_logits(tiny):
  _, graphdef, params, rng = tiny
  decoding_checks.assert_cache_gives_the_full_forward(
      graphdef, params, _prompts(rng),
      lambda ids: np.asarray(models.llama.apply(graphdef, params, jnp.asarray([ids])))[0],
      width=32, length=48, rng=rng, atol=1e-5)


def test_without_a_cache_the_same_tokens_are_recomputed(tiny, monkeypatch):
  _, graphdef, params, rng = tiny
  prompts = _prompts(rng)
  cached = generate.greedy(graphdef, params, prompts, max_new_tokens=6)
  arch = registry.ARCHITECTURES["llama"]
  monkeypatch.setitem(registry.ARCHITECTURES, "llama", dataclasses.replace(arch, init_cache=None))
  assert generate.greedy(graphdef, params, prompts, max_new_tokens=6) == cached
  with pytest.raises(ValueError, match="no init_cache"):
    generate.decoding_model(graphdef, params, batch=1, length=8)


def test_rows_stop_at_eos_or_their_stop_rule_and_compile_once_per_bucket(tiny):
  _, graphdef, params, rng = tiny
  prompts = [rng.integers(3, 97, size=n).tolist() for n in (5, 11)]  # one length bucket (16)
  free = generate.greedy(graphdef, params, prompts, max_new_tokens=8, batch_size=2)
  eos = free[0][2]
  got = generate.greedy(graphdef, params, prompts, max_new_tokens=8, batch_size=2, eos_ids={eos},
                        stop=lambda row, toks: row == 1 and len(toks) == 3)
  first_eos = free[0].index(eos)
  assert got[0] == free[0][:first_eos + 1]
  assert got[1] == free[1][:min(3, free[1].index(eos) + 1 if eos in free[1] else 3)]
  compiled = generate.greedy_step._cache_size()
  generate.greedy(graphdef, params, [p[:1] for p in prompts], max_new_tokens=8, batch_size=2)  # same buckets
  assert generate.greedy_step._cache_size() == compiled
  with pytest.raises(ValueError, match="at least one token"):
    generate.greedy(graphdef, params, [[]], max_new_tokens=2)
