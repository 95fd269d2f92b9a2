"""Fréchet distance: closed forms, scipy, streaming statistics, and parity with torchmetrics' FID."""
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from vision.metrics.fid import FID, FeatureStatistics, fid_from_features, frechet_distance, load_statistics


def _random_spd(n: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((n, n))
    return a @ a.T / n + 0.1 * np.eye(n)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(v1)), torch.tensor(mu2), torch.tensor(np.diag(v2)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_general_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(20, rng), _random_spd(20, rng)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = frechet_distance(*(torch.tensor(a) for a in (mu1, s1, mu2, s2)))
    assert got == pytest.approx(expected, rel=1e-9)
    # commuting case: S1 = c S2 gives (1 - sqrt c)^2 tr(S2)
    assert frechet_distance(torch.zeros(20), torch.tensor(4 * s2), torch.zeros(20), torch.tensor(s2)) == \
        pytest.approx(np.trace(s2), rel=1e-10)


def test_identical_sets_give_zero():
    feats = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert abs(fid_from_features(feats, feats.clone())) < 1e-6


def test_streaming_statistics_equal_numpy_cov(tmp_path):
    x = torch.randn(257, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5 + 100
    stats = FeatureStatistics()
    for chunk in torch.split(x, [1, 50, 6, 200]):
        stats.update(chunk)
    assert stats.n == 257
    np.testing.assert_allclose(stats.mean.numpy(), x.numpy().mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    other = FeatureStatistics().update(x[:100]).merge(FeatureStatistics().update(x[100:]))
    np.testing.assert_allclose(other.cov.numpy(), stats.cov.numpy(), rtol=1e-12)
    stats.save(tmp_path / "s.npz")
    mu, sigma = load_statistics(tmp_path / "s.npz")
    assert torch.equal(mu, stats.mean) and torch.equal(sigma, stats.cov)


def test_warns_when_fewer_samples_than_features():
    feats = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="rank-deficient"):
        fid_from_features(feats, feats + 1)


class TinyNet(nn.Module):
    """A small random conv net mapping uint8 images to 16-d features."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x.float() / 255) * 100


def test_fid_matches_torchmetrics_with_custom_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(4)
    real = torch.randint(0, 256, (120, 3, 24, 24), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.5 + torch.randint(0, 120, real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    net = TinyNet().eval()
    reference = FrechetInceptionDistance(feature=net)
    ours = FID(net, batch_size=32)
    for batch in real.split(50):
        reference.update(batch, real=True)
        ours.update(batch, real=True)
    for batch in fake.split(70):
        reference.update(batch, real=False)
        ours.update(batch, real=False)
    expected = float(reference.compute())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 120 samples >= 16 features: no warning
        got = ours.compute()
    assert expected > 0.1
    assert got == pytest.approx(expected, rel=1e-6)
