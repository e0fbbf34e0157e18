# Copyright 2026 The elsa_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
"""The cost of distillation (``--distill``, ``--squarehead``): train-step time and predicted memory.

Times the ELSA train step (the one without the z/u update, i.e. nearly every
step) on a random LLaMA, without distillation, with the KL to the frozen dense
teacher, and with the KL plus SquareHead's per-block loss; and prints, per
variant, the predicted per-device memory (:func:`elsa_jax.run.memory.predict_memory`).
The teacher is the student's starting point in the compute dtype, an argument of
the jitted step, as in a run.

    python scripts/bench_distill.py --shape tiny --batch 2 --seqlen 128 --steps 5    # CPU, about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from elsa_jax.models import llama
from elsa_jax.run import memory
from elsa_jax.run import sharding as sharding_lib
from elsa_jax.run import teacher as teacher_lib
from elsa_jax.run import train
from model_shapes import SHAPES

#: The variants timed: label -> the ElsaConfig fields they set.
VARIANTS = {"no distillation": {}, "KL (--distill 0.5)": {"distill": 0.5},
            "KL + SquareHead (--squarehead)": {"distill": 0.5, "squarehead": True}}


def step_ms(graphdef, params, cfg: train.ElsaConfig, steps: int, vocab: int) -> list[float]:
  """Milliseconds of each of ``steps`` train steps (after one of compilation and warm-up)."""
  tx = train.make_optimizer(cfg)
  distill = teacher_lib.spec(cfg)
  step = jax.jit(train.make_train_step(graphdef, tx, compute_dtype=jnp.dtype(cfg.compute_dtype), z_update=False,
                                       distill=distill), donate_argnums=(0, 1))
  params = jax.tree.map(jnp.array, params)  # a fresh copy: the step donates it
  teacher = () if distill is None else (teacher_lib.cast_floating(params, jnp.dtype(cfg.compute_dtype), copy=True),)
  opt_state = jax.jit(tx.init)(params)
  batch = jax.random.randint(jax.random.key(cfg.seed), (cfg.grad_accum, cfg.batch_size, cfg.seqlen + 1), 0, vocab)
  params, opt_state, metrics = step(params, opt_state, batch, *teacher)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, batch, *teacher)
    jax.block_until_ready((params, metrics))
    times.append(1e3 * (time.perf_counter() - t))
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", choices=("tiny", "small", "smollm2"), default="tiny")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seqlen", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
  parser.add_argument("--compute-dtype", default="bfloat16")
  parser.add_argument("--out", default="bench_distill.json", help="the JSON of the table")
  args = parser.parse_args()
  config = llama.LlamaConfig(**SHAPES[args.shape])
  graphdef, params = llama.split(llama.Llama(config, rngs=nnx.Rngs(0)))
  mesh = sharding_lib.make_mesh(1, 1)
  base = train.ElsaConfig(batch_size=args.batch, seqlen=args.seqlen, steps=1000, compute_dtype=args.compute_dtype)
  rows = []
  for label, fields in VARIANTS.items():
    cfg = dataclasses.replace(base, **fields)
    times = step_ms(graphdef, params, cfg, args.steps, config.vocab_size)
    mem = memory.predict_memory(config, cfg, mesh, z_update=False)
    rows.append({"variant": label, "step_ms_median": statistics.median(times), "step_ms_min": min(times),
                 "predicted_gib": mem.total_gib, "argument_gib": mem.argument_bytes / memory.GiB,
                 "temp_gib": mem.temp_bytes / memory.GiB})
  plain = rows[0]["step_ms_median"]
  print(f"{args.shape} LLaMA ({sum(p.size for p in jax.tree.leaves(params)) / 1e6:.2f}M params), batch {args.batch} "
        f"x {args.seqlen} tokens, {args.compute_dtype}, {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"median of {args.steps} steps")
  print("| variant | step ms (median) | vs none | predicted MiB (args + temps) |")
  print("|---|---|---|---|")
  for row in rows:
    print(f"| {row['variant']} | {row['step_ms_median']:.1f} | x{row['step_ms_median'] / plain:.2f} | "
          f"{row['predicted_gib'] * 1024:.1f} ({row['argument_gib'] * 1024:.1f} + {row['temp_gib'] * 1024:.1f}) |")
  record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, **vars(args), "rows": rows}
  pathlib.Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
