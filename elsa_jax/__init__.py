"""elsa_jax: pruning LLMs to extreme sparsity with ELSA (surrogate-free ADMM) in JAX."""

__version__ = "0.1.0"
