"""VQRAE: Representation Quantization Autoencoders (Du et al., 2025, arXiv:2511.23386).

A unified tokenizer built on a pretrained vision foundation model (VFM):

- encoder: a timm ViT (any name, e.g. ``vit_small_patch16_224``; the paper uses SigLIP2 / InternViT
  class VFMs). Its patch tokens (prefix/class tokens dropped) are the *continuous semantic
  features* used for understanding (:meth:`VQRAE.semantic_features`);
- quantizer: a parameter-free LayerNorm of the features (``feature_norm``, as RAE normalises its
  frozen encoder's output), a linear projection to ``codebook_dim`` (1536 in the paper: semantic
  features need a *high-dimensional* codebook to reach 100% utilisation) and SimVQ
  (:class:`~tokenizers.quantizers.VectorQuantizer` with ``codebook="simvq"``: frozen random codes
  ``C`` reparameterised by a learned linear map ``W``); the ids on the ``(h, w)`` patch grid are the
  *discrete tokens* used for generation;
- decoder: a ViT symmetric to the encoder (same depth / width / heads / MLP ratio unless set):
  linear in, learned positions, transformer blocks, LayerNorm, a linear head to ``patch² · 3``
  pixels, unpatchify.

Two training stages (:meth:`VQRAE.set_stage`):

1. the encoder is frozen (no gradients, always in eval mode); codebook + decoder learn from
   pixel L2 + LPIPS + GAN + VQ losses;
2. the encoder is unfrozen and a frozen deep copy of it becomes the *self-distillation teacher*;
   :meth:`VQRAE.distillation_loss` keeps the fine-tuned features close to the teacher's so the
   semantic (understanding) ability survives the reconstruction fine-tuning.

:class:`VQRAELoss` puts the generator / discriminator objectives together from the pieces in
``tokenizers/losses.py``. The official code was not available; details the paper does not pin
down (the distillation distance, the GAN weight, decoder initialisation) are documented where
they are chosen.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.errors import ConfigError
from vision.hub import HubError, load_official_state_dict, register_model
from vision.tokens import Tokens, TokenSpec

from .losses import AdversarialLoss, _f
from .quantizers import QuantizerOutput, VectorQuantizer


@dataclass
class VQRAEConfig:
    """VQRAE hyper-parameters.

    encoder: timm model name; ``encoder_kwargs`` go to ``timm.create_model`` (e.g. ``depth``,
        ``embed_dim``, ``num_heads`` for a small test model). ``image_size`` / ``patch_size`` are
        passed as ``img_size`` / ``patch_size``; the head is always dropped (``num_classes=0``).
    encoder_weights: a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.ckpt`` file with the encoder's
        timm state dict (nested under ``model`` / ``state_dict`` is accepted); the timm model's own
        ``checkpoint_filter_fn`` adapts it (position embeddings resampled to ``image_size``...).
        Nothing is ever downloaded. Once loaded the weights live in the module, so the model's
        ``config.encoder_weights`` is reset to None: a saved VQRAE does not need the file.
    encoder_mean / encoder_std: the encoder's input normalisation (images arrive in [-1, 1]);
        None takes timm's ``pretrained_cfg`` values for that name.
    decoder_*: None means "as the encoder" (the paper's symmetric decoder).
    """

    encoder: str = "vit_small_patch16_224"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    encoder_weights: str | None = None
    encoder_mean: tuple[float, ...] | None = None
    encoder_std: tuple[float, ...] | None = None
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    feature_norm: bool = True
    codebook_size: int = 16384
    codebook_dim: int = 1536
    simvq: bool = True
    beta: float = 0.25
    decoder_depth: int | None = None
    decoder_width: int | None = None
    decoder_heads: int | None = None
    decoder_mlp_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "codebook_size", "codebook_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image size {self.image_size} must be a multiple of the patch size {self.patch_size} "
                              f"(e.g. {max(1, self.image_size // self.patch_size) * self.patch_size})")
        for name in ("decoder_depth", "decoder_width", "decoder_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or None: as the encoder), got {getattr(self, name)}")
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------


def build_encoder(config: VQRAEConfig) -> nn.Module:
    """The timm ViT, headless, at ``image_size`` / ``patch_size``, with local weights if given."""
    import timm

    encoder = timm.create_model(config.encoder, pretrained=False, num_classes=0, img_size=config.image_size,
                                patch_size=config.patch_size, in_chans=config.in_channels,
                                **config.encoder_kwargs)
    if config.encoder_weights is not None:
        load_encoder_weights(encoder, config.encoder_weights)
    return encoder


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise HubError(f"encoder weights {path} do not exist; put the timm state dict of the encoder there "
                       "(VQRAE never downloads weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_official_state_dict(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HubError(f"{path}: expected a state dict of tensors (optionally under 'model' / 'state_dict')")
    return dict(state)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local timm-format state dict into ``encoder``; fail loudly on any key or shape mismatch.

    The architecture's ``checkpoint_filter_fn`` (timm) is applied first, as timm does for its own
    pretrained files: it resamples position embeddings / patch kernels to the model's size and maps
    known foreign layouts (OpenAI CLIP, DINOv2...). Classifier keys (``head.*``) are dropped.
    """
    path = Path(path)
    state = _read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(encoder).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, encoder)
    expected = encoder.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("head.") and k not in expected)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HubError(f"{path}: does not match encoder {type(encoder).__name__}: missing keys {missing[:5]}, "
                       f"unexpected keys {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise HubError(f"{path}: key {k!r} has shape {tuple(v.shape)}, the encoder expects {tuple(expected[k].shape)}")
    encoder.load_state_dict(state)


def _encoder_dims(encoder: nn.Module) -> tuple[int, int, int, float]:
    """(width, depth, heads, mlp_ratio) of a timm ViT-like encoder, for the symmetric decoder."""
    width = int(getattr(encoder, "embed_dim", None) or encoder.num_features)
    blocks = getattr(encoder, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(encoder).__name__} has no `blocks`; set decoder_depth/width/heads/mlp_ratio")
    heads = int(getattr(getattr(blocks[0], "attn", None), "num_heads", 0)) or None
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None)
    mlp_ratio = fc1.out_features / width if isinstance(fc1, nn.Linear) else None
    return width, len(blocks), heads, mlp_ratio


