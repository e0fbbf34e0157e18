"""elsa_jax.run.checks: the jitted finiteness check, the divergence error, strict records, option bounds."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elsa_jax.run import checks
from elsa_jax.run import train


def _tree(rng):
  """Params-and-state-like leaves of several dtypes, including an int count and an empty placeholder."""
  return {
      "params": {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16)},
      "opt_state": ({"count": jnp.int32(rng.integers(100)), "z": jnp.asarray(rng.normal(size=(5, 7)),
                                                                             jnp.float8_e4m3fn)},
                    {"placeholder": jnp.zeros((0,), jnp.float32), "mu": jnp.asarray(rng.normal(size=(3,)))}),
  }


FLOAT_LEAVES = [("params", "w"), ("params", "b"), ("opt_state", 0, "z"), ("opt_state", 1, "mu")]


def _poisoned(tree, where, value, rng):
  """A copy of ``tree`` with ``value`` at a random entry of the leaf at ``where`` (a path of dict keys / indices)."""
  out = jax.tree.map(lambda x: x, tree)  # new containers, same leaves
  node = out
  for k in where[:-1]:
    node = node[k]
  leaf = node[where[-1]]
  flat = np.asarray(leaf.astype(jnp.float32)).reshape(-1).copy()
  flat[rng.integers(flat.size)] = value
  node[where[-1]] = jnp.asarray(flat.reshape(leaf.shape), leaf.dtype)
  return out


def test_a_finite_tree_passes_and_ints_and_empty_leaves_are_ignored():
  rng = np.random.default_rng()
  tree = _tree(rng)
  assert bool(checks.all_finite(tree))
  assert checks.first_nonfinite(tree) is None
  assert bool(checks.all_finite({"count": jnp.int32(-1), "empty": jnp.zeros((0, 3))}))
  assert bool(checks.all_finite({}))


@pytest.mark.parametrize("where", FLOAT_LEAVES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_one_non_finite_entry_anywhere_is_found_and_named(where, value):
  rng = np.random.default_rng()
  if where == ("opt_state", 0, "z") and np.isinf(value):
    value = np.nan  # float8_e4m3fn has no infinity: inf saturates to NaN there
  bad = _poisoned(_tree(rng), where, value, rng)
  assert not bool(checks.all_finite(bad))
  named = checks.first_nonfinite(bad)
  assert named == jax.tree_util.keystr(tuple(
      jax.tree_util.SequenceKey(k) if isinstance(k, int) else jax.tree_util.DictKey(k) for k in where))


def test_the_check_is_one_jitted_program():
  rng = np.random.default_rng()
  tree = _tree(rng)
  checks.all_finite(tree)
  before = checks.all_finite._cache_size()
  checks.all_finite(_tree(rng))  # same structure, new values: no new trace
  assert checks.all_finite._cache_size() == before
  text = checks.all_finite.lower(tree).as_text()
  assert "is_finite" in text


def test_check_state_names_the_step_the_leaf_and_the_flag():
  rng = np.random.default_rng()
  tree = _tree(rng)
  step = int(rng.integers(1, 1000))
  checks.check_state(step, tree["params"], tree["opt_state"], lr=1e-3)  # finite: no error
  bad = _poisoned(tree, ("opt_state", 1, "mu"), np.nan, rng)
  with pytest.raises(checks.DivergedError) as info:
    checks.check_state(step, bad["params"], bad["opt_state"], lr=0.5)
  err = info.value
  assert err.step == step and isinstance(err, FloatingPointError)
  message = str(err)
  assert f"at step {step}" in message and "--lr (now 0.5)" in message and "['mu']" in message
  assert "no checkpoint" in message
  err.last_good = step - 1
  assert f"last good checkpoint, step {step - 1}, is kept" in str(err)


def test_json_ready_makes_strict_json():
  rng = np.random.default_rng()
  x = float(rng.normal())
  record = {"a": float("nan"), "b": [float("inf"), x, np.float32(-np.inf)], "c": {"d": np.float64(x)},
            "e": np.arange(3), "f": "text", "g": None, "h": 3}
  out = checks.json_ready(record)
  assert out == {"a": None, "b": [None, x, None], "c": {"d": x}, "e": [0, 1, 2], "f": "text", "g": None, "h": 3}
  json.dumps(out, allow_nan=False)  # strict: would raise on NaN or inf


def test_drop_metrics_after_keeps_each_step_once(tmp_path):
  path = tmp_path / "metrics.jsonl"
  checks.drop_metrics_after(path, 3)  # no file: nothing happens
  assert not path.exists()
  n = int(np.random.default_rng().integers(5, 12))
  lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, n + 1)]
  path.write_text("\n".join(lines) + "\n" + '{"step": 99, "lo')  # a line torn by a kill
  resumed = int(np.random.default_rng().integers(1, n))
  checks.drop_metrics_after(path, resumed)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == list(range(1, resumed + 1))
  checks.drop_metrics_after(path, 0)
  assert path.read_text() == ""


@pytest.mark.parametrize("field,value", [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("lr", -1e-3), ("lmda", -1.0), ("lmda", float("nan")),
    ("b1", 1.5), ("b1", 1.0), ("b2", -0.1), ("clip", 0.0), ("sam_rho", -0.1), ("eps", float("inf")),
])
def test_elsa_config_refuses_bad_numbers_naming_the_flag(field, value):
  flag = "--" + field.replace("_", "-")
  with pytest.raises(ValueError, match=f"^{flag} must be a finite number"):
    train.ElsaConfig(**{field: value})


@pytest.mark.parametrize("field", ["lmda_schedule", "projection", "score_source", "state_dtype", "moment_dtype",
                                   "score_dtype", "compute_dtype"])
def test_elsa_config_refuses_unknown_names_naming_the_flag(field):
  flag = "--" + field.replace("_", "-")
  with pytest.raises(ValueError, match=f"unknown {flag} 'foo'; choose one of"):
    train.ElsaConfig(**{field: "foo"})


def test_elsa_config_keeps_accepting_what_it_accepted():
  cfg = train.ElsaConfig(lmda=0.0, b1=0.0, state_dtype="bf16", score_dtype=jnp.int8, compute_dtype=jnp.float32,
                         moment_dtype="int8", lmda_schedule="residual_balancing", projection="magnitude")
  assert cfg.state_dtype == "bf16" and cfg.b1 == 0.0
