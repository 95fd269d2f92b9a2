"""A continuous tokenizer: the KL-regularised autoencoder of latent diffusion (Rombach et al., CVPR 2022).

The network is diffusers' ``AutoencoderKL`` itself (``diffusers.models.autoencoders``), not a
re-implementation: Tessera wraps it, adds the token interface, the training pass and the import of
LDM-layout checkpoints. Official code followed: CompVis/latent-diffusion ``ldm/models/autoencoder.py``
and its copy in LTH14/mar ``models/vae.py`` (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``,
the KL-16 VAE that MAR, Li et al. 2024, "Autoregressive Image Generation without Vector Quantization",
generates in).

- encoder: conv_in; per level ``layers_per_block`` ResnetBlocks (GroupNorm, SiLU, 3x3 conv, twice; a
  1x1 shortcut when the width changes), each followed by single-head self-attention on the levels in
  ``encoder_attention`` (LDM's ``attn_resolutions``; KL-16: the 16x16 level of a 256 image, level 4);
  between levels a stride-2 3x3 conv after one zero row/column at the bottom/right; middle ResnetBlock,
  attention, ResnetBlock; GroupNorm, SiLU, conv to ``2 * latent_channels`` (mean and log-variance),
  then ``quant_conv`` (1x1). The posterior is a diagonal Gaussian, log-variance clamped to [-30, 20].
- decoder: ``post_quant_conv`` (1x1), conv_in, middle block, per level (coarse to fine)
  ``layers_per_block + 1`` ResnetBlocks (attention after each on the levels in ``decoder_attention``;
  none in KL-16) and nearest x2 upsampling + 3x3 conv; GroupNorm, SiLU, conv to RGB.

Tokens: ``latents`` (B, latent_channels, H/f, W/f) = posterior **mean** x ``scaling_factor``
(``encode``). The mean, because a tokenizer's encoding should be a function of the image: the token
cache, reconstruction metrics and anything comparing two encodings need the same latents for the same
image. MAR trains its generator on posterior *samples* (``posterior.sample() * 0.2325``,
engine_mar.py); ``encode(images, sample=True, generator=g)`` gives exactly that, and
:meth:`KLTokenizer.posterior` the unscaled distribution. ``decode`` divides by ``scaling_factor`` and
returns images in about [-1, 1] (not clamped). ``scaling_factor`` makes the latents a generator sees
roughly unit-variance (LDM section 4.3.2): MAR's KL-16 uses 0.2325; a freshly trained model gets
``1 / std`` of its training latents from :meth:`KLTokenizer.calibrate_scaling_factor`, which
``apps.train_tokenizer`` runs before saving. (The wrapped model's own ``config.scaling_factor`` is not
used; Tessera's config is the one source.)

Training (``forward``): reconstruction from a posterior sample (the mean in eval mode) and the KL term
``kl_weight * KL(q(z|x) || N(0, I))``, the KL summed over the latent of each image and divided by the
number of pixel values per image. LDM sums both its L1(+LPIPS) term and the KL over each image; Tessera's
losses average the reconstruction over pixels, so this division keeps LDM's ratio and ``kl_weight``
means what it means in LDM's configs (1e-6).

Official checkpoints: MAR's ``kl16.ckpt`` (``{"model": state}``, LDM key names ``encoder.down.N.block.M``,
``encoder.mid.attn_1``, ``decoder.up.N...``, ``quant_conv``, ``post_quant_conv``) loads through
:func:`from_official` and every app's ``--tokenizer``/``--vae`` (the importer is registered with the
hub). :func:`ldm_to_diffusers_key` is the explicit key table; attention's 1x1 convs become diffusers'
linear layers. The architecture is read from the keys and shapes; every weight must map, with its
shape, and nothing may be left over. LDM's training-only ``loss.*`` entries (LPIPS, discriminator,
logvar), when present, are not weights of the autoencoder and are skipped.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vision.errors import ConfigError
from vision.hub import HubError, check_state_dict, load_official_state_dict, register_model, register_official
from vision.tokens import Tokens, TokenSpec

MAR_KL16_SCALE = 0.2325  # LTH14/mar engine_mar.py: x = posterior.sample().mul_(0.2325)


@dataclass
class KLConfig:
    """A KL autoencoder; the defaults are MAR's KL-16 (256 px, 16 latent channels, /16)."""

    image_size: int = 256  # native resolution: sets spec.grid; any multiple of the downsampling works
    channels: int = 3  # image channels in and out
    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)  # LDM ch * ch_mult, fine to coarse
    layers_per_block: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    latent_channels: int = 16
    norm_num_groups: int = 32
    encoder_attention: tuple[int, ...] = (4,)  # levels (0 = finest) with attention after each ResnetBlock
    decoder_attention: tuple[int, ...] = ()
    mid_attention: bool = True
    scaling_factor: float = MAR_KL16_SCALE  # tokens are posterior mean * scaling_factor
    kl_weight: float = 1e-6  # training: weight of the KL term (LDM's meaning; see the module docstring)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.encoder_attention = tuple(sorted({int(i) for i in self.encoder_attention}))
        self.decoder_attention = tuple(sorted({int(i) for i in self.decoder_attention}))
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ConfigError(f"block_out_channels needs at least one level, each >= 1, got {self.block_out_channels}")
        for name in ("channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        if bad:
            raise ConfigError(f"block_out_channels {bad[0]} is not divisible by norm_num_groups {self.norm_num_groups}")
        levels = len(self.block_out_channels)
        for name in ("encoder_attention", "decoder_attention"):
            outside = [i for i in getattr(self, name) if not 0 <= i < levels]
            if outside:
                raise ConfigError(f"{name} level {outside[0]} is outside 0..{levels - 1}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ConfigError(f"scaling_factor must be a finite number > 0, got {self.scaling_factor}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ConfigError(f"kl_weight must be a finite number >= 0, got {self.kl_weight}")
        f = self.downsample
        if self.image_size < f or self.image_size % f:
            raise ConfigError(f"image size {self.image_size} must be a multiple of the model's downsampling factor {f} "
                              f"(e.g. {max(f, self.image_size // f * f)})")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """The arguments of diffusers' AutoencoderKL for this configuration."""
        levels = range(len(self.block_out_channels))
        down = tuple("AttnDownEncoderBlock2D" if i in self.encoder_attention else "DownEncoderBlock2D" for i in levels)
        # diffusers lists the decoder's blocks coarse to fine
        up = tuple("AttnUpDecoderBlock2D" if i in self.decoder_attention else "UpDecoderBlock2D"
                   for i in reversed(levels))
        return dict(in_channels=self.channels, out_channels=self.channels, down_block_types=down, up_block_types=up,
                    block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                    act_fn="silu", latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                    sample_size=self.image_size, scaling_factor=self.scaling_factor, force_upcast=False,
                    mid_block_add_attention=self.mid_attention)


KL_CONFIGS: dict[str, KLConfig] = {
    "kl16": KLConfig(),  # MAR's KL-16 (from_official builds the same from kl16.ckpt)
    # MNIST-5k at 32x32: /4 -> 8x8 grid of 4 channels; attention only in the middle (8x8); 0.24M weights, about
    # 0.2 s per batch of 32 on one CPU core (widths 32-64 cost 3x as much and reconstructed worse in equal time);
    # scaling_factor is re-measured after training (calibrate_scaling_factor)
    "kl-mnist": KLConfig(image_size=32, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, encoder_attention=(), scaling_factor=1.0),
}


def kl_config(name: str, **overrides: Any) -> KLConfig:
    """A copy of a named configuration, with optional field overrides."""
    if name not in KL_CONFIGS:
        raise ValueError(f"unknown KL configuration {name!r}; known: {', '.join(KL_CONFIGS)}")
    return dataclasses.replace(KL_CONFIGS[name], **overrides)


@dataclass
class PosteriorOutput:
    """What ``KLTokenizer.forward`` returns beside the reconstruction (the QuantizerOutput interface the
    tokenizer losses read: ``losses``, ``metrics``, ``loss``).

    latents: the latent the reconstruction was decoded from (a posterior sample when training, the mean
        in eval mode), times ``scaling_factor``, as tokens carry it.
    mean, logvar: the posterior's parameters, unscaled (logvar clamped to [-30, 20] as LDM does).
    losses: ``{"kl": kl_weight * KL / pixel values per image}``, batch mean (see the module docstring).
    metrics: ``kl`` (unweighted KL per latent value), ``posterior_std`` (mean posterior std, scaled),
        ``latent_std`` (std of the scaled means: about 1 once calibrated).
    """

    latents: Tensor
    mean: Tensor
    logvar: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses (a zero scalar if there are none)."""
        if not self.losses:
            return self.latents.new_zeros(())
        return torch.stack([v.to(self.latents.dtype) for v in self.losses.values()]).sum()


def _contiguous_attention():
    """diffusers' default attention processor, with its (B, C, H, W) output made contiguous.

    The default returns a transposed view (channels-last strides); the next convolution then takes another
    CPU kernel whose float32 rounding error is about 4x larger (random-weight KL-16 decode: 1.8e-5 from the
    float64 result, against 4.5e-6 for LDM's code and for this). Same values otherwise.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    class ContiguousAttnProcessor(AttnProcessor2_0):
        # the parameter names diffusers' Attention.forward looks up in a processor's signature
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs) -> Tensor:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args,
                                    **kwargs).contiguous()

    return ContiguousAttnProcessor()


@register_model("kl")
class KLTokenizer(nn.Module):
    """KL autoencoder tokenizer: ``encode`` images in [-1, 1] to continuous latents, ``decode`` them back."""

    config_class = KLConfig
    kind = "tokenizer"

    def __init__(self, config: KLConfig) -> None:
        super().__init__()
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # heavy; only when a model is built

        self.config = dataclasses.replace(config)  # its own copy: calibrate_scaling_factor changes it
        self.vae = AutoencoderKL(**config.diffusers_kwargs())
        self.vae.set_attn_processor(_contiguous_attention())

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        side = c.image_size // c.downsample
        return TokenSpec("continuous", (side, side), c.downsample, channels=c.latent_channels)

    @property
    def last_layer(self) -> Tensor:
        """The weight VQGAN's adaptive GAN weight differentiates against (the decoder's output conv)."""
        return self.vae.decoder.conv_out.weight

    def _check_images(self, images: Tensor) -> None:
        f, cin = self.config.downsample, self.config.channels
        if images.ndim != 4 or images.shape[1] != cin or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"expected images (B, {cin}, H, W) with H, W multiples of {f}, got {tuple(images.shape)}")

    def posterior(self, images: Tensor):
        """q(z | images): diffusers' DiagonalGaussianDistribution (``mean``, ``logvar``, ``std``,
        ``sample(generator)``, ``kl()``), unscaled."""
        self._check_images(images)
        return self.vae.encode(images).latent_dist

    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tokens:
        """Images (B, C, H, W) in [-1, 1] -> Tokens with latents (B, latent_channels, H/f, W/f).

        The latents are the posterior mean times ``scaling_factor`` (deterministic: the same image always
        gives the same tokens). ``sample=True`` draws ``mean + std * noise`` instead (noise from
        ``generator``), as MAR does for each training batch.
        """
        q = self.posterior(images)
        z = q.sample(generator) if sample else q.mean
        latents = (z * self.config.scaling_factor).contiguous()
        return Tokens(dataclasses.replace(self.spec, grid=tuple(latents.shape[-2:])), latents=latents)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, latent_channels, h, w) -> images in about [-1, 1] (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents (B, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}")
        return self.vae.decode(latents / self.config.scaling_factor).sample

    def decode(self, tokens: Tokens) -> Tensor:
        """Tokens (latents as ``encode`` gives them) -> images in about [-1, 1] (not clamped)."""
        if tokens.latents is None:
            raise ValueError("a KL tokenizer decodes continuous Tokens (latents), not ids")
        return self.decode_latents(tokens.latents)

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, PosteriorOutput]:
        """The training pass: (reconstruction, PosteriorOutput with the weighted KL in ``losses``).

        Decodes a posterior sample in training mode (LDM's ``sample_posterior=True``), the mean in eval mode.
        """
        q = self.posterior(images)
        # contiguous as encode's latents: the mean is a channel slice, and a strided input takes other conv kernels
        z = (q.sample(generator) if self.training else q.mean).contiguous()
        recon = self.vae.decode(z).sample
        kl = q.kl()  # (B,): summed over each image's latent
        s = self.config.scaling_factor
        losses = {"kl": self.config.kl_weight * kl.mean() / images[0].numel()}
        with torch.no_grad():
            metrics = {"kl": (kl.mean() / q.mean[0].numel()).item(), "posterior_std": (q.std.mean() * s).item(),
                       "latent_std": (q.mean.float().std() * s).item()}
        return recon, PosteriorOutput(z * s, q.mean, q.logvar, losses, metrics)

    @torch.no_grad()
    def calibrate_scaling_factor(self, images: Tensor, batch_size: int = 100) -> float:
        """Set ``config.scaling_factor`` to ``1 / std`` of the posterior means of ``images`` (all values
        together, as LDM's ``scale_by_std``) and return it.

        LDM takes the std of one batch of posterior samples; Tessera uses the means, because the means are
        what ``encode`` (and so every token cache) hands to a generator. Run it on about 1000 training
        images after training; ``apps.train_tokenizer`` does so before saving a KL tokenizer.
        """
        if images.shape[0] < 2:
            raise ValueError("calibrating the scaling factor needs at least 2 images")
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        means = [self.posterior(chunk.to(device)).mean.double().flatten() for chunk in images.split(batch_size)]
        self.train(was)
        std = torch.cat(means).std().item()
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"the latents' std is {std}; cannot calibrate the scaling factor")
        self.config.scaling_factor = 1.0 / std
        return self.config.scaling_factor


