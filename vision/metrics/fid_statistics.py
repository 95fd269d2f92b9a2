"""FID statistics of an image set: mean, covariance, count and the network's tag, and their .npz files.

The file format is pytorch-fid's (`mu`, `sigma`), so its precomputed statistics (e.g. of ImageNet
val) can be used directly; Tessera adds `n` (the number of images) and `extractor` (which network).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vision.atomic import atomic_path
from vision.metrics.errors import EvaluationInputError, first_line
from vision.metrics.fid import FeatureStatistics, frechet_distance


@dataclass
class FIDStatistics:
    mu: Tensor  # (D,) float64
    sigma: Tensor  # (D, D) float64, unbiased covariance
    n: int | None  # images summarised (None in pytorch-fid's own files)
    tag: str | None  # the feature network (None in pytorch-fid's own files)


def statistics_of_features(features: Tensor, tag: str, what: str = "features") -> FIDStatistics:
    """Mean and covariance (float64) of (N, D) feature rows; `what` names the set in the error for N < 2."""
    if len(features) < 2:
        raise EvaluationInputError(f"{what}: FID needs at least 2 images, found {len(features)}")
    s = FeatureStatistics().update(features)
    return FIDStatistics(s.mean, s.cov, s.n, tag)


def read_fid_statistics(path: str | os.PathLike) -> FIDStatistics:
    """A statistics .npz (pytorch-fid's or Tessera's)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise EvaluationInputError(
                    f"{path} has no {' or '.join(missing)}; a statistics file holds mu and sigma "
                    "(pytorch-fid's format, written by `python -m apps.evaluate stats`)")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else None
            tag = str(f["extractor"]) if "extractor" in f.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, EvaluationInputError):
            raise
        raise EvaluationInputError(f"{path}: not a readable .npz statistics file ({first_line(e)})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationInputError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    return FIDStatistics(torch.from_numpy(mu), torch.from_numpy(sigma), n, tag)


def write_fid_statistics(path: str | os.PathLike, stats: FIDStatistics, overwrite: bool = False) -> None:
    """Write atomically (a reader sees the old file or the whole new one); keep an existing file unless `overwrite`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu.numpy(), sigma=stats.sigma.numpy(), n=np.int64(stats.n),
                     extractor=np.str_(stats.tag))
        if path.exists() and not overwrite:  # checked last: it may have appeared while the features were computed
            raise EvaluationInputError(f"{path} exists; pass --overwrite to replace it")


def fid_between(real: FIDStatistics, fake: FIDStatistics) -> float:
    """The Fréchet distance, with a warning for a set smaller than the feature dimension."""
    for s, name in ((real, "real"), (fake, "fake")):
        if s.n is not None and s.n < s.mu.shape[0]:
            warnings.warn(f"{name} set has {s.n} images for {s.mu.shape[0]}-d features: the covariance is "
                          "rank-deficient and FID is biased upward (published FIDs use 50k images)")
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
