"""Fréchet Inception Distance (Heusel et al., 2017) and rFID.

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

- Statistics accumulate in float64 with a streaming (Chan et al.) mean/covariance update, so
  any number of batches gives the same mean and unbiased covariance as `np.cov` on all rows.
- Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2 (torch-fidelity
  and torchmetrics take `eigvals(S1 @ S2)`). Here it is the nuclear norm of R1^T R2 for factors
  S = R R^T from symmetric eigendecompositions, eigenvalues at round-off level dropped. With fewer
  samples than feature dimensions the covariances are singular, and square roots of their ~1e-13
  round-off eigenvalues add up over 2048 dimensions: with `eigvals` the rFID of two photos with
  themselves came out as -1e-3, and rank-deficient pairs err by ~1e-3 to 1e-2; this agrees with
  the exact low-rank value (nuclear norm of the centred feature product) to ~1e-11.
  No `scipy.linalg.sqrtm`, whose `disp` argument is gone from SciPy 1.18.
- With fewer samples than feature dimensions the covariance is rank-deficient and FID is biased
  upward; a warning says so. Published numbers use 50k samples (rFID: the 50k ImageNet val set).

rFID is the same distance between a set of originals ("real") and their reconstructions.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vision.atomic import atomic_path
from vision.metrics.features import FeatureExtractor, InceptionFeatures, extract_features


class FeatureStatistics:
    """Streaming float64 mean and covariance of feature rows."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self._m2: Tensor | None = None  # sum of outer products of deviations from the mean

    def update(self, features: Tensor) -> "FeatureStatistics":
        x = features.detach().flatten(1).to(torch.float64)
        if len(x) == 0:
            return self
        mean_b = x.mean(0)
        dev = x - mean_b
        self._merge(len(x), mean_b, dev.t() @ dev)
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Fold another accumulator in (e.g. from another process)."""
        if other.n:
            self._merge(other.n, other.mean, other._m2)
        return self

    def _merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if self.n == 0:
            self.n, self.mean, self._m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"feature size changed from {self.mean.shape[0]} to {mean_b.shape[0]}")
        mean_b, m2_b = mean_b.to(self.mean.device), m2_b.to(self.mean.device)
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (self.n * n_b / total)
        self.n = total

    @property
    def dim(self) -> int:
        return 0 if self.mean is None else self.mean.shape[0]

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance (divides by n - 1)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        return self._m2 / (self.n - 1)

    def save(self, path: str | os.PathLike) -> None:
        """Write mu and sigma as .npz (the format of pytorch-fid's precomputed statistics), atomically."""
        path = Path(path)
        if path.suffix != ".npz":  # as np.savez names it
            path = path.with_name(path.name + ".npz")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=self.mean.cpu().numpy(), sigma=self.cov.cpu().numpy(), n=self.n)


def load_statistics(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """(mu, sigma) float64 from an .npz with `mu` and `sigma` (pytorch-fid / Tessera)."""
    with np.load(Path(path)) as f:
        return torch.from_numpy(f["mu"]).to(torch.float64), torch.from_numpy(f["sigma"]).to(torch.float64)


def _psd_factor(sigma: Tensor) -> Tensor:
    """R (D x k) with R R^T = sigma, from the eigenvalues above round-off (D * eps * the largest)."""
    w, u = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = w > w.max().clamp_min(0) * sigma.shape[0] * torch.finfo(torch.float64).eps
    return u[:, keep] * w[keep].sqrt()


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """Tr((S1 S2)^(1/2)) of two PSD matrices (float64), accurate for singular ones.

    With S1 = R1 R1^T and S2 = R2 R2^T, the nonzero eigenvalues of S1 S2 are the squared singular
    values of R1^T R2, so the trace is its nuclear norm: no square roots of round-off eigenvalues.
    """
    return torch.linalg.svdvals(_psd_factor(sigma1).T @ _psd_factor(sigma2)).sum()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t, dtype=torch.float64).cpu() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def _warn_if_few(stats: FeatureStatistics, name: str) -> None:
    if stats.n < stats.dim:
        warnings.warn(f"FID: {name} set has {stats.n} samples for {stats.dim}-d features; the covariance is "
                      f"rank-deficient and FID is biased upward (use >= {stats.dim}, ideally 50k)", stacklevel=3)


def fid_from_statistics(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    _warn_if_few(real, "real")
    _warn_if_few(fake, "fake")
    return frechet_distance(real.mean, real.cov, fake.mean, fake.cov)


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """FID between two (N, D) feature matrices."""
    return fid_from_statistics(FeatureStatistics().update(real), FeatureStatistics().update(fake))


class FID:
    """Streaming FID: `update(images, real=...)` batch by batch, then `compute()`.

    `extractor` is any FeatureExtractor (default: `InceptionFeatures()`, pool3 2048-d features;
    keyword arguments go to it). Images are uint8 NCHW or float in [0, 1]. Real statistics can
    also come from a file (`set_real_statistics`) and survive `reset()`.
    """

    def __init__(self, extractor: FeatureExtractor | None = None, *, batch_size: int = 64, **inception_kwargs):
        self.extractor = extractor if extractor is not None else InceptionFeatures(**inception_kwargs)
        self.batch_size = batch_size
        self.real, self.fake = FeatureStatistics(), FeatureStatistics()
        self._real_fixed: tuple[Tensor, Tensor] | None = None

    def update(self, images: Tensor, real: bool) -> None:
        self.update_features(extract_features(self.extractor, images, self.batch_size), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        (self.real if real else self.fake).update(features)

    def set_real_statistics(self, mu: Tensor, sigma: Tensor) -> None:
        """Use precomputed reference statistics (e.g. `load_statistics("imagenet_val.npz")`)."""
        self._real_fixed = (torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64))

    def reset(self, real: bool = True) -> None:
        """Forget the fake statistics, and the streamed real ones too when `real`."""
        self.fake = FeatureStatistics()
        if real:
            self.real = FeatureStatistics()

    def compute(self) -> float:
        _warn_if_few(self.fake, "fake")
        if self._real_fixed is not None:
            return frechet_distance(*self._real_fixed, self.fake.mean, self.fake.cov)
        _warn_if_few(self.real, "real")
        return frechet_distance(self.real.mean, self.real.cov, self.fake.mean, self.fake.cov)


def rfid(pairs: Iterable[tuple[Tensor, Tensor]], extractor: FeatureExtractor | None = None, **kwargs) -> float:
    """Reconstruction FID over batches of (originals, reconstructions), both uint8 or [0, 1] NCHW."""
    metric = FID(extractor, **kwargs)
    for originals, reconstructions in pairs:
        metric.update(originals, real=True)
        metric.update(reconstructions, real=False)
    return metric.compute()
