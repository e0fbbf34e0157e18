"""Sparsity patterns and exact top-k projections (bisection on the float bit pattern)."""

from elsa_jax.sparsity import topk
