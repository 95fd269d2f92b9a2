"""Crops and resizes shared by training and evaluation protocols."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def center_crop_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """The rFID protocol: resize the short side to `size` (bicubic, antialiased), centre-crop size x size.

    image: (C, H, W) or (B, C, H, W) float. Values are clamped to the input's range afterwards
    because bicubic overshoots.
    """
    squeeze = image.ndim == 3
    x = image[None] if squeeze else image
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        lo, hi = x.amin(), x.amax()
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(lo, hi)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x[0] if squeeze else x
