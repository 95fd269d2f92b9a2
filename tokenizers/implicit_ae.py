"""The first stage of arbitrary-scale latent diffusion: a plain convolutional autoencoder whose decoder is
an implicit neural decoder (a convolutional trunk + LIIF), so a latent renders at any output size.

Kim & Kim, "Arbitrary-Scale Image Generation and Upsampling using Latent Diffusion Model and Implicit
Neural Decoder" (CVPR 2024); official code github.com/zhenshij/arbitrary-scale-diffusion,
``ldm/models/firststagemodel.py`` (``FirstStageModel``, ``IND``) and ``ldm/modules/losses/encoderloss.py``.

- encoder: ``Sequential(Encoder, Conv2d(z, z, 1))`` as the official, where ``Encoder`` is the LDM encoder
  (diffusers' ``Encoder`` here: conv_in; per level ``num_res_blocks`` GroupNorm/SiLU ResnetBlocks and a
  stride-2 conv after a zero row/column at the bottom/right, except the last level; middle block; GroupNorm,
  SiLU, conv to ``z_channels``; ``double_z=False``). Deterministic: no posterior, no quantiser, no KL.
- decoder: :class:`vision.decoders.liif.LIIF` with the ``"ind"`` encoder (:mod:`vision.decoders.ind`: the LDM
  decoder without upsampling or output tail), ``cell_decode``, ``local_ensemble``, and (official) no
  ``feat_unfold``. Its feature map has ``ch * ch_mult[0]`` channels at the latent's resolution.
- training (``reconstruction_loss``): per batch one target size ``gt = int(uniform(low, high))``
  (:meth:`ImplicitAutoencoder.random_target_size`), target ``F.interpolate(images, gt, 'bicubic')``
  (align_corners False, no antialias), L1 between it and the decoder's render at that size. The encoder always
  sees the full image. No perceptual, GAN or KL term.

Scaled down for a CPU (the official DIV2K model: ch 128, ch_mult (1, 2, 4), 2 ResnetBlocks per level,
mid attention, LIIF MLP [256] * 4, 192 px images -> 48x48x3 latents). ``mid_attention`` defaults to False
here. GroupNorm makes every feature depend on the whole latent, so the decoder's tiling (``tile=``) tiles
the queries only (see vision/decoders/ind.py).

Tokens: ``latents`` (B, z_channels, H/f, W/f) = encoder output x ``scaling_factor``; ``decode`` divides
it back out and renders (B, 3, H, W) at any size, unclamped. Under ``torch.no_grad`` the render takes LIIF's
fast grid path; with autograd on it is differentiable (the official code renders eval-mode LIIFs under
no_grad, which the alignment stage has to work around; here the caller chooses).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.decoders.ind import INDConfig
from vision.decoders.liif import LIIF, LIIFConfig
from vision.errors import ConfigError
from vision.hub import register_model
from vision.tokens import Tokens, TokenSpec


@dataclass
class ImplicitAEConfig:
    """A tiny first stage by default (48 px images -> 12x12x3 latents, f = 4)."""

    image_size: int = 48  # native resolution: sets spec.grid; any multiple of f works
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)  # f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1  # encoder ResnetBlocks per level (the decoder trunk has one more)
    z_channels: int = 3
    mid_attention: bool = False  # official configs: True (in both encoder and trunk)
    norm_num_groups: int = 8
    hidden_list: list[int] = field(default_factory=lambda: [64, 64, 64])  # LIIF MLP (official [256] * 4)
    feat_unfold: bool = False  # official: no unfold
    scaling_factor: float = 1.0  # tokens are latents * scaling_factor (official DIV2K: 1.0)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.hidden_list = [int(w) for w in self.hidden_list]
        INDConfig(**self.trunk_args())  # the shared fields (widths, levels, groups) are checked there
        if not self.hidden_list or min(self.hidden_list) < 1:
            raise ConfigError(f"hidden_list needs at least one width, each >= 1, got {self.hidden_list}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ConfigError(f"scaling_factor must be a finite number > 0, got {self.scaling_factor}")
        f = self.downsample
        if self.image_size < f or self.image_size % f:
            raise ConfigError(f"image size {self.image_size} must be a multiple of the model's downsampling factor {f}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def trunk_args(self) -> dict:
        """The INDConfig fields of the decoder trunk (same ch/ch_mult/z as the encoder, as the official ddconfig)."""
        return dict(z_channels=self.z_channels, ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                    norm_num_groups=self.norm_num_groups, mid_attention=self.mid_attention)


def _size_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(int(s) != s or s < 1 for s in pair):
        raise ValueError(f"output size must be a positive int or two positive ints (H, W), got {size}")
    return int(pair[0]), int(pair[1])


@register_model("implicit-ae")
class ImplicitAutoencoder(nn.Module):
    """Autoencoder with an implicit (any-size) decoder: ``encode`` images in [-1, 1] to continuous latents,
    ``decode`` them at any (H, W)."""

    config_class = ImplicitAEConfig
    kind = "tokenizer"
    renders_any_size = True  # decode(tokens, size=(H, W)): apps.generate --size

    def __init__(self, config: ImplicitAEConfig | None = None) -> None:
        super().__init__()
        from diffusers.models.autoencoders.vae import Encoder  # heavy; only when a model is built

        self.config = c = dataclasses.replace(config or ImplicitAEConfig())
        widths = tuple(c.ch * m for m in c.ch_mult)
        self.encoder = nn.Sequential(
            Encoder(in_channels=3, out_channels=c.z_channels, down_block_types=("DownEncoderBlock2D",) * len(widths),
                    block_out_channels=widths, layers_per_block=c.num_res_blocks, norm_num_groups=c.norm_num_groups,
                    act_fn="silu", double_z=False, mid_block_add_attention=c.mid_attention),
            nn.Conv2d(c.z_channels, c.z_channels, 1),
        )
        self.decoder = LIIF(LIIFConfig(encoder="ind", encoder_args=c.trunk_args(), hidden_list=list(c.hidden_list),
                                       out_dim=3, local_ensemble=True, feat_unfold=c.feat_unfold, cell_decode=True))

    # ------------------------------------------------------------ token interface

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def spec(self) -> TokenSpec:
        side = self.config.image_size // self.downsample
        return TokenSpec("continuous", (side, side), self.downsample, channels=self.config.z_channels)

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of f -> scaled latents (B, z, H/f, W/f)
        (differentiable; ``encode`` is the no-grad Tokens form)."""
        f = self.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"expected images (B, 3, H, W) with H, W multiples of {f}, got {tuple(images.shape)}")
        return self.encoder(images) * self.config.scaling_factor

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tokens:
        latents = self.encode_latents(images).contiguous()
        return Tokens(dataclasses.replace(self.spec, grid=tuple(latents.shape[-2:])), latents=latents)

    def decode(
        self,
        tokens_or_latents: Tokens | Tensor,
        size: int | tuple[int, int] | None = None,
        *,
        tile: int | None = None,
        chunk: int | None = None,
        dtype: torch.dtype | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Tokens or scaled latents (B, z, h, w) -> images (B, 3, H, W) at ``size`` = (H, W) (an int: square;
        default (h f, w f)), unclamped. Any H, W >= 1. Under ``torch.no_grad`` LIIF's fast grid path; with
        autograd on, differentiable w.r.t. the latents (and the decoder's weights unless frozen).
        ``tile``/``chunk``/``dtype``/``progress`` go to :meth:`LIIF.decode`."""
        if isinstance(tokens_or_latents, Tokens):
            if tokens_or_latents.latents is None:
                raise ValueError("an implicit autoencoder decodes continuous Tokens (latents), not ids")
            latents = tokens_or_latents.latents
        else:
            latents = tokens_or_latents
        z = self.config.z_channels
        if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != z:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"expected latents (B, {z}, h, w), got {shape}")
        h, w = latents.shape[-2:]
        size = (h * self.downsample, w * self.downsample) if size is None else _size_pair(size)
        if tile is not None and tile < 1:
            raise ValueError(f"tile must be a positive number of latent pixels, got {tile}")
        return self.decoder.decode(latents / self.config.scaling_factor, size, tile=tile, chunk=chunk, dtype=dtype,
                                   progress=progress)

    # ------------------------------------------------------------ training

    def forward(self, images: Tensor, size: int | tuple[int, int]) -> Tensor:
        """Training path: the reconstruction of ``images`` rendered at ``size`` (differentiable)."""
        return self.decode(self.encode_latents(images), size)

    def reconstruction_loss(self, images: Tensor, size: int | tuple[int, int]) -> Tensor:
        """Official first-stage loss: mean |render(size) - bicubic(images, size)| (torch bicubic,
        align_corners False, no antialias; the target is the images themselves at their own size)."""
        size = _size_pair(size)
        if size == tuple(images.shape[-2:]):
            target = images
        else:
            target = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        return (self(images, size) - target).abs().mean()

    @staticmethod
    def random_target_size(generator: torch.Generator | None, low: int, high: int) -> int:
        """Official per-batch target side ``int(random.uniform(low, high))`` (uniform in size; ``high`` is
        effectively exclusive unless low == high), drawn from ``generator``."""
        if low < 1 or high < low:
            raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        return int(low + (high - low) * u)
