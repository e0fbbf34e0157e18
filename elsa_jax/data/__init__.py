"""Text in: the built-in assets from PyPI files, documents and calibration windows, evaluation."""

from elsa_jax.data import assets
from elsa_jax.data import documents
from elsa_jax.data import evaluation
