#!/usr/bin/env python
"""File size of a pruned model, dense against compact (``--format bitmask``), and the read-back bit-exact.

Loads the built-in SmolLM2-135M (the CLI's default model, ``elsa_jax.data.assets``), prunes its
prunable matrices by magnitude (the format does not depend on the method) at each target, and for
each dtype writes the model with ``elsa_jax.models.save_pretrained`` dense and compact. It then reads
the compact directory back with ``from_pretrained`` and compares every weight bit for bit with the
pruned weights cast to that dtype, and densifies it and compares every tensor with the dense export.
Sizes are the bytes of the ``*.safetensors`` files (headers included). Writes
``results/sparse-format.md`` (the table) and ``.json``.

  python scripts/bench_sparse_format.py                          # 50%, 70%, 90%, 2:4 x bf16, fp32
  python scripts/bench_sparse_format.py --targets 0.7 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import tempfile
import time


def _nbytes(directory: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _bit_equal(a, b) -> bool:
  import numpy as np

  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and bool(
      (a.view(np.dtype(f"u{a.dtype.itemsize}")) == b.view(np.dtype(f"u{b.dtype.itemsize}"))).all())


def _dense_tensors(directory: pathlib.Path) -> dict:
  from safetensors.numpy import load_file

  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(load_file(f))
  return out


def measure(loaded, target: str, dtype: str, root: pathlib.Path) -> dict:
  """One row: the model pruned at ``target`` and written in ``dtype``, dense and compact."""
  import jax
  import jax.numpy as jnp

  from elsa_jax import models
  from elsa_jax.oneshot.magnitude import magnitude_prune_tree

  t0 = time.time()
  prune = dict(n_m=tuple(int(x) for x in target.split(":"))) if ":" in target else dict(sparsity=float(target))
  pruned = magnitude_prune_tree(loaded.params, prunable=loaded.architecture.prunable, **prune)
  pruned = jax.tree.map(lambda p: p.astype(dtype), jax.device_get(pruned))
  t_prune = time.time() - t0
  model = (loaded.graphdef, pruned)
  dense, compact, densified = root / "dense", root / "compact", root / "densified"
  t0 = time.time()
  models.save_pretrained(model, loaded.config, dense, overwrite=True)
  t_dense = time.time() - t0
  t0 = time.time()
  models.save_pretrained(model, loaded.config, compact, overwrite=True, sparse_format="bitmask")
  t_compact = time.time() - t0
  t0 = time.time()
  back, _ = models.from_pretrained(compact, param_dtype=jnp.dtype(dtype))
  t_read = time.time() - t0
  read_exact = all(jax.tree.leaves(jax.tree.map(_bit_equal, models.split(back)[1], pruned)))
  models.densify_directory(compact, densified, overwrite=True)
  want, got = _dense_tensors(dense), _dense_tensors(densified)
  densify_exact = set(want) == set(got) and all(_bit_equal(want[n], got[n]) for n in want)
  layout = json.loads((compact / "config.json").read_text())[models.safetensors_dir.LAYOUT_KEY]["tensors"]
  formats = {}
  for entry in layout.values():
    key = entry["format"] if entry["format"] == "bitmask" else f"{entry['n']}:{entry['m']}"
    formats[key] = formats.get(key, 0) + 1
  matrices = sum(want[n].nbytes for n in layout)
  stored = _dense_tensors(compact)
  matrices_compact = sum(a.nbytes for n, a in stored.items() if n.rpartition(".")[0] in layout)
  return {
      "target": target, "dtype": dtype, "dense_bytes": _nbytes(dense), "compact_bytes": _nbytes(compact),
      "ratio": _nbytes(compact) / _nbytes(dense), "matrices_ratio": matrices_compact / matrices,
      "compact_tensors": formats, "dense_tensors": len(want) - len(layout), "read_back_exact": read_exact,
      "densify_exact": densify_exact, "seconds": {"prune": t_prune, "save_dense": t_dense,
                                                  "save_compact": t_compact, "read_compact": t_read},
  }


def table(rows: list[dict]) -> str:
  lines = ["| pruning | dtype | dense MB | compact MB | compact / dense | pruned matrices only | layouts "
           "(matrices) | read back bit-exact | densified = dense | save dense / compact, read compact (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    target = r["target"] if ":" in r["target"] else f"{float(r['target']):.0%}"
    layouts = ", ".join(f"{k} x{v}" for k, v in sorted(r["compact_tensors"].items()))
    s = r["seconds"]
    lines.append(f"| {target} | {r['dtype']} | {r['dense_bytes'] / 1e6:.2f} | {r['compact_bytes'] / 1e6:.2f} | "
                 f"{r['ratio']:.3f}x | {r['matrices_ratio']:.3f}x | {layouts}; {r['dense_tensors']} dense | "
                 f"{'yes' if r['read_back_exact'] else 'NO'} | {'yes' if r['densify_exact'] else 'NO'} | "
                 f"{s['save_dense']:.1f} / {s['save_compact']:.1f}, {s['read_compact']:.1f} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--targets", default="0.5,0.7,0.9,2:4", help="sparsities and N:M patterns, comma-separated")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--out-dir", default="results")
  ap.add_argument("--work-dir", help="where the model directories are written (default: a temporary one)")
  args = ap.parse_args()

  import jax

  from elsa_jax.cli import jobs

  t0 = time.time()
  loaded = jobs.load_model(jobs.DEFAULT_MODEL)  # SmolLM2-135M from its built-in GGUF, float32
  print(f"loaded {jobs.DEFAULT_MODEL} in {time.time() - t0:.0f}s", flush=True)
  rows = []
  with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
    for target in args.targets.split(","):
      for dtype in args.dtypes.split(","):
        rows.append(measure(loaded, target, dtype, pathlib.Path(work)))
        r = rows[-1]
        print(f"{target:>4s} {dtype:9s} dense {r['dense_bytes']:,} compact {r['compact_bytes']:,} "
              f"({r['ratio']:.3f}x) exact {r['read_back_exact']}/{r['densify_exact']}", flush=True)
  text = table(rows)
  print(text)
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  meta = {"date": datetime.date.today().isoformat(), "devices": [str(d) for d in jax.devices()],
          "model": jobs.DEFAULT_MODEL, "rows": rows}
  (out_dir / "sparse-format.md").write_text(text + "\n")
  (out_dir / "sparse-format.json").write_text(json.dumps(meta, indent=2))
  print(f"wrote {out_dir / 'sparse-format.md'}")


if __name__ == "__main__":
  main()