# ---------------------------------------------------------------------------------------------
# official (LDM-layout) checkpoints: MAR's kl16.ckpt
# ---------------------------------------------------------------------------------------------

_SIGNATURE = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.mid.attn_1.q.weight",
              "decoder.up.0.block.0.conv1.weight", "quant_conv.weight", "post_quant_conv.weight",
              "decoder.conv_out.weight")
_TRAINING_ONLY_PREFIX = "loss."  # LDM's LPIPSWithDiscriminator (perceptual net, discriminator, logvar)

# LDM -> diffusers names inside a ResnetBlock, inside an AttnBlock, and of the encoder's/decoder's own layers
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}


def ldm_to_diffusers_key(key: str, levels: int) -> str | None:
    """The diffusers AutoencoderKL name of an LDM (MAR ``models/vae.py``) weight, or None when it has none.

    ``levels`` is the number of resolution levels (``len(ch_mult)``), needed because LDM's ``decoder.up``
    is indexed fine to coarse and diffusers' ``decoder.up_blocks`` coarse to fine.

    ========================================  ==========================================================
    LDM                                       diffusers
    ========================================  ==========================================================
    quant_conv / post_quant_conv              quant_conv / post_quant_conv
    {enc,dec}oder.conv_in / conv_out          same
    {enc,dec}oder.norm_out                    {enc,dec}oder.conv_norm_out
    {enc,dec}oder.mid.block_1 / block_2       {enc,dec}oder.mid_block.resnets.0 / .1
    {enc,dec}oder.mid.attn_1                  {enc,dec}oder.mid_block.attentions.0
    encoder.down.i.block.j                    encoder.down_blocks.i.resnets.j
    encoder.down.i.attn.j                     encoder.down_blocks.i.attentions.j
    encoder.down.i.downsample.conv            encoder.down_blocks.i.downsamplers.0.conv
    decoder.up.i.block.j                      decoder.up_blocks.(levels-1-i).resnets.j
    decoder.up.i.attn.j                       decoder.up_blocks.(levels-1-i).attentions.j
    decoder.up.i.upsample.conv                decoder.up_blocks.(levels-1-i).upsamplers.0.conv
    (ResnetBlock) nin_shortcut                conv_shortcut
    (AttnBlock) norm, q, k, v, proj_out       group_norm, to_q, to_k, to_v, to_out.0 (1x1 conv -> linear)
    ========================================  ==========================================================
    """
    m = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", key)
    if not m:
        return None
    part, body, leaf = m.groups()

    if body in _TOP:
        return f"{part}.{_TOP[body]}.{leaf}"
    if mm := re.fullmatch(r"mid\.block_([12])\.(\w+)", body):
        inner = _RESNET.get(mm.group(2))
        return f"{part}.mid_block.resnets.{int(mm.group(1)) - 1}.{inner}.{leaf}" if inner else None
    if mm := re.fullmatch(r"mid\.attn_1\.(\w+)", body):
        inner = _ATTENTION.get(mm.group(1))
        return f"{part}.mid_block.attentions.0.{inner}.{leaf}" if inner else None
    if part == "encoder":
        level_name, block_name, sampler = "down", "down_blocks", "downsample"
    else:
        level_name, block_name, sampler = "up", "up_blocks", "upsample"
    mm = re.fullmatch(rf"{level_name}\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", body)
    if mm:
        i, kind, j, name = int(mm.group(1)), mm.group(2), int(mm.group(3)), mm.group(4)
        if i >= levels:
            return None
        level = i if part == "encoder" else levels - 1 - i
        inner = (_RESNET if kind == "block" else _ATTENTION).get(name)
        where = "resnets" if kind == "block" else "attentions"
        return f"{part}.{block_name}.{level}.{where}.{j}.{inner}.{leaf}" if inner else None
    mm = re.fullmatch(rf"{level_name}\.(\d+)\.{sampler}\.conv", body)
    if mm:
        i = int(mm.group(1))
        if i >= levels:
            return None
        level = i if part == "encoder" else levels - 1 - i
        return f"{part}.{block_name}.{level}.{sampler}rs.0.conv.{leaf}"
    return None


