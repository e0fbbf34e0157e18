"""The sharded pruning loop: train step, mesh sharding, checkpoints, multi-host, memory prediction."""

from elsa_jax.run import checkpoint
from elsa_jax.run import distributed
from elsa_jax.run import memory
from elsa_jax.run import sharding
from elsa_jax.run import train
