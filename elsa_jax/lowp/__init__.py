"""Low-precision state (ELSA-L): codecs, Adam with 8-bit moments, XLA ordering helpers."""

from elsa_jax.lowp import adam
from elsa_jax.lowp import codecs
from elsa_jax.lowp import ordering
