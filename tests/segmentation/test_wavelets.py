"""Haar DWT in torch against PyWavelets (pywt.dwtn, 'haar', default mode), and the neU-Net pyramid."""
import numpy as np
import pytest
import pywt
import torch

from segmentation.wavelets import haar_dwtn, haar_dwtn_concat, haar_idwtn, wavelet_pyramid


def _assert_matches_pywt(a: np.ndarray, axes):
    ref = pywt.dwtn(a, "haar", axes=axes)
    got = haar_dwtn(torch.from_numpy(a), axes)
    assert list(got) == list(ref)  # same sub-band names in the same order
    for k in ref:
        assert got[k].shape == ref[k].shape
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (1, 9)])
def test_dwt2_matches_pywt(shape):
    _assert_matches_pywt(np.random.default_rng(0).standard_normal(shape), axes=(0, 1))


@pytest.mark.parametrize("shape", [(4, 6, 8), (5, 6, 3)])
def test_dwt3_matches_pywt(shape):
    _assert_matches_pywt(np.random.default_rng(1).standard_normal(shape), axes=(0, 1, 2))


def test_dwt_on_batched_volumes_over_some_axes_matches_pywt():
    a = np.random.default_rng(2).standard_normal((2, 3, 4, 6, 8))
    _assert_matches_pywt(a, axes=(3, 4))      # the (1, 2, 2) stride case
    _assert_matches_pywt(a, axes=(2, 3, 4))   # the (2, 2, 2) stride case
    _assert_matches_pywt(a, axes=(4, 2))      # axis order decides the key letters


def test_haar_is_orthonormal_and_invertible():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    bands = haar_dwtn(x, (2, 3, 4))
    energy = sum(b.pow(2).sum() for b in bands.values())
    assert torch.allclose(energy, x.pow(2).sum(), rtol=1e-12)
    assert torch.allclose(haar_idwtn(bands, (2, 3, 4)), x, atol=1e-12)
    ref = pywt.idwtn({k: v.numpy() for k, v in bands.items()}, "haar", axes=(2, 3, 4))
    np.testing.assert_allclose(ref, x.numpy(), atol=1e-12)


def test_concat_is_band_major_like_the_official_loader():
    # official: np.concatenate(list(pywt.dwtn(x, 'haar', axes).values()), axis=1)
    a = np.random.default_rng(3).standard_normal((2, 2, 4, 6)).astype(np.float32)
    ref = np.concatenate(list(pywt.dwtn(a, "haar", axes=(2, 3)).values()), axis=1)
    got = haar_dwtn_concat(torch.from_numpy(a), (2, 3))
    assert got.shape == (2, 8, 2, 3)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)


def test_pyramid_is_recursive_on_the_approximation():
    a = np.random.default_rng(4).standard_normal((1, 2, 8, 16, 16))
    strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    got = wavelet_pyramid(torch.from_numpy(a), strides)
    # expectation written with pywt: ones pass through, then 2-axis, then 3-axis DWTs of 'a' bands
    l1 = pywt.dwtn(a, "haar", axes=(3, 4))
    l2 = pywt.dwtn(l1["aa"], "haar", axes=(2, 3, 4))
    l3 = pywt.dwtn(l2["aaa"], "haar", axes=(2, 3, 4))
    expected = [a] + [np.concatenate(list(l.values()), axis=1) for l in (l1, l2, l3)]
    assert [tuple(g.shape) for g in got] == [(1, 2, 8, 16, 16), (1, 8, 8, 8, 8), (1, 16, 4, 4, 4), (1, 16, 2, 2, 2)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=0, atol=1e-12)


def test_pyramid_rejects_strides_haar_cannot_make():
    with pytest.raises(ValueError):
        wavelet_pyramid(torch.zeros(1, 1, 8, 8), [(3, 1)])
    with pytest.raises(ValueError):
        wavelet_pyramid(torch.zeros(1, 1, 8, 8), [(2, 2, 2)])
