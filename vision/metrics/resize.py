"""Resizing for Inception feature extraction.

FID reference statistics were computed by the TensorFlow graph, which resizes with TF1's
`tf.image.resize_bilinear(align_corners=False)`. That op has no half-pixel offset: output pixel
`j` samples the input at `j * in_size / out_size` (PyTorch's `align_corners=False` samples at
`(j + 0.5) * in / out - 0.5`). torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
reproduces TF1 exactly; `resize_tf1_bilinear` follows the same semantics (sample positions in
float32, the upper neighbour clamped to the border, interpolate along x and then along y).
NVIDIA's StyleGAN/ADA Inception does the same with `affine_grid` + `grid_sample`.

pytorch-fid instead uses `F.interpolate(mode="bilinear", align_corners=False)` without
antialiasing: `resize_torch_bilinear`. The two differ by about 1e-3 relative in FID.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ResizeMode = Literal["tf1", "torch"]


def _tf1_sample_positions(in_size: int, out_size: int, align_corners: bool, device: torch.device):
    """Lower index, clamped upper index and fraction of each output pixel along one axis."""
    if align_corners:
        scale = (in_size - 1) / max(1, out_size - 1)
    else:
        scale = in_size / out_size
    # TF1 computes the position in float32: position = float(dst) * float(scale).
    pos = torch.arange(out_size, dtype=torch.float32, device=device) * torch.tensor(scale, dtype=torch.float32)
    lo = pos.long()  # positions are >= 0, so truncation is floor
    hi = (lo + 1).clamp_max(in_size - 1)
    return lo, hi, pos - lo.to(torch.float32)


def resize_tf1_bilinear(x: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of a float NCHW tensor exactly as TensorFlow 1.x `resize_bilinear`."""
    if x.dim() != 4 or not torch.is_floating_point(x):
        raise ValueError(f"expected a floating-point NCHW tensor, got {tuple(x.shape)} {x.dtype}")
    (in_h, in_w), (out_h, out_w) = x.shape[-2:], size
    y_lo, y_hi, dy = _tf1_sample_positions(in_h, out_h, align_corners, x.device)
    x_lo, x_hi, dx = _tf1_sample_positions(in_w, out_w, align_corners, x.device)
    dx = dx.to(x.dtype).view(1, 1, 1, out_w)
    dy = dy.to(x.dtype).view(1, 1, out_h, 1)
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)
    top_l, top_r = top.index_select(3, x_lo), top.index_select(3, x_hi)
    bot_l, bot_r = bottom.index_select(3, x_lo), bottom.index_select(3, x_hi)
    upper = top_l + (top_r - top_l) * dx
    lower = bot_l + (bot_r - bot_l) * dx
    return upper + (lower - upper) * dy


def resize_torch_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """pytorch-fid's resize: `F.interpolate(bilinear, align_corners=False)`, no antialiasing."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def resize_for_inception(x: Tensor, size: tuple[int, int], mode: ResizeMode = "tf1") -> Tensor:
    """Resize float NCHW pixels to `size` with the chosen protocol (no-op if already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "tf1":
        return resize_tf1_bilinear(x, size)
    if mode == "torch":
        return resize_torch_bilinear(x, size)
    raise ValueError(f"unknown resize mode {mode!r}; use 'tf1' or 'torch'")
