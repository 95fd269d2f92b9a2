"""Training losses for image tokenizers: LPIPS, PatchGAN, GAN objectives, LeCAM, adaptive weight.

The VQGAN recipe (CompVis/taming-transformers ``vqperceptual.py``) as WeTok configures it
(zhuangshaobin/WeTok ``modules/losses/vqperceptual.py::VQLPIPSWithDiscriminator``):

generator:      |x - x̂| + 1.0 LPIPS_vgg(x, x̂) + w · factor(step) · g_loss + quantizer losses
discriminator:  factor(step) · (hinge(D(x), D(x̂)) + 0.05 · LeCAM)

- ``g_loss`` is non-saturating, on the *per-image mean* of the PatchGAN logits:
  ``mean_b softplus(-mean_hw D(x̂)_b)``;
- ``w`` is WeTok's fixed 0.1 (``gen_loss_weight``) or, with ``gan_weight=None``, VQGAN's adaptive
  weight ``||∇_L nll|| / (||∇_L g_loss|| + 1e-4)``, clamped to [0, 1e4], times 0.8 (``disc_weight``),
  ``L`` = ``decoder.conv_out.weight``;
- ``factor(step)`` is 0 before ``disc_start`` and 1 from it (WeTok: ``disc_start: 0``);
- LeCAM (Tseng et al., 2021): EMAs (decay 0.999, start 0) of the mean real and fake logits, updated
  with the current batch *before* ``mean relu(D(x) - ema_fake)² + mean relu(ema_real - D(x̂))²``.
  The official EMA is a plain Python object outside ``state_dict``, so it restarts from 0 on every
  resume; :class:`LeCAM` keeps it in buffers so checkpoints carry it. Under torch.distributed the
  batch means are averaged over processes first, so every rank holds the same EMA.

Differences from the official code, none of which change a loss value: LPIPS always runs in eval
mode (the official LPIPS has dropout layers that a Lightning ``.train()`` call switches on), and the
generator side skips the discriminator while ``factor(step)`` is 0 instead of multiplying by 0.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vision.nn.distributed import world_size

from .quantizers import QuantizerOutput


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


class LPIPSLoss(nn.Module):
    """LPIPS (the ``lpips`` package, v0.1 heads) as a frozen loss on images in [-1, 1], per image.

    The network is kept out of the module tree: it is frozen, comes from local files, and is
    neither trained nor written into checkpoints; ``.to()`` still moves it and it stays in eval.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._net = (net.eval().requires_grad_(False),)

    @classmethod
    def from_local(cls, net: str = "vgg", backbone_path: str | os.PathLike | None = None) -> "LPIPSLoss":
        """The real LPIPS: torchvision ImageNet backbone from the torch hub cache or `backbone_path`."""
        from vision.metrics.image_quality import load_lpips

        return cls(load_lpips(net, backbone_path))

    @classmethod
    def random_backbone(cls, net: str = "vgg", seed: int = 0) -> "LPIPSLoss":
        """LPIPS with a randomly initialised backbone (tests, smoke runs); the global RNG is untouched."""
        import lpips

        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(seed)
            model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        return cls(model)

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def _apply(self, fn, recurse: bool = True):
        self._net[0]._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, images: Tensor, recon: Tensor) -> Tensor:
        return self.net(images, recon, normalize=False).flatten()


# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator and GAN objectives
# ---------------------------------------------------------------------------------------------


