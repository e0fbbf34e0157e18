#!/usr/bin/env python
"""ELSA train-step speed against plain Adam on a random-weight LLaMA.

Prints a markdown table and writes it to ``--out`` (default
results/bench_speed.md): tokens/s, model-FLOPs utilisation against the
measured bf16 matmul peak of the device, the time share of ELSA's z/u update
(projection + dual), peak device memory and optimizer-state bytes per
parameter, for fp32 ADMM state and for ELSA-L state (fp8 z/u, int8 moments).

Examples::

  python scripts/bench_speed.py --model smollm2 --batch 8 --seqlen 1024          # GPU
  python scripts/bench_speed.py --model tinyllama-1.1b --batch 4 --seqlen 2048   # GPU
  python scripts/bench_speed.py --model tiny --batch 2 --seqlen 128 --steps 3    # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elsa_jax.models import llama
from elsa_jax.run import train
from model_shapes import SHAPES



def measure_peak_tflops(dtype=jnp.bfloat16, n=8192, reps=10) -> float:
  """The device's measured dense matmul peak (TFLOP/s)."""
  if jax.default_backend() == "cpu":
    n, reps = 1024, 3
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a, b)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_token(config: llama.LlamaConfig, n_params: int, seqlen: int) -> float:
  """6N + 12 * layers * hidden * seqlen (N without the embedding lookup table)."""
  n = n_params - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
  return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seqlen


def peak_memory_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


def time_steps(step_fn, params, opt_state, batch, steps: int) -> tuple[float, object, object]:
  params, opt_state, m = step_fn(params, opt_state, batch)  # compile + warm up
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    params, opt_state, m = step_fn(params, opt_state, batch)
  jax.block_until_ready((params, m))
  return (time.perf_counter() - t) / steps, params, opt_state


def adam_step(graphdef, tx, compute_dtype):
  loss_fn = train.make_loss_fn(graphdef, compute_dtype)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch[0])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss}

  return step


VARIANTS = {
    "adam": ("adam (floor)", None),
    "elsa": ("elsa fp32 state", dict()),
    "elsa-l": ("elsa-L fp8 z/u, int8 moments", dict(state_dtype="float8_e4m3fn", moment_dtype="int8")),
}


def run_variant(args, key: str) -> dict:
  """Measures one variant in this process (so peak memory is its own)."""
  name, overrides = VARIANTS[key]
  config = llama.LlamaConfig(**SHAPES[args.model], max_position_embeddings=max(args.seqlen, 2048))
  graphdef, params0 = llama.split(llama.Llama(config, rngs=nnx.Rngs(0), remat=args.remat,
                                              scan_layers=args.scan_layers))
  n_params = llama.param_count(params0)
  batch = jax.random.randint(jax.random.key(2), (1, args.batch, args.seqlen + 1), 0, config.vocab_size)
  cfg = train.ElsaConfig(sparsity=0.7, steps=10_000, batch_size=args.batch, seqlen=args.seqlen,
                         interval=args.interval, compute_dtype="bfloat16", **(overrides or {}))
  if overrides is None:
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4, b1=0.9, b2=0.95))
    fn = adam_step(graphdef, tx, jnp.bfloat16)
  else:
    tx = train.make_optimizer(cfg)
    fn = train.make_train_step(graphdef, tx, compute_dtype=jnp.bfloat16, z_update=False)
  opt_state = jax.jit(tx.init)(params0)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
  step = jax.jit(fn, donate_argnums=(0, 1))
  # Steps between z-updates (the common case); the z/u update's cost is added below.
  sec, params, opt_state = time_steps(step, params0, opt_state, batch, args.steps)
  share = float("nan")
  if overrides is not None:
    # The z/u update as train.run runs it every interval steps: its own program after the step.
    zu = jax.jit(train.make_zu_step(tx), donate_argnums=(1,))
    zu_steps = lambda p, s, _: (p, *zu(p, s))
    sec_zu, _, _ = time_steps(zu_steps, params, opt_state, batch, max(2, args.steps // 8))
    extra = sec_zu / args.interval
    share = extra / (sec + extra)
    sec = sec + extra
  peak = measure_peak_tflops()
  tokens = args.batch * args.seqlen
  tps = tokens / sec
  return dict(variant=name, step_ms=sec * 1e3, tokens_per_s=tps,
              mfu=tps * flops_per_token(config, n_params, args.seqlen) / (peak * 1e12), zu_share=share,
              peak_mem_gib=peak_memory_bytes() / 2**30, state_bytes_per_param=state_bytes / n_params,
              n_params=n_params, peak_tflops=peak)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="smollm2", choices=sorted(SHAPES))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seqlen", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--interval", type=int, default=32)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--scan-layers", action="store_true")
  ap.add_argument("--variant", choices=sorted(VARIANTS), help="measure only this one (internal)")
  ap.add_argument("--out", default="results/bench_speed.md")
  ap.add_argument("--json", help="also write the rows to this JSON file")
  args = ap.parse_args()
  if args.variant:
    print("ROW " + json.dumps(run_variant(args, args.variant)), flush=True)
    return
  rows = []
  for key in VARIANTS:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", key]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("ROW ")]
    if out.returncode or not line:
      print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
      raise SystemExit(f"variant {key} failed")
    rows.append(json.loads(line[0][4:]))
  device = jax.devices()[0].device_kind
  floor = rows[0]["tokens_per_s"]
  lines = [
      f"model {args.model} ({rows[0]['n_params'] / 1e6:.1f}M params, random weights), batch {args.batch} x "
      f"{args.seqlen} tokens, bf16 compute / fp32 master, z/u interval {args.interval}, remat {args.remat}, scan {args.scan_layers}, "
      f"device {device} (measured bf16 matmul peak {rows[0]['peak_tflops']:.0f} TFLOP/s), {datetime.date.today()}",
      "",
      "| variant | step ms | tokens/s | vs Adam | MFU | z/u share | peak mem GiB | opt-state B/param |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / floor:.3f} "
        f"| {r['mfu']:.1%} | {r['zu_share']:.2%} | {r['peak_mem_gib']:.2f} | {r['state_bytes_per_param']:.2f} |"
    )
  table = "\n".join(lines)
  print(table)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "a") as f:
    f.write(table + "\n\n")
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps({"device": device, "model": args.model, "batch": args.batch,
                                                   "seqlen": args.seqlen, "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
