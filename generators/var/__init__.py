"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., NeurIPS 2024), with its
multi-scale residual VQVAE tokenizer (vqvae.py) and the transformer that predicts one scale at a time."""
