"""Tiny VAR models for the tests: a small multi-scale VQVAE (scales 1, 2, 3, 4) and VAR transformers on it,
with every weight made to matter (official init leaves the AdaLN gammas at ~1e-5 and the head at 0.02 scale,
which would hide a wrong formula)."""
from __future__ import annotations

import torch

from generators.var.model import VAR, VARConfig
from generators.var.vqvae import MultiScaleVQVAE, VARVQVAEConfig

PATCH_NUMS = (1, 2, 3, 4)
VOCAB = 64
CVAE = 8


def tiny_vqvae(seed: int = 0, vocab: int = VOCAB, patch_nums=PATCH_NUMS, ch_mult=(1, 2)) -> MultiScaleVQVAE:
    """ch_mult (1, 2): 8-px images; (1, 1, 1, 1, 1): 16x downsampling as the released VQVAE (64 px)."""
    torch.manual_seed(seed)
    config = VARVQVAEConfig(vocab_size=vocab, z_channels=CVAE, ch=16 if len(ch_mult) < 3 else 8, ch_mult=ch_mult,
                            num_res_blocks=1, using_sa=False, using_mid_sa=False, norm_groups=8, patch_nums=patch_nums,
                            image_size=2 ** (len(ch_mult) - 1) * patch_nums[-1], test_mode=True)
    return MultiScaleVQVAE(config).eval()


def randomize(model: VAR, seed: int = 0) -> VAR:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada_lin" in name or name.startswith(("head", "pos_", "lvl_", "class_emb")) or name.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("log_head_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.5)
    return model


def tiny_var(tokenizer: MultiScaleVQVAE | None = None, seed: int = 0, *, depth: int = 2, width: int = 32,
             heads: int = 2, tokenizer_name: str | None = None, **extra) -> VAR:
    tok = tokenizer if tokenizer is not None else tiny_vqvae()
    c = tok.config
    torch.manual_seed(seed)
    config = VARConfig(tokenizer=tokenizer_name, num_classes=10, vocab_size=c.vocab_size, cvae=c.z_channels,
                       patch_nums=c.patch_nums, downsample=c.downsample, depth=depth, embed_dim=width,
                       num_heads=heads, **extra)
    model = randomize(VAR(config), seed).eval()
    model.bind_tokenizer(tok)
    return model


def random_scale_ids(batch: int, seed: int = 0, patch_nums=PATCH_NUMS, vocab: int = VOCAB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, pn, pn), generator=g) for pn in patch_nums]
