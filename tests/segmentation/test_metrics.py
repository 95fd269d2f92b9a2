"""Dice and HD95 against MONAI's implementations (installed as a dev dependency)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from segmentation.metrics import dice_per_class, hausdorff_distance, hd95_per_class, mask_edges, surface_distances
from vision.data.phantom import make_phantom

monai_metrics = pytest.importorskip("monai.metrics")


def _one_hot(labels: np.ndarray, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(labels).long(), n).movedim(-1, 0)[None].float()


def _monai_dice(pred, gt, n, **kw) -> np.ndarray:
    return monai_metrics.compute_dice(_one_hot(pred, n), _one_hot(gt, n), **kw).numpy()[0]


def _monai_hd(pred, gt, n, **kw) -> np.ndarray:
    with warnings.catch_warnings():  # MONAI warns about empty classes
        warnings.simplefilter("ignore")
        return monai_metrics.compute_hausdorff_distance(_one_hot(pred, n), _one_hot(gt, n), **kw).numpy()[0]


def _blobs(rng, shape, n_classes):
    """Smooth random label fields: realistic connected blobs rather than salt-and-pepper."""
    fields = ndimage.gaussian_filter(rng.standard_normal((n_classes, *shape)), sigma=(0, 2.5, 2.5, 1.5))
    fields[0] += 0.02  # a little more background
    return fields.argmax(0)


def _phantom_pair(seed):
    _, gt = make_phantom(seed, n_organs=3, n_lesions=2)
    pred = gt.copy()
    pred[ndimage.binary_dilation(gt == 1, iterations=1)] = 1  # an over-segmented organ
    pred[ndimage.binary_erosion(gt == 2) ^ (gt == 2)] = 0  # an under-segmented one
    pred[5:9, 5:9, 2:4] = 3  # a false-positive island far away
    return pred.astype(np.int64), gt.astype(np.int64)


@pytest.mark.parametrize("case", range(4))
def test_dice_matches_monai(case):
    rng = np.random.default_rng(case)
    if case < 2:
        pred, gt = _blobs(rng, (30, 28, 16), 4), _blobs(rng, (30, 28, 16), 4)
    else:
        pred, gt = _phantom_pair(case)
    n = int(max(pred.max(), gt.max())) + 1
    for include_background in (True, False):
        mine = dice_per_class(pred, gt, n, include_background=include_background)
        ref = _monai_dice(pred, gt, n, include_background=include_background)
        np.testing.assert_allclose(mine, ref, rtol=1e-6, equal_nan=True)


def test_dice_empty_ground_truth():
    gt = np.zeros((8, 8, 8), np.int64)
    pred = gt.copy()
    pred[2:4, 2:4, 2:4] = 1
    for ignore_empty in (True, False):
        mine = dice_per_class(pred, gt, 2, ignore_empty=ignore_empty)
        np.testing.assert_allclose(mine, _monai_dice(pred, gt, 2, ignore_empty=ignore_empty), equal_nan=True)
    assert np.isnan(dice_per_class(pred, gt, 2)[1])
    assert dice_per_class(gt, gt, 2, ignore_empty=False)[1] == 1.0


@pytest.mark.parametrize("spacing", [None, (0.8, 1.1, 3.0)])
@pytest.mark.parametrize("case", range(4))
def test_hd95_matches_monai(case, spacing):
    rng = np.random.default_rng(10 + case)
    if case < 2:
        pred, gt = _blobs(rng, (30, 28, 16), 4), _blobs(rng, (30, 28, 16), 4)
    else:
        pred, gt = _phantom_pair(case)
    n = int(max(pred.max(), gt.max())) + 1
    mine = hd95_per_class(pred, gt, n, spacing=spacing)
    ref = _monai_hd(pred, gt, n, percentile=95, spacing=spacing)
    assert np.isfinite(mine).sum() >= 2
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    # Plain Hausdorff (max) and with background too.
    mine = hd95_per_class(pred, gt, n, spacing=spacing, percentile=None, include_background=True)
    ref = _monai_hd(pred, gt, n, spacing=spacing, include_background=True)
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_hd_2d_random_masks():
    rng = np.random.default_rng(7)
    pred, gt = rng.integers(0, 3, (24, 20)), rng.integers(0, 3, (24, 20))
    mine = hd95_per_class(pred, gt, 3, spacing=(0.5, 2.0))
    np.testing.assert_allclose(mine, _monai_hd(pred, gt, 3, percentile=95, spacing=(0.5, 2.0)), rtol=1e-5)


def test_hd_empty_cases():
    empty = np.zeros((12, 12, 12), bool)
    cube = empty.copy()
    cube[3:7, 3:7, 3:7] = True
    assert np.isnan(hausdorff_distance(empty, empty))
    assert hausdorff_distance(cube, empty) == np.inf and hausdorff_distance(empty, cube) == np.inf
    # MONAI's plain Hausdorff agrees (its 95th-percentile variant returns NaN here; see segmentation.metrics).
    labels_cube, labels_empty = cube.astype(np.int64), empty.astype(np.int64)
    assert _monai_hd(labels_cube, labels_empty, 2)[0] == np.inf
    assert np.isnan(_monai_hd(labels_empty, labels_empty, 2)[0])
    assert hausdorff_distance(cube, cube) == 0.0


def test_edges_and_distances_by_hand():
    cube = np.zeros((10, 10, 10), bool)
    cube[2:7, 2:7, 2:7] = True  # 5^3 cube: 125 - 27 interior = 98 edge voxels
    assert mask_edges(cube).sum() == 98
    border = np.zeros((4, 4, 4), bool)
    border[:, :, :] = True  # touching the image border: the border layer counts as edge
    assert mask_edges(border).sum() == 64 - 8
    shifted = np.roll(cube, 2, axis=2)
    d_ab, d_ba = surface_distances(cube, shifted, spacing=(1.0, 1.0, 1.5))
    assert d_ab.max() == pytest.approx(3.0) and d_ba.max() == pytest.approx(3.0)  # 2 voxels * 1.5 mm
