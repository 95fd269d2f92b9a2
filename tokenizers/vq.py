"""A convolutional VQ tokenizer (VQGAN recipe) on the same encoder/decoder as WeTok.

VQGAN (Esser et al., 2021) tokenizes with a nearest-neighbour codebook; Tessera keeps that
quantizer (``tokenizers.quantizers.VectorQuantizer``: L2 or cosine lookup, learned, EMA or
SimVQ codebook, dead-code restart) and reuses WeTok's attention-free ResBlock encoder and
AdaGN decoder, so the two tokenizers differ only in how a latent becomes a token. One code
per position: ``ids`` are ``(B, h, w)`` in ``[0, codebook_size)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vision.errors import ConfigError
from vision.hub import register_model
from vision.tokens import Tokens, TokenSpec

from .quantizers import QuantizerOutput, VectorQuantizer
from .wetok import Decoder, Encoder, WeTokConfig, check_image_size


@dataclass
class VQConfig:
    image_size: int = 256
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    codebook_size: int = 1024
    codebook_dim: int = 64
    distance: str = "l2"  # l2 | cosine
    codebook: str = "learned"  # learned | ema | simvq
    beta: float = 0.25
    dead_code_steps: int = 0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"ch_mult needs at least one level, each >= 1, got {self.ch_mult}")
        for name in ("in_channels", "ch", "num_res_blocks", "norm_groups", "codebook_size", "codebook_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_image_size(self.image_size, self.downsample)
        if self.distance not in ("l2", "cosine"):
            raise ConfigError(f"distance must be 'l2' or 'cosine', got {self.distance!r}")
        if self.codebook not in ("learned", "ema", "simvq"):
            raise ConfigError(f"codebook must be 'learned', 'ema' or 'simvq', got {self.codebook!r}")
        if not self.beta >= 0 or self.dead_code_steps < 0:
            raise ConfigError(f"beta and dead_code_steps must be >= 0, got {self.beta} and {self.dead_code_steps}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def backbone(self) -> WeTokConfig:
        """The WeTok encoder/decoder configuration with a codebook_dim-channel latent."""
        return WeTokConfig(image_size=self.image_size, in_channels=self.in_channels, out_channels=self.in_channels,
                           ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                           z_channels=self.codebook_dim, groups=1, norm_groups=self.norm_groups)


VQ_CONFIGS: dict[str, VQConfig] = {
    "vq-f16": VQConfig(),
    "vq-tiny-f4": VQConfig(image_size=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                           codebook_size=256, codebook_dim=16, dead_code_steps=50),
}


def vq_config(name: str, **overrides: Any) -> VQConfig:
    if name not in VQ_CONFIGS:
        raise ValueError(f"unknown VQ configuration {name!r}; known: {', '.join(VQ_CONFIGS)}")
    return dataclasses.replace(VQ_CONFIGS[name], **overrides)


@register_model("vq")
class VQTokenizer(nn.Module):
    config_class = VQConfig

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = c = config
        backbone = c.backbone()
        self.encoder = Encoder(backbone)
        self.quantize = VectorQuantizer(c.codebook_size, c.codebook_dim, distance=c.distance, codebook=c.codebook,
                                        beta=c.beta, dead_code_steps=c.dead_code_steps)
        self.decoder = Decoder(backbone)

    @property
    def spec(self) -> TokenSpec:
        side = self.config.image_size // self.config.downsample
        return TokenSpec("discrete", (side, side), self.config.downsample, vocab_size=self.config.codebook_size)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    def _check_images(self, images: Tensor) -> None:
        f = self.config.downsample
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(images.shape)}")

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        self._check_images(images)
        q = self.quantize(self.encoder(images))
        return self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tokens:
        self._check_images(images)
        ids = self.quantize(self.encoder(images)).ids
        return Tokens(dataclasses.replace(self.spec, grid=tuple(ids.shape[-2:])), ids=ids)

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        return self.quantize.ids_to_latents(ids).contiguous()

    def decode(self, tokens: Tokens) -> Tensor:
        latents = tokens.latents if tokens.ids is None else self.ids_to_latents(tokens.ids)
        return self.decoder(latents)
