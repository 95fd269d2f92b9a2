"""Upscaling quality on held-out photos: PSNR of an arbitrary-scale model against bicubic.

Protocol (LIIF's DIV2K evaluation): the HR photo is cropped to a whole number of LR pixels
and bicubic-downsampled (PIL, uint8) by the scale; the model and bicubic interpolation
(torch, align_corners=False) bring it back to the HR size; PSNR on RGB in [0, 1] with
ceil(scale) + 6 pixels shaved from each border, averaged over photos.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vision.data.images import read_image_uint8
from vision.data.sr import div2k_shave, downsampled_pair
from vision.metrics.image_quality import psnr


def scale_key(scale: float) -> str:
    return f"x{scale:g}"


@torch.no_grad()
def evaluate_upscaler(model, photos: Sequence[str | Path | np.ndarray], scales: Sequence[float],
                      tile: int | None = 128, device: torch.device | str = "cpu") -> dict[str, float]:
    """{"psnr_liif_db_x3.7": ..., "psnr_bicubic_db_x3.7": ...} for each scale."""
    images = [p if isinstance(p, np.ndarray) else read_image_uint8(p) for p in photos]
    out: dict[str, float] = {}
    for s in scales:
        ours, bicubic = [], []
        for img in images:
            lr, hr = downsampled_pair(img, s)
            lr = lr[None].to(device)
            size = tuple(hr.shape[-2:])
            sr = model.upscale(lr, size, tile=tile).cpu()
            bi = F.interpolate(lr.cpu(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
            target = (hr[None] + 1) / 2
            shave = div2k_shave(s)
            ours.append(psnr((sr + 1) / 2, target, shave=shave).item())
            bicubic.append(psnr((bi + 1) / 2, target, shave=shave).item())
        out[f"psnr_liif_db_{scale_key(s)}"] = float(np.mean(ours))
        out[f"psnr_bicubic_db_{scale_key(s)}"] = float(np.mean(bicubic))
    return out
