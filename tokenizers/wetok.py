"""WeTok: group-wise lookup-free quantization and a generative decoder (Zhuang et al., 2025).

Follows zhuangshaobin/WeTok (an Open-MAGVIT2 fork): ``src/WeTok/modules/diffusionmodules/
improved_model.py`` (``Encoder``, ``Decoder``, ``GANDecoder``), ``modules/vqvae/lookup_free_quantize.py``
(``GFQ``), ``models/lfqgan.py`` / ``lfqgan_pretrain_gan_decoder.py`` and ``configs/WeToK/Inference``:

- encoder: 3x3 conv (no bias), per level ``num_res_blocks`` ResBlocks (GroupNorm, swish, 3x3 conv
  without bias, twice; a 1x1 conv without bias on the shortcut when the width changes) and a 3x3
  stride-2 conv (with bias) between levels, ``num_res_blocks`` more ResBlocks in the middle,
  GroupNorm + swish + 1x1 conv to ``z_channels``. No attention anywhere.
- quantizer: :class:`~tokenizers.quantizers.GroupQuantizer` (``G`` groups of ``d`` adjacent
  channels, sign + straight-through, ``2**d`` sub-codes per group; entropy 0.1, commitment 0.25).
- decoder: 3x3 conv (with bias) from ``z``, middle ResBlocks, then per level (coarse to fine) an
  :class:`AdaptiveGroupNorm` conditioned on the quantized latent, ResBlocks, and an upsampler
  (3x3 conv to 4x channels + depth-to-space in DCR order); GroupNorm + swish + 3x3 conv out.
- generative decoder (``generative=True``, the paper's GD): Gaussian noise with the latent's shape
  is concatenated after ``z`` at the decoder's ``conv_in`` while every AdaGN stays conditioned on
  the clean ``z``. :func:`to_generative` turns a trained stage-1 model into the stage-2 one by
  zero-padding ``conv_in.weight`` for the noise channels (identical reconstructions at the start)
  and freezing the encoder and quantizer.

Module names follow the official ones, so official checkpoints (Lightning ``.ckpt``: ``encoder.*``,
``decoder.*``, the EMA copy under ``model_ema.<name without dots>``, the loss under ``loss.*``)
load through :func:`from_official` with a one-to-one key map.

Token layout: ``ids`` are ``(B, G, h, w)`` int64 in ``[0, 2**d)`` (``(B, h, w)`` when ``G == 1``),
``TokenSpec(kind="discrete", groups=G, vocab_size=2**d)``; any input whose sides are multiples of
the downsampling factor is accepted and its Tokens carry the matching grid.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.errors import ConfigError
from vision.hub import HubError, register_model, register_official
from vision.tokens import Tokens, TokenSpec

from .quantizers import GroupQuantizer, QuantizerOutput


@dataclass
class WeTokConfig:
    image_size: int = 256  # native resolution: sets spec.grid; any multiple of the downsample factor works
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32
    groups: int = 4  # GQ groups (official `num_codebooks`); bits per group = z_channels // groups
    norm_groups: int = 32  # official: GroupNorm(32, ...) everywhere; lower it for narrow CPU models
    generative: bool = False  # the generative decoder: noise concatenated to z at decoder.conv_in
    freeze_encoder: bool = False  # stage 2: encoder and quantizer frozen (requires_grad False, eval mode)
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    sample_minimization_weight: float = 1.0
    batch_maximization_weight: float = 1.0

    def __post_init__(self) -> None:
        # (the 1..16 bits per group are checked by GroupQuantizer: VQTokenizer reuses this config for its
        # encoder/decoder with one wide group and no GQ)
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"ch_mult needs at least one level, each >= 1, got {self.ch_mult}")
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "groups", "norm_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_image_size(self.image_size, self.downsample)
        if self.z_channels % self.groups:
            raise ConfigError(f"z_channels {self.z_channels} must split into {self.groups} equal groups")
        for width in {self.ch * m for m in (1, *self.ch_mult)}:
            if width % self.norm_groups:
                raise ConfigError(f"width {width} is not divisible by norm_groups {self.norm_groups}")
        for name in ("entropy_weight", "commitment_weight", "sample_minimization_weight", "batch_maximization_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.freeze_encoder and not self.generative:
            raise ConfigError("freeze_encoder is the stage-2 (generative decoder) setting; set generative=True")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def bits(self) -> int:
        return self.z_channels // self.groups


def check_image_size(image_size: int, downsample: int) -> None:
    """A tokenizer's native resolution must be a whole number of tokens across."""
    if image_size < downsample or image_size % downsample:
        raise ConfigError(f"image size {image_size} must be a multiple of the model's downsampling factor {downsample} "
                          f"(e.g. {max(downsample, image_size // downsample * downsample)})")


