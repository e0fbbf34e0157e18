"""The ELSA method as optax transforms: ADMM around a base optimizer, SAM (SAFE's x-update)."""

from elsa_jax.optim import sam
from elsa_jax.optim import transform
