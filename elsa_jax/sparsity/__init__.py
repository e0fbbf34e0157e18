"""Sparsity patterns, the prunable set, and exact top-k projections (bisection on the float bit pattern)."""

from elsa_jax.sparsity import patterns
from elsa_jax.sparsity import prunable
from elsa_jax.sparsity import topk
