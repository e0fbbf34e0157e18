#!/usr/bin/env python
"""Predicted against measured per-device memory of the ELSA train step.

For each configuration, a fresh subprocess (1) predicts the step's memory with
``elsa_jax.run.memory.predict_memory`` (XLA's buffer assignment, nothing
allocated), (2) builds the random-weight model and its optimizer state on
the device, compiles the step, and (3) runs a few steps while measuring the
peak: ``peak_bytes_in_use`` of the device where the runtime reports it (GPU,
TPU), otherwise the process's resident memory sampled every millisecond,
above what it held after compiling and before allocating the model.
Writes ``results/memory-<device>.md``.

``--fit-gib N`` asks the question a user with an N GiB device has instead:
for each state, the largest model of the first size's width (its layer count
grown or shrunk) whose predicted peak fits N GiB, found by compiling, then
measured as above. Writes ``results/fit-<device>.md``.

  python scripts/bench_memory.py                       # SmolLM2-135M shape, fp32 and ELSA-L state
  python scripts/bench_memory.py --sizes 135m,1b --batch-size 4 --seqlen 2048   # on a GPU
  python scripts/bench_memory.py --sizes 48m --fit-gib 4 --compute-dtype bfloat16  # the largest model per state
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

from model_shapes import SHAPES

#: The sizes measured (the --sizes names) -> their shapes (rope_theta does not change the memory).
SIZES = {"48m": SHAPES["48m"], "135m": SHAPES["smollm2"], "1b": SHAPES["tinyllama-1.1b"]}
STATES = {
    "fp32": dict(state_dtype="float32", moment_dtype="float32"),
    "elsa-l": dict(state_dtype="float8_e4m3fn", moment_dtype="int8"),  # and an int8 grad-EMA score
    "elsa-l-bf16-score": dict(state_dtype="float8_e4m3fn", moment_dtype="int8", score_dtype="bfloat16"),
}


def _child(spec: dict) -> dict:
  import threading
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from elsa_jax.models import llama

  from elsa_jax.run import memory

  from elsa_jax.run import sharding

  from elsa_jax.run import train

  config = llama.LlamaConfig(**{**SIZES[spec["size"]], **spec.get("override", {})})
  cfg = train.ElsaConfig(batch_size=spec["batch_size"], seqlen=spec["seqlen"], steps=100, interval=2,
                         compute_dtype=spec["compute_dtype"], **STATES[spec["state"]])
  mesh = sharding.make_mesh(1, 1)
  separate = not spec["fused_z_update"]
  model_kw = dict(remat=spec["remat"], scan_layers=spec["scan_layers"])
  pred = memory.predict_memory(config, cfg, mesh, separate_z_update=separate, **model_kw)  # the run's peak
  plain = memory.predict_memory(config, cfg, mesh, z_update=False, **model_kw)
  zu = memory.predict_memory(config, cfg, mesh, z_update="program", **model_kw)
  fused = memory.predict_memory(config, cfg, mesh, separate_z_update=False, **model_kw)

  device = jax.local_devices()[0]
  on_device = device.memory_stats() is not None

  def rss() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  graphdef, abstract = memory.abstract_model(config, remat=spec["remat"], scan_layers=spec["scan_layers"])
  axes = llama.logical_axes(llama.merge(graphdef, abstract))
  p_shard = sharding.param_shardings(axes, abstract, mesh)
  tx = train.make_optimizer(cfg)
  s_shard = sharding.opt_state_shardings(tx, abstract, p_shard, mesh)
  init = jax.jit(lambda: llama.split(llama.Llama(config, remat=spec["remat"], rngs=nnx.Rngs(0)))[1],
                 out_shardings=p_shard)
  data = sharding.batch_sharding(mesh)
  batch_shape = jax.ShapeDtypeStruct((1, cfg.batch_size, cfg.seqlen + 1), jnp.int32, sharding=data)
  state_abstract = jax.eval_shape(tx.init, abstract)
  compiled = {}  # the programs of a run (as train.run runs them), compiled before measuring
  for due in sorted({False, not separate}):
    step = jax.jit(train.make_train_step(graphdef, tx, compute_dtype=jnp.dtype(cfg.compute_dtype), z_update=due),
                   in_shardings=(p_shard, s_shard, data),
                   out_shardings=(p_shard, s_shard, sharding.replicated(mesh)), donate_argnums=(0, 1))
    compiled[due] = step.lower(abstract, state_abstract, batch_shape).compile()
  if separate:
    compiled["zu"] = jax.jit(train.make_zu_step(tx), in_shardings=(p_shard, s_shard),
                             out_shardings=(s_shard, sharding.replicated(mesh)),
                             donate_argnums=(1,)).lower(abstract, state_abstract).compile()
  init_compiled = init.lower().compile()
  state_init = jax.jit(tx.init, out_shardings=s_shard).lower(abstract).compile()
  time.sleep(0.5)
  base = device.memory_stats()["bytes_in_use"] if on_device else rss()
  peak = [base]
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], rss())
      time.sleep(0.001)

  sampler = None if on_device else threading.Thread(target=sample, daemon=True)
  if sampler:
    sampler.start()
  params = init_compiled()
  opt_state = state_init(params)
  tokens = jax.device_put(np.random.default_rng(0).integers(0, config.vocab_size,
                                                            (1, cfg.batch_size, cfg.seqlen + 1), np.int32), data)
  for due in (True, False, True):
    params, opt_state, metrics = compiled[due and not separate](params, opt_state, tokens)
    if due and separate:
      opt_state, metrics = compiled["zu"](params, opt_state)
    jax.block_until_ready(metrics)
  if sampler:
    stop.set()
    sampler.join()
    measured = peak[0] - base
  else:
    measured = device.memory_stats()["peak_bytes_in_use"] - base
  return dict(spec, predicted=pred.total_bytes, measured=int(measured), n_params=pred.n_params,
              argument_bytes=plain.argument_bytes, plain_temp_bytes=plain.temp_bytes, zu_temp_bytes=zu.temp_bytes,
              fused_temp_bytes=fused.temp_bytes,
              state_bytes_per_param=pred.state_bytes_per_param, device=device.device_kind,
              method="peak_bytes_in_use" if on_device else "process RSS")


def _largest_fitting(spec: dict, capacity: int) -> tuple[int, int]:
  """(layers, predicted peak bytes) of the deepest model of ``spec``'s width that fits ``capacity``."""
  from elsa_jax.models import llama
  from elsa_jax.run import memory
  from elsa_jax.run import sharding
  from elsa_jax.run import train

  mesh = sharding.make_mesh(1, 1)
  cfg = train.ElsaConfig(batch_size=spec["batch_size"], seqlen=spec["seqlen"], steps=100, interval=2,
                         compute_dtype=spec["compute_dtype"], **STATES[spec["state"]])
  peaks = {}

  def peak(layers: int) -> int:
    if layers not in peaks:
      config = llama.LlamaConfig(**{**SIZES[spec["size"]], "num_hidden_layers": layers})
      peaks[layers] = memory.predict_memory(config, cfg, mesh, separate_z_update=not spec["fused_z_update"],
                                            remat=spec["remat"], scan_layers=spec["scan_layers"]).total_bytes
      print(f"  {spec['state']}: {layers} layers -> {peaks[layers] / 2**30:.3f} GiB", flush=True)
    return peaks[layers]

  if peak(1) > capacity:
    raise SystemExit(f"{spec['state']}: even one layer needs {peak(1) / 2**30:.2f} GiB > {capacity / 2**30} GiB")
  lo, hi = 1, 2
  while peak(hi) <= capacity:  # the peak grows with depth: double, then bisect
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if peak(mid) <= capacity else (lo, mid)
  return lo, peaks[lo]


