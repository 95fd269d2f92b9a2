"""KID and Inception Score: the MMD formula directly, and parity with torchmetrics on the same subsets."""
import itertools

import pytest
import torch
from torch import nn

from vision.metrics.inception_score import InceptionScore, inception_score
from vision.metrics.kid import KID, kid_from_features, mmd2_unbiased


class FixedFeatures(nn.Module):
    """Returns precomputed float64 rows indexed by the (fake) image batch: the extractor is exact."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.num_features = table.shape[1]

    def forward(self, index_images):
        return self.table[index_images[:, 0, 0, 0].long()]


def _index_images(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()


def test_mmd2_matches_direct_double_sum():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64) + .3
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert float(mmd2_unbiased(x, y)) == pytest.approx(float(xx + yy - 2 * xy), rel=1e-12)


@pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features")
def test_kid_matches_torchmetrics_on_identical_subsets():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(1)
    table = torch.cat([torch.randn(90, 12, generator=g, dtype=torch.float64),
                       torch.randn(70, 12, generator=g, dtype=torch.float64) * 1.2 + 0.2])
    reference = KernelInceptionDistance(feature=FixedFeatures(table), subsets=20, subset_size=50)
    reference.update(_index_images(0, 90), real=True)
    reference.update(_index_images(90, 70), real=False)
    torch.manual_seed(123)
    expected_mean, expected_std = (float(v) for v in reference.compute())
    mean, std = kid_from_features(table[:90], table[90:], subsets=20, subset_size=50, seed=123)
    assert expected_mean > 1e-3
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)
    # the streaming class over an extractor gives the same number (defaults: seed 2020, capped subset size)
    metric = KID(FixedFeatures(table), subsets=5, subset_size=1000)
    metric.update(_index_images(0, 90), real=True)
    metric.update(_index_images(90, 70), real=False)
    with pytest.warns(UserWarning, match="capped at 70"):
        assert metric.compute() == kid_from_features(table[:90], table[90:], subsets=5, subset_size=70)


@pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features")
def test_inception_score_matches_torchmetrics():
    from torchmetrics.image.inception import InceptionScore as TMInceptionScore

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(103, 20, generator=g, dtype=torch.float64) * 3
    reference = TMInceptionScore(feature=FixedFeatures(logits), splits=10)
    reference.update(_index_images(0, 103))
    torch.manual_seed(7)
    expected_mean, expected_std = (float(v) for v in reference.compute())
    mean, std = inception_score(logits, splits=10, seed=7)
    assert expected_mean > 1.5
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)
    streaming = InceptionScore(FixedFeatures(logits), batch_size=40, seed=7)
    streaming.update(_index_images(0, 103))
    assert streaming.compute() == (mean, std)


def test_inception_score_bounds():
    # one-hot confident predictions spread evenly over 10 classes: IS = number of classes
    logits = torch.full((100, 10), -1e4, dtype=torch.float64)
    logits[torch.arange(100), torch.arange(100) % 10] = 0
    mean, _ = inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9)
    assert inception_score(torch.zeros(50, 10), splits=5)[0] == pytest.approx(1.0)