def _init_weights(m: nn.Module) -> None:
    """taming ``weights_init``: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """The pix2pix PatchGAN as taming / Open-MAGVIT2 / WeTok use it (keys ``main.<i>.*`` as theirs).

    4x4 convs: stride 2 for the first ``n_layers``, then stride 1 twice (the last to one logit per
    patch); BatchNorm + LeakyReLU(0.2) after every conv but the first and the last.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 · (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """-log sigmoid of each image's mean logit, averaged over the batch (WeTok / MaskBit)."""
    return F.softplus(-logits_fake.flatten(1).mean(dim=1)).mean()


def disc_factor(step: int, disc_start: int) -> float:
    """taming ``adopt_weight``: the GAN terms are off (0) before ``disc_start``, on (1) from it."""
    return 0.0 if step < disc_start else 1.0


class LeCAM(nn.Module):
    """LeCAM regularisation with the EMAs of the mean real / fake logits held in (saved) buffers."""

    def __init__(self, decay: float = 0.999, init: float = 0.0) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("logits_real_ema", torch.tensor(init, dtype=torch.float64))
        self.register_buffer("logits_fake_ema", torch.tensor(init, dtype=torch.float64))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """ema <- ema · decay + batch mean · (1 - decay), in float64 as the official Python floats."""
        means = torch.stack([logits_real.detach().mean(), logits_fake.detach().mean()]).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        means = means.to(self.logits_real_ema.device)
        for ema, m in ((self.logits_real_ema, means[0]), (self.logits_fake_ema, means[1])):
            ema.copy_(ema * self.decay + m * (1 - self.decay))

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """mean relu(D(x) - ema_fake)² + mean relu(ema_real - D(x̂))² (no update: call `update` first)."""
        real_ema = self.logits_real_ema.to(logits_fake.device, logits_fake.dtype)
        fake_ema = self.logits_fake_ema.to(logits_real.device, logits_real.dtype)
        return F.relu(logits_real - fake_ema).pow(2).mean() + F.relu(real_ema - logits_fake).pow(2).mean()

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 0.8,
                        eps: float = 1e-4, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: ||∇_L nll|| / (||∇_L g|| + eps), clamped to [0, max_weight], detached, · disc_weight.

    Returns 0 where no gradient can be taken (no grad mode), as the official code does in evaluation.
    Under torch.distributed both gradients are averaged over processes first (the official code takes
    each process's own), so the weight is the single-process one of the global batch.
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
        return nll_loss.new_zeros(())
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if world_size() > 1:
        both = torch.stack([nll_grads, g_grads])
        dist.all_reduce(both)
        nll_grads, g_grads = both / world_size()
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


def _f(t: Tensor) -> float:
    return float(t.detach())


# ---------------------------------------------------------------------------------------------
# the two sides, put together
# ---------------------------------------------------------------------------------------------


class AdversarialLoss(nn.Module):
    """What every GAN-trained tokenizer loss shares: LPIPS, the PatchGAN and its hinge + LeCAM side,
    and the generator's GAN term with a fixed or VQGAN-adaptive weight, gated by ``disc_start``.

    ``state_dict`` holds the discriminator and the LeCAM EMAs (LPIPS is frozen and not saved).
    Methods take an optional ``discriminator`` to call instead of ``self.discriminator`` (e.g. its
    DDP wrapper). Subclasses define ``generator_loss`` and ``g_loss(logits_fake)``.
    """

    def __init__(self, perceptual: nn.Module | None = None, discriminator: nn.Module | None = None, *,
                 gan: bool = True, perceptual_weight: float = 1.0, gan_weight: float | None = 0.1,
                 adaptive_disc_weight: float = 0.8, disc_start: int = 0, lecam_weight: float | None = 0.05,
                 lecam_decay: float = 0.999) -> None:
        super().__init__()
        if perceptual is None and perceptual_weight > 0:
            raise ValueError("perceptual_weight > 0 needs a perceptual loss module (LPIPSLoss.from_local())")
        self.perceptual = perceptual
        self.gan = gan
        self.discriminator = (discriminator if discriminator is not None else NLayerDiscriminator()) if gan else None
        self.lecam = LeCAM(lecam_decay) if gan and lecam_weight is not None else None
        self.perceptual_weight = perceptual_weight
        self.gan_weight = gan_weight
        self.adaptive_disc_weight = adaptive_disc_weight
        self.disc_start = disc_start
        self.lecam_weight = lecam_weight

    def g_loss(self, logits_fake: Tensor) -> Tensor:
        raise NotImplementedError

    def _add_perceptual(self, nll: Tensor, images: Tensor, recon: Tensor, logs: dict[str, float]) -> Tensor:
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(images.contiguous(), recon.contiguous()).mean()
            nll = nll + self.perceptual_weight * p
            logs["lpips"] = _f(p)
        logs["nll"] = _f(nll)
        return nll

    def _add_gan(self, loss: Tensor, nll: Tensor, recon: Tensor, step: int, last_layer: Tensor | None,
                 discriminator: nn.Module | None, logs: dict[str, float]) -> Tensor:
        factor = disc_factor(step, self.disc_start) if self.gan else 0.0
        if factor == 0:
            return loss
        disc = discriminator if discriminator is not None else self.discriminator
        g_loss = self.g_loss(disc(recon.contiguous()))
        if self.gan_weight is None:
            if last_layer is None:
                raise ValueError("the adaptive GAN weight needs last_layer (e.g. model.last_layer)")
            weight = adaptive_gan_weight(nll, g_loss, last_layer, self.adaptive_disc_weight)
        else:
            weight = torch.tensor(self.gan_weight, device=g_loss.device, dtype=g_loss.dtype)
        logs.update(g_loss=_f(g_loss), gan_weight=_f(weight))
        return loss + weight * factor * g_loss

    @staticmethod
    def _add_quantizer(loss: Tensor, quantizer: QuantizerOutput | None, logs: dict[str, float]) -> Tensor:
        if quantizer is None:
            return loss
        logs.update({f"{k}_loss": _f(v) for k, v in quantizer.losses.items()})
        logs.update({f"q_{k}": float(v) for k, v in quantizer.metrics.items()})
        return loss + quantizer.loss

    def discriminator_loss(self, images: Tensor, recon: Tensor, step: int = 0, *,
                           discriminator: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        """factor(step) · (hinge(D(x), D(x̂)) + lecam_weight · LeCAM)."""
        if not self.gan:
            raise ValueError(f"this {type(self).__name__} was built with gan=False")
        disc = discriminator if discriminator is not None else self.discriminator
        logits_real = disc(images.contiguous().detach())
        logits_fake = disc(recon.contiguous().detach())
        hinge = hinge_d_loss(logits_real, logits_fake)
        d_loss = hinge
        logs = {"hinge": _f(hinge), "logits_real": _f(logits_real.mean()), "logits_fake": _f(logits_fake.mean())}
        if self.lecam is not None:
            self.lecam.update(logits_real, logits_fake)
            reg = self.lecam(logits_real, logits_fake)
            d_loss = hinge + self.lecam_weight * reg
            logs["lecam"] = _f(reg)
        return disc_factor(step, self.disc_start) * d_loss, logs


class WeTokLoss(AdversarialLoss):
    """Generator- and discriminator-side losses of WeTok (defaults) or VQGAN (``gan_weight=None``).

    Typical use with ``vision.train`` (one Phase each, generator first)::

        recon, q = model(x)
        loss, logs = crit.generator_loss(x, recon, q, step, last_layer=model.last_layer)
        ...
        d_loss, d_logs = crit.discriminator_loss(x, recon.detach(), step)

    Stage 2 of WeTok (generative decoder) passes ``quantizer=None``: L1 + LPIPS + GAN only.
    """

    def __init__(self, perceptual: nn.Module | None = None, discriminator: nn.Module | None = None, *,
                 l1_weight: float = 1.0, **kwargs) -> None:
        super().__init__(perceptual, discriminator, **kwargs)
        self.l1_weight = l1_weight

    def g_loss(self, logits_fake: Tensor) -> Tensor:
        return non_saturating_g_loss(logits_fake)

    def generator_loss(self, images: Tensor, recon: Tensor, quantizer: QuantizerOutput | None = None, step: int = 0,
                       *, last_layer: Tensor | None = None,
                       discriminator: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        l1 = (images - recon).abs().mean()
        logs = {"l1": _f(l1)}
        nll = self._add_perceptual(self.l1_weight * l1, images, recon, logs)
        loss = self._add_gan(nll, nll, recon, step, last_layer, discriminator, logs)
        return self._add_quantizer(loss, quantizer, logs), logs
