"""Haar discrete wavelet transform in torch (N-D, any subset of axes, recursive pyramids).

The transform is the orthonormal Haar DWT of PyWavelets (`pywt.dwtn(x, "haar")`): along each
transformed axis, pairs (x[2k], x[2k+1]) become

    a[k] = (x[2k] + x[2k+1]) / sqrt(2)        d[k] = (x[2k] - x[2k+1]) / sqrt(2)

An odd-length axis is first extended by repeating its last sample, which is what pywt's default
'symmetric' mode (and 'periodization') does for the 2-tap Haar filter, so sizes become ceil(n/2).
Sub-band keys and order follow `pywt.dwtn`: one letter per transformed axis ('a' approximation,
'd' detail), the first letter for the first axis, ordered as `itertools.product("ad", ...)`
('aa', 'ad', 'da', 'dd' in 2-D).

neU-Net (aitechlabcn/neUNet, `wavelet_downsampling.py`, mode=1) feeds each encoder stage the
sub-bands of a recursive DWT: the approximation band of the previous level is transformed again
over the axes the stage stride halves, and all sub-bands are concatenated on the channel axis in
the order above (`wavelet_pyramid`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["haar_dwt1", "haar_idwt1", "haar_dwtn", "haar_idwtn", "haar_dwtn_concat", "wavelet_pyramid"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _axis(x: Tensor, axis: int) -> int:
    return axis % x.ndim


def haar_dwt1(x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """One-level Haar DWT along one axis: returns (approximation, detail), each of size ceil(n/2)."""
    axis = _axis(x, axis)
    n = x.shape[axis]
    if n == 0:
        raise ValueError("cannot transform an empty axis")
    if n % 2:  # half-sample symmetric extension == repeat the last sample (pywt 'symmetric')
        x = torch.cat([x, x.narrow(axis, n - 1, 1)], dim=axis)
    pairs = x.unflatten(axis, (x.shape[axis] // 2, 2))
    even, odd = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
    return (even + odd) * _INV_SQRT2, (even - odd) * _INV_SQRT2


def haar_idwt1(a: Tensor, d: Tensor, axis: int) -> Tensor:
    """Inverse of `haar_dwt1` for even-length signals (interleaves the reconstructed pairs)."""
    axis = _axis(a, axis)
    even, odd = (a + d) * _INV_SQRT2, (a - d) * _INV_SQRT2
    return torch.stack([even, odd], dim=axis + 1).flatten(axis, axis + 1)


def haar_dwtn(x: Tensor, axes: Sequence[int]) -> dict[str, Tensor]:
    """Single-level N-D Haar DWT over `axes`, as `pywt.dwtn(x, "haar", axes=axes)` (same keys, order)."""
    axes = [_axis(x, a) for a in axes]
    if len(set(axes)) != len(axes):
        raise ValueError(f"repeated axes {axes}")
    bands: dict[str, Tensor] = {"": x}
    for axis in axes:
        nxt: dict[str, Tensor] = {}
        for key, band in bands.items():
            a, d = haar_dwt1(band, axis)
            nxt[key + "a"], nxt[key + "d"] = a, d
        bands = nxt
    return {"".join(k): bands["".join(k)] for k in itertools.product("ad", repeat=len(axes))}


def haar_idwtn(coeffs: dict[str, Tensor], axes: Sequence[int]) -> Tensor:
    """Inverse of `haar_dwtn` (even sizes): rebuilds the signal from all 2^len(axes) sub-bands."""
    axes = list(axes)
    if not axes:
        return coeffs[""]
    bands = dict(coeffs)
    for i in reversed(range(len(axes))):  # undo the last transformed axis first
        merged: dict[str, Tensor] = {}
        for prefix in ("".join(k) for k in itertools.product("ad", repeat=i)):
            merged[prefix] = haar_idwt1(bands[prefix + "a"], bands[prefix + "d"], axes[i])
        bands = merged
    return bands[""]


def haar_dwtn_concat(x: Tensor, axes: Sequence[int], dim: int = 1) -> Tensor:
    """All sub-bands of `haar_dwtn` concatenated along `dim` in pywt key order (band-major)."""
    return torch.cat(list(haar_dwtn(x, axes).values()), dim=dim)


def wavelet_pyramid(x: Tensor, strides: Sequence[Sequence[int]]) -> list[Tensor]:
    """Recursive Haar inputs, one per stride: level i transforms the approximation of level i-1.

    `x` is (B, C, *spatial); each stride has one factor per spatial axis, each 1 or 2. Level i
    transforms the axes whose factor in `strides[i]` is 2 and returns all sub-bands concatenated
    on the channel axis (C * 2^k channels at the cumulative downsampled size); a stride of all
    ones returns the current approximation unchanged (C channels), as neU-Net's loader does.
    """
    spatial = x.ndim - 2
    out: list[Tensor] = []
    approx = x
    for stride in strides:
        stride = tuple(int(s) for s in stride)
        if len(stride) != spatial or any(s not in (1, 2) for s in stride):
            raise ValueError(f"Haar pyramid strides must have {spatial} entries of 1 or 2, got {stride}")
        axes = [2 + i for i, s in enumerate(stride) if s == 2]
        if not axes:
            out.append(approx)
            continue
        bands = haar_dwtn(approx, axes)
        approx = bands["a" * len(axes)]
        out.append(torch.cat(list(bands.values()), dim=1))
    return out
