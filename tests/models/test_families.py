"""One battery for every architecture beside LLaMA (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text), against
transformers' PyTorch models on tiny random configs: logits, the HF round trip, export, GGUF, the layer walk,
scan, the memory predictor, and prune -> export -> reload from the command line with ELSA and SparseGPT."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from elsa_jax import cli
from elsa_jax import models
from elsa_jax import oneshot
from elsa_jax.run import memory
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import train

import decoding_checks  # tests/models/decoding_checks.py

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15)

#: HF config of each family: every feature it has switched on and made to matter at this size (windows
#: shorter than the 40-token inputs, small soft-caps, RoPE bases of their own, head_dim != hidden / heads).
FAMILIES = {
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(head_dim=24, attention_bias=True, tie_word_embeddings=False),
    "mistral": dict(sliding_window=8, head_dim=24, tie_word_embeddings=False),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=4.0,
                   attn_logit_softcapping=2.0),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=20, sliding_window=8, sliding_window_pattern=2,
                        rope_theta=5e4, rope_local_base_freq=100.0,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False),
}

#: Per family, config changes that must change the logits by far more than the 1e-4 bound (so the
#: logits test sees each feature).
ABLATIONS = {
    "qwen2": [dict(use_sliding_window=False, layer_types=None)],
    "mistral": [dict(sliding_window=None)],
    "gemma2": [dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
               dict(query_pre_attn_scalar=16), dict(sliding_window=64)],
    "gemma3_text": [dict(rope_local_base_freq=5e4), dict(rope_scaling=None), dict(sliding_window=64)],
}

CLASSES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma2": "Gemma2", "gemma3_text": "Gemma3Text"}


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 30))


def _hf_config(family: str, vocab_size: int = 97, **overrides):
  return transformers.AutoConfig.for_model(family, vocab_size=vocab_size, **{**_SHAPE, **FAMILIES[family],
                                                                              **overrides})


def _hf_model(family: str, seed: int, vocab_size: int = 97, **overrides):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(family, vocab_size, **overrides),
                                                        attn_implementation="eager").eval()
  offset = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + w
  with torch.no_grad():  # random norms and biases too, so that every tensor matters
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(offset + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  return model


def _hf_logits(hf, ids) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.from_numpy(np.asarray(ids))).logits.float().numpy()


def _logits(model, ids) -> np.ndarray:
  return np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """``family -> (hf model, its saved directory)``, built once per module."""
  root = tmp_path_factory.mktemp("families")
  out = {}
  for family in FAMILIES:
    hf = _hf_model(family, _seed())
    hf.save_pretrained(root / family)
    out[family] = (hf, root / family)
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_round_trip_and_export_match_transformers(family, hf_dirs, tmp_path):
  hf, directory = hf_dirs[family]
  model, config = models.from_pretrained(directory)
  assert type(model).__name__ == CLASSES[family] and models.architecture_of(model).model_type == family
  assert models.config_from_pretrained(directory) == config
  ids = np.random.default_rng().integers(0, 97, size=(2, 40))
  ref = _hf_logits(hf, ids)
  assert np.abs(_logits(model, ids) - ref).max() < 1e-4
  # Back to HF: the same tensors, bit for bit, and nothing missing or unexpected.
  out = models.save_pretrained(model, config, tmp_path / "out")
  assert json.loads((out / "config.json").read_text())["model_type"] == family
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  want, got = hf.state_dict(), reloaded.state_dict()
  assert want.keys() == got.keys()
  for k in want:
    assert torch.equal(want[k], got[k]), k
  reloaded.set_attn_implementation("eager")
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), ids), ref)
  assert models.config_from_pretrained(out) == config


@pytest.mark.parametrize("family", sorted(ABLATIONS))
def test_each_feature_changes_the_logits(family, hf_dirs):
  hf, directory = hf_dirs[family]
  model, config = models.from_pretrained(directory)
  _, params = models.split(model)
  ids = np.random.default_rng().integers(0, 97, size=(2, 40))
  ref = _hf_logits(hf, ids)
  arch = models.architecture_of(config)
  for change in ABLATIONS[family]:
    other = dataclasses.replace(config, **change)
    graphdef, _ = models.split(arch.build(other, rngs=nnx.Rngs(0)))
    assert np.abs(_logits(models.merge(graphdef, params), ids) - ref).max() > 1e-3, change


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_round_trip_is_bit_exact_and_sharded_loading_places_every_weight(family, tmp_path):
  hf = _hf_model(family, _seed()).to(torch.bfloat16)
  hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  model, config = models.from_pretrained(tmp_path / "hf", param_dtype=jnp.bfloat16)
  models.save_pretrained(model, config, tmp_path / "back", max_shard_size="60KB")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.bfloat16)
  want, got = hf.state_dict(), reloaded.state_dict()
  assert want.keys() == got.keys()
  for k in want:
    assert torch.equal(want[k], got[k]), k
  mesh = sharding_lib.make_mesh(4, 2)
  sharded_model, _ = models.from_pretrained(
      tmp_path / "hf", param_dtype=jnp.bfloat16,
      shardings=lambda p, axes: sharding_lib.param_shardings(axes, p, mesh))
  graphdef, sharded = models.split(sharded_model)
  want_shardings = sharding_lib.param_shardings(models.logical_axes_of(graphdef, sharded), sharded, mesh)
  jax.tree.map(lambda leaf, s: chex.assert_equal(leaf.sharding.is_equivalent_to(s, leaf.ndim), True),
               sharded, want_shardings)
  chex.assert_trees_all_equal(sharded, models.split(model)[1])
  q = sharded["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("data", "model")


def _write_gguf(hf, family: str, path) -> None:
  """``hf``'s tensors as llama.cpp writes a ``qwen2`` / ``qwen3`` GGUF (Q/K unpermuted, HF [out, in])."""
  import gguf

  c = hf.config
  w = gguf.GGUFWriter(str(path), family)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_vocab_size(c.vocab_size)
  if family == "qwen3":
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  for name, tensor in hf.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    gguf_name = top.get(name)
    if gguf_name is None:  # model.layers.N.<module>.<weight|bias>
      _, _, layer, module = name.split(".", 3)
      module, leaf = module.rsplit(".", 1)
      gguf_name = f"blk.{layer}.{names[module]}.{leaf}"
    w.add_tensor(gguf_name, tensor.numpy())
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("family,overrides", [("qwen2", dict(use_sliding_window=False)),
                                              ("qwen2", dict(use_sliding_window=False, tie_word_embeddings=False)),
                                              ("qwen3", dict(attention_bias=False))])