def _state_of(obj: Any) -> dict | None:
    """The state dict inside ``{"model": state}`` or a plain state dict; None when neither."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    return obj if isinstance(obj, dict) else None


def recognise_official(obj: Any) -> bool:
    """Whether ``obj`` (what torch.load gave for a file) is an LDM-layout KL autoencoder state dict: LDM's
    encoder/decoder names, and a ``quant_conv`` that doubles the channels of ``post_quant_conv`` (mean and
    log-variance) with no codebook (taming's VQGAN has ``quantize.embedding``)."""
    state = _state_of(obj)
    if state is None or not all(isinstance(state.get(k), Tensor) for k in _SIGNATURE):
        return False
    if any(isinstance(k, str) and k.startswith("quantize.") for k in state):
        return False
    quant, post = state["quant_conv.weight"], state["post_quant_conv.weight"]
    return quant.ndim == 4 and post.ndim == 4 and quant.shape[0] == 2 * post.shape[0]


def official_config(state: dict, *, image_size: int = 256, scaling_factor: float = MAR_KL16_SCALE,
                    source: str = "checkpoint") -> KLConfig:
    """The architecture of an LDM-layout state dict, read from its key names and weight shapes.

    GroupNorm's group count is not in a file; LDM (and MAR) use 32 everywhere.
    """

    def shape(key: str) -> tuple[int, ...]:
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise HubError(f"{source}: not an LDM KL autoencoder checkpoint (no tensor {key!r})")
        return tuple(value.shape)

    def indices(pattern: str) -> set[int]:
        return {int(m.group(1)) for k in state if isinstance(k, str) and (m := re.fullmatch(pattern, k))}

    levels = 1 + max(indices(r"encoder\.down\.(\d+)\..*") or {-1})
    blocks = 1 + max(indices(r"encoder\.down\.0\.block\.(\d+)\..*") or {-1})
    if levels == 0 or blocks == 0:
        raise HubError(f"{source}: not an LDM KL autoencoder checkpoint (no 'encoder.down.0.block.0.*' weights)")
    widths = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels))
    latent = shape("post_quant_conv.weight")[0]
    try:
        return KLConfig(image_size=image_size, channels=shape("encoder.conv_in.weight")[1], block_out_channels=widths,
                        layers_per_block=blocks, latent_channels=latent,
                        encoder_attention=tuple(indices(r"encoder\.down\.(\d+)\.attn\.0\.q\.weight")),
                        decoder_attention=tuple(indices(r"decoder\.up\.(\d+)\.attn\.0\.q\.weight")),
                        mid_attention="encoder.mid.attn_1.q.weight" in state, scaling_factor=scaling_factor)
    except ConfigError as e:
        raise HubError(f"{source}: not a KL autoencoder architecture Tessera builds ({e})") from None


