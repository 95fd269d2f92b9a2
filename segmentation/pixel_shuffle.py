"""N-D pixel shuffle with one factor per spatial axis (anisotropic), and its inverse.

`pixel_shuffle_nd(x, (r1, ..., rn))` maps (B, C * r1*...*rn, d1, ..., dn) to
(B, C, d1*r1, ..., dn*rn). Channel index c * prod(r) + flat(i1, ..., in) (row-major over the
factors) goes to output position (k1*r1 + i1, ..., kn*rn + in): the convention of
`torch.nn.functional.pixel_shuffle` in 2-D, and of neU-Net's `PixelShuffle3d`
(aitechlabcn/neUNet, `neUNet_utils/model.py`), which views the channels as
(C, r1, r2, r3) and interleaves each factor after its spatial axis.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["pixel_shuffle_nd", "pixel_unshuffle_nd", "PixelShuffleND", "PixelUnshuffleND"]


def _factors(x: Tensor, factors: Sequence[int]) -> tuple[int, ...]:
    factors = tuple(int(f) for f in factors)
    if len(factors) != x.ndim - 2:
        raise ValueError(f"need one factor per spatial axis: {x.ndim - 2} axes, got factors {factors}")
    if any(f < 1 for f in factors):
        raise ValueError(f"factors must be >= 1, got {factors}")
    return factors


def pixel_shuffle_nd(x: Tensor, factors: Sequence[int]) -> Tensor:
    """(B, C*prod(f), *d) -> (B, C, *(d_i * f_i))."""
    f = _factors(x, factors)
    n, r = len(f), math.prod(f)
    b, c, *dims = x.shape
    if c % r:
        raise ValueError(f"channels ({c}) must be divisible by prod(factors) = {r}")
    x = x.reshape(b, c // r, *f, *dims)
    # (B, C, r1..rn, d1..dn) -> (B, C, d1, r1, d2, r2, ..., dn, rn)
    order = [0, 1] + [i for k in range(n) for i in (2 + n + k, 2 + k)]
    return x.permute(order).reshape(b, c // r, *(d * s for d, s in zip(dims, f)))


def pixel_unshuffle_nd(x: Tensor, factors: Sequence[int]) -> Tensor:
    """(B, C, *(d_i * f_i)) -> (B, C*prod(f), *d); the exact inverse of `pixel_shuffle_nd`."""
    f = _factors(x, factors)
    n = len(f)
    b, c, *dims = x.shape
    if any(d % s for d, s in zip(dims, f)):
        raise ValueError(f"spatial size {tuple(dims)} is not divisible by factors {f}")
    split = [v for d, s in zip(dims, f) for v in (d // s, s)]
    x = x.reshape(b, c, *split)  # (B, C, d1, r1, ..., dn, rn)
    order = [0, 1] + [3 + 2 * k for k in range(n)] + [2 + 2 * k for k in range(n)]
    return x.permute(order).reshape(b, c * math.prod(f), *(d // s for d, s in zip(dims, f)))


class PixelShuffleND(nn.Module):
    """Module form of `pixel_shuffle_nd` (no parameters)."""

    def __init__(self, factors: Sequence[int]):
        super().__init__()
        self.factors = tuple(int(f) for f in factors)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle_nd(x, self.factors)

    def extra_repr(self) -> str:
        return f"factors={self.factors}"


class PixelUnshuffleND(nn.Module):
    """Module form of `pixel_unshuffle_nd` (no parameters)."""

    def __init__(self, factors: Sequence[int]):
        super().__init__()
        self.factors = tuple(int(f) for f in factors)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_unshuffle_nd(x, self.factors)

    def extra_repr(self) -> str:
        return f"factors={self.factors}"
