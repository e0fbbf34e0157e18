"""Model architectures (Flax NNX) and their conversion from/to Hugging Face and GGUF files."""

from elsa_jax.models import gguf_tokenizer
from elsa_jax.models import llama
