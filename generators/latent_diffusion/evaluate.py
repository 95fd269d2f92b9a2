"""Held-out figures of arbitrary-scale latent diffusion, shared by apps.train_ldm (index entries) and
apps.benchmark ldm.

- First stage: PSNR of the implicit decoder's reconstruction at the input size and at half of it
  (against the bicubic downscale, the first stage's training target), on the held-out photos'
  central crops or the held-out MNIST-5k digits.
- Super-resolution: the held-out photos' central `crop` x `crop`, bicubic-downscaled (PIL,
  uint8) by the scale as LIIF's protocol does, brought back by the diffusion model, by bicubic
  interpolation and by the deterministic LIIF path; PSNR on RGB in [0, 1] with LIIF's border shave,
  LPIPS (alex) where its backbone file is present.
- Generation: the Fréchet distance of 1000 samples to the held-out digits (the digit classifier's
  features, `vision.metrics.digits`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vision.data.images import read_image_uint8
from vision.data.sr import _pil_bicubic, _to_unit, div2k_shave
from vision.metrics.image_quality import psnr

SR_CROP = 96  # HR side of the held-out crops (x4: a 24x24 LR)
SR_STEPS = 50


def central_crop(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    side = min(side, h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(img[y0:y0 + side, x0:x0 + side])


def heldout_photos() -> list[np.ndarray]:
    from vision.data.samples import split_photos

    return [read_image_uint8(p) for p in split_photos()[1]]


def sr_pairs(scale: float, crop: int = SR_CROP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lr, hr) in [-1, 1] per held-out photo: the central crop and its PIL-bicubic downscale."""
    pairs = []
    for img in heldout_photos():
        hr = central_crop(img, crop)
        side = max(1, round(hr.shape[0] / scale))
        pairs.append((_to_unit(_pil_bicubic(hr, (side, side))), _to_unit(hr)))
    return pairs


def try_lpips(device):
    """An LPIPS (alex) model, or None where torchvision's AlexNet weights are not on disk."""
    from vision.metrics.image_quality import load_lpips

    try:
        return load_lpips("alex", device=device)
    except FileNotFoundError:
        return None


@torch.no_grad()
def sr_figures(model, scale: float, device, *, seed: int = 0, steps: int = SR_STEPS, crop: int = SR_CROP,
               liif=None, lpips_model=None, **sampling) -> dict[str, float]:
    """psnr_{ldm,bicubic,liif}_x{s} (and lpips_*) averaged over the held-out photos."""
    key = f"x{scale:g}"
    shave = div2k_shave(scale)
    rows: dict[str, list[float]] = {}
    for i, (lr, hr) in enumerate(sr_pairs(scale, crop)):
        size = tuple(hr.shape[-2:])
        lr = lr[None].to(device)
        g = torch.Generator(device).manual_seed(seed * 1000 + i)
        outputs = {"ldm": model.upscale(lr, size, steps=steps, generator=g, **sampling).clamp(-1, 1).cpu(),
                   "bicubic": F.interpolate(lr.cpu(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)}
        if liif is not None:
            outputs["liif"] = liif.upscale(lr, size).cpu()
        target = (hr[None] + 1) / 2
        for name, out in outputs.items():
            rows.setdefault(f"psnr_{name}_{key}", []).append(psnr((out + 1) / 2, target, shave=shave).item())
            if lpips_model is not None:
                d = lpips_model(((out + 1) / 2).to(device), target.to(device), normalize=True).item()
                rows.setdefault(f"lpips_{name}_{key}", []).append(d)
    return {k: round(float(np.mean(v)), 4) for k, v in rows.items()}


def evaluate_sr(model, device, *, seed: int = 0) -> tuple[dict[str, float], str]:
    figures = sr_figures(model, 4.0, device, seed=seed, lpips_model=try_lpips(device))
    return figures, (f"held-out photos' central {SR_CROP}x{SR_CROP} crops, PIL-bicubic x4 downscale, {SR_STEPS} "
                     f"sampling steps at the model's defaults, seed {seed}; PSNR RGB with LIIF's shave; "
                     "generators.latent_diffusion.evaluate.sr_figures")


@torch.no_grad()
def evaluate_first_stage(model, data: str, crop: int, device) -> tuple[dict[str, float], str]:
    if data == "mnist5k":
        from vision.data.datasets import MNISTImages

        images = MNISTImages(32, heldout=True).x[:500]
        where = "500 held-out MNIST-5k digits"
    else:
        side = 192 - 192 % model.downsample
        images = torch.stack([_to_unit(central_crop(img, side)) for img in heldout_photos()])
        where = f"held-out photos' central {side}x{side} crops"
    images = images.to(device)
    h, w = images.shape[-2:]
    rec = torch.cat([model.decode(model.encode_latents(x[None]), size=(h, w)) for x in images]).clamp(-1, 1)
    half = (h // 2, w // 2)
    rec_half = torch.cat([model.decode(model.encode_latents(x[None]), size=half) for x in images]).clamp(-1, 1)
    target_half = F.interpolate(images, size=half, mode="bicubic", align_corners=False).clamp(-1, 1)
    figures = {"psnr_reconstruction_db": psnr((rec + 1) / 2, (images + 1) / 2).item(),
               "psnr_half_size_db": psnr((rec_half + 1) / 2, (target_half + 1) / 2).item()}
    return ({k: round(v, 3) for k, v in figures.items()},
            f"{where}: decoded at the input size, and at half of it against the bicubic downscale")


@torch.no_grad()
def evaluate_generation(model, device, *, seed: int = 0, n: int = 1000) -> tuple[dict[str, float], str]:
    from vision.metrics.digits import score_digits

    g = torch.Generator(device).manual_seed(seed)
    images = []
    for start in range(0, n, 100):
        tokens, _ = model.generate(None, generator=g, batch_size=min(100, n - start))
        images.append(model.tokenizer.decode(tokens.latents).clamp(-1, 1).cpu())
    fd = score_digits(torch.cat(images), None)["fd"]
    return ({"fd_plain": round(fd, 3)},
            f"{n} samples with the plain sampler at the model's defaults, seed {seed}; "
            "vision.metrics.digits.score_digits (Fréchet distance) against the 1000 held-out MNIST-5k digits")
