"""The LLaMA shapes that the benchmark scripts build with random weights, one table for all of them.

  import model_shapes  # from a script in scripts/ (its folder is on sys.path)
  config = llama.LlamaConfig(**model_shapes.SHAPES["smollm2"])
"""

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
    # Small, with a 512-token vocabulary: 99% of its 47.7M params are prunable, so the optimizer dominates.
    "48m": dict(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    # SmolLM2-135M's shape.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True),
    # TinyLlama-1.1B's shape (the 1.1B rows).
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
}
