"""EDSR feature encoder without the upsampling tail (Lim et al., CVPR-W 2017), as used by LIIF.

Module names follow yinboc/liif `models/edsr.py` so official state_dict keys load unchanged:
`sub_mean`, `add_mean`, `head.0`, `body.{i}.body.{0,2}`, `body.{n}`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass
class EDSRConfig:
    n_resblocks: int = 16  # edsr-baseline; full EDSR is 32
    n_feats: int = 64  # edsr-baseline; full EDSR is 256
    res_scale: float = 1.0  # edsr-baseline; full EDSR is 0.1
    rgb_range: float = 1.0  # only sets the (unused) mean-shift biases


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv adding/subtracting the DIV2K mean.

    The official LIIF encoder keeps these in its state_dict but never applies them in `forward`
    (the calls are commented out); Tessera keeps them for key compatibility only.
    """

    def __init__(self, rgb_range: float, sign: int):
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(DIV2K_RGB_MEAN))
        self.requires_grad_(False)


def conv3x3(dim_in: int, dim_out: int) -> nn.Conv2d:
    return nn.Conv2d(dim_in, dim_out, 3, padding=1)


class ResBlock(nn.Module):
    """conv-ReLU-conv with a scaled identity skip (no batch norm)."""

    def __init__(self, dim: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(conv3x3(dim, dim), nn.ReLU(inplace=True), conv3x3(dim, dim))
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        if self.res_scale != 1:  # edsr-baseline's 1.0 would be a wasted pass (x * 1.0 is exact)
            out = out * self.res_scale
        return out.add_(x)  # the conv output is not needed for backward, so in place is safe


class EDSR(nn.Module):
    """3 -> n_feats features at the input resolution: head conv, residual body, global skip."""

    def __init__(self, config: EDSRConfig | None = None):
        super().__init__()
        self.config = config = config or EDSRConfig()
        dim = config.n_feats
        self.sub_mean = MeanShift(config.rgb_range, sign=-1)
        self.add_mean = MeanShift(config.rgb_range, sign=1)
        self.head = nn.Sequential(conv3x3(3, dim))
        self.body = nn.Sequential(
            *[ResBlock(dim, config.res_scale) for _ in range(config.n_resblocks)],
            conv3x3(dim, dim),
        )
        self.out_dim = dim

    @property
    def receptive_radius(self) -> int:
        """Input pixels on each side that can influence one output feature (one per 3x3 conv)."""
        return 2 * self.config.n_resblocks + 2

    @property
    def peak_channels(self) -> int:
        """Channels per input pixel alive at once in an inference forward (memory planning)."""
        return 4 * self.config.n_feats + 3  # input, head output, running feature, two block temporaries

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(x)
        return self.body(x).add_(x)