def convert_official_state(state: dict, levels: int, source: str = "checkpoint") -> dict[str, Tensor]:
    """LDM-layout weights -> KLTokenizer's state dict (``vae.`` + the diffusers name), float32; attention's
    1x1 conv kernels (C, C, 1, 1) become linear weights (C, C). HubError for a key with no counterpart."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(_TRAINING_ONLY_PREFIX):
            continue
        if not isinstance(value, Tensor):
            raise HubError(f"{source}: {key!r} is not a tensor; not a KL autoencoder state dict")
        name = ldm_to_diffusers_key(key, levels)
        if name is None:
            raise HubError(f"{source}: unexpected key {key!r} (no counterpart in diffusers' AutoencoderKL)")
        if ".attentions." in name and name.endswith(".weight") and value.ndim == 4:
            if tuple(value.shape[2:]) != (1, 1):
                raise HubError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected a 1x1 conv kernel")
            value = value[:, :, 0, 0]
        out["vae." + name] = value.float()
    return out


def from_official(path_or_state: str | os.PathLike | dict, *, image_size: int = 256,
                  scaling_factor: float = MAR_KL16_SCALE, source: str | None = None) -> KLTokenizer:
    """Load MAR's ``kl16.ckpt`` (or any LDM-layout KL autoencoder) as a :class:`KLTokenizer`.

    Takes a path, ``{"model": state}`` or a plain state dict. The architecture is read from the keys and
    shapes; every weight must map (``ldm_to_diffusers_key``) onto the model with its shape and cover it
    exactly, else HubError naming the key. ``scaling_factor`` is not in the file: 0.2325 is MAR's for
    KL-16; pass another VAE's own. ``image_size`` only sets ``spec.grid``.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = source or str(path_or_state)
        path_or_state = load_official_state_dict(path_or_state)
    source = source or "official KL autoencoder state dict"
    state = _state_of(path_or_state)
    if state is None:
        raise HubError(f"{source}: not a KL autoencoder checkpoint (expected {{'model': state dict}} or a state dict)")
    if not all(isinstance(k, str) for k in state):
        raise HubError(f"{source}: not a KL autoencoder checkpoint (non-string keys)")
    config = official_config(state, image_size=image_size, scaling_factor=scaling_factor, source=source)
    converted = convert_official_state(state, len(config.block_out_channels), source)
    with torch.device("meta"):  # every weight comes from the file: skip the random initialisation
        model = KLTokenizer(config)
    check_state_dict(model.state_dict(), converted, source)
    model.load_state_dict(converted, assign=True)
    return model.eval()


def _load_official(obj: Any, path: Path) -> KLTokenizer:
    return from_official(obj, source=str(path))


register_official("ldm-kl", kind="tokenizer", recognise=recognise_official, load=_load_official)
