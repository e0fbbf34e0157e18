"""Score sources behind one interface: a new one is a class and a registry line."""

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elsa_jax
from elsa_jax.optim import scores


def _problem(seed):
  r = np.random.default_rng(seed)
  params = {"layers": {"0": {"kernel": jnp.asarray(r.normal(size=(16, 8)), jnp.float32)}},
            "norm": {"scale": jnp.ones(8)}}
  grads = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
  return params, grads


@dataclasses.dataclass(frozen=True)
class Column(scores.Magnitude):
  """A toy source: entries of higher input index weigh more (v = 1 + row index)."""

  name: ClassVar[str] = "column"

  def weights(self, score, score_scale, base_state, flat_params, treedef):
    return [jnp.arange(1.0, w.shape[0] + 1.0)[:, None] if w.ndim == 2 else None for _, w in flat_params]


def test_a_new_score_source_is_one_class_and_one_registry_line(monkeypatch):
  monkeypatch.setitem(scores.SCORE_SOURCES, "column", Column)
  params, grads = _problem(int(np.random.default_rng().integers(1 << 30)))
  tx = elsa_jax.admm(optax.sgd(0.0), sparsity=0.5, interval=1, score_source="column")
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads, state, params)
  w = params["layers"]["0"]["kernel"]
  v = jnp.arange(1.0, 17.0)[:, None]
  expected = elsa_jax.admm_projection(params, 0.5, v={"layers": {"0": {"kernel": v}}, "norm": {"scale": None}})
  chex.assert_trees_all_equal(state.z["layers"]["0"]["kernel"], expected["layers"]["0"]["kernel"])
  assert isinstance(state.config.score, Column)
  chex.assert_trees_all_equal(elsa_jax.finalize(params, state)["layers"]["0"]["kernel"],
                              expected["layers"]["0"]["kernel"])
  assert not np.array_equal(np.asarray(expected["layers"]["0"]["kernel"]),
                            np.asarray(elsa_jax.admm_projection(params, 0.5)["layers"]["0"]["kernel"]))


@pytest.mark.parametrize("projection,source,cls", [
    ("magnitude", "grad_ema", scores.Magnitude), ("objective_aware", "grad_ema", scores.GradEma),
    ("objective_aware", "base_second_moment", scores.BaseSecondMoment),
])
def test_sources_from_the_arguments(projection, source, cls):
  params, grads = _problem(0)
  tx = elsa_jax.admm(optax.adam(1e-2), sparsity=0.5, projection=projection, score_source=source)
  state = tx.init(params)
  assert type(state.config.score) is cls
  assert (state.score["layers"]["0"]["kernel"].size > 0) == cls.stateful
  _, state = jax.jit(tx.update)(grads, state, params)
  kernel = elsa_jax.finalize(params, state)["layers"]["0"]["kernel"]
  assert int((kernel == 0).sum()) == 64


def test_zu_update_of_an_injected_state_reads_its_hyperparameters():
  """admm_zu_update on an inject_hyperparams state takes sparsity from the injected values."""
  params, grads = _problem(1)
  tx = optax.inject_hyperparams(elsa_jax.admm, static_args=("interval",))(optax.sgd(1e-2), sparsity=0.5,
                                                                           interval=2)
  state = tx.init(params)
  assert elsa_jax.find_admm_state(state).config.sparsity is None  # injected: not frozen into the state
  updates, state = jax.jit(tx.update, static_argnames="z_update")(grads, state, params, z_update=False)
  params = optax.apply_updates(params, updates)
  state.hyperparams["sparsity"] = jnp.asarray(0.75)
  state = jax.jit(elsa_jax.admm_zu_update)(state, params)
  z = elsa_jax.find_admm_state(state).z["layers"]["0"]["kernel"]
  assert int((z == 0).sum()) == 96
  assert int((elsa_jax.finalize(params, state)["layers"]["0"]["kernel"] == 0).sum()) == 96
