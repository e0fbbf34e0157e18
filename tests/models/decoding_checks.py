"""Checks of KV-cache decoding shared by the model tests: the cache against the full forward, greedy
decoding against transformers' generate."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
import torch

from elsa_jax.models import generate


def assert_cache_gives_the_full_forward(graphdef, params, prompts: Sequence[list[int]],
                                        full_logits: Callable[[list[int]], np.ndarray], *, width: int, length: int,
                                        rng: np.random.Generator, atol: float) -> None:
  """Left-padded ``prompts`` (to ``width``) through the cache, then one more token each: the logits of
  both calls equal ``full_logits`` of the prompt and that token, row by row."""
  decode_graphdef, cache = generate.decoding_model(graphdef, params, batch=len(prompts), length=length)
  ids, positions = generate.left_padded(prompts, width)
  logits, cache = generate.cached_forward(decode_graphdef, params, cache, jnp.asarray(ids), jnp.asarray(positions))
  nxt = rng.integers(3, 97, size=(len(prompts), 1)).astype(np.int32)
  lengths = np.array([len(p) for p in prompts], np.int32)
  step, _ = generate.cached_forward(decode_graphdef, params, cache, jnp.asarray(nxt), jnp.asarray(lengths[:, None]))
  for row, prompt in enumerate(prompts):
    full = full_logits(prompt + nxt[row].tolist())
    np.testing.assert_allclose(np.asarray(logits[row, width - len(prompt):]), full[:-1], atol=atol)
    np.testing.assert_allclose(np.asarray(step[row, 0]), full[-1], atol=atol)


def assert_greedy_is_transformers_greedy(hf, graphdef, params, prompts: Sequence[list[int]], *, max_new_tokens: int,
                                         eos_id: int | None = None, batch_size: int = 4) -> None:
  """``generate.greedy`` gives, prompt by prompt, the tokens of the HF model's greedy ``generate``."""
  got = generate.greedy(graphdef, params, prompts, max_new_tokens=max_new_tokens,
                        eos_ids=set() if eos_id is None else {eos_id}, batch_size=batch_size)
  for prompt, tokens in zip(prompts, got):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                        **({} if eos_id is not None else {"eos_token_id": None}))
    assert tokens == ref[0, len(prompt):].tolist(), prompt
