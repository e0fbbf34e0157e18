"""The JAX backend against lm-eval's own ``hf`` backend on tasks the test writes, a tiny LLaMA and SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from transformers import AutoTokenizer  # noqa: E402

from elsa_jax import harness  # noqa: E402  (registers "elsa_jax")
from elsa_jax.cli import jobs  # noqa: E402

TASKS = ["tiny_mc", "tiny_roll", "tiny_gen"]


def _evaluate(backend, model_dir, tasks_dir, tasks):
  """lm-eval on ``backend`` ("hf", "elsa_jax" or an LM) with 64-token windows, keeping every sample."""
  model_args = f"pretrained={model_dir},batch_size=4,max_length=64"
  if backend == "hf":
    model_args += ",dtype=float32"
  manager = harness.zero_shot.task_manager(tasks, str(tasks_dir))
  return lm_eval.simple_evaluate(model=backend, model_args=None if isinstance(backend, harness.ElsaLM) else model_args,
                                 tasks=tasks, task_manager=manager, device="cpu", bootstrap_iters=0, log_samples=True)


def _loglikelihoods(results, task):
  """Per sample, the log-likelihood of every request (choice, or whole text)."""
  return [[r[0] if isinstance(r[0], float) else r[0][0] for r in s["resps"]] for s in results["samples"][task]]


def _assert_items_agree(runs, model_dir):
  """Every choice's log-likelihood to 1e-4; every rolling text's to 1e-4 per token (float32 sums of
  ~100-token texts carry a few 1e-4 of rounding on a 30-layer model)."""
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  for task in ("tiny_mc", "tiny_roll"):
    got, want = _loglikelihoods(runs["elsa_jax"], task), _loglikelihoods(runs["hf"], task)
    assert len(got) == len(want) > 0
    if task == "tiny_roll":
      tokens = [len(tokenizer(s["doc"]["text"])["input_ids"]) for s in runs["hf"]["samples"][task]]
      np.testing.assert_array_less(np.abs(np.concatenate(got) - np.concatenate(want)), 1e-4 * np.array(tokens))
    else:
      np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-4, err_msg=task)


@pytest.fixture(scope="module")
def both(tiny_run, tmp_path_factory, lm_eval_tasks):
  _, model_dir, _, _ = tiny_run
  tasks_dir = lm_eval_tasks(tmp_path_factory.mktemp("tasks"), seed=int(np.random.default_rng().integers(1 << 30)))
  return {b: _evaluate(b, model_dir, tasks_dir, TASKS) for b in ("elsa_jax", "hf")}, model_dir


def test_registered_under_its_name():
  assert lm_eval.api.registry.get_model("elsa_jax") is harness.ElsaLM


def test_accuracies_and_perplexities_equal_the_hf_backend(both):
  runs, _ = both
  jax_res, hf_res = runs["elsa_jax"]["results"], runs["hf"]["results"]
  for metric in ("acc,none", "acc_norm,none"):
    assert jax_res["tiny_mc"][metric] == hf_res["tiny_mc"][metric]
  assert jax_res["tiny_gen"]["exact_match,none"] == hf_res["tiny_gen"]["exact_match,none"]
  for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
    np.testing.assert_allclose(jax_res["tiny_roll"][metric], hf_res["tiny_roll"][metric], rtol=1e-5)
  assert harness.task_scores(runs["elsa_jax"])["tiny_mc"]["acc,none"] == jax_res["tiny_mc"]["acc,none"]
  assert "tiny_mc" in harness.results_table(runs["elsa_jax"])


def test_per_item_loglikelihoods_agree_to_1e4(both):
  runs, model_dir = both
  _assert_items_agree(runs, model_dir)
  # The rolling texts span several 64-token windows, so the windows are what is being compared.
  texts = [s["doc"]["text"] for s in runs["hf"]["samples"]["tiny_roll"]]
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  assert max(len(tokenizer(t)["input_ids"]) for t in texts) > 64


def test_generate_until_equals_transformers_greedy_generate(both):
  runs, _ = both
  got = [s["resps"] for s in runs["elsa_jax"]["samples"]["tiny_gen"]]
  want = [s["resps"] for s in runs["hf"]["samples"]["tiny_gen"]]
  assert got == want and any(r[0][0] for r in got)


def test_smollm2_agrees_with_the_hf_backend_on_a_few_items(tmp_path, lm_eval_tasks):
  try:
    loaded = jobs.load_model("default")
  except (RuntimeError, OSError) as err:
    pytest.skip(f"the PyPI files of the default model are unavailable: {err}")
  model_dir = jobs.export(loaded, loaded.params, tmp_path / "smollm2")
  tasks_dir = lm_eval_tasks(tmp_path / "tasks", seed=int(np.random.default_rng().integers(1 << 30)), n_mc=3,
                          n_rolling=1)
  lm = harness.ElsaLM(model=loaded, batch_size=4, max_length=64)  # the GGUF's weights, in memory
  runs = {name: _evaluate(b, model_dir, tasks_dir, ["tiny_mc", "tiny_roll"])
          for name, b in (("elsa_jax", lm), ("hf", "hf"))}
  _assert_items_agree(runs, model_dir)
  assert runs["elsa_jax"]["results"]["tiny_mc"]["acc,none"] == runs["hf"]["results"]["tiny_mc"]["acc,none"]
