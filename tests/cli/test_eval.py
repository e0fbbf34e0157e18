"""``elsa-jax eval --tasks`` and ``elsa-jax prune --eval-tasks`` (lm-eval), and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import elsa_jax
from elsa_jax.cli import commands
from elsa_jax.cli import jobs as pipeline


def test_without_lm_eval_the_package_imports_and_tasks_say_what_to_install(monkeypatch, capsys):
  code = ("import sys; sys.modules['lm_eval'] = None\n"
          "import elsa_jax, elsa_jax.cli.commands, elsa_jax.cli.jobs, elsa_jax.models.generate\n"
          "from elsa_jax.data import perplexity_sets\n"
          "try:\n  import elsa_jax.harness\nexcept ImportError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert "pip install 'elsa_jax[eval]'" in out
  monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval "not installed" in this process too
  for name in [m for m in sys.modules if m.startswith("elsa_jax.harness")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.delattr(elsa_jax, "harness", raising=False)
  monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  assert commands.main(["eval", "--tasks", "boolq,rte"]) == 2
  assert "pip install 'elsa_jax[eval]'" in capsys.readouterr().err
  assert commands.main(["eval", "--num-fewshot", "1"]) == 2  # a task flag without tasks
  assert "only applies with --tasks" in capsys.readouterr().err


@pytest.fixture
def tasks_dir(tmp_path, lm_eval_tasks):
  pytest.importorskip("lm_eval")
  return lm_eval_tasks(tmp_path / "tasks", seed=int(np.random.default_rng().integers(1 << 30)))


def test_eval_prints_the_table_and_perplexity_and_writes_json(tiny_run, tasks_dir, tmp_path, capsys, monkeypatch):
  _, model_dir, _, evalt = tiny_run
  out = tmp_path / "eval.json"
  assert commands.main(["eval", "--model", str(model_dir), "--tasks", "tiny_mc,tiny_roll", "--include-path",
                        str(tasks_dir), "--num-fewshot", "1", "--limit", "3", "--eval-text", str(evalt),
                        "--eval-seqlen", "32", "--output", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "|tiny_mc" in printed and "acc_norm" in printed and "perplexity @32: " in printed
  written = json.loads(out.read_text())
  assert written["lm_eval"]["n-shot"]["tiny_mc"] == 1 and written["lm_eval"]["results"]["tiny_mc"]["sample_len"] == 3
  assert 0 <= written["zero_shot"]["tiny_mc"]["acc,none"] <= 1 and written["seqlen"] == 32
  assert np.isfinite(written["perplexity"])
  monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  assert commands.main(["eval", "--tasks", "tiny_nosuch", "--include-path", str(tasks_dir)]) == 2
  assert "unknown lm-eval task(s) tiny_nosuch" in capsys.readouterr().err


def test_prune_eval_tasks_scores_the_pruned_model_into_the_summary(tiny_run, tasks_dir, tmp_path, capsys):
  _, model_dir, calib, evalt = tiny_run
  out = tmp_path / "run"
  flags = ["prune", "--model", str(model_dir), "--calib", str(calib), "--eval-text", str(evalt), "--method",
           "magnitude", "--sparsity", "0.6", "--eval-seqlen", "32", "--preset", "cpu", "--no-compare-magnitude",
           "--mesh", "1x1", "--output", str(out), "--eval-tasks", "tiny_roll", "--include-path", str(tasks_dir)]
  assert commands.main(flags) == 0
  printed = capsys.readouterr().out
  assert "dense perplexity @32: " in printed and "magnitude unstructured 60% perplexity @32: " in printed
  assert "|tiny_roll" in printed
  summary = json.loads((out / "summary.json").read_text())
  pruned = summary["zero_shot"]["tiny_roll"]["word_perplexity,none"]
  assert json.loads((out / "zero_shot.json").read_text())["results"]["tiny_roll"]["word_perplexity,none"] == pruned
  # The same task through lm-eval's registry on the exported pruned model, and on the dense one.
  from elsa_jax import harness

  def word_ppl(model):
    results = harness.evaluate(harness.ElsaLM(str(model)), ["tiny_roll"], include_path=str(tasks_dir))
    return results["results"]["tiny_roll"]["word_perplexity,none"]

  np.testing.assert_allclose(word_ppl(out / "model"), pruned, rtol=1e-6)
  assert not np.isclose(word_ppl(model_dir), pruned, rtol=1e-3)
