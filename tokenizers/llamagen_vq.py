"""LlamaGen's VQ image tokenizer (Sun et al., 2024, "Autoregressive Model Beats Diffusion").

Follows FoundationVision/LlamaGen, ``tokenizer/tokenizer_image/vq_model.py`` (``VQModel``,
``VQ_16`` / ``VQ_8``), a VQGAN (taming-transformers) with a small l2-normalised codebook:

- encoder: 3x3 conv to ``ch``; per level ``num_res_blocks`` ResnetBlocks (GroupNorm(32), swish,
  3x3 conv, twice, biases on; a 1x1 ``nin_shortcut`` when the width changes), self-attention
  after each ResnetBlock of the last (coarsest) level, and between levels a stride-2 3x3 conv
  after padding one zero row/column at the bottom/right; middle ResnetBlock, attention,
  ResnetBlock; GroupNorm + swish + 3x3 conv to ``z_channels`` (256).
- ``quant_conv`` (1x1, 256 -> 8), then the quantizer: both the latent and the 16384 codes are
  l2-normalised and the nearest code (squared distance, i.e. largest cosine) is taken, so the
  quantized latent is a unit vector; ``post_quant_conv`` (1x1, 8 -> 256) before the decoder.
- decoder: mirror of the encoder, coarse to fine, with ``num_res_blocks + 1`` ResnetBlocks per
  level (attention after each at the coarsest level) and nearest-neighbour x2 upsampling + 3x3
  conv between levels.

VQ-16 is ``ch_mult (1, 1, 2, 2, 4)`` (16x downsampling), VQ-8 ``(1, 2, 2, 4)``; both ``ch 128``,
2 ResnetBlocks, codebook 16384 x 8. Module names are the official ones, so the released files
(``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``: ``{"model": state}``) load with no key mapping through
:func:`from_official`, and every app takes them by path (the importer is registered with the hub).
The official ``quantize.codebook_used`` buffer (a training-time usage log) is not kept.

Token layout: ``ids`` are ``(B, h, w)`` int64 in ``[0, codebook_size)``; any input whose sides are
multiples of the downsampling factor is accepted and its Tokens carry the matching grid.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.hub import HubError, check_state_dict, load_official_state_dict, register_model, register_official
from vision.tokens import Tokens, TokenSpec

from .quantizers import QuantizerOutput, straight_through


@dataclass
class LlamaGenVQConfig:
    image_size: int = 256  # native resolution: sets spec.grid; any multiple of the downsample factor works
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # the official encoder_ch_mult == decoder_ch_mult
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    norm_groups: int = 32  # official: GroupNorm(32, ...) everywhere; lower it for narrow test models

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult:
            raise ValueError("ch_mult needs at least one level")
        for width in {self.ch * m for m in (1, *self.ch_mult)}:
            if width % self.norm_groups:
                raise ValueError(f"width {width} is not divisible by norm_groups {self.norm_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


LLAMAGEN_VQ_CONFIGS: dict[str, LlamaGenVQConfig] = {
    "llamagen-vq-ds16": LlamaGenVQConfig(ch_mult=(1, 1, 2, 2, 4)),  # VQ_16, vq_ds16_c2i.pt
    "llamagen-vq-ds8": LlamaGenVQConfig(ch_mult=(1, 2, 2, 4)),  # VQ_8, vq_ds8_c2i.pt
}


def llamagen_vq_config(name: str, **overrides: Any) -> LlamaGenVQConfig:
    """A copy of a named configuration, with optional field overrides."""
    if name not in LLAMAGEN_VQ_CONFIGS:
        raise ValueError(f"unknown LlamaGen VQ configuration {name!r}; known: {', '.join(LLAMAGEN_VQ_CONFIGS)}")
    return dataclasses.replace(LLAMAGEN_VQ_CONFIGS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


def swish(x: Tensor) -> Tensor:
    # the official x * sigmoid(x): F.silu rounds differently (~1e-6), and this form keeps decoding
    # bit-identical to the official model
    return x * torch.sigmoid(x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, norm_groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return h + (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape
        q = self.q(h).reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
        k = self.k(h).reshape(b, c, -1)  # (B, C, N)
        v = self.v(h).reshape(b, c, -1)  # (B, C, N)
        attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (B, query, key)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after one zero row/column at the bottom/right (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` (ResnetBlocks), ``attn`` (empty except at the coarsest level)
    and an optional ``downsample``/``upsample``."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, attention: bool, norm_groups: int) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(blocks):
            self.res.append(ResnetBlock(in_ch, out_ch, norm_groups))
            in_ch = out_ch
            if attention:
                self.attn.append(AttnBlock(out_ch, norm_groups))

    def run_blocks(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _middle(width: int, norm_groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(width, width, norm_groups), AttnBlock(width, norm_groups),
                          ResnetBlock(width, width, norm_groups)])


class Encoder(nn.Module):
    def __init__(self, c: LlamaGenVQConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = c.ch
        last = len(c.ch_mult) - 1
        for i, mult in enumerate(c.ch_mult):
            level = _Level(width, c.ch * mult, c.num_res_blocks, i == last, c.norm_groups)
            width = c.ch * mult
            if i != last:
                level.downsample = Downsample(width)
            self.conv_blocks.append(level)
        self.mid = _middle(width, c.norm_groups)
        self.norm_out = _norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: LlamaGenVQConfig) -> None:
        super().__init__()
        width = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = _middle(width, c.norm_groups)
        # stored and run coarse to fine: conv_blocks[0] is the coarsest level (as the official list)
        self.conv_blocks = nn.ModuleList()
        last = len(c.ch_mult) - 1
        for i in reversed(range(len(c.ch_mult))):
            level = _Level(width, c.ch * c.ch_mult[i], c.num_res_blocks + 1, i == last, c.norm_groups)
            width = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
        self.norm_out = _norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class NormalizedVectorQuantizer(nn.Module):
    """LlamaGen's nearest-code quantizer; with ``l2_norm`` latents and codes lie on the unit sphere.

    ``ids`` are ``(B, h, w)``; ``quantized`` equals ``ids_to_latents(ids)`` exactly, with the
    identity gradient to the (normalised) latent. Losses as in the official training: the codebook
    term ``||e - sg(z)||^2`` unweighted, the commitment term ``beta * ||sg(e) - z||^2``.
    """

    def __init__(self, codebook_size: int, dim: int, *, l2_norm: bool = True, beta: float = 0.25) -> None:
        super().__init__()
        self.codebook_size, self.dim, self.l2_norm, self.beta = codebook_size, dim, l2_norm, beta
        # the official initialisation, uniform then normalised (given as _weight: no default normal_ first)
        w = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm and not w.is_meta:  # a meta tensor (built only for its layout) has no values to normalise
            w = F.normalize(w, dim=-1)
        self.embedding = nn.Embedding(codebook_size, dim, _weight=w)

    @property
    def codebook(self) -> Tensor:
        """The ``(codebook_size, dim)`` codes as looked up (l2-normalised when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """ids (B, h, w) -> codes (B, dim, h, w)."""
        return F.embedding(ids.long(), self.codebook).movedim(-1, 1).contiguous()

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected latents (B, {self.dim}, h, w), got {tuple(z.shape)}")
        x = z.movedim(1, -1)
        if self.l2_norm:
            x = F.normalize(x, dim=-1)
        flat = x.reshape(-1, self.dim)
        codebook = self.codebook
        with torch.no_grad():
            # the official summation order ((|z|^2 + |e|^2) - 2 z.e), so near-ties break the same way
            dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * (flat @ codebook.T)
            ids = dist.argmin(1)
        code = F.embedding(ids, codebook)
        codebook_loss = F.mse_loss(code, flat.detach())
        commitment = F.mse_loss(code.detach(), flat)
        losses = {"codebook": codebook_loss, "commitment": self.beta * commitment}
        with torch.no_grad():
            counts = torch.bincount(ids, minlength=self.codebook_size)
            p = counts.float() / counts.sum().clamp(min=1)
            metrics = {
                "codebook": codebook_loss.item(),
                "commitment": commitment.item(),
                "utilisation": (counts > 0).float().mean().item(),
                "perplexity": torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item(),
            }
        # contiguous like ids_to_latents' output: a strided layout can select another conv kernel
        quantized = straight_through(code, flat).reshape(x.shape).movedim(-1, 1).contiguous()
        return QuantizerOutput(quantized, ids.reshape(x.shape[:-1]), losses, metrics)


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------


@register_model("llamagen-vq")
class LlamaGenVQ(nn.Module):
    """LlamaGen VQ tokenizer: ``encode`` images in [-1, 1] to ids (B, h, w), ``decode`` ids to images."""

    config_class = LlamaGenVQConfig
    kind = "tokenizer"

    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = NormalizedVectorQuantizer(c.codebook_size, c.codebook_embed_dim, l2_norm=c.codebook_l2_norm,
                                                  beta=c.commit_loss_beta)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        side = c.image_size // c.downsample
        return TokenSpec(kind="discrete", grid=(side, side), downsample=c.downsample, vocab_size=c.codebook_size)

    @property
    def last_layer(self) -> Tensor:
        """The weight VQGAN's adaptive GAN weight differentiates against (``decoder.conv_out.weight``)."""
        return self.decoder.conv_out.weight

    def _check_images(self, images: Tensor) -> None:
        f, cin = self.config.downsample, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != cin or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"expected images (B, {cin}, H, W) with H, W multiples of {f}, got {tuple(images.shape)}")

    def quantize_images(self, images: Tensor) -> QuantizerOutput:
        """Encoder + quant_conv + quantizer: unit-norm codes (B, dim, h, w), ids (B, h, w), losses."""
        self._check_images(images)
        return self.quantize(self.quant_conv(self.encoder(images)))

    def decode_latents(self, latents: Tensor) -> Tensor:
        """post_quant_conv + decoder on codes (B, codebook_embed_dim, h, w)."""
        dim = self.config.codebook_embed_dim
        if latents.ndim != 4 or latents.shape[1] != dim:
            raise ValueError(f"expected latents (B, {dim}, h, w), got {tuple(latents.shape)}")
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Training pass: (reconstruction, quantizer output with ids, weighted losses and metrics)."""
        q = self.quantize_images(images)
        return self.decode_latents(q.quantized), q

    # ----------------------------------------------------------------- Tokenizer protocol

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tokens:
        ids = self.quantize_images(images).ids
        return Tokens(dataclasses.replace(self.spec, grid=tuple(ids.shape[-2:])), ids=ids)

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """ids (B, h, w) -> the exact unit-norm codes (B, codebook_embed_dim, h, w) ``encode`` chose."""
        return self.quantize.ids_to_latents(ids.to(self.quantize.embedding.weight.device))

    def decode(self, tokens: Tokens) -> Tensor:
        """Images in about [-1, 1] (not clamped), from ids (or from the codes as latents)."""
        if tokens.ids is not None:
            latents = self.ids_to_latents(tokens.ids)
        elif tokens.latents is not None:
            latents = tokens.latents
        else:
            raise ValueError("LlamaGen VQ decodes Tokens with ids (or latents), not scale_ids")
        return self.decode_latents(latents)


# ---------------------------------------------------------------------------------------------
# official checkpoints
# ---------------------------------------------------------------------------------------------

# in every official state dict but not a weight of the tokenizer: the training-time code-usage log
_TRAINING_ONLY = ("quantize.codebook_used",)
# what identifies LlamaGen's layout (taming's VQGAN has `encoder.down.N.block`, not `conv_blocks.N.res`)
_SIGNATURE = ("encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight", "quant_conv.weight",
              "post_quant_conv.weight", "decoder.conv_out.weight")


def _state_of(obj: Any) -> dict | None:
    """The state dict inside ``{"model": state}`` or a plain state dict; None when neither."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    return obj if isinstance(obj, dict) else None


