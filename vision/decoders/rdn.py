"""Residual Dense Network feature encoder without upsampling (Zhang et al., CVPR 2018), as used by LIIF.

Module names follow yinboc/liif `models/rdn.py` so official state_dict keys load unchanged:
`SFENet1`, `SFENet2`, `RDBs.{i}.convs.{c}.conv.0`, `RDBs.{i}.LFF`, `GFF.{0,1}`.
The official presets are RDNconfig 'A' = (20 blocks, 6 layers, growth 32) and 'B' = (16, 8, 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

RDN_PRESETS = {"A": (20, 6, 32), "B": (16, 8, 64)}  # (num_blocks D, num_layers C, growth G)


@dataclass
class RDNConfig:
    G0: int = 64  # feature width between dense blocks
    kernel_size: int = 3
    num_blocks: int = 16  # D
    num_layers: int = 8  # C, conv layers per dense block
    growth: int = 64  # G, channels each dense layer adds


class DenseLayer(nn.Module):
    """conv-ReLU whose output is concatenated to its input (official `RDB_Conv`)."""

    def __init__(self, dim_in: int, growth: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(dim_in, growth, kernel_size, padding=kernel_size // 2), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv(x)), dim=1)


class RDB(nn.Module):
    """Residual dense block: C dense layers, 1x1 local feature fusion, identity skip."""

    def __init__(self, dim: int, growth: int, num_layers: int, kernel_size: int):
        super().__init__()
        self.convs = nn.Sequential(*[DenseLayer(dim + i * growth, growth, kernel_size) for i in range(num_layers)])
        self.LFF = nn.Conv2d(dim + num_layers * growth, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.LFF(self.convs(x)) + x


class RDN(nn.Module):
    """3 -> G0 features at the input resolution: shallow convs, D dense blocks, global feature fusion."""

    def __init__(self, config: RDNConfig | None = None):
        super().__init__()
        self.config = config = config or RDNConfig()
        dim, k = config.G0, config.kernel_size
        self.SFENet1 = nn.Conv2d(3, dim, k, padding=k // 2)
        self.SFENet2 = nn.Conv2d(dim, dim, k, padding=k // 2)
        self.RDBs = nn.ModuleList([RDB(dim, config.growth, config.num_layers, k) for _ in range(config.num_blocks)])
        self.GFF = nn.Sequential(nn.Conv2d(config.num_blocks * dim, dim, 1), nn.Conv2d(dim, dim, k, padding=k // 2))
        self.out_dim = dim

    @property
    def receptive_radius(self) -> int:
        """Input pixels on each side that can influence one output feature.

        Spatial convs on the longest path: SFENet1, SFENet2, C per dense block, the last GFF conv.
        """
        c = self.config
        return (c.kernel_size // 2) * (3 + c.num_blocks * c.num_layers)

    @property
    def peak_channels(self) -> int:
        """Channels per input pixel alive at once in an inference forward (memory planning): inside a
        dense block the two latest concatenations, the block outputs kept for fusion; at fusion their
        concatenation too."""
        c = self.config
        in_blocks = 2 * c.G0 + c.num_blocks * c.G0 + 2 * (c.G0 + c.num_layers * c.growth)
        at_fusion = 2 * c.num_blocks * c.G0 + 2 * c.G0
        return max(in_blocks, at_fusion) + 3

    def forward(self, x: Tensor) -> Tensor:
        shallow = self.SFENet1(x)
        x = self.SFENet2(shallow)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        return self.GFF(torch.cat(outs, dim=1)) + shallow