# Official configs (configs/WeToK/Inference/*.yaml); all use ch 256, 4 res blocks, 256 codes per group.
WETOK_CONFIGS: dict[str, WeTokConfig] = {
    # ImageNet_downsample8 and GeneralDomain_compratio48
    "wetok-f8": WeTokConfig(ch_mult=(1, 2, 2, 4)),
    # GeneralDomain_compratio24: z 64 in 8 groups
    "wetok-f8-z64": WeTokConfig(ch_mult=(1, 2, 2, 4), z_channels=64, groups=8),
    # ImageNet_downsample16 and GeneralDomain_compratio192
    "wetok-f16": WeTokConfig(ch_mult=(1, 1, 2, 2, 4)),
    # stage 1 of the 32x model; GeneralDomain_compratio768 ships the generative decoder below
    "wetok-f32": WeTokConfig(ch_mult=(1, 1, 2, 2, 4, 8)),
    "wetok-f32-gd": WeTokConfig(ch_mult=(1, 1, 2, 2, 4, 8), generative=True, freeze_encoder=True),
    # CPU-sized models for tests and tiny training runs
    "wetok-tiny-f4": WeTokConfig(image_size=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                                 groups=2, norm_groups=8),
    "wetok-tiny-f8": WeTokConfig(image_size=32, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32,
                                 groups=4, norm_groups=8),
}