def test_gguf_files_load_as_their_hf_checkpoint(family, overrides, tmp_path):
  hf = _hf_model(family, _seed(), **overrides)
  hf.save_pretrained(tmp_path / "hf")
  _write_gguf(hf, family, tmp_path / "m.gguf")
  from_hf, hf_config = models.from_pretrained(tmp_path / "hf")
  model, config = models.from_gguf(tmp_path / "m.gguf")
  assert type(model) is type(from_hf) and models.config_from_gguf_file(tmp_path / "m.gguf") == config
  for field in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "rope_theta", "qkv_bias", "o_bias"):
    assert getattr(config, field) == getattr(hf_config, field), field
  chex.assert_trees_all_equal(models.split(model)[1], models.split(from_hf)[1])
  ids = np.random.default_rng().integers(0, 97, size=(1, 24))
  assert np.abs(_logits(model, ids) - _hf_logits(hf, ids)).max() < 1e-4


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])  # scaled embeddings; two layer types in both
def test_the_layer_walk_feeds_each_layer_what_the_model_does(family, hf_dirs):
  model, _ = models.from_pretrained(hf_dirs[family][1])
  graphdef, params = models.split(model)
  first, second = models.architecture_of(graphdef).layer_graphdefs(graphdef, params)
  assert first != second  # a local and a global layer: the walk compiles each kind
  windows = np.random.default_rng().integers(0, 97, size=(4, 16)).astype(np.int32)
  stats = oneshot.calibration_statistics(graphdef, params, windows, batch_size=2)
  x = model.embed(jnp.asarray(windows))
  positions = jnp.broadcast_to(jnp.arange(16), windows.shape)
  for i, layer in enumerate(model.layers):
    _, inputs = layer.with_linear_inputs(x, positions)
    for key, value in inputs.items():
      flat = value.reshape(-1, value.shape[-1])
      np.testing.assert_allclose(stats[i][key], flat.T @ flat, rtol=2e-4, atol=2e-4, err_msg=f"layer {i} {key}")
    x = layer(x, positions)


def test_layer_period_is_the_smallest_repeat_of_the_layer_kinds():
  from elsa_jax.models.llama.model import layer_period

  kinds = ([0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 1, 0], [0, 1, 1])
  assert [layer_period(k) for k in kinds] == [1, 2, 3, 3]


def test_scan_over_alternating_layers_matches_the_unrolled_model():
  config = models.architecture("gemma3_text").config_from_hf(_hf_config("gemma3_text", num_hidden_layers=5).to_dict())
  assert config.layer_types == ("sliding_attention", "full_attention") * 2 + ("sliding_attention",)
  arch = models.architecture_of(config)
  seed = _seed()
  graphdef, params = models.split(arch.build(config, rngs=nnx.Rngs(seed)))
  scan_def, _ = models.split(arch.build(config, scan_layers=True, rngs=nnx.Rngs(seed)))
  ids = jnp.asarray(np.random.default_rng().integers(0, 97, size=(2, 20)), jnp.int32)

  def loss(gd):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(arch.apply(gd, p, ids) ** 2)))

  (l_ref, g_ref), (l_scan, g_scan) = loss(graphdef)(params), loss(scan_def)(params)
  np.testing.assert_allclose(l_scan, l_ref, rtol=1e-5)
  chex.assert_trees_all_close(g_scan, g_ref, rtol=1e-4, atol=1e-6)
  hlo = jax.jit(lambda p: arch.apply(scan_def, p, ids)).lower(params).as_text()
  assert "while" in hlo  # two (local, global) pairs scanned, the fifth layer after them


