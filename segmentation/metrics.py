"""Per-class Dice and (percentile) Hausdorff distance for label maps, with MONAI's definitions.

Dice (``monai.metrics.DiceMetric`` / ``compute_dice``): ``2|P ∩ G| / (|P| + |G|)`` per class;
background (class 0) is included unless ``include_background=False``; an empty ground truth
gives NaN (``ignore_empty=True``) or, with ``ignore_empty=False``, 1 when the prediction is
empty too and 0 otherwise.

Hausdorff distance (``monai.metrics.HausdorffDistanceMetric(percentile=95)``): background is
excluded by default; each mask is reduced to its edge voxels (the mask minus its binary erosion
with the 6-/4-neighbour structuring element, voxels on the image border count as edges); the
distance from every predicted edge voxel to the nearest ground-truth edge voxel and back is
measured (Euclidean, in voxels, or in millimetres when ``spacing`` is given); the chosen
percentile (linear interpolation, as ``torch.quantile``) of each direction is taken and the
larger of the two is the result. Both masks empty gives NaN. Exactly one empty gives ``inf``:
this is MONAI's result for the plain Hausdorff distance; MONAI 1.6's 95th-percentile variant
returns NaN there only because ``torch.quantile`` of an all-inf array is NaN, which would hide
a missed or hallucinated structure among genuinely undefined cases.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["dice_per_class", "mask_edges", "surface_distances", "hausdorff_distance", "hd95_per_class"]


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _classes(pred: np.ndarray, target: np.ndarray, num_classes: int | None) -> int:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")
    if num_classes is not None:
        return int(num_classes)
    return int(max(pred.max(initial=0), target.max(initial=0))) + 1


def dice_per_class(pred: Any, target: Any, num_classes: int | None = None, *, include_background: bool = True,
                   ignore_empty: bool = True) -> np.ndarray:
    """Dice of each class between two label maps of the same shape.

    Returns an array with one entry per class (classes ``0..num_classes-1``, or ``1..`` without
    background); ``num_classes`` defaults to the largest label present plus one.
    """
    pred, target = _as_numpy(pred), _as_numpy(target)
    n = _classes(pred, target, num_classes)
    scores = []
    for c in range(0 if include_background else 1, n):
        p, g = pred == c, target == c
        size_g, size_p = int(g.sum()), int(p.sum())
        if size_g > 0:
            scores.append(2.0 * np.logical_and(p, g).sum() / (size_g + size_p))
        elif ignore_empty:
            scores.append(np.nan)
        else:
            scores.append(1.0 if size_p == 0 else 0.0)
    return np.asarray(scores, dtype=np.float64)


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """Edge voxels of a binary mask: the voxels that a one-voxel binary erosion removes."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise ValueError(f"spacing {tuple(sp)} does not match a {ndim}-D mask")
    return sp


def surface_distances(pred_mask: Any, gt_mask: Any, spacing: float | Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each predicted edge voxel to the ground-truth edges, and back.

    An empty side yields ``inf`` for every edge voxel of the other side (two empty arrays when
    both masks are empty).
    """
    pred, gt = _as_numpy(pred_mask).astype(bool), _as_numpy(gt_mask).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    sp = _spacing(spacing, pred.ndim)
    union = pred | gt
    if not union.any():
        return np.zeros(0), np.zeros(0)
    # Distances are translation invariant: work in the union's bounding box plus a one-voxel margin
    # (the same edges as in the full image, where erosion treats the outside as background).
    box = []
    for axis_any in (union.any(axis=tuple(a for a in range(union.ndim) if a != d)) for d in range(union.ndim)):
        idx = np.flatnonzero(axis_any)
        box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    pred_e, gt_e = mask_edges(pred[tuple(box)]), mask_edges(gt[tuple(box)])
    if not gt_e.any():
        return np.full(int(pred_e.sum()), np.inf), np.zeros(0)
    if not pred_e.any():
        return np.zeros(0), np.full(int(gt_e.sum()), np.inf)
    to_gt = ndimage.distance_transform_edt(~gt_e, sampling=sp)[pred_e]
    to_pred = ndimage.distance_transform_edt(~pred_e, sampling=sp)[gt_e]
    return to_gt, to_pred


def hausdorff_distance(pred_mask: Any, gt_mask: Any, *, spacing: float | Sequence[float] | None = None,
                       percentile: float | None = 95.0) -> float:
    """Symmetric (percentile) Hausdorff distance between two binary masks; see the module docstring."""
    a, b = surface_distances(pred_mask, gt_mask, spacing)
    if a.size == 0 and b.size == 0:
        return float("nan")
    if np.isinf(a).any() or np.isinf(b).any():
        return float("inf")
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")

    def reduce(d: np.ndarray) -> float:
        return float(d.max()) if not percentile else float(np.percentile(d, percentile))

    return max(reduce(a), reduce(b))


def hd95_per_class(pred: Any, target: Any, num_classes: int | None = None, *, include_background: bool = False,
                   spacing: float | Sequence[float] | None = None, percentile: float | None = 95.0) -> np.ndarray:
    """Percentile Hausdorff distance of each class between two label maps (background excluded by default).

    Units are voxels, or millimetres when ``spacing`` (one value per axis) is given.
    """
    pred, target = _as_numpy(pred), _as_numpy(target)
    n = _classes(pred, target, num_classes)
    return np.asarray([hausdorff_distance(pred == c, target == c, spacing=spacing, percentile=percentile)
                       for c in range(0 if include_background else 1, n)], dtype=np.float64)
