"""Fixtures shared by the test modules: a tiny random LLaMA on disk with a tokenizer and text."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from flax import nnx

from elsa_jax.models import llama

_WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this be "
    "river city king music war film team school north house water light year people world time life"
).split()


def pytest_configure(config):
  config.addinivalue_line("markers", "faults: fault injection on the tiny model (kills, damage, full disk); "
                                     "about two to three minutes")


def _write_text(path: pathlib.Path, n_docs: int, seed: int) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n_docs):
    words = rng.choice(_WORDS, size=int(rng.integers(60, 120)))
    lines.append(json.dumps({"text": " ".join(words).capitalize() + "."}))
  path.write_text("\n".join(lines) + "\n")
  return path


def _tiny_tokenizer(corpus: pathlib.Path):
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  calib = _write_text(root / "calib.jsonl", 60, seed=1)
  evalt = _write_text(root / "eval.jsonl", 12, seed=2)
  tokenizer = _tiny_tokenizer(calib)
  config = llama.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
  )
  model = llama.Llama(config, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
  model_dir = root / "model"
  llama.save_pretrained(model, config, model_dir)
  tokenizer.save_pretrained(model_dir)
  return root, model_dir, calib, evalt



def exported_tensors(out):
  from safetensors.numpy import load_file

  files = sorted((out / "model").glob("*.safetensors"))
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
  return tensors




@pytest.fixture
def exported():
  """``exported(run_dir) -> {name: array}``: the tensors of a run's exported model."""
  return exported_tensors


# ----------------------------------------------------------------------------
# lm-eval tasks written by the tests: multiple choice, rolling log-likelihood, generation
# ----------------------------------------------------------------------------

_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
{body}"""
_TASK_BODIES = {
    "multiple_choice": ('doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "loglikelihood_rolling": ('doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                              "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
    "generate_until": ('doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n'
                       '  until: ["."]\n  max_gen_toks: 10\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n'),
}


def write_tasks(folder: pathlib.Path, seed: int, *, n_mc: int = 12, n_rolling: int = 4, n_gen: int = 4
                ) -> pathlib.Path:
  """Writes three lm-eval tasks (YAML + JSONL) into ``folder``: ``tiny_mc`` (3 choices of 1-3 words),
  ``tiny_roll`` (texts of 20-90 words) and ``tiny_gen`` (greedy, until "."); returns ``folder``."""
  rng = np.random.default_rng(seed)
  words = lambda n: " ".join(rng.choice(_WORDS, size=n))
  docs = {
      ("tiny_mc", "multiple_choice"): [
          {"question": words(8), "choices": [words(int(rng.integers(1, 4))) for _ in range(3)],
           "label": int(rng.integers(3))} for _ in range(n_mc)],
      ("tiny_roll", "loglikelihood_rolling"): [{"text": words(int(rng.integers(20, 90)))} for _ in range(n_rolling)],
      ("tiny_gen", "generate_until"): [{"question": words(6), "answer": "the"} for _ in range(n_gen)],
  }
  folder.mkdir(parents=True, exist_ok=True)
  for (name, output_type), records in docs.items():
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / f"{name}.yaml").write_text(_TASK_YAML.format(name=name, data=data, output_type=output_type,
                                                           body=_TASK_BODIES[output_type]))
  return folder


@pytest.fixture(scope="session")
def lm_eval_tasks():
  """``lm_eval_tasks(folder, seed, ...) -> folder``: writes the tiny lm-eval tasks (:func:`write_tasks`)."""
  return write_tasks