def test_memory_predictor_builds_every_family_and_compiles_gemmas_step(hf_dirs):
  for family, (_, directory) in hf_dirs.items():  # the predictor's model is the architecture's, shape for shape
    config = models.config_from_pretrained(directory)
    graphdef, abstract = models.abstract_model(config)
    assert type(models.merge(graphdef, abstract)).__name__ == CLASSES[family]
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, models.split(models.from_pretrained(directory)[0])[1])
  config = models.config_from_pretrained(hf_dirs["gemma3_text"][1])
  _, abstract = models.abstract_model(config)
  prediction = memory.predict_memory(config, train.ElsaConfig(batch_size=2, seqlen=16), sharding_lib.make_mesh(1, 1),
                                     z_update=False)
  assert prediction.n_params == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract))
  assert prediction.argument_bytes >= 12 * prediction.n_params  # fp32 params + Adam m, v


def test_unknown_and_multimodal_model_types_are_refused_clearly(tmp_path):
  with pytest.raises(ValueError, match="supports: gemma2, gemma3_text, llama, mistral, qwen2, qwen3"):
    models.architecture("phi3")
  directory = tmp_path / "gemma3"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
  with pytest.raises(ValueError, match=r"image-text checkpoint.*gemma3_text"):
    models.from_pretrained(directory)
  with pytest.raises(ValueError, match="not a Qwen3 architecture"):
    models.qwen3.Qwen3Config.from_hf({"model_type": "qwen2"})
  with pytest.raises(ValueError, match="encoder"):
    models.gemma.Gemma3TextConfig.from_hf({"model_type": "gemma3_text", "use_bidirectional_attention": True})


@pytest.fixture(scope="module")
def tiny_text(tiny_run):
  """The tiny tokenizer and text of conftest's ``tiny_run``."""
  root, model_dir, calib, evalt = tiny_run
  return transformers.AutoTokenizer.from_pretrained(model_dir), calib, evalt, root


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["elsa", "sparsegpt"])
def test_prune_export_reload_from_the_command_line(family, method, tiny_text):
  tokenizer, calib, evalt, root = tiny_text
  source = root / f"{family}-{method}-source"
  hf = _hf_model(family, _seed(), vocab_size=len(tokenizer))
  hf.save_pretrained(source)
  tokenizer.save_pretrained(source)
  out = root / f"{family}-{method}-run"
  args = ["prune", "--model", str(source), "--calib", str(calib), "--eval-text", str(evalt),
          "--output", str(out), "--method", method, "--seqlen", "32", "--eval-seqlen", "32",
          "--eval-windows", "2", "--no-compare-magnitude", "--no-dense-eval"]
  if method == "elsa":  # on a 2 x 2 mesh: data parallel and the heads, MLP and vocabulary split in two
    args += ["--sparsity", "0.5", "--steps", "4", "--batch-size", "2", "--interval", "2", "--mesh", "2x2",
             "--allocation", "uniform"]  # every matrix at 50% (the default, OWL, moves it per layer)
  else:
    args += ["--pattern", "2:4", "--calib-windows", "8", "--mesh", "1x1"]
  assert cli.main(args) == 0
  pruned, info = transformers.AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  kernels = {k: v.numpy() for k, v in pruned.state_dict().items()
             if k.startswith("model.layers.") and k.endswith("proj.weight")}
  assert len(kernels) == 14
  for name, w in kernels.items():  # HF [out, in]
    if method == "elsa":
      assert np.count_nonzero(w == 0) == w.size // 2, name
    else:
      np.testing.assert_array_equal((w.reshape(w.shape[0], -1, 4) == 0).sum(-1), 2, err_msg=name)
  model, _ = models.from_pretrained(out / "model")
  ids = np.random.default_rng().integers(0, len(tokenizer), size=(2, 24))
  pruned.set_attn_implementation("eager")
  assert np.abs(_logits(model, ids) - _hf_logits(pruned.eval(), ids)).max() < 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "mistral"])  # soft-caps, windows, q/k norms
def test_kv_cache_decoding_matches_the_full_forward_and_transformers(family, hf_dirs):
  """Prompts longer than the sliding window (8): the cached logits equal the full forward's, and
  greedy decoding equals transformers' greedy generate."""
  hf, directory = hf_dirs[family]
  model, _ = models.from_pretrained(directory)
  graphdef, params = models.split(model)
  rng = np.random.default_rng(_seed())
  prompts = [rng.integers(3, 97, size=n).tolist() for n in (5, 13, 19)]
  decoding_checks.assert_cache_gives_the_full_forward(graphdef, params, prompts, lambda ids: _logits(model, [ids])[0],
                                                      width=24, length=40, rng=rng, atol=2e-5)
  decoding_checks.assert_greedy_is_transformers_greedy(hf, graphdef, params, prompts, max_new_tokens=8, batch_size=3)
