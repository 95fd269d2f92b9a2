"""Sliding-window inference against MONAI's, and the intensity preprocessing."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from segmentation import inference
from segmentation.inference import importance_map, scan_intervals, sliding_window_inference, window_starts
from segmentation.intensity import (CTStatistics, ct_statistics, normalize_ct, resample_to_shape,
                                    resample_to_spacing, resampled_shape, zscore)
from vision.data.phantom import make_phantom

monai_inferers = pytest.importorskip("monai.inferers")
monai_data_utils = pytest.importorskip("monai.data.utils")


def _net3d(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, classes, 3, padding=1)).eval()


def _net2d(classes: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return torch.randn(1, 40, 50, 33, generator=torch.Generator().manual_seed(0))


def _monai(x: torch.Tensor, net, window, overlap, mode="gaussian") -> torch.Tensor:
    with torch.no_grad():
        return monai_inferers.sliding_window_inference(x[None], window, 4, net, overlap=overlap, mode=mode)[0]


# ------------------------------------------------------------------------------- placement, weights

def test_window_placement_matches_monai():
    for size, win, ov in itertools.product([(40, 50, 33), (16, 17, 100), (7, 64, 65)], [(16, 16, 16), (7, 32, 48)],
                                           [0.0, 0.25, 0.5, 0.8]):
        win = tuple(min(w, s) for w, s in zip(win, size))  # placement after padding
        interval = scan_intervals(size, win, (ov,) * 3)
        assert interval == monai_inferers.utils._get_scan_interval(size, win, 3, (ov,) * 3)
        ref = monai_data_utils.dense_patch_slices(size, win, interval)
        mine = [tuple(slice(s, s + w) for s, w in zip(st, win))
                for st in itertools.product(*window_starts(size, win, interval))]
        assert mine == ref


@pytest.mark.parametrize("window", [(16, 16, 16), (7, 10, 31), (48, 20)])
def test_importance_map_matches_monai(window):
    for mode in ("gaussian", "constant"):
        ref = monai_data_utils.compute_importance_map(window, mode=mode, sigma_scale=0.125)
        assert torch.equal(importance_map(window, mode, 0.125), ref)
    ref = monai_data_utils.compute_importance_map(window, mode="gaussian", sigma_scale=0.5)
    assert torch.equal(importance_map(window, "gaussian", 0.5), ref)


# ------------------------------------------------------------------------------- parity with MONAI

@pytest.mark.parametrize("window,overlap", [((16, 16, 16), 0.25), ((16, 16, 16), 0.5), ((48, 16, 16), 0.25),
                                            ((16, 20, 40), 0.5)])
def test_matches_monai_gaussian(volume, window, overlap):
    net = _net3d()
    ref = _monai(volume, net, window, overlap)
    logits = sliding_window_inference(volume, net, window, overlap=overlap, output="logits")
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-5
    probs = sliding_window_inference(volume, net, window, overlap=overlap, output="probabilities", sw_batch_size=3)
    assert (probs - ref.softmax(0)).abs().max().item() < 1e-5
    labels = sliding_window_inference(volume, net, window, overlap=overlap)
    assert labels.dtype == torch.uint8 and labels.shape == volume.shape[1:]
    assert torch.equal(labels, ref.argmax(0).to(torch.uint8))


def test_matches_monai_constant_and_step(volume):
    net = _net3d()
    ref = _monai(volume, net, (16, 16, 16), 0.25, mode="constant")
    out = sliding_window_inference(volume, net, 16, overlap=0.25, mode="constant", output="logits")
    assert (out - ref).abs().max().item() < 1e-5
    ref = _monai(volume, net, (16, 16, 16), 0.5)  # interval int(16 * 0.5) = 8
    out = sliding_window_inference(volume, net, 16, step=8, output="logits")
    assert (out - ref).abs().max().item() < 1e-5


def test_slab_is_bounded_by_the_window(volume, monkeypatch):
    created = []
    real = inference._SlabStitcher
    monkeypatch.setattr(inference, "_SlabStitcher", lambda *a, **k: created.append(real(*a, **k)) or created[-1])
    sliding_window_inference(volume, _net3d(5), (16, 16, 12), overlap=0.5)
    assert created[0].slab_shape == (5, 40, 50, 12)  # classes x X x Y x window, not x 33
    assert created[0].result.shape == (40, 50, 33) and created[0].result.dtype == torch.uint8


def test_2d_model_slice_by_slice_matches_monai_2d():
    x = torch.randn(1, 40, 50, 6, generator=torch.Generator().manual_seed(2))
    net = _net2d()
    calls = []

    def model(batch):
        calls.append(batch.shape[0])
        return net(batch)

    with torch.no_grad():  # MONAI 2-D sliding window with the slices as the batch
        ref = monai_inferers.sliding_window_inference(x.permute(3, 0, 1, 2), (16, 16), 4, net, overlap=0.25,
                                                      mode="gaussian").permute(1, 2, 3, 0)
    out = sliding_window_inference(x, model, (16, 16), spatial_dims=2, output="logits", sw_batch_size=32)
    assert (out - ref).abs().max().item() < 1e-5
    assert calls == [32, 32, 8]  # 12 windows per slice x 6 slices, batched across slices


def test_window_larger_than_volume_is_padded_like_monai():
    x = torch.randn(1, 9, 30, 11, generator=torch.Generator().manual_seed(3))
    net = _net3d()
    ref = _monai(x, net, (16, 16, 16), 0.25)
    out = sliding_window_inference(x, net, 16, output="logits")
    assert out.shape == (3, 9, 30, 11) and (out - ref).abs().max().item() < 1e-5


def test_mirror_tta_is_the_mean_over_flips():
    # A shape whose window grid is symmetric (40 = 0, 12, 24 + 16; 28 = 0, 12 + 16), so mirroring the
    # volume mirrors the windows and TTA equals the mean of MONAI's outputs on the 8 flipped volumes.
    x = torch.randn(1, 40, 40, 28, generator=torch.Generator().manual_seed(4))
    net = _net3d()
    expected = 0
    for r in range(4):
        for axes in itertools.combinations((1, 2, 3), r):
            out = _monai(x.flip(axes) if axes else x, net, (16, 16, 16), 0.25)
            expected = expected + (out.flip(axes) if axes else out)
    expected = expected / 8
    out = sliding_window_inference(x, net, 16, tta_mirror=True, output="logits")
    assert (out - expected).abs().max().item() < 1e-5
    assert (sliding_window_inference(x, net, 16, output="logits") - expected).abs().max().item() > 1e-2


def test_bad_inputs(volume):
    with pytest.raises(ValueError, match="keep the spatial size"):
        sliding_window_inference(volume, lambda b: b[:, :, ::2], 16)
    with pytest.raises(ValueError, match="step"):
        sliding_window_inference(volume, _net3d(), 16, step=20)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(volume, _net3d(), 16, overlap=1.0)
    with pytest.raises(ValueError, match="3-D model cannot run on a volume with 2 spatial axes"):
        sliding_window_inference(volume[:, :, :, 0], _net3d(), 16, spatial_dims=3)


# ------------------------------------------------------------------------------- intensity

def test_zscore_matches_monai_normalize_intensity():
    from monai.transforms import NormalizeIntensity

    image, _ = make_phantom(0, shape=(32, 32, 16))
    image[image < -900] = 0  # a zero background, as in skull-stripped MRI
    for nonzero in (False, True):
        ref = NormalizeIntensity(nonzero=nonzero)(torch.from_numpy(image)).numpy()
        np.testing.assert_allclose(zscore(image, nonzero=nonzero), ref, atol=1e-5)
    assert (zscore(image, nonzero=True)[image == 0] == 0).all()


def test_ct_normalisation():
    images, labels = zip(*(make_phantom(s, shape=(32, 32, 16), n_organs=2, n_lesions=0) for s in range(2)))
    stats = ct_statistics(images, labels)
    fg = np.concatenate([im[lab > 0] for im, lab in zip(images, labels)]).astype(np.float64)
    assert stats.lower == pytest.approx(np.percentile(fg, 0.5))
    assert stats.upper == pytest.approx(np.percentile(fg, 99.5))
    assert stats.mean == pytest.approx(fg.mean()) and stats.std == pytest.approx(fg.std())
    out = normalize_ct(images[0], stats)
    assert out.dtype == np.float32
    assert out.min() == pytest.approx((stats.lower - stats.mean) / stats.std, rel=1e-5)  # air is clipped
    np.testing.assert_allclose(normalize_ct(np.array([0.0, 1e4]), CTStatistics(-10, 50, 20, 4)), [-5.0, 7.5])


def test_resampling_round_trip():
    image, labels = make_phantom(1, shape=(33, 29, 15))
    spacing, target = (1.5, 1.5, 3.0), (1.0, 1.0, 1.0)
    up = resample_to_spacing(image, spacing, target)
    assert up.shape == resampled_shape(image.shape, spacing, target) == (50, 44, 45)
    back = resample_to_shape(up, image.shape)
    assert back.shape == image.shape and back.dtype == np.float32
    lab_up = resample_to_spacing(labels, spacing, target, is_label=True)
    assert lab_up.dtype == np.uint8 and set(np.unique(lab_up)) <= set(np.unique(labels))
    assert resample_to_shape(lab_up, labels.shape, is_label=True).shape == labels.shape
    # Integer factors: nearest up then down is the identity on labels.
    double = resample_to_spacing(labels, (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), is_label=True)
    assert np.array_equal(resample_to_shape(double, labels.shape, is_label=True), labels)
    # Linear interpolation keeps a constant image constant; channels and torch tensors pass through.
    const = torch.full((2, 10, 12, 7), 3.5)
    out = resample_to_spacing(const, (1.0, 1.0, 2.5), (0.7, 0.7, 1.0))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 14, 17, 18) and torch.allclose(out, const[0, 0, 0, 0])
