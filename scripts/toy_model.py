#!/usr/bin/env python
"""Writes a tiny random LLaMA with SmolLM2's tokenizer as an HF directory: the model of dry runs.

  python scripts/toy_model.py results/toy-model

The vocabulary is SmolLM2's (49152 ids), so the built-in calibration and
evaluation text (and their token cache) serve it as they are; the rest is
tiny (hidden 64, 2 layers), so a prune run of it takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import pathlib

from flax import nnx

from elsa_jax.data import assets
from elsa_jax.models import llama


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("out", help="the directory to write (replaced)")
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  tokenizer = assets.default_tokenizer()
  config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, tie_word_embeddings=True)
  out = pathlib.Path(args.out)
  llama.save_pretrained(llama.Llama(config, rngs=nnx.Rngs(args.seed)), config, out, overwrite=True)
  tokenizer.save_pretrained(out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
