"""MaskGIT's VQGAN tokenizer as the U-ViT MaskGIT uses it (`vqgan_jax_strongaug.ckpt`: MaskGIT's JAX
VQGAN, google-research/maskgit `nets/vqgan_tokenizer.py`, ported to PyTorch; liebenxj/ReCAP
`examples/MaskGIT+ReCAP/models/vqgan.py`, `models/diffusionmodules/model.py`, `configs/vq-f16-jax.yaml`).

Not taming's VQGAN, although the key names look like it: there is no attention, and

* ResBlock: GroupNorm(32, eps 1e-6), swish, 3x3 conv without bias, twice; when the width changes, a
  1x1 conv without bias is applied to the block's *output* (MaskGIT's JAX ResBlock reassigns x before
  its shortcut), so the block returns h + shortcut(h);
* encoder: 3x3 conv (no bias) to ch, per level `num_res_blocks` ResBlocks, 2x2 average pooling
  between levels, two middle ResBlocks, GroupNorm + swish + 1x1 conv to z (256);
* decoder: 3x3 conv from z, two middle ResBlocks, per level (coarse to fine) `num_res_blocks`
  ResBlocks, nearest x2 upsampling + 3x3 conv between levels, GroupNorm + swish + 3x3 conv to RGB;
* quantizer: the nearest of 1024 codes of width 256 by squared Euclidean distance (taming's
  `VectorQuantizer2`), no normalisation, no quant_conv.

ch 128, ch_mult (1, 1, 2, 2, 4): 16x downsampling, a 16 x 16 grid at 256 px. Module names are the
official ones, so the file (`{"state_dict": state}` or the state itself) loads with no key mapping.

Pixels: the network works on images in [0, 1] (ReCAP saves `decode(ids) * 255`); Tessera's images
are in [-1, 1], so `encode` maps x to (x + 1) / 2 and `decode` returns 2 y - 1 (not clamped).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.hub import HubError, check_state_dict, register_model, register_official
from vision.tokens import Tokens, TokenSpec


@dataclass
class MaskGITVQGANConfig:
    image_size: int = 256  # sets spec.grid; any multiple of the downsampling factor is accepted
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256  # also the code width
    codebook_size: int = 1024
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult:
            raise ValueError("ch_mult needs at least one level")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)  # the official form (F.silu rounds differently)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(out_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return h + (self.nin_shortcut(h) if hasattr(self, "nin_shortcut") else x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(in_ch: int, out_ch: int, blocks: int, groups: int) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(blocks))
    return level


def _middle(width: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResBlock(width, width, groups)
    mid.block_2 = ResBlock(width, width, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, c: MaskGITVQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1, bias=False)
        widths = [c.ch * m for m in c.ch_mult]
        self.down = nn.ModuleList(_level(([c.ch] + widths)[i], w, c.num_res_blocks, c.norm_groups)
                                  for i, w in enumerate(widths))
        self.mid = _middle(widths[-1], c.norm_groups)
        self.norm_out = nn.GroupNorm(c.norm_groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, 2, 2)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: MaskGITVQGANConfig) -> None:
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = _middle(widths[-1], c.norm_groups)
        # up[i] is level i (up[0] the finest), run from the coarsest, as the official list
        levels = []
        width = widths[-1]
        for i in reversed(range(len(widths))):
            level = _level(width, widths[i], c.num_res_blocks, c.norm_groups)
            width = widths[i]
            if i != 0:
                level.upsample = Upsample(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(c.norm_groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class NearestCode(nn.Module):
    """The nearest code by squared Euclidean distance (inference only)."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def ids(self, z: Tensor) -> Tensor:
        """z (B, dim, h, w) -> ids (B, h, w)."""
        flat = z.movedim(1, -1).reshape(-1, z.shape[1])
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        return dist.argmin(1).view(z.shape[0], *z.shape[2:])

    def latents(self, ids: Tensor) -> Tensor:
        return self.embedding(ids.long()).movedim(-1, 1)


@register_model("maskgit-vqgan")
class MaskGITVQGAN(nn.Module):
    """Encode images in [-1, 1] to ids (B, h, w); decode ids to images in about [-1, 1]."""

    config_class = MaskGITVQGANConfig
    kind = "tokenizer"

    def __init__(self, config: MaskGITVQGANConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = NearestCode(c.codebook_size, c.z_channels)

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        side = c.image_size // c.downsample
        return TokenSpec(kind="discrete", grid=(side, side), downsample=c.downsample, vocab_size=c.codebook_size)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tokens:
        f, cin = self.config.downsample, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != cin or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"expected images (B, {cin}, H, W) with H, W multiples of {f}, got {tuple(images.shape)}")
        ids = self.quantize.ids(self.encoder((images + 1) / 2))
        return Tokens(dataclasses.replace(self.spec, grid=tuple(ids.shape[-2:])), ids=ids)

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """ids (B, h, w) -> codes (B, z_channels, h, w)."""
        return self.quantize.latents(ids.to(self.quantize.embedding.weight.device))

    def decode(self, tokens: Tokens) -> Tensor:
        if tokens.ids is not None:
            latents = self.ids_to_latents(tokens.ids)
        elif tokens.latents is not None:
            latents = tokens.latents
        else:
            raise ValueError("MaskGIT's VQGAN decodes Tokens with ids (or latents)")
        return self.decoder(latents) * 2 - 1


# ---------------------------------------------------------------------------------------------
# the released file
# ---------------------------------------------------------------------------------------------

_SIGNATURE = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight",
              "encoder.mid.block_2.conv2.weight", "quantize.embedding.weight")


def _state_of(obj: Any) -> dict | None:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj if isinstance(obj, dict) else None


def recognise(obj: Any) -> bool:
    """MaskGIT's layout: taming-like names, but no attention, no quant_conv, and bias-free ResBlock convs."""
    state = _state_of(obj)
    return (state is not None and all(isinstance(state.get(k), Tensor) for k in _SIGNATURE)
            and "quant_conv.weight" not in state and "encoder.mid.attn_1.q.weight" not in state
            and "encoder.down.0.block.0.conv1.bias" not in state)


def official_config(state: dict, source: str) -> MaskGITVQGANConfig:
    def count(pattern: str) -> int:
        found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
        return 1 + max(found) if found else 0

    try:
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = count(r"encoder\.down\.(\d+)\.")
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        codebook_size, dim = state["quantize.embedding.weight"].shape
        z_channels = state["encoder.conv_out.weight"].shape[0]
        out_channels = state["decoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise HubError(f"{source}: not a MaskGIT VQGAN state dict ({e})") from None
    if dim != z_channels:
        raise HubError(f"{source}: codes of width {dim} but a {z_channels}-channel latent (no quant_conv to map them)")
    try:
        return MaskGITVQGANConfig(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                                  num_res_blocks=count(r"encoder\.down\.0\.block\.(\d+)\."), z_channels=z_channels,
                                  codebook_size=codebook_size)
    except ValueError as e:
        raise HubError(f"{source}: not a MaskGIT VQGAN architecture Tessera builds ({e})") from None


def from_official(obj: Any, path: str | Path) -> MaskGITVQGAN:
    """Build the tokenizer from `vqgan_jax_strongaug.ckpt` (already read with weights_only=True)."""
    source = Path(path).name
    state = _state_of(obj)
    if state is None:
        raise HubError(f"{source}: not a MaskGIT VQGAN checkpoint")
    config = official_config(state, source)
    with torch.device("meta"):  # every weight comes from the file
        model = MaskGITVQGAN(config)
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval()


register_official("maskgit-vqgan", kind="tokenizer", recognise=recognise, load=from_official)
