"""Autoregressive image generation: LlamaGen GPT, its plain sampler and speculative Jacobi decoding."""
