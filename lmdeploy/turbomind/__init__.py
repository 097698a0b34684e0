"""TurboMind: the inference engine and its tokenizer."""
