"""The ELSA method as optax transforms: ADMM around a base optimizer, SAM (SAFE's x-update).

``config`` (the frozen configuration), ``steps`` (the maths as pure
functions), ``scores`` (the projection's score sources), ``transform``
(:func:`admm`, its state, :func:`admm_zu_update`), ``finalize`` (the final
projection and reports) and ``sam``.
"""

from elsa_jax.optim import config
from elsa_jax.optim import finalize
from elsa_jax.optim import sam
from elsa_jax.optim import scores
from elsa_jax.optim import steps
from elsa_jax.optim import transform
