"""Compact sparse HF directories: a pruned LLaMA saved compact, read back bit-exact, densified for transformers."""

from __future__ import annotations

import ast
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from elsa_jax import models
from elsa_jax.models import llama
from elsa_jax.models import safetensors_dir as sd
from elsa_jax.models import sparse_format as sf
from elsa_jax.oneshot.magnitude import magnitude_prune_tree

PRUNINGS = {"70%": dict(sparsity=0.7), "2:4": dict(n_m=(2, 4))}


def _pruned_llama(pruning: str):
  config = llama.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  rng = np.random.default_rng()
  graphdef, params = models.split(llama.Llama(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
  params = jax.tree_util.tree_map_with_path(  # non-trivial norm weights, so that every tensor matters
      lambda path, p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), p.dtype) if p.ndim == 1 else p, params)
  pruned = magnitude_prune_tree(params, prunable=llama.ARCHITECTURE.prunable, **PRUNINGS[pruning])
  return graphdef, pruned, config


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(load_file(f))
  return out


def _nbytes(directory: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


@pytest.mark.parametrize("pruning", sorted(PRUNINGS))
def test_compact_reads_back_bit_exact_and_densifies_for_transformers(tmp_path, pruning):
  graphdef, params, config = _pruned_llama(pruning)
  models.save_pretrained((graphdef, params), config, tmp_path / "dense")
  models.save_pretrained((graphdef, params), config, tmp_path / "compact", sparse_format="bitmask")
  layout = json.loads((tmp_path / "compact" / "config.json").read_text())[sd.LAYOUT_KEY]
  assert layout["format"] == "bitmask" and layout["version"] == sd.LAYOUT_VERSION
  dense = _tensors(tmp_path / "dense")
  matrices = {n for n in dense if n.startswith("model.layers.") and n.endswith("proj.weight")}
  assert set(layout["tensors"]) == matrices  # the pruned matrices; embeddings and norms stay dense
  want_format = "nm" if pruning == "2:4" else "bitmask"
  assert {e["format"] for e in layout["tensors"].values()} == {want_format}
  stored = _tensors(tmp_path / "compact")
  compact_bytes = sum(a.nbytes for n, a in stored.items() if n.rpartition(".")[0] in matrices)
  # fp32: 70% in 1/8 + 0.3 * 4 bytes an entry, 2:4 in 3/8 bits + 2 bytes a group of 4 (not 1/8 + 2 a pair)
  ratio = {"70%": (1 / 8 + 0.3 * 4) / 4, "2:4": (3 / 8 + 2 * 4) / 16}[pruning]
  assert compact_bytes <= 1.01 * ratio * sum(dense[n].nbytes for n in matrices)
  assert _nbytes(tmp_path / "compact") < _nbytes(tmp_path / "dense")

  loaded, loaded_config = models.from_pretrained(tmp_path / "compact")
  assert loaded_config == config
  chex.assert_trees_all_equal(jax.tree.map(_bits, models.split(loaded)[1]), jax.tree.map(_bits, params))

  (tmp_path / "compact" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
  models.densify_directory(tmp_path / "compact", tmp_path / "densified")
  assert (tmp_path / "densified" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
  assert json.loads((tmp_path / "densified" / "config.json").read_text()) == \
      json.loads((tmp_path / "dense" / "config.json").read_text())
  densified = _tensors(tmp_path / "densified")
  assert set(densified) == set(dense)
  for name in dense:
    chex.assert_trees_all_equal(_bits(densified[name]), _bits(dense[name]))
  ids = torch.from_numpy(np.random.default_rng().integers(0, 97, size=(2, 20)))
  with torch.no_grad():
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "dense").eval()(ids).logits.numpy()
    got = LlamaForCausalLM.from_pretrained(tmp_path / "densified").eval()(ids).logits.numpy()
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dtype_is_kept_and_shards_hold_whole_tensors(tmp_path, dtype):
  graphdef, params, config = _pruned_llama("70%")
  models.save_pretrained((graphdef, params), config, tmp_path / "c", sparse_format="bitmask", dtype=dtype,
                         max_shard_size="20KB")
  index = json.loads((tmp_path / "c" / sd.INDEX_FILE).read_text())["weight_map"]
  assert len(set(index.values())) > 1
  stored = _tensors(tmp_path / "c")
  assert set(index) == set(stored)
  for name, entry in json.loads((tmp_path / "c" / "config.json").read_text())[sd.LAYOUT_KEY]["tensors"].items():
    assert entry["dtype"] == dtype and stored[f"{name}.values"].dtype == np.dtype(getattr(ml_dtypes, dtype, dtype))
    assert index[f"{name}.values"] == index[f"{name}.bitmask"]
    assert int(sf.row_counts(stored[f"{name}.bitmask"], entry["shape"][1]).sum()) == entry["nnz"]
  loaded, _ = models.from_pretrained(tmp_path / "c", param_dtype=jnp.dtype(dtype))
  want = jax.tree.map(lambda p: _bits(p.astype(dtype)), params)
  chex.assert_trees_all_equal(jax.tree.map(_bits, models.split(loaded)[1]), want)


def test_slices_decode_only_their_rows(tmp_path):
  rng = np.random.default_rng()
  x = rng.normal(size=(37, 24)).astype(np.float32)
  x[rng.random(x.shape) < 0.7] = 0
  x[-3:] = 0  # the last values end before the last rows
  y = np.where(np.arange(32) % 4 < 2, rng.normal(size=(16, 32)), 0).astype(ml_dtypes.bfloat16)  # 2:4
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "config.json").write_text("{}")
  save_file({"x": x, "y": y}, str(tmp_path / "d" / "model.safetensors"))
  sd.compact_directory(tmp_path / "d", tmp_path / "c")
  checkpoint = sd.open_checkpoint(tmp_path / "c")
  assert {n: e["format"] for n, e in checkpoint.layout.items()} == {"x": "bitmask", "y": "nm"}
  with checkpoint.open(checkpoint.files["x"]) as fh:
    assert sorted(fh.keys()) == ["x", "y"]
    for name, want in (("x", x), ("y", y)):
      sl = fh.get_slice(name)
      assert sl.get_shape() == list(want.shape)
      for index in [(slice(3, 17), slice(None)), (slice(0, 5), slice(8, 16)), (slice(30, None),), (slice(34, None),),
                    (slice(None, None, 3), slice(1, 7)), 4, (slice(9, 2),)]:
        got = sl[index]
        chex.assert_trees_all_equal(_bits(got), _bits(want[index]))


def test_sharded_loading_reads_each_devices_rows_of_the_values(tmp_path, monkeypatch):
  import safetensors

  from elsa_jax.run import sharding as sharding_lib

  if jax.device_count() < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  graphdef, params, config = _pruned_llama("70%")
  models.save_pretrained((graphdef, params), config, tmp_path / "c", sparse_format="bitmask", max_shard_size="40KB")
  reads = []  # (part, entries) of every slice of a compact tensor's values
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
        get_shape, get_dtype = sl.get_shape, sl.get_dtype

        def __getitem__(self, index):
          out = sl[index]
          reads.append((name, out.size))
          return out

      return Slice()

    def __getattr__(self, attr):
      return getattr(self._fh, attr)

  monkeypatch.setattr(safetensors, "safe_open", Spy)
  mesh = sharding_lib.make_mesh(4, 2)
  rules = dict(sharding_lib.DEFAULT_RULES)
  model, _ = models.from_pretrained(
      tmp_path / "c", shardings=lambda p, axes: sharding_lib.param_shardings(axes, p, mesh, rules))
  sharded = models.split(model)[1]
  want = sharding_lib.param_shardings(llama.logical_axes(model), sharded, mesh, rules)
  chex.assert_trees_all_equal(jax.tree.map(_bits, sharded), jax.tree.map(_bits, params))
  for leaf, target in zip(jax.tree.leaves(sharded), jax.tree.leaves(want)):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
  name = "model.layers.0.self_attn.q_proj.weight.values"
  nnz = json.loads((tmp_path / "c" / "config.json").read_text())[sd.LAYOUT_KEY]["tensors"][name[:-7]]["nnz"]
  q = [size for part, size in reads if part == name and size]
  assert q and max(q) < nnz, (q, nnz)  # each shard reads its own rows' values, never all of them


def _damage(directory: pathlib.Path, change) -> None:
  file = directory / "model.safetensors"
  tensors = load_file(file)
  change(tensors)
  save_file(tensors, str(file))


def test_damaged_compact_files_are_named(tmp_path):
  graphdef, params, config = _pruned_llama("70%")
  models.save_pretrained((graphdef, params), config, tmp_path / "c", sparse_format="bitmask")
  name = "model.layers.1.mlp.up_proj.weight"
  for case, change, match in [
      ("short", lambda t: t.update({f"{name}.values": t[f"{name}.values"][:-1]}), "set bits but there are"),
      ("mask", lambda t: t.update({f"{name}.bitmask": t[f"{name}.bitmask"][:, :-1]}), "not uint8"),
      ("dtype", lambda t: t.update({f"{name}.values": t[f"{name}.values"].astype(np.float16)}), "float16"),
      ("lost", lambda t: t.pop(f"{name}.bitmask"), "lacks"),
  ]:
    broken = tmp_path / case
    models.save_pretrained((graphdef, params), config, broken, sparse_format="bitmask")
    _damage(broken, change)
    for read in (models.from_pretrained, lambda d: sd.densify_directory(d, tmp_path / f"{case}-dense")):
      with pytest.raises(sf.SparseFormatError, match=match) as err:
        read(broken)
      assert name in str(err.value) and str(broken) in str(err.value)
    assert not (tmp_path / f"{case}-dense").exists()  # no half-written output


def test_bad_requests_are_refused_before_any_work(tmp_path):
  graphdef, params, config = _pruned_llama("70%")
  with pytest.raises(ValueError, match="'csr' is not one of dense, bitmask"):
    models.save_pretrained((graphdef, params), config, tmp_path / "x", sparse_format="csr")
  assert not (tmp_path / "x").exists()
  models.save_pretrained((graphdef, params), config, tmp_path / "dense")
  with pytest.raises(ValueError, match="already dense"):
    sd.densify_directory(tmp_path / "dense", tmp_path / "y")
  models.save_pretrained((graphdef, params), config, tmp_path / "c", sparse_format="bitmask")
  with pytest.raises(FileExistsError, match="not empty"):
    models.save_pretrained((graphdef, params), config, tmp_path / "c", sparse_format="bitmask")
  with pytest.raises(FileExistsError, match="not empty"):
    sd.densify_directory(tmp_path / "c", tmp_path / "dense")
  with pytest.raises(ValueError, match="already a compact"):
    sd.compact_directory(tmp_path / "c", tmp_path / "z")
  config_file = tmp_path / "c" / "config.json"
  newer = json.loads(config_file.read_text())
  newer[sd.LAYOUT_KEY]["version"] = sd.LAYOUT_VERSION + 1
  config_file.write_text(json.dumps(newer))
  with pytest.raises(ValueError, match="Upgrade elsa_jax"):
    models.from_pretrained(tmp_path / "c")
  assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.mark.parametrize("module", [sd, sf])
def test_codecs_and_densify_import_no_jax(module):
  """``elsa-jax densify``'s code reads numpy and safetensors only."""
  imported = set()
  for node in ast.walk(ast.parse(pathlib.Path(module.__file__).read_text())):
    if isinstance(node, ast.Import):
      imported |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module == "elsa_jax.models":
      imported |= {f"elsa_jax.models.{a.name}" for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module if node.module.startswith("elsa_jax") else node.module.split(".")[0])
  allowed = {"__future__", "contextlib", "functools", "json", "math", "os", "pathlib", "re", "shutil",
             "collections", "typing", "numpy", "safetensors", "elsa_jax.errors", "elsa_jax.files", "elsa_jax.models.hf",
             "elsa_jax.models.sparse_format"}
  assert imported <= allowed, imported - allowed