def recognise_official(obj: Any) -> bool:
    """Whether `obj` (what torch.load gave for a file) is a LlamaGen VQ state dict."""
    state = _state_of(obj)
    if state is None or not all(isinstance(state.get(k), Tensor) for k in _SIGNATURE):
        return False
    codes = state.get("quantize.embedding.weight")
    return isinstance(codes, Tensor) and codes.ndim == 2


def official_config(state: dict, image_size: int = 256, source: str = "checkpoint") -> LlamaGenVQConfig:
    """The architecture of an official state dict, read from its key names and weight shapes."""

    def shape(key: str) -> tuple[int, ...]:
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise HubError(f"{source}: not a LlamaGen VQ checkpoint (no tensor {key!r})")
        return tuple(value.shape)

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for k in state if isinstance(k, str) and (m := re.match(pattern, k))}
        return 1 + max(found) if found else 0

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count(r"encoder\.conv_blocks\.(\d+)\.")
    blocks = count(r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
    if levels == 0 or blocks == 0:
        raise HubError(f"{source}: not a LlamaGen VQ checkpoint (no 'encoder.conv_blocks.0.res.0.*' weights)")
    ch_mult = tuple(shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] // ch for i in range(levels))
    codebook_size, dim = shape("quantize.embedding.weight")
    try:
        return LlamaGenVQConfig(image_size=image_size, in_channels=in_channels,
                                out_channels=shape("decoder.conv_out.weight")[0], ch=ch, ch_mult=ch_mult,
                                num_res_blocks=blocks, z_channels=shape("encoder.conv_out.weight")[0],
                                codebook_size=codebook_size, codebook_embed_dim=dim)
    except ValueError as e:
        raise HubError(f"{source}: not a LlamaGen VQ architecture Tessera builds ({e})") from None


def from_official(path_or_state: str | os.PathLike | dict, *, image_size: int = 256,
                  source: str | None = None) -> LlamaGenVQ:
    """Load an official LlamaGen VQ file (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``) or what torch.load gave for it.

    Takes ``{"model": state}`` or a plain state dict. The preset (VQ-16 / VQ-8, or any other width,
    depth or codebook) is read from the keys and shapes; every weight must be present with the
    official shape and nothing else may be there, else HubError naming the key. The state's float32
    tensors become the model's weights without a copy. ``image_size`` only sets ``spec.grid`` (the
    released tokenizers serve 256 and 384 pixel generators alike).
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = source or str(path_or_state)
        path_or_state = load_official_state_dict(path_or_state)
    source = source or "official LlamaGen VQ state dict"
    state = _state_of(path_or_state)
    if state is None:
        raise HubError(f"{source}: not a LlamaGen VQ checkpoint (expected {{'model': state dict}} or a state dict)")
    state = {k: v for k, v in state.items() if k not in _TRAINING_ONLY}
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise HubError(f"{source}: {not_tensors[0]!r} is not a tensor; not a LlamaGen VQ state dict")
    config = official_config(state, image_size, source)
    with torch.device("meta"):  # every weight comes from the file: skip the random initialisation
        model = LlamaGenVQ(config)
    check_state_dict(model.state_dict(), state, source)
    # the given tensors become the weights (no copy), in float32 as the official model computes
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval()


def _load_official(obj: Any, path: Path) -> LlamaGenVQ:
    return from_official(obj, source=str(path))


register_official("llamagen-vq", kind="tokenizer", recognise=recognise_official, load=_load_official)
