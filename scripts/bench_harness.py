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
"""Throughput of lm-eval ``loglikelihood`` requests: the JAX backend (elsa_jax) against lm-eval's ``hf``.

Both backends score the same requests, built from the built-in evaluation text
(a context of 30-200 words and a continuation of 1-8 words, at random
positions), on the built-in SmolLM2-135M: the JAX backend from the GGUF's
weights in memory, the ``hf`` backend (PyTorch, float32) from the same weights
exported as an HF directory. Each backend is timed twice on the same requests:
``cold`` includes the JIT compilation (JAX) or the first-call warm-up, ``warm``
is the second pass. The largest difference of the per-request log-likelihoods
is printed as a check.

    python scripts/bench_harness.py --requests 200 --batch-size 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from lm_eval.api.instance import Instance

from elsa_jax import harness
from elsa_jax.cli import jobs
from elsa_jax.data import assets


def make_requests(n: int, seed: int) -> list[Instance]:
  """``n`` (context, continuation) requests cut from the built-in evaluation text."""
  rng = np.random.default_rng(seed)
  words = " ".join(assets.default_text("evaluation")).split()
  out = []
  for i in range(n):
    n_ctx, n_cont = int(rng.integers(30, 200)), int(rng.integers(1, 9))
    start = int(rng.integers(0, len(words) - n_ctx - n_cont))
    context = " ".join(words[start:start + n_ctx])
    continuation = " " + " ".join(words[start + n_ctx:start + n_ctx + n_cont])
    out.append(Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=i))
  return out


def _timed(lm, requests) -> tuple[float, float, np.ndarray]:
  t = time.perf_counter()
  lm.loglikelihood(requests, disable_tqdm=True)
  cold = time.perf_counter() - t
  t = time.perf_counter()
  scores = lm.loglikelihood(requests, disable_tqdm=True)
  warm = time.perf_counter() - t
  return cold, warm, np.array([s[0] for s in scores])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--requests", type=int, default=200)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--hf-dir", help="where the exported HF copy of SmolLM2 is kept (default: a temporary folder)")
  ap.add_argument("--out-dir", default="results")
  args = ap.parse_args()

  from lm_eval.models.huggingface import HFLM

  requests = make_requests(args.requests, args.seed)
  loaded = jobs.load_model("default")
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = pathlib.Path(args.hf_dir or tmp) / "smollm2"
    if not (hf_dir / "config.json").exists():
      jobs.export(loaded, loaded.params, hf_dir)
    backends = {
        "elsa_jax (JAX)": harness.ElsaLM(model=loaded, batch_size=args.batch_size),
        "hf (PyTorch)": HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu"),
    }
    encode = backends["elsa_jax (JAX)"]._encode_pair  # lm-eval's split of the text into context/continuation
    tokens = sum(len(c) + len(k) for c, k in (encode(*r.args) for r in requests))
    rows, scores = [], {}
    for name, lm in backends.items():
      cold, warm, scores[name] = _timed(lm, requests)
      rows.append((name, cold, warm))
      print(f"{name}: cold {cold:.1f} s, warm {warm:.1f} s", flush=True)
  diff = float(np.abs(scores["elsa_jax (JAX)"] - scores["hf (PyTorch)"]).max())
  load = os.getloadavg()[0]
  lines = [
      f"SmolLM2-135M float32, {args.requests} loglikelihood requests ({tokens} tokens), batch {args.batch_size}, "
      f"device {jax.devices()[0].device_kind} ({os.cpu_count()} cores, load average {load:.1f}), "
      f"{datetime.date.today()}; max |logp difference| {diff:.2e}",
      "",
      "| backend | cold s (incl. compile) | warm s | warm requests/s | warm tokens/s |",
      "|---|---|---|---|---|",
  ]
  for name, cold, warm in rows:
    lines.append(f"| {name} | {cold:.1f} | {warm:.1f} | {args.requests / warm:.1f} | {tokens / warm:,.0f} |")
  table = "\n".join(lines)
  print(table)
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "bench-harness.md").write_text(table + "\n")
  (out_dir / "bench-harness.json").write_text(json.dumps(
      {"requests": args.requests, "tokens": tokens, "batch_size": args.batch_size, "max_abs_diff": diff,
       "load_average": load, "rows": [{"backend": n, "cold_s": c, "warm_s": w} for n, c, w in rows]}, indent=2))


if __name__ == "__main__":
  main()
