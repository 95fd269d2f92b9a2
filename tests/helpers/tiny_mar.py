"""Tiny hand-built stand-ins for MAR, for the distribution tests of continuous speculative decoding.

They expose what MAR's samplers use (`forward(tokens, visible, class_embedding) -> z`, `head(y, t, z)`,
`class_embedding`, `fake_latent`, `seq_len`, `token_dim`, `spec`, `num_classes`, `tokenizer_name`), so the
real plain sampler and the real CSpD code run on them. A real MAR of this size would sample from a
random network (tokens exploding at the first, almost pure-noise step); these have a known shape:

* "transformer": the condition of position n is z_n = (mu_n, log sigma_n, v_n) with
  mu_n = a_n + class shift + c_n tanh(sum of the visible other tokens) -- so a position depends on what
  is known when it is sampled -- and log sigma_n = s_n + d_n tanh(that sum);
* "diffusion head": the noise prediction that is optimal for data N(mu, sigma^2) per coordinate, its x_0
  prediction moved by wiggle (1 - abar_t) tanh(y) (so the steps, and the last one, are not affine), and a
  variance interpolation v = tanh(v_n + 0.3 y).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from generators.mar.model import MAR, diffusion_for
from vision.tokens import TokenSpec

_ALPHAS = diffusion_for(None).tables["alphas_cumprod"]


class TinyHead(nn.Module):
    def __init__(self, channels: int, wiggle: float) -> None:
        super().__init__()
        self.channels, self.wiggle = channels, wiggle

    def forward(self, y: Tensor, t: Tensor, z: Tensor) -> Tensor:
        C = self.channels
        abar = _ALPHAS.to(y.device)[t].to(y.dtype)[:, None]
        mu, log_sigma, v = z[:, :C], z[:, C:2 * C], z[:, 2 * C:3 * C]
        var = torch.exp(2 * log_sigma)
        eps = (y - abar.sqrt() * mu) * (1 - abar).sqrt() / (abar * var + 1 - abar)
        # x_0 prediction moved by wiggle (1 - abar) tanh(y): nonlinear, vanishing at both ends of the schedule
        eps = eps - self.wiggle * (abar * (1 - abar)).sqrt() * torch.tanh(y)
        return torch.cat([eps, torch.tanh(v + 0.3 * y)], dim=1)


class TinyMAR(nn.Module):
    is_mar_like = True

    def __init__(self, *, positions: int = 2, channels: int = 1, num_classes: int = 3, seed: int = 0,
                 coupling: float = 1.0, wiggle: float = 0.2, perturb: float = 0.0, perturb_seed: int = 1,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        N, C = positions, channels
        self.seq_len, self.token_dim, self.channels = N, C, C
        self.config = type("Config", (), {"num_classes": num_classes, "tokenizer": "tiny"})()
        self.a = nn.Parameter(torch.randn(N, C, generator=g).to(dtype))
        self.c = nn.Parameter((coupling * torch.randn(N, C, generator=g)).to(dtype))
        self.s = nn.Parameter((-0.5 + 0.2 * torch.randn(N, C, generator=g)).to(dtype))
        self.d = nn.Parameter((0.3 * torch.randn(N, C, generator=g)).to(dtype))
        self.v = nn.Parameter((0.5 * torch.randn(N, C, generator=g)).to(dtype))
        self.class_emb = nn.Embedding(max(num_classes, 1), C).to(dtype)
        with torch.no_grad():
            self.class_emb.weight.copy_(torch.randn(max(num_classes, 1), C, generator=g))
        self.fake_latent = nn.Parameter(torch.zeros(1, C, dtype=dtype))
        self._head = TinyHead(C, wiggle)
        if perturb:  # a nearby model (a draft): every parameter moved by perturb * N(0, 1)
            gp = torch.Generator().manual_seed(perturb_seed)
            with torch.no_grad():
                for p in self.parameters():
                    p.add_(perturb * torch.randn(p.shape, generator=gp, dtype=p.dtype))

    class_embedding = MAR.class_embedding

    @property
    def head(self) -> TinyHead:
        return self._head

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec("continuous", (1, self.seq_len), 1, channels=self.channels)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def tokenizer_name(self) -> str:
        return "tiny"

    def forward(self, tokens: Tensor, visible: Tensor, class_embedding: Tensor) -> Tensor:
        known = tokens * visible[..., None].to(tokens.dtype)  # (R, N, C)
        others = known.sum(dim=1, keepdim=True) - known  # the visible other positions
        h = torch.tanh(others)
        mu = self.a + class_embedding[:, None] + self.c * h
        log_sigma = self.s + self.d * h
        v = self.v.expand_as(mu)
        return torch.cat([mu, log_sigma, v], dim=-1)


def random_mar(seed: int = 0, depth: int = 1, **overrides):
    """A tiny real MAR (4x4 grid of 2-channel tokens, width 32, `depth` encoder and decoder blocks) with seeded
    random weights, in float64. MAR zero-initialises its head's modulation and output; these are drawn too, so
    the head says something."""
    from generators.mar.model import MARConfig

    torch.manual_seed(seed)
    config = dict(num_classes=5, grid=(4, 4), downsample=4, channels=2, encoder_dim=32, encoder_depth=depth,
                  encoder_heads=4, decoder_dim=32, decoder_depth=depth, decoder_heads=4, buffer_size=2,
                  diffloss_width=32, diffloss_depth=2, attn_dropout=0.0, proj_dropout=0.0)
    model = MAR(MARConfig(**{**config, **overrides}))
    with torch.no_grad():
        for block in model.head.res_blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.05)
        model.head.final_layer.linear.weight.normal_(0, 0.05)
    return model.eval().double()
