"""keep_mask: an optax wrapper that trains the surviving weights only."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from elsa_jax.optim import masked


def _params(rng):
  w = rng.normal(size=(12, 8)).astype(np.float32)
  w[rng.random(w.shape) < 0.6] = 0.0
  return {"layers": {"0": {"kernel": jnp.asarray(w)}}, "norm": {"scale": jnp.zeros(8)}}


def test_pruned_entries_stay_zero_and_the_rest_moves_as_the_inner_optimizer_on_masked_grads():
  rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
  params = _params(rng)
  zero = params["layers"]["0"]["kernel"] == 0
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
  tx = masked.keep_mask(inner)
  state, ref_state = jax.jit(tx.init)(params), inner.init(params)
  ref_params = params
  step = jax.jit(tx.update)
  for _ in range(5):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    # By hand: the gradient zeroed on the pruned entries, then the inner optimizer, then zeroed again.
    g = {"layers": {"0": {"kernel": jnp.where(zero, 0.0, grads["layers"]["0"]["kernel"])}}, "norm": grads["norm"]}
    ref_updates, ref_state = inner.update(g, ref_state, ref_params)
    ref_updates["layers"]["0"]["kernel"] = jnp.where(zero, 0.0, ref_updates["layers"]["0"]["kernel"])
    ref_params = optax.apply_updates(ref_params, ref_updates)
  kernel = params["layers"]["0"]["kernel"]
  assert bool(jnp.all(kernel[zero] == 0.0))  # exactly zero: never touched
  chex.assert_trees_all_close(params, ref_params, atol=1e-6)
  assert not bool(jnp.all(params["norm"]["scale"] == 0))  # the non-prunable leaf trains unmasked
  assert masked.find_keep_mask(optax.chain(optax.identity(), tx).init(params)) is not None
  assert masked.find_keep_mask(inner.init(params)) is None
