"""The command line (``elsa-jax prune | eval | export``) and the jobs behind it."""

from elsa_jax.cli.commands import main
