"""Intensity normalisation and resampling for CT/MRI volumes (nnU-Net's preprocessing recipes).

- CT (nnU-Net ``CTNormalization``): clip to the 0.5 / 99.5 percentiles of the *foreground* voxels
  of the training set, then z-score with the mean and standard deviation of those (unclipped)
  foreground voxels. The statistics belong to the dataset, not to the case being normalised.
- MRI (nnU-Net ``ZScoreNormalization``, MONAI ``NormalizeIntensity``): z-score each case with its
  own mean and (population) standard deviation, optionally over the non-zero voxels only, leaving
  the zero background at 0.
- Resampling to a target spacing and back: trilinear for images, nearest for labels; the way back
  takes the original shape explicitly, so it is always recovered exactly.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CTStatistics", "ct_statistics", "normalize_ct", "zscore", "resampled_shape",
           "resample_to_spacing", "resample_to_shape"]


@dataclass(frozen=True)
class CTStatistics:
    """Dataset-level CT intensity statistics (nnU-Net's ``foreground_intensity_properties``)."""

    lower: float  # 0.5th percentile of foreground HU
    upper: float  # 99.5th percentile
    mean: float
    std: float


def ct_statistics(images: Iterable[np.ndarray], labels: Iterable[np.ndarray],
                  percentiles: tuple[float, float] = (0.5, 99.5)) -> CTStatistics:
    """Foreground (label > 0) intensity statistics over a set of training cases."""
    values = [np.asarray(img, dtype=np.float64)[np.asarray(lab) > 0] for img, lab in zip(images, labels)]
    fg = np.concatenate(values) if values else np.zeros(0)
    if fg.size == 0:
        raise ValueError("no foreground voxels (label > 0) to compute CT statistics from")
    lo, hi = np.percentile(fg, percentiles)
    return CTStatistics(lower=float(lo), upper=float(hi), mean=float(fg.mean()), std=float(fg.std()))


def normalize_ct(image: np.ndarray, stats: CTStatistics) -> np.ndarray:
    """Clip to ``[stats.lower, stats.upper]`` then ``(x - mean) / max(std, 1e-8)``; float32 out."""
    out = np.clip(np.asarray(image, dtype=np.float32), stats.lower, stats.upper)
    return ((out - np.float32(stats.mean)) / np.float32(max(stats.std, 1e-8))).astype(np.float32)


def zscore(image: np.ndarray, nonzero: bool = False) -> np.ndarray:
    """Per-case z-score; with ``nonzero=True`` only non-zero voxels are used and changed (zeros stay 0)."""
    image = np.asarray(image, dtype=np.float32)
    out = np.zeros_like(image) if nonzero else image.copy()
    mask = image != 0 if nonzero else np.ones(image.shape, dtype=bool)
    if not mask.any():
        return out
    values = image[mask]
    mean, std = values.mean(), values.std()
    out[mask] = (values - mean) / (std if std > 0 else 1.0)
    return out


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's new shape: ``round(shape * spacing / target_spacing)``, at least 1 per axis."""
    if not (len(shape) == len(spacing) == len(target_spacing)):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target {tuple(target_spacing)} "
                         "need one entry per spatial axis")
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def resample_to_shape(array: np.ndarray | torch.Tensor, shape: Sequence[int], *, is_label: bool = False
                      ) -> np.ndarray | torch.Tensor:
    """Resample the last ``len(shape)`` axes to ``shape`` (leading axes are channels).

    Images use (bi/tri)linear interpolation (``align_corners=False``: voxel centres of the two grids
    cover the same extent); labels use ``nearest-exact``, which keeps label values and, for integer
    factors, makes down(up(labels)) the identity. Returns the input's type (numpy or torch).
    """
    is_numpy = not isinstance(array, torch.Tensor)
    x = torch.from_numpy(np.ascontiguousarray(array)) if is_numpy else array
    nsp = len(shape)
    if nsp not in (1, 2, 3) or x.ndim < nsp:
        raise ValueError(f"cannot resample an array of shape {tuple(x.shape)} to {tuple(shape)}")
    lead = x.shape[: x.ndim - nsp]
    dtype = x.dtype
    if tuple(x.shape[-nsp:]) == tuple(shape):
        return array
    y = x.reshape(1, -1, *x.shape[-nsp:]).to(torch.float32)  # exact for labels < 2**24
    if is_label:
        y = F.interpolate(y, size=tuple(shape), mode="nearest-exact")
        y = y.round().to(dtype)
    else:
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nsp]
        y = F.interpolate(y, size=tuple(shape), mode=mode, align_corners=False)
        y = y.to(dtype if dtype.is_floating_point else torch.float32)
    y = y.reshape(*lead, *shape)
    return y.numpy() if is_numpy else y


def resample_to_spacing(array: np.ndarray | torch.Tensor, spacing: Sequence[float], target_spacing: Sequence[float],
                        *, is_label: bool = False) -> np.ndarray | torch.Tensor:
    """Resample the last ``len(spacing)`` axes from ``spacing`` to ``target_spacing`` (see ``resample_to_shape``).

    Go back with ``resample_to_shape(out, original_shape, is_label=...)``.
    """
    nsp = len(spacing)
    shape = tuple(array.shape[-nsp:])
    return resample_to_shape(array, resampled_shape(shape, spacing, target_spacing), is_label=is_label)