# ---------------------------------------------------------------------------------------------
# decoder
# ---------------------------------------------------------------------------------------------


class ViTPixelDecoder(nn.Module):
    """Quantized tokens (B, D, h, w) -> pixels (B, C, h·p, w·p) through a plain ViT.

    Linear weights are truncated-normal(0.02), biases zero, position embeddings trunc-normal(0.02)
    (timm's ViT initialisation; the paper does not specify one).
    """

    def __init__(self, in_dim: int, grid: tuple[int, int], patch_size: int, out_channels: int, width: int,
                 depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.grid = tuple(grid)
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.proj_in = nn.Linear(in_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, patch_size * patch_size * out_channels)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, latents: Tensor) -> Tensor:
        b, _, h, w = latents.shape
        if (h, w) != self.grid:
            raise ValueError(f"the decoder was built for a {self.grid} token grid, got {(h, w)}")
        x = self.proj_in(latents.flatten(2).transpose(1, 2)) + self.pos_embed
        x = self.head(self.norm(self.blocks(x)))
        p, c = self.patch_size, self.out_channels
        # (B, h·w, p·p·c) -> (B, c, h·p, w·p), pixel order inside a patch (p_row, p_col, channel)
        x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h * p, w * p)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


@register_model("vqrae")
class VQRAE(nn.Module):
    """Frozen-VFM encoder + high-dimensional SimVQ codebook + symmetric ViT pixel decoder.

    ``forward(images) -> (recon, QuantizerOutput, features)``: ``recon`` is the raw decoder output
    (not clamped, for the losses), ``features`` the encoder's continuous patch tokens (B, N, C).
    ``decode`` clamps to [-1, 1]. Built in stage 1 (encoder frozen).
    """

    config_class = VQRAEConfig

    def __init__(self, config: VQRAEConfig) -> None:
        super().__init__()
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} must be a multiple of patch_size {c.patch_size}")
        self.encoder = build_encoder(c)
        # the weights now live in the module: a saved VQRAE must not need (or re-read) the file
        self.config = dataclasses.replace(c, encoder_weights=None)
        side = c.image_size // c.patch_size
        grid = tuple(getattr(getattr(self.encoder, "patch_embed", None), "grid_size", (side, side)))
        if grid != (side, side):
            raise ValueError(f"encoder grid {grid} != image_size / patch_size = {(side, side)}")
        self.num_prefix_tokens = int(getattr(self.encoder, "num_prefix_tokens", 0))

        pcfg = getattr(self.encoder, "pretrained_cfg", {}) or {}
        mean = c.encoder_mean if c.encoder_mean is not None else pcfg.get("mean", (0.5,) * c.in_channels)
        std = c.encoder_std if c.encoder_std is not None else pcfg.get("std", (0.5,) * c.in_channels)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

        width, depth, heads, mlp_ratio = _encoder_dims(self.encoder)
        self.feature_dim = width
        self.proj = nn.Linear(width, c.codebook_dim) if width != c.codebook_dim else nn.Identity()
        self.quantizer = VectorQuantizer(c.codebook_size, c.codebook_dim, distance="l2",
                                         codebook="simvq" if c.simvq else "learned", beta=c.beta)
        dec_width = c.decoder_width or width
        dec_heads = c.decoder_heads or (heads if c.decoder_width in (None, width) else None)
        if dec_heads is None:
            raise ValueError("set decoder_heads when decoder_width differs from the encoder's width")
        self.decoder = ViTPixelDecoder(c.codebook_dim, grid, c.patch_size, c.in_channels, dec_width,
                                       c.decoder_depth or depth, dec_heads, c.decoder_mlp_ratio or mlp_ratio or 4.0)
        self._teacher: tuple[nn.Module, ...] = ()
        self.stage = 1
        self.set_stage(1)

    # ----------------------------------------------------------------- stages

    def set_stage(self, stage: int) -> "VQRAE":
        """1: freeze the encoder (no grad, eval mode). 2: unfreeze it; the first call also freezes a
        deep copy of the current encoder as the distillation teacher (kept until ``set_stage(1)``)."""
        if stage not in (1, 2):
            raise ValueError(f"VQRAE has stages 1 and 2, got {stage}")
        self.stage = stage
        if stage == 1:
            self.encoder.requires_grad_(False)
            self._teacher = ()
        else:
            if not self._teacher:
                self._teacher = (copy.deepcopy(self.encoder).requires_grad_(False).eval(),)
            self.encoder.requires_grad_(True)
        return self.train(self.training)

    @property
    def teacher(self) -> nn.Module | None:
        """Stage 2's frozen encoder copy (not in ``state_dict``: a stage-2 resume restores it itself)."""
        return self._teacher[0] if self._teacher else None

    def train(self, mode: bool = True) -> "VQRAE":
        super().train(mode)
        if self.stage == 1:  # the frozen encoder always runs as at inference (no dropout / drop-path)
            self.encoder.eval()
        if self._teacher:
            self._teacher[0].eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        if self._teacher:
            self._teacher[0]._apply(fn)
        return super()._apply(fn, recurse)

    # ----------------------------------------------------------------- pieces

    @property
    def spec(self) -> TokenSpec:
        side = self.config.image_size // self.config.patch_size
        return TokenSpec(kind="discrete", grid=(side, side), downsample=self.config.patch_size,
                         vocab_size=self.config.codebook_size)

    @property
    def last_layer(self) -> Tensor:
        """The weight VQGAN's adaptive GAN weight differentiates against (the decoder's pixel head)."""
        return self.decoder.head.weight

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.in_channels or tuple(images.shape[-2:]) != (c.image_size,) * 2:
            raise ValueError(f"expected images (B, {c.in_channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(images.shape)}")

    def _run_encoder(self, encoder: nn.Module, images: Tensor) -> Tensor:
        x = ((images + 1) / 2 - self.pixel_mean) / self.pixel_std
        tokens = encoder.forward_features(x)
        return tokens[:, self.num_prefix_tokens:]

    def semantic_features(self, images: Tensor) -> Tensor:
        """The continuous encoder features (B, N, C), patch tokens only (for understanding).

        In stage 1 the encoder is frozen and this runs without autograd.
        """
        self._check_images(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage == 2):
            return self._run_encoder(self.encoder, images)

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> Tensor:
        if self.teacher is None:
            raise RuntimeError("no teacher: call set_stage(2) first")
        self._check_images(images)
        return self._run_encoder(self.teacher, images)

    def distillation_loss(self, images: Tensor, features: Tensor | None = None) -> Tensor:
        """Stage-2 self-distillation: mean squared error between the trainable encoder's features and
        the frozen teacher's, over every patch token and channel.

        The paper writes its distances as l2 (pixel loss included) and the goal is to keep the
        features *themselves* (what the understanding model consumes) where they were, so the full
        vector is matched, magnitude included; a cosine distance would leave the feature norm free
        to drift. ``features`` reuses the forward pass's output instead of running the encoder again.
        """
        if features is None:
            features = self.semantic_features(images)
        return F.mse_loss(features, self.teacher_features(images).to(features.dtype))

    def quantize_features(self, features: Tensor) -> QuantizerOutput:
        """(B, N, C) encoder features -> SimVQ output on the (h, w) grid (quantized (B, D, h, w), ids (B, h, w))."""
        z = F.layer_norm(features, features.shape[-1:]) if self.config.feature_norm else features
        z = self.proj(z)
        h, w = self.spec.grid
        return self.quantizer(z.transpose(1, 2).reshape(z.shape[0], -1, h, w))

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Decoder on quantized latents (B, D, h, w); raw output (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.codebook_dim:
            raise ValueError(f"expected latents (B, {self.config.codebook_dim}, h, w), got {tuple(latents.shape)}")
        return self.decoder(latents)

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput, Tensor]:
        """Training pass: (raw reconstruction, quantizer output, continuous encoder features)."""
        features = self.semantic_features(images)
        q = self.quantize_features(features)
        return self.decode_latents(q.quantized), q, features

    # ----------------------------------------------------------------- Tokenizer protocol

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tokens:
        q = self.quantize_features(self.semantic_features(images))
        return Tokens(self.spec, ids=q.ids)

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """Ids (B, h, w) -> the exact codes (B, codebook_dim, h, w) that ``encode`` chose."""
        return self.quantizer.ids_to_latents(ids).contiguous()

    def decode(self, tokens: Tokens) -> Tensor:
        """Tokens (ids, or latents) -> images clamped to [-1, 1]."""
        if tokens.ids is not None:
            latents = self.ids_to_latents(tokens.ids.to(self.decoder.head.weight.device))
        elif tokens.latents is not None:
            latents = tokens.latents
        else:
            raise ValueError("VQRAE decodes Tokens with ids (or latents), not scale_ids")
        return self.decode_latents(latents).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


