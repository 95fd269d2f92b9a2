"""MAR: masked autoregressive generation of continuous tokens with a per-token diffusion head, its plain
sampler, continuous speculative decoding (CSpD), and the importer of the released checkpoints."""