def wetok_config(name: str, **overrides: Any) -> WeTokConfig:
    """A copy of a named configuration, with optional field overrides."""
    if name not in WETOK_CONFIGS:
        raise ValueError(f"unknown WeTok configuration {name!r}; known: {', '.join(WETOK_CONFIGS)}")
    return dataclasses.replace(WETOK_CONFIGS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


def depth_to_space(x: Tensor, block: int) -> Tensor:
    """(B, s*s*C, H, W) -> (B, C, s*H, s*W) in DCR order (channel = (i*s + j)*C + c).

    This is the official ``depth_to_space``; ``F.pixel_shuffle`` uses the other (CRD) order.
    """
    b, c, h, w = x.shape
    c_out = c // (block * block)
    x = x.view(b, block, block, c_out, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c_out, h * block, w * block)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine whose per-channel scale and bias are linear in statistics of ``z``.

    scale = gamma(sqrt(var_hw(z) + eps)), bias = beta(mean_hw(z)), one value per channel of ``z``;
    the variance is ``torch.var``'s default (unbiased), as in the official code.
    """

    def __init__(self, z_channels: int, channels: int, norm_groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(norm_groups, channels, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        flat = z.flatten(2)
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())
        bias = self.beta(flat.mean(dim=-1))
        return self.gn(x) * scale[..., None, None] + bias[..., None, None]


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels * 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return depth_to_space(self.conv1(x), 2)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks) and an optional ``downsample``/``upsample``."""


class Encoder(nn.Module):
    def __init__(self, c: WeTokConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        width = c.ch
        for i, mult in enumerate(c.ch_mult):
            level = _Level()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                level.block.append(ResBlock(width, c.ch * mult, c.norm_groups))
                width = c.ch * mult
            if i < len(c.ch_mult) - 1:
                level.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList(ResBlock(width, width, c.norm_groups) for _ in range(c.num_res_blocks))
        self.norm_out = nn.GroupNorm(c.norm_groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, c.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        for block in self.mid_block:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: WeTokConfig) -> None:
        super().__init__()
        self.z_channels = c.z_channels
        self.generative = c.generative
        width = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels * (2 if c.generative else 1), width, 3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(width, width, c.norm_groups) for _ in range(c.num_res_blocks))
        # stored fine-to-coarse (index = level), run coarse-to-fine, as the official ModuleLists
        adaptive: list[nn.Module] = []
        up: list[nn.Module] = []
        for i in reversed(range(len(c.ch_mult))):
            adaptive.insert(0, AdaptiveGroupNorm(c.z_channels, width, c.norm_groups))
            level = _Level()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                level.block.append(ResBlock(width, c.ch * c.ch_mult[i], c.norm_groups))
                width = c.ch * c.ch_mult[i]
            if i > 0:
                level.upsample = Upsample(width)
            up.insert(0, level)
        self.adaptive = nn.ModuleList(adaptive)
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(c.norm_groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor, noise: Tensor | None = None) -> Tensor:
        if self.generative:
            if noise is None or noise.shape != z.shape:
                raise ValueError(f"the generative decoder needs noise shaped like z {tuple(z.shape)}")
            # conv(cat[z, noise]) computed as conv(z) + conv(noise): the same function, but the z
            # part is bit-identical to the stage-1 conv, so zero noise weights reproduce stage 1 exactly
            w = self.conv_in.weight
            h = F.conv2d(z, w[:, : self.z_channels], self.conv_in.bias, padding=1)
            h = h + F.conv2d(noise, w[:, self.z_channels:], None, padding=1)
        else:
            h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for i in reversed(range(len(self.up))):
            h = self.adaptive[i](h, z)
            for block in self.up[i].block:
                h = block(h)
            if hasattr(self.up[i], "upsample"):
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------


@register_model("wetok")
class WeTok(nn.Module):
    """WeTok tokenizer: ``encode`` images in [-1, 1] to GQ ids, ``decode`` ids back to images."""

    config_class = WeTokConfig

    def __init__(self, config: WeTokConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.quantize = GroupQuantizer(
            c.groups, c.bits, entropy_weight=c.entropy_weight, commitment_weight=c.commitment_weight,
            sample_minimization_weight=c.sample_minimization_weight,
            batch_maximization_weight=c.batch_maximization_weight,
        )
        self.decoder = Decoder(c)
        if c.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.quantize.requires_grad_(False)
            self.train(self.training)

    def train(self, mode: bool = True) -> "WeTok":
        super().train(mode)
        if self.config.freeze_encoder:  # stage 2: the frozen parts always run as at inference
            self.encoder.eval()
            self.quantize.eval()
        return self

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        side = c.image_size // c.downsample
        return TokenSpec(kind="discrete", grid=(side, side), downsample=c.downsample, vocab_size=2**c.bits,
                         groups=c.groups)

    @property
    def last_layer(self) -> Tensor:
        """The weight VQGAN's adaptive GAN weight differentiates against (``decoder.conv_out.weight``)."""
        return self.decoder.conv_out.weight

    # ----------------------------------------------------------------- pieces

    def _check_images(self, images: Tensor) -> None:
        f = self.config.downsample
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of the downsampling factor {f}")

    def quantize_images(self, images: Tensor) -> QuantizerOutput:
        """Encoder + GQ: the straight-through quantized latent, ids (B, G, h, w) and the GQ losses."""
        self._check_images(images)
        return self.quantize(self.encoder(images))

    def decode_latents(self, latents: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Decoder on quantized latents (B, z, h, w).

        The generative decoder draws its noise from `generator` (a torch.Generator on the latents'
        device; None: the global RNG), so a seed fixes the reconstruction.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.z_channels:
            raise ValueError(f"expected latents (B, {self.config.z_channels}, h, w), got {tuple(latents.shape)}")
        if latents.shape[-2] * latents.shape[-1] < 2:
            raise ValueError("AdaGN needs at least 2 latent positions (its variance is unbiased); use a larger image")
        noise = None
        if self.config.generative:
            # drawn as the official `randn_like(z)` draws it: GFQ's output is channels-last in memory
            # and randn_like keeps that layout, so the same seed gives the official noise
            noise = torch.empty(latents.shape, device=latents.device, dtype=latents.dtype,
                                memory_format=torch.channels_last).normal_(generator=generator).contiguous()
        return self.decoder(latents, noise)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, QuantizerOutput]:
        """Training pass: (reconstruction, quantizer output with ids, weighted losses and metrics)."""
        q = self.quantize_images(images)
        return self.decode_latents(q.quantized, generator), q

    # ----------------------------------------------------------------- Tokenizer protocol

    def _ids_tensor(self, ids: Tensor) -> Tensor:
        return ids.unsqueeze(1) if self.config.groups == 1 and ids.ndim == 3 else ids

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tokens:
        q = self.quantize_images(images)
        ids = q.ids[:, 0] if self.config.groups == 1 else q.ids
        return Tokens(dataclasses.replace(self.spec, grid=tuple(ids.shape[-2:])), ids=ids)

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """Ids (B, G, h, w) (or (B, h, w) when G == 1) -> the exact ±1 latents ``encode`` quantized to."""
        latents = self.quantize.ids_to_latents(self._ids_tensor(ids)).to(self.decoder.conv_in.weight.dtype)
        # contiguous like the encoder's output: a strided layout can select another conv kernel
        return latents.contiguous()

    def decode(self, tokens: Tokens, generator: torch.Generator | None = None) -> Tensor:
        if tokens.ids is not None:
            latents = self.ids_to_latents(tokens.ids.to(self.decoder.conv_in.weight.device))
        elif tokens.latents is not None:
            latents = tokens.latents
        else:
            raise ValueError("WeTok decodes Tokens with ids (or latents), not scale_ids")
        return self.decode_latents(latents, generator)


def to_generative(model: WeTok) -> WeTok:
    """Stage 2 of WeTok: a generative-decoder copy of a trained stage-1 model.

    Every weight is copied; ``decoder.conv_in.weight`` gets zero columns for the noise channels, so
    the new model reconstructs exactly as the old one until those weights move. The encoder and
    quantizer are frozen (``freeze_encoder=True``), as in ``lfqgan_pretrain_gan_decoder.py`` (stage2).
    """
    if model.config.generative:
        raise ValueError("the model already has a generative decoder")
    config = dataclasses.replace(model.config, generative=True, freeze_encoder=True)
    weight = model.decoder.conv_in.weight
    new = WeTok(config).to(device=weight.device, dtype=weight.dtype)
    state = model.state_dict()
    state["decoder.conv_in.weight"] = torch.cat([weight.detach(), torch.zeros_like(weight.detach())], dim=1)
    new.load_state_dict(state)
    return new.train(model.training)


# ---------------------------------------------------------------------------------------------
# official checkpoints
# ---------------------------------------------------------------------------------------------

# Keys of an official Lightning checkpoint that are not part of the tokenizer: the training loss
# (LPIPS and the discriminator, see `discriminator_from_official`) and the EMA's bookkeeping.
_IGNORED = (re.compile(r"loss\..*"), re.compile(r"model_ema\.(decay|num_updates)"), re.compile(r"model_ema\.loss.*"))


def _state_of(checkpoint: dict) -> dict[str, Tensor]:
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or "encoder.conv_in.weight" not in state:
        raise ValueError("not a WeTok checkpoint: no 'encoder.conv_in.weight' (in 'state_dict' or at the top level)")
    return state


def official_config(checkpoint: dict, image_size: int = 256, bits: int = 8) -> WeTokConfig:
    """The architecture of an official checkpoint, read from its weight shapes.

    GQ has no weights, so the groups are not in the file: every official configuration uses
    ``n_embed: 256`` (8 bits per group), hence ``groups = z_channels // bits``.
    """
    state = _state_of(checkpoint)
    ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
    z = state["encoder.conv_out.weight"].shape[0]
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    generative = state["decoder.conv_in.weight"].shape[1] == 2 * z
    out_channels = state["decoder.conv_out.weight"].shape[0]
    return WeTokConfig(image_size=image_size, in_channels=in_channels, out_channels=out_channels, ch=ch,
                       ch_mult=ch_mult, num_res_blocks=blocks, z_channels=z, groups=z // bits,
                       generative=generative, freeze_encoder=generative)


def from_official(checkpoint: dict, config: WeTokConfig | str | None = None, *, use_ema: bool = True) -> WeTok:
    """Load an official WeTok checkpoint (the dict `torch.load` returns for ``WeTok.ckpt``).

    ``use_ema=True`` (what the official evaluation uses: ``ema_scope``) takes every weight from
    ``model_ema.<name without dots>``. A stage-2 checkpoint's EMA tracks only trainable weights, so
    if it holds no encoder entry at all the (frozen, hence never averaged) encoder is taken raw.
    Every key is either mapped or one of the known non-tokenizer keys; anything else, a missing
    weight, or a shape mismatch raises ValueError naming the key.
    """
    state = _state_of(checkpoint)
    if config is None:
        config = official_config(checkpoint)
    elif isinstance(config, str):
        config = wetok_config(config)
    model = WeTok(config)
    expected = model.state_dict()
    ema_encoder = any(k.startswith("model_ema.encoder") for k in state)
    mapped: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, target in expected.items():
        source = name
        if use_ema and (ema_encoder or not name.startswith("encoder.")):
            source = "model_ema." + name.replace(".", "")
        if source not in state:
            raise ValueError(f"official checkpoint lacks {source!r} (for {name!r})")
        value = state[source]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"official {source!r} has shape {tuple(value.shape)}, "
                             f"{name!r} needs {tuple(target.shape)}")
        mapped[name] = value
        used.add(source)
    undotted = {k.replace(".", "") for k in expected}
    for key in state:
        if key in used or any(p.fullmatch(key) for p in _IGNORED):
            continue
        if use_ema and (key.startswith("encoder.") or key.startswith("decoder.")) and key in expected:
            continue  # the raw (non-EMA) copy of a weight taken from the EMA
        if not use_ema and key.startswith("model_ema.") and key[len("model_ema."):] in undotted:
            continue  # the EMA copy of a weight taken raw
        raise ValueError(f"official checkpoint key {key!r} is not a WeTok weight")
    model.load_state_dict(mapped)
    return model.eval()


def discriminator_from_official(checkpoint: dict):
    """The PatchGAN of an official checkpoint (``loss.discriminator.*``), e.g. to resume GAN training."""
    from .losses import NLayerDiscriminator

    state = _state_of(checkpoint)
    prefix = "loss.discriminator."
    disc_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not disc_state:
        raise ValueError("official checkpoint has no 'loss.discriminator.*' weights")
    disc = NLayerDiscriminator()
    expected = disc.state_dict()
    for k, v in disc_state.items():
        if k not in expected:
            raise ValueError(f"official {prefix + k!r} is not a PatchGAN weight")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"official {prefix + k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(disc_state))
    if missing:
        raise ValueError(f"official checkpoint lacks {prefix + missing[0]!r}")
    disc.load_state_dict(disc_state)
    return disc


def recognise_official(obj: Any) -> bool:
    """An official WeTok Lightning checkpoint (``WeTok.ckpt``): WeTok's encoder and its AdaGN decoder."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    return (isinstance(state, dict) and "encoder.conv_in.weight" in state and "decoder.conv_in.weight" in state
            and any(k.startswith("decoder.adaptive.") for k in state))


def _load_official(obj: dict, path) -> WeTok:
    try:
        return from_official(obj)
    except ValueError as e:
        raise HubError(f"{getattr(path, 'name', path)}: {e}") from None


register_official("wetok", kind="tokenizer", recognise=recognise_official, load=_load_official)
