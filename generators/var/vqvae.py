"""VAR's multi-scale residual VQVAE (Tian et al., NeurIPS 2024, "Visual Autoregressive Modeling:
Scalable Image Generation via Next-Scale Prediction").

Follows FoundationVision/VAR, ``models/vqvae.py`` (``VQVAE``), ``models/quant.py``
(``VectorQuantizer2``, ``Phi``, ``PhiPartiallyShared``) and ``models/basic_vae.py`` (the
taming / latent-diffusion Encoder and Decoder):

- encoder: 3x3 conv to ``ch``; per level ``num_res_blocks`` ResnetBlocks (GroupNorm(32, eps 1e-6),
  swish, 3x3 conv, twice; a 1x1 ``nin_shortcut`` when the width changes), single-head attention
  after each block of the coarsest level (``using_sa``), a stride-2 3x3 conv after one zero
  row/column at the bottom/right between levels; middle block, attention (``using_mid_sa``),
  block; GroupNorm + swish + 3x3 conv to ``z_channels`` (Cvae). The decoder mirrors it with
  ``num_res_blocks + 1`` blocks per level and nearest x2 upsampling + 3x3 conv.
- ``quant_conv`` / ``post_quant_conv``: 3x3 convs Cvae -> Cvae around the quantizer.
- the quantizer, one codebook (V x Cvae) shared by all scales ``patch_nums`` (pn_1 < ... < pn_K,
  pn_K the latent side). Encoding keeps a residual ``r = f`` and ``f_hat = 0``; for each scale k:
  area-downsample ``r`` to pn_k (not at the last scale), take the nearest code of each position
  (squared L2; cosine with ``using_znorm``), bicubic-upsample the codes to the full grid (not at the
  last scale), apply ``phi_k(h) = (1 - q) h + q conv3x3(h)`` (q = ``quant_resi``, 0.5), add to
  ``f_hat`` and subtract from ``r``. ``share_quant_resi`` = 4 phis serve all K scales: scale k uses
  the one whose tick is nearest k / (K - 1), the ticks being ``linspace(1/(3n), 1 - 1/(3n), n)``
  for n = 4 phis and ``linspace(1/(2n), 1 - 1/(2n), n)`` otherwise (1: one phi; 0: one per scale).
- training (``forward``): the loss is the mean over scales of
  ``beta * mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f))`` (f_hat_k the running sum after scale k; the
  second term trains the codebook and the phis), and the decoder sees ``f_hat`` with the identity
  gradient to ``f`` (straight through). ``ema_vocab_hit_SV`` keeps an EMA of per-scale code hits.
  Officially it is updated only under torch.distributed; here in every training step (summed over
  processes when distributed), with the official schedule (copy, then 0.9, after 100 updates 0.99).
- VAR's transformer reads the tokenizer through ``embed_ids``, ``scales_to_var_input`` (the
  official ``idxBl_to_var_input``: teacher-forced inputs of scales 2..K, ``area(f_hat_k -> pn_{k+1})``
  flattened), ``next_autoregressive_input`` (``get_next_autoregressive_input``), ``scales_to_fhat``
  (``embed_to_fhat``) and ``fhat_to_images`` (``fhat_to_img``, clamped to [-1, 1]). The VQVAE is
  frozen while VAR uses it (officially ``test_mode``), so these run without autograd.
  ``scales_to_var_input`` and ``scales_to_fhat`` also take the first n < K scales only (what CoDe's
  refiner rebuilds); given every scale they are the official functions.

Differences from the official code, none of which changes what a released file computes: the
straight-through value is exactly ``f_hat`` (``tokenizers.quantizers.straight_through``; the official
``(f_hat - f) + f`` is off by an ulp, which moves a training reconstruction by ~1e-5), and two training
aids are off by default: ``eini`` (the official but unused ``VectorQuantizer2.eini`` codebook init)
and ``dead_code_steps`` (restart codes no scale chose for that many steps on a random lookup input;
without it the codebook collapses on MNIST).

Module and parameter names are the official ones, so the released ``vae_ch160v4096z32.pth`` (a plain
state dict, 324 keys) loads with no renaming through :func:`from_official` (registered with the hub:
every app takes the file by path). Token layout: ``Tokens.scale_ids``, one ``(B, pn, pn)`` int64
tensor per scale; images must be exactly ``image_size`` (``patch_nums[-1] * downsample``) square.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers.quantizers import QuantizerOutput, straight_through
from vision.errors import ConfigError
from vision.hub import HubError, check_state_dict, load_official_state_dict, register_model, register_official
from vision.tokens import Tokens, TokenSpec

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass
class VARVQVAEConfig:
    vocab_size: int = 4096  # V
    z_channels: int = 32  # Cvae, the codebook dimension
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    using_sa: bool = True  # attention after each block of the coarsest level
    using_mid_sa: bool = True  # attention in the middle
    in_channels: int = 3
    norm_groups: int = 32  # official: GroupNorm(32) everywhere (narrow test models lower it)
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    image_size: int = 256  # must be patch_nums[-1] * downsample
    beta: float = 0.25  # commitment weight
    using_znorm: bool = False  # cosine instead of L2 nearest-code lookup
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # phi(h) = (1 - |q|) h + |q| conv(h); |q| <= 1e-6: phi is the identity
    share_quant_resi: int = 4  # 0: one phi per scale, 1: one phi for all, n > 1: n partially shared phis
    default_qresi_counts: int = 0  # share_quant_resi 0: how many phis (0: one per scale)
    test_mode: bool = True  # official: built frozen (eval, no gradients); training configs set False
    # training aids, not in the official model (their defaults change nothing):
    eini: float = 0.0  # official VectorQuantizer2.eini: > 0 trunc-normal std, < 0 uniform +-|eini|/V, 0 N(0, 1)
    dead_code_steps: int = 0  # > 0: a code no scale chose for this many training steps restarts on a latent

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"ch_mult needs at least one level, each >= 1, got {self.ch_mult}")
        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "in_channels", "norm_groups",
                     "quant_conv_ks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.quant_conv_ks % 2 == 0:
            raise ConfigError(f"quant_conv_ks must be odd (same-size conv), got {self.quant_conv_ks}")
        for width in sorted({self.ch * m for m in (1, *self.ch_mult)}):
            if width % self.norm_groups:
                raise ConfigError(f"width {width} is not divisible by norm_groups {self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        pn = self.patch_nums
        if len(pn) < 2 or min(pn) < 1 or any(b <= a for a, b in zip(pn, pn[1:])):
            raise ConfigError(f"patch_nums must be at least two strictly increasing sides >= 1, got {pn}")
        if self.image_size != pn[-1] * self.downsample:
            raise ConfigError(f"image_size {self.image_size} must be patch_nums[-1] x downsample = "
                              f"{pn[-1]} x {self.downsample} = {pn[-1] * self.downsample}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if not abs(self.quant_resi) <= 1:
            raise ConfigError(f"quant_resi must be in [-1, 1], got {self.quant_resi}")
        if not math.isfinite(self.eini):
            raise ConfigError(f"eini must be finite, got {self.eini}")
        if self.share_quant_resi < 0 or self.default_qresi_counts < 0 or self.dead_code_steps < 0:
            raise ConfigError(f"share_quant_resi, default_qresi_counts and dead_code_steps must be >= 0, got "
                              f"{self.share_quant_resi}, {self.default_qresi_counts} and {self.dead_code_steps}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VAR_VQVAE_CONFIGS: dict[str, VARVQVAEConfig] = {
    # the released vae_ch160v4096z32.pth (models/__init__.py: build_vae_var)
    "var-vae-f16": VARVQVAEConfig(),
    # 32x32 MNIST digits, 8x8 latent in 6 scales; small enough to train on a CPU. Without restarts the
    # codebook collapses on MNIST (a 150-step probe: 6% of the codes in use, 99% with dead_code_steps 20)
    "var-vae-mnist": VARVQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                    using_sa=False, using_mid_sa=True, norm_groups=16, patch_nums=(1, 2, 3, 4, 6, 8),
                                    image_size=32, test_mode=False, dead_code_steps=20),
}


def var_vqvae_config(name: str, **overrides: Any) -> VARVQVAEConfig:
    """A copy of a named configuration, with optional field overrides (ConfigError on a bad field)."""
    if name not in VAR_VQVAE_CONFIGS:
        raise ValueError(f"unknown VAR VQVAE configuration {name!r}; known: {', '.join(VAR_VQVAE_CONFIGS)}")
    return dataclasses.replace(VAR_VQVAE_CONFIGS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# encoder and decoder (taming / latent-diffusion layout, official module names)
# ---------------------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v from one 1x1 conv (``qkv``), residual output."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, height * width).unbind(1)  # each (B, C, N)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # (B, query, key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` (ResnetBlocks), ``attn`` (one after each block, or empty), and
    ``downsample`` / ``upsample`` set by the owner where there is one."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, attention: bool, dropout: float, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(blocks):
            self.block.append(ResnetBlock(in_ch, out_ch, dropout, groups))
            in_ch = out_ch
            if attention:
                self.attn.append(AttnBlock(out_ch, groups))

    def run(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, width: int, attention: bool, dropout: float, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(width, width, dropout, groups)
        self.attn_1 = AttnBlock(width, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(width, width, dropout, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: VARVQVAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, last = c.ch, len(c.ch_mult) - 1
        for i, mult in enumerate(c.ch_mult):
            level = _Level(width, c.ch * mult, c.num_res_blocks, i == last and c.using_sa, c.dropout, c.norm_groups)
            width = c.ch * mult
            if i != last:
                level.downsample = Downsample2x(width)
            self.down.append(level)
        self.mid = _Middle(width, c.using_mid_sa, c.dropout, c.norm_groups)
        self.norm_out = _norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: VARVQVAEConfig) -> None:
        super().__init__()
        last = len(c.ch_mult) - 1
        width = c.ch * c.ch_mult[last]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = _Middle(width, c.using_mid_sa, c.dropout, c.norm_groups)
        levels = []  # built coarse to fine; stored fine to coarse (up[0] is the full resolution), as officially
        for i in reversed(range(len(c.ch_mult))):
            level = _Level(width, c.ch * c.ch_mult[i], c.num_res_blocks + 1, i == last and c.using_sa, c.dropout,
                           c.norm_groups)
            width = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample2x(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, c.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# the multi-scale residual quantizer
# ---------------------------------------------------------------------------------------------


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class QuantResi(nn.Module):
    """The phis and which one serves scale k of K (official PhiShared / PhiPartiallyShared / PhiNonShared).

    Parameter names follow the official classes: ``qresi.*`` (one shared phi), ``qresi_ls.i.*``
    (partially shared), ``i.*`` (one per scale). Scale k takes the phi whose tick is nearest k / (K - 1).
    """

    def __init__(self, channels: int, ratio: float, share: int, count: int) -> None:
        super().__init__()

        def make() -> nn.Module:
            return Phi(channels, ratio) if abs(ratio) > 1e-6 else nn.Identity()

        self.share = share
        if share == 1:
            self.qresi = make()
            n = 1
        elif share == 0:
            n = count
            for i in range(n):
                self.add_module(str(i), make())
        else:
            n = share
            self.qresi_ls = nn.ModuleList(make() for _ in range(n))
        self.ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)

    def index(self, k: int, num_scales: int) -> int:
        if self.share == 1:
            return 0
        return int(np.argmin(np.abs(self.ticks - k / (num_scales - 1))))

    def at(self, k: int, num_scales: int) -> nn.Module:
        i = self.index(k, num_scales)
        if self.share == 1:
            return self.qresi
        return self.qresi_ls[i] if self.share > 1 else getattr(self, str(i))

    def extra_repr(self) -> str:
        return f"ticks={self.ticks.tolist()}"


class MultiScaleQuantizer(nn.Module):
    """VAR's residual quantizer over ``patch_nums`` (official ``VectorQuantizer2``): see the module docstring.

    Works on latents ``f`` (B, Cvae, H, W) with H = W = ``patch_nums[-1]``; ids per scale are (B, pn, pn).
    """

    def __init__(self, c: VARVQVAEConfig) -> None:
        super().__init__()
        self.vocab_size, self.dim, self.beta, self.using_znorm = c.vocab_size, c.z_channels, c.beta, c.using_znorm
        self.patch_nums = c.patch_nums
        self.quant_resi = QuantResi(c.z_channels, c.quant_resi, c.share_quant_resi,
                                    c.default_qresi_counts or len(c.patch_nums))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(c.patch_nums), c.vocab_size))
        self.record_hit = 0  # EMA updates so far (not saved, as officially)
        self.embedding = nn.Embedding(c.vocab_size, c.z_channels)
        if not self.embedding.weight.is_meta:
            with torch.no_grad():
                if c.eini > 0:
                    nn.init.trunc_normal_(self.embedding.weight, std=c.eini)
                elif c.eini < 0:
                    self.embedding.weight.uniform_(-abs(c.eini) / c.vocab_size, abs(c.eini) / c.vocab_size)
        self.dead_code_steps = c.dead_code_steps
        # training steps since each code was last chosen at any scale (not saved: not an official weight)
        self.register_buffer("steps_unused", torch.zeros(c.vocab_size, dtype=torch.long), persistent=False)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    # ------------------------------------------------------------------ the pieces

    def nearest(self, z: Tensor) -> Tensor:
        """ids (N,) of the nearest code of each row of z (N, Cvae), as the official lookup computes it."""
        e = self.embedding.weight.detach()
        z = z.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(e.T, dim=0), dim=1)
        d = z.square().sum(1, keepdim=True) + e.square().sum(1)
        return d.addmm_(z, e.T, alpha=-2, beta=1).argmin(1)

    def embed(self, ids: Tensor) -> Tensor:
        """ids (B, h, w) -> codes (B, Cvae, h, w), laid out as the official decoding paths make them (a
        transposed view of the (B, h*w, Cvae) lookup; see :meth:`lift` on why the layout matters)."""
        B, h, w = ids.shape
        return self.embedding(ids.reshape(B, h * w)).transpose(1, 2).view(B, self.dim, h, w)

    def _embed_encoding(self, ids: Tensor) -> Tensor:
        """The same codes laid out as the official encoding paths make them (a permuted (B, h, w, Cvae) lookup)."""
        return self.embedding(ids).permute(0, 3, 1, 2)

    def lift(self, h: Tensor, k: int, *, contiguous: bool = False) -> Tensor:
        """Scale k's codes (B, Cvae, pn_k, pn_k) -> their contribution to f_hat: bicubic to the full grid
        (except at the last scale), then phi_k.

        The codes come as a strided view of the lookup (as every official path makes them); encoding and
        training make them contiguous before phi, the other official paths do not. The memory layout picks
        the interpolation and convolution kernels, whose rounding differs, so each path keeps its official
        layout and reproduces the official values bit for bit on CPU (the layouts agree to ~1e-6).
        """
        side = self.patch_nums[-1]
        if k != self.num_scales - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.quant_resi.at(k, self.num_scales)(h.contiguous() if contiguous else h)

    def _downsample(self, f: Tensor, k: int) -> Tensor:
        pn = self.patch_nums[k]
        return f if k == self.num_scales - 1 else F.interpolate(f, size=(pn, pn), mode="area")

    def _check_latents(self, f: Tensor) -> None:
        side = self.patch_nums[-1]
        if f.ndim != 4 or f.shape[1] != self.dim or tuple(f.shape[-2:]) != (side, side):
            raise ValueError(f"expected latents (B, {self.dim}, {side}, {side}), got {tuple(f.shape)}")

    def check_scale_ids(self, scale_ids: Sequence[Tensor], *, allow_prefix: bool = False) -> list[Tensor]:
        """(B, pn, pn) ids (or (B, pn*pn), official idx_Bl) for the first n scales -> (B, pn, pn) int64."""
        n, K = len(scale_ids), self.num_scales
        if not (1 <= n <= K) or (n != K and not allow_prefix):
            raise ValueError(f"expected ids for {'1 to ' if allow_prefix else ''}{K} scales, got {n}")
        out = []
        for k, ids in enumerate(scale_ids):
            pn = self.patch_nums[k]
            if ids.ndim == 2 and ids.shape[1] == pn * pn:
                ids = ids.reshape(ids.shape[0], pn, pn)
            if ids.ndim != 3 or tuple(ids.shape[1:]) != (pn, pn) or ids.shape[0] != scale_ids[0].shape[0]:
                raise ValueError(f"scale {k}: expected ids (B, {pn}, {pn}), got {tuple(ids.shape)}")
            out.append(ids.long())
        return out

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode(self, f: Tensor) -> list[Tensor]:
        """Latents (B, Cvae, H, W) -> ids (B, pn, pn) per scale (official ``f_to_idxBl_or_fhat``)."""
        self._check_latents(f)
        f = f.float()
        rest, out = f.clone(), []
        for k, pn in enumerate(self.patch_nums):
            z = self._downsample(rest, k)
            ids = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, self.dim)).view(f.shape[0], pn, pn)
            rest.sub_(self.lift(self._embed_encoding(ids), k, contiguous=True))
            out.append(ids)
        return out

    def ids_to_fhat(self, scale_ids: Sequence[Tensor]) -> Tensor:
        """Sum of the lifted codes of the given scales (a prefix of them is allowed): (B, Cvae, H, W)."""
        ids = self.check_scale_ids(scale_ids, allow_prefix=True)
        side = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(ids[0].shape[0], self.dim, side, side, dtype=torch.float32)
        for k, ids_k in enumerate(ids):
            f_hat = f_hat + self.lift(self.embed(ids_k), k)
        return f_hat

    # ------------------------------------------------------------------ VAR's view

    def var_input(self, scale_ids: Sequence[Tensor]) -> Tensor:
        """Official ``idxBl_to_var_input``: ``area(f_hat_k -> pn_{k+1})`` flattened, for k = 1..min(n, K-1)
        with n the number of scales given: (B, sum of pn_{k+1}^2, Cvae)."""
        ids = self.check_scale_ids(scale_ids, allow_prefix=True)
        B, side = ids[0].shape[0], self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.dim, side, side, dtype=torch.float32)
        inputs = []
        for k in range(min(len(ids), self.num_scales - 1)):
            f_hat = f_hat + self.lift(self.embed(ids[k]), k)
            pn = self.patch_nums[k + 1]
            inputs.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(inputs, 1) if inputs else f_hat.new_zeros(B, 0, self.dim)

    def next_input(self, k: int, f_hat: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor]:
        """Official ``get_next_autoregressive_input``: f_hat += lift(h, k); the next input is
        ``area(f_hat -> pn_{k+1})``, at the last scale f_hat itself. f_hat is not modified in place."""
        K = self.num_scales
        if not 0 <= k < K:
            raise ValueError(f"scale index must be in [0, {K}), got {k}")
        pn, side = self.patch_nums[k], self.patch_nums[-1]
        if h.ndim != 4 or tuple(h.shape[1:]) != (self.dim, pn, pn):
            raise ValueError(f"scale {k}: expected codes (B, {self.dim}, {pn}, {pn}), got {tuple(h.shape)}")
        if f_hat is None:
            f_hat = h.new_zeros(h.shape[0], self.dim, side, side, dtype=torch.float32)
        elif tuple(f_hat.shape) != (h.shape[0], self.dim, side, side):
            raise ValueError(f"expected f_hat (B, {self.dim}, {side}, {side}), got {tuple(f_hat.shape)}")
        f_hat = f_hat + self.lift(h, k)
        if k == K - 1:
            return f_hat, f_hat
        nxt = self.patch_nums[k + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")

    # ------------------------------------------------------------------ training

    def forward(self, f: Tensor) -> QuantizerOutput:
        """Official ``VectorQuantizer2.forward``: f_hat straight through to f, the mean multi-scale vq loss,
        ids (B, L) of every scale concatenated (scale order, row-major) and usage metrics."""
        self._check_latents(f)
        with torch.autocast(f.device.type, enabled=False):
            f32 = f.float()
            target = f32.detach()
            rest = target.clone()
            f_hat = torch.zeros_like(target)
            loss = f32.new_zeros(())
            hits = torch.zeros(self.vocab_size, device=f.device)
            all_ids, inputs = [], []
            for k, pn in enumerate(self.patch_nums):
                z = self._downsample(rest, k)
                z = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
                inputs.append(z)
                ids = self.nearest(z)
                hit = ids.bincount(minlength=self.vocab_size).float()
                if self.training and dist.is_available() and dist.is_initialized():
                    dist.all_reduce(hit)
                h = self.lift(self._embed_encoding(ids.view(f.shape[0], pn, pn)), k, contiguous=True)
                f_hat = f_hat + h
                rest = rest - h.detach()
                if self.training:
                    self._record(k, hit)
                hits += hit
                all_ids.append(ids.view(f.shape[0], -1))
                loss = loss + F.mse_loss(f_hat.detach(), f32) * self.beta + F.mse_loss(f_hat, target)
            loss = loss / self.num_scales
            quantized = straight_through(f_hat, f32)
        if self.training and self.dead_code_steps > 0:
            self._restart_dead_codes(hits, torch.cat(inputs))
        with torch.no_grad():
            p = hits / hits.sum().clamp(min=1)
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            margin = world * (f.numel() / f.shape[1]) / self.vocab_size * 0.08  # official usage threshold
            metrics = {
                "vq": loss.item(),
                "utilisation": (hits > 0).float().mean().item(),
                "perplexity": torch.exp(-(p * p.clamp(min=1e-12).log()).sum()).item(),
                "utilisation_ema": (self.ema_vocab_hit_SV >= margin).float().mean().item(),
            }
        return QuantizerOutput(quantized.to(f.dtype), torch.cat(all_ids, 1), {"vq": loss}, metrics)

    @torch.no_grad()
    def _record(self, k: int, hit: Tensor) -> None:
        row = self.ema_vocab_hit_SV[k]
        if self.record_hit == 0:
            row.copy_(hit)
        elif self.record_hit < 100:
            row.mul_(0.9).add_(hit * 0.1)
        else:
            row.mul_(0.99).add_(hit * 0.01)
        self.record_hit += 1

    @torch.no_grad()
    def _restart_dead_codes(self, hits: Tensor, inputs: Tensor) -> None:
        """Codes unused for dead_code_steps steps take random rows of this step's lookup inputs (residuals of
        every scale); every process gets rank 0's rows. Runs after the lookup, so this step's ids stay valid."""
        self.steps_unused.add_(1).masked_fill_(hits > 0, 0)
        dead = self.steps_unused >= self.dead_code_steps
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        new = inputs[torch.randint(inputs.shape[0], (num_dead,), device=inputs.device)].to(self.embedding.weight)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, src=0)
        self.embedding.weight.data[dead] = new
        self.steps_unused[dead] = 0

    def extra_repr(self) -> str:
        return (f"patch_nums={self.patch_nums}, vocab_size={self.vocab_size}, dim={self.dim}, beta={self.beta}, "
                f"using_znorm={self.using_znorm}")


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------


@register_model("var-vqvae")
class MultiScaleVQVAE(nn.Module):
    """VAR's VQVAE: ``encode`` images in [-1, 1] to one (B, pn, pn) id map per scale, ``decode`` them back."""

    config_class = VARVQVAEConfig
    kind = "tokenizer"

    def __init__(self, config: VARVQVAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = MultiScaleQuantizer(c)
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, c.quant_conv_ks, padding=c.quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, c.quant_conv_ks, padding=c.quant_conv_ks // 2)
        if c.test_mode:
            self.eval()
            self.requires_grad_(False)

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        side = c.patch_nums[-1]
        return TokenSpec("discrete", (side, side), c.downsample, vocab_size=c.vocab_size, scales=c.patch_nums)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def last_layer(self) -> Tensor:
        """The weight VQGAN's adaptive GAN weight differentiates against (``decoder.conv_out.weight``)."""
        return self.decoder.conv_out.weight

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"expected images (B, {c.in_channels}, {c.image_size}, {c.image_size}) (the scales "
                             f"{c.patch_nums} fix the size), got {tuple(images.shape)}")

    def latents(self, images: Tensor) -> Tensor:
        """Encoder + quant_conv: f (B, Cvae, pn_K, pn_K)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Training pass (official ``VQVAE.forward``): the unclamped reconstruction and the quantizer output."""
        q = self.quantize(self.latents(images))
        return self.decoder(self.post_quant_conv(q.quantized)), q

    # ----------------------------------------------------------------- Tokenizer protocol

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tokens:
        return Tokens(self.spec, scale_ids=self.quantize.encode(self.latents(images)))

    def decode(self, tokens: Tokens) -> Tensor:
        """Images clamped to [-1, 1] (official ``fhat_to_img``) from the ids of every scale, or from
        ``tokens.latents`` when given: the accumulated f_hat a sampler produced itself (VAR's ``more_smooth``
        Gumbel-softmax mixes codes, so its f_hat is not the sum of the hard ids' codes)."""
        if tokens.latents is not None:
            return self.fhat_to_images(tokens.latents)
        if tokens.scale_ids is None:
            raise ValueError("VAR's VQVAE decodes Tokens with scale_ids (one id map per scale)")
        return self.fhat_to_images(self.scales_to_fhat(tokens.scale_ids))

    # ----------------------------------------------------------------- what VAR's transformer uses

    @torch.no_grad()
    def embed_ids(self, ids: Tensor) -> Tensor:
        """Codebook lookup: ids (B, pn, pn) (or (B, pn*pn)) -> codes (B, Cvae, pn, pn)."""
        if ids.ndim == 2:
            pn = math.isqrt(ids.shape[1])
            if pn * pn != ids.shape[1]:
                raise ValueError(f"expected ids (B, pn, pn) or (B, pn*pn), got {tuple(ids.shape)}")
            ids = ids.reshape(ids.shape[0], pn, pn)
        if ids.ndim != 3:
            raise ValueError(f"expected ids (B, pn, pn) or (B, pn*pn), got {tuple(ids.shape)}")
        return self.quantize.embed(ids.long())

    @torch.no_grad()
    def scales_to_var_input(self, scale_ids: Sequence[Tensor]) -> Tensor:
        """Teacher-forced inputs of scales 2..K (official ``idxBl_to_var_input``): (B, L - pn_1^2, Cvae).
        Given the first n < K scales only, the inputs of scales 2..n+1."""
        return self.quantize.var_input(scale_ids)

    @torch.no_grad()
    def next_autoregressive_input(self, k: int, f_hat: Tensor | None, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """After sampling scale k with codes h_BChw (B, Cvae, pn_k, pn_k): (f_hat, the input of scale k+1 as
        (B, Cvae, pn_{k+1}, pn_{k+1})); at the last scale the input is f_hat itself. f_hat None: zeros."""
        return self.quantize.next_input(k, f_hat, h_BChw)

    @torch.no_grad()
    def scales_to_fhat(self, scale_ids: Sequence[Tensor]) -> Tensor:
        """f_hat (B, Cvae, pn_K, pn_K) from the ids of every scale (or of the first n)."""
        return self.quantize.ids_to_fhat(scale_ids)

    def fhat_to_images(self, f_hat: Tensor) -> Tensor:
        """Decoder on f_hat, clamped to [-1, 1] (official ``fhat_to_img``)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# official checkpoints
# ---------------------------------------------------------------------------------------------

# what identifies VAR's VQVAE: taming-style names plus the multi-scale quantizer's hit log
_SIGNATURE = ("quantize.ema_vocab_hit_SV", "quantize.embedding.weight", "encoder.conv_in.weight",
              "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight", "quant_conv.weight",
              "post_quant_conv.weight")


def recognise_official(obj: Any) -> bool:
    """Whether `obj` (what torch.load gave for a file) is a VAR VQVAE state dict."""
    return isinstance(obj, dict) and all(isinstance(obj.get(k), Tensor) for k in _SIGNATURE)


def official_config(state: dict, patch_nums: Sequence[int] | None = None,
                    source: str = "checkpoint") -> VARVQVAEConfig:
    """The architecture of an official state dict, from its key names and shapes; what the file cannot tell
    (quant_resi's ratio, beta, dropout) takes the official defaults. patch_nums: the file only holds their
    count (``ema_vocab_hit_SV``); the official ones are assumed when the count matches, else pass them."""

    def shape(key: str) -> tuple[int, ...]:
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise HubError(f"{source}: not a VAR VQVAE checkpoint (no tensor {key!r})")
        return tuple(value.shape)

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for k in state if isinstance(k, str) and (m := re.fullmatch(pattern, k))}
        return 1 + max(found) if found else 0

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count(r"encoder\.down\.(\d+)\..*")
    blocks = count(r"encoder\.down\.0\.block\.(\d+)\..*")
    if levels == 0 or blocks == 0:
        raise HubError(f"{source}: not a VAR VQVAE checkpoint (no 'encoder.down.0.block.0.*' weights)")
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    vocab_size, z_channels = shape("quantize.embedding.weight")
    num_scales = shape("quantize.ema_vocab_hit_SV")[0]
    if patch_nums is None:
        if num_scales != len(OFFICIAL_PATCH_NUMS):
            raise HubError(f"{source}: the file was trained with {num_scales} scales, not the official "
                           f"{len(OFFICIAL_PATCH_NUMS)}; pass its patch_nums")
        patch_nums = OFFICIAL_PATCH_NUMS
    patch_nums = tuple(int(p) for p in patch_nums)
    shared_ls, shared_one, per_scale = (count(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight"),
                                        "quantize.quant_resi.qresi.weight" in state,
                                        count(r"quantize\.quant_resi\.(\d+)\.weight"))
    if shared_ls:
        phis = dict(share_quant_resi=shared_ls)
    elif shared_one:
        phis = dict(share_quant_resi=1)
    elif per_scale:
        phis = dict(share_quant_resi=0, default_qresi_counts=per_scale)
    else:  # no phi weights: the identity phi (quant_resi 0)
        phis = dict(quant_resi=0.0)
    try:
        return VARVQVAEConfig(
            vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
            using_sa=f"encoder.down.{levels - 1}.attn.0.qkv.weight" in state,
            using_mid_sa="encoder.mid.attn_1.qkv.weight" in state, in_channels=in_channels,
            patch_nums=patch_nums, image_size=patch_nums[-1] * 2 ** (levels - 1),
            quant_conv_ks=shape("quant_conv.weight")[-1], test_mode=True, **phis)
    except ConfigError as e:
        raise HubError(f"{source}: not a VAR VQVAE architecture Tessera builds ({e})") from None


def from_official(path_or_state: str | os.PathLike | dict, *, patch_nums: Sequence[int] | None = None,
                  source: str | None = None) -> MultiScaleVQVAE:
    """Load the official VQVAE (``vae_ch160v4096z32.pth``, a plain state dict) or what torch.load gave for it.

    The architecture comes from the keys and shapes (see :func:`official_config`); every key must map to a
    weight of the same shape and every weight must be given, else HubError naming the key. The model is
    built frozen and in eval mode (official ``test_mode``); its float32 weights are the file's tensors.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = source or str(path_or_state)
        path_or_state = load_official_state_dict(path_or_state)
    source = source or "official VAR VQVAE state dict"
    if not isinstance(path_or_state, dict):
        raise HubError(f"{source}: not a VAR VQVAE checkpoint (expected a state dict)")
    state = path_or_state
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise HubError(f"{source}: {not_tensors[0]!r} is not a tensor; not a VAR VQVAE state dict")
    config = official_config(state, patch_nums, source)
    with torch.device("meta"):  # every weight comes from the file: skip the random initialisation
        model = MultiScaleVQVAE(config)
    check_state_dict(model.state_dict(), state, source)  # the official names are the module's own
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    model.quantize.steps_unused = torch.zeros_like(model.quantize.steps_unused, device="cpu")  # not in the file
    model.requires_grad_(False)
    return model.eval()


def _load_official(obj: Any, path: Path) -> MultiScaleVQVAE:
    return from_official(obj, source=str(path))


register_official("var-vqvae", kind="tokenizer", recognise=recognise_official, load=_load_official)