def _run_child(spec: dict) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    print(out.stderr[-3000:], file=sys.stderr)
    raise SystemExit(f"{spec['size']}/{spec['state']} failed")
  return json.loads(lines[0][7:])


def _write_table(lines: list[str], path: pathlib.Path) -> None:
  table = "\n".join(lines)
  print(table)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(table + "\n")


def _fit(args, compute: str) -> None:
  capacity = int(args.fit_gib * 2**30)
  size = args.sizes.split(",")[0]
  rows = []
  for state in args.states.split(","):
    spec = dict(size=size, state=state, batch_size=args.batch_size, seqlen=args.seqlen, compute_dtype=compute,
                remat=args.remat or False, scan_layers=args.scan_layers, fused_z_update=args.fused_z_update)
    layers, predicted = _largest_fitting(spec, capacity)
    row = _run_child(dict(spec, override={"num_hidden_layers": layers}))
    rows.append(dict(row, layers=layers))
  device = rows[0]["device"]
  base = rows[0]["n_params"]
  lines = [f"device {device}, {datetime.date.today()}, capacity {args.fit_gib} GiB, width of {size} "
           f"({SIZES[size]['hidden_size']} hidden, FFN {SIZES[size]['intermediate_size']}, vocab "
           f"{SIZES[size]['vocab_size']}), batch {args.batch_size} x {args.seqlen}, compute {compute}, remat "
           f"{args.remat or 'none'}, z/u update {'fused' if args.fused_z_update else 'as its own program'}, "
           f"measured as {rows[0]['method']}", "",
           "| state | largest fitting layers | params | vs first row | predicted peak GiB | measured GiB |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['state']} | {r['layers']} | {r['n_params'] / 1e6:.1f}M | {r['n_params'] / base:.2f}x | "
                 f"{r['predicted'] / 2**30:.3f} | {r['measured'] / 2**30:.3f} |")
  _write_table(lines, pathlib.Path(args.out_dir) / f"fit-{device.replace(' ', '_')}.md")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="135m")
  ap.add_argument("--states", default="fp32,elsa-l")
  ap.add_argument("--batch-size", type=int, default=1)
  ap.add_argument("--seqlen", type=int, default=256)
  ap.add_argument("--compute-dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
  ap.add_argument("--remat", default="", help="'' (none) | full | dots | dots_no_batch")
  ap.add_argument("--scan-layers", action="store_true", help="run the layers as one lax.scan")
  ap.add_argument("--fused-z-update", action="store_true",
                  help="measure runs with the z/u update fused into its step (train.run(separate_z_update=False))")
  ap.add_argument("--fit-gib", type=float, default=None,
                  help="find, per state, the largest model of the first size's width whose peak fits this many GiB")
  ap.add_argument("--out-dir", default="results")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
    return
  import jax

  compute = args.compute_dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  if args.fit_gib:
    return _fit(args, compute)
  rows = []
  for size in args.sizes.split(","):
    for state in args.states.split(","):
      spec = dict(size=size, state=state, batch_size=args.batch_size, seqlen=args.seqlen, compute_dtype=compute,
                  remat=args.remat or False, scan_layers=args.scan_layers, fused_z_update=args.fused_z_update)
      row = _run_child(spec)
      rows.append(row)
      print(f"{size} {state}: predicted {row['predicted'] / 2**30:.3f} GiB, measured {row['measured'] / 2**30:.3f} "
            f"GiB", flush=True)
  device = rows[0]["device"]
  lines = [f"device {device}, {datetime.date.today()}, batch {args.batch_size} x {args.seqlen}, compute {compute}, "
           f"remat {args.remat or 'none'}, scan over layers {args.scan_layers}, z/u update "
           f"{'fused into its step' if args.fused_z_update else 'as its own program'}, measured as "
           f"{rows[0]['method']}", "",
           "| model | state | params | state B/param | arguments MiB | temporaries MiB: plain step | "
           "z/u program | step with z/u fused | predicted peak GiB | measured GiB | predicted / measured |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['size']} | {r['state']} | {r['n_params'] / 1e6:.1f}M | {r['state_bytes_per_param']:.2f} | "
                 f"{r['argument_bytes'] / 2**20:,.0f} | {r['plain_temp_bytes'] / 2**20:,.0f} | "
                 f"{r['zu_temp_bytes'] / 2**20:,.0f} | {r['fused_temp_bytes'] / 2**20:,.0f} | {r['predicted'] / 2**30:.3f} | {r['measured'] / 2**30:.3f} | {r['predicted'] / r['measured']:.3f} |")
  _write_table(lines, pathlib.Path(args.out_dir) / f"memory-{device.replace(' ', '_')}.md")


if __name__ == "__main__":
  main()