class VQRAELoss(AdversarialLoss):
    """VQRAE's objectives. Generator side, stage 1::

        pixel_weight · ||x - x̂||² + perceptual_weight · LPIPS(x, x̂) + λ_G · factor(step) · (-mean D(x̂)) + VQ

    and stage 2 adds ``distill_weight · distillation_loss``. λ_G is VQGAN's adaptive weight
    (``gan_weight=None``, the default: ||∇_L nll|| / (||∇_L g|| + 1e-4), clamped, · 0.8, ``L`` the
    decoder head) or a fixed number; the paper gives no value. Discriminator: PatchGAN hinge
    (optionally + LeCAM), as taming. ``state_dict`` holds the discriminator (LPIPS is frozen, unsaved).

    Usage::

        recon, q, feats = model(x)
        loss, logs = crit.generator_loss(model, x, recon, q, feats, step)
        d_loss, d_logs = crit.discriminator_loss(x, recon.detach(), step)
    """

    def __init__(self, perceptual: nn.Module | None = None, discriminator: nn.Module | None = None, *,
                 pixel_weight: float = 1.0, gan_weight: float | None = None, distill_weight: float = 1.0,
                 lecam_weight: float | None = None, **kwargs) -> None:
        super().__init__(perceptual, discriminator, gan_weight=gan_weight, lecam_weight=lecam_weight, **kwargs)
        self.pixel_weight = pixel_weight
        self.distill_weight = distill_weight

    def g_loss(self, logits_fake: Tensor) -> Tensor:
        return -logits_fake.mean()  # VQGAN's generator term

    def generator_loss(self, model: VQRAE, images: Tensor, recon: Tensor, quantizer: QuantizerOutput,
                       features: Tensor | None = None, step: int = 0, *,
                       discriminator: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        l2 = F.mse_loss(recon, images)
        logs = {"l2": _f(l2)}
        nll = self._add_perceptual(self.pixel_weight * l2, images, recon, logs)
        loss = self._add_gan(nll, nll, recon, step, model.last_layer, discriminator, logs)
        loss = self._add_quantizer(loss, quantizer, logs)
        if model.stage == 2 and self.distill_weight > 0:
            d = model.distillation_loss(images, features)
            loss = loss + self.distill_weight * d
            logs["distill"] = _f(d)
        logs["loss"] = _f(loss)
        return loss, logs
