"""Decoding: a KV cache, the model run over it, sampling, and the generation loop."""
