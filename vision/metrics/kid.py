"""Kernel Inception Distance (Bińkowski et al., 2018).

KID is the unbiased estimate of the squared MMD between real and fake features under the cubic
polynomial kernel k(x, y) = (x·y / d + 1)^3, averaged over random subsets. Defaults follow
torch-fidelity: 100 subsets of 1000 samples, here capped at the smaller set size. Each subset
draws `randperm(n_real)` then `randperm(n_fake)` from one generator, the order torchmetrics uses,
so with the same seed both libraries pick the same subsets. The spread is the population standard
deviation over subsets (torch-fidelity and torchmetrics). Computed in float64.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from vision.metrics.features import FeatureExtractor, InceptionFeatures, extract_features


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> Tensor:
    """k(x, y) = (gamma x·y + coef)^degree, gamma = 1 / d by default."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.t() * gamma + coef) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> Tensor:
    """Unbiased MMD^2: within-set kernel means exclude the diagonal, the cross term does not."""
    m, n = len(x), len(y)
    k_xx = polynomial_kernel(x, x, degree, gamma, coef)
    k_yy = polynomial_kernel(y, y, degree, gamma, coef)
    k_xy = polynomial_kernel(x, y, degree, gamma, coef)
    return ((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
            + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
            - 2 * k_xy.sum() / (m * n))


def kid_from_features(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000,
                      degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                      seed: int = 2020, generator: torch.Generator | None = None) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of both feature sets."""
    real, fake = real.detach().flatten(1).to(torch.float64), fake.detach().flatten(1).to(torch.float64)
    n_real, n_fake = len(real), len(fake)
    size = min(subset_size, n_real, n_fake)
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, have {n_real} real and {n_fake} fake")
    if size < subset_size:
        warnings.warn(f"KID: subset_size {subset_size} capped at {size} (fewer samples)", stacklevel=2)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(n_real, generator=generator)[:size].to(real.device)]
        f = fake[torch.randperm(n_fake, generator=generator)[:size].to(fake.device)]
        values.append(mmd2_unbiased(r, f, degree, gamma, coef))
    values = torch.stack(values)
    return float(values.mean()), float(values.std(unbiased=False))


class KID:
    """Streaming KID: features are kept (KID needs subsets of the raw features), then `compute()`."""

    def __init__(self, extractor: FeatureExtractor | None = None, *, batch_size: int = 64, subsets: int = 100,
                 subset_size: int = 1000, seed: int = 2020, **inception_kwargs):
        self.extractor = extractor if extractor is not None else InceptionFeatures(**inception_kwargs)
        self.batch_size, self.subsets, self.subset_size, self.seed = batch_size, subsets, subset_size, seed
        self.real: list[Tensor] = []
        self.fake: list[Tensor] = []

    def update(self, images: Tensor, real: bool) -> None:
        self.update_features(extract_features(self.extractor, images, self.batch_size), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(features.detach().to(torch.float64).cpu())

    def reset(self, real: bool = True) -> None:
        self.fake = []
        if real:
            self.real = []

    def compute(self) -> tuple[float, float]:
        return kid_from_features(torch.cat(self.real), torch.cat(self.fake), subsets=self.subsets,
                                 subset_size=self.subset_size, seed=self.seed)
