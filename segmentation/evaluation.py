"""Per-class Dice / HD95 of predicted label maps against ground truth, per case and summarised.

`evaluate_folders(pred_dir, truth_dir)` pairs ``pred_dir/NAME.nii.gz`` with
``truth_dir/NAME.nii.gz`` (label-map names: the file name without ``.nii``/``.nii.gz``), checks that each pair shares shape and affine (a prediction in a
different geometry is an error, not a bad score), and computes per case and class:

- Dice (`segmentation.metrics.dice_per_class`, MONAI's definition; NaN where the class is absent
  from the ground truth);
- HD95 in millimetres (`segmentation.metrics.hd95_per_class` with the voxel spacing from the
  affine; ``inf`` where exactly one of prediction and truth is empty: a missed or hallucinated
  structure);
- detection: the fraction of the ground truth's connected components (26-connectivity) that the
  prediction touches with the same class -- for small structures such as lesions, where one
  Dice per volume hides how many were found.

The summary per class: mean Dice over cases with the class present, mean HD95 over cases where
it is finite plus the count of infinite cases, and detected/total components.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from segmentation.dataset import case_name
from segmentation.metrics import dice_per_class, hd95_per_class

__all__ = ["CaseScores", "Evaluation", "evaluate_pair", "evaluate_cases", "evaluate_folders", "format_table"]


@dataclass
class CaseScores:
    name: str
    dice: np.ndarray          # per foreground class (1..K-1)
    hd95: np.ndarray          # per foreground class, mm
    components: np.ndarray    # ground-truth connected components per class
    detected: np.ndarray      # of which the prediction touches


@dataclass
class Evaluation:
    class_names: list[str]    # foreground classes, in order 1..K-1
    cases: list[CaseScores] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per class: dice, hd95_mm (finite cases), hd95_inf_cases, detected, components."""
        out = {}
        for i, name in enumerate(self.class_names):
            dice = np.array([c.dice[i] for c in self.cases])
            hd = np.array([c.hd95[i] for c in self.cases])
            finite = hd[np.isfinite(hd)]
            comp = int(sum(c.components[i] for c in self.cases))
            det = int(sum(c.detected[i] for c in self.cases))
            out[name] = {
                "dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan,
                "hd95_mm": float(finite.mean()) if finite.size else math.nan,
                "hd95_inf_cases": int(np.isinf(hd).sum()),
                "detected": det,
                "components": comp,
            }
        return out

    def mean_dice(self) -> float:
        values = [v["dice"] for v in self.summary().values() if not math.isnan(v["dice"])]
        return float(np.mean(values)) if values else math.nan

    def flat_metrics(self, digits: int = 4) -> dict[str, float | int]:
        """One flat {snake_case: number} dict (for index.json / --json); NaN entries are left out."""
        out: dict[str, float | int] = {}
        for name, s in self.summary().items():
            key = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
            for metric, value in s.items():
                if isinstance(value, float):
                    if math.isnan(value):
                        continue
                    value = round(value, digits)
                out[f"{metric}_{key}"] = value
        if not math.isnan(self.mean_dice()):
            out["dice_mean_foreground"] = round(self.mean_dice(), digits)
        out["cases"] = len(self.cases)
        return out


def _components(pred: np.ndarray, truth: np.ndarray, c: int) -> tuple[int, int]:
    comp, n = ndimage.label(truth == c, structure=np.ones((3,) * truth.ndim, dtype=bool))
    if n == 0:
        return 0, 0
    hit = np.unique(comp[(pred == c) & (comp > 0)])
    return n, int(hit.size)


def evaluate_pair(name: str, pred: np.ndarray, truth: np.ndarray, num_classes: int,
                  spacing: Sequence[float] | None = None) -> CaseScores:
    """Scores of one case (foreground classes 1..num_classes-1)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    dice = dice_per_class(pred, truth, num_classes, include_background=False)
    hd = hd95_per_class(pred, truth, num_classes, include_background=False, spacing=spacing)
    comps = np.array([_components(pred, truth, c) for c in range(1, num_classes)], dtype=np.int64).reshape(-1, 2)
    return CaseScores(name, dice, hd, comps[:, 0], comps[:, 1])


def evaluate_cases(pairs: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[float] | None]], num_classes: int,
                   class_names: Sequence[str] | None = None) -> Evaluation:
    """Evaluate (name, prediction, truth, spacing) tuples; ``class_names`` includes background."""
    names = list(class_names)[1:] if class_names is not None else [f"class_{c}" for c in range(1, num_classes)]
    if len(names) != num_classes - 1:
        raise ValueError(f"{len(names) + 1} class names for {num_classes} classes")
    result = Evaluation(names)
    for name, pred, truth, spacing in pairs:
        result.cases.append(evaluate_pair(name, pred, truth, num_classes, spacing))
    return result


def _niftis(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith("."):
            files[case_name(p, image=False)] = p
    if not files:
        raise ValueError(f"{folder}: no .nii/.nii.gz files")
    return files


def evaluate_folders(pred_dir: str | Path, truth_dir: str | Path, *, num_classes: int | None = None,
                     class_names: Sequence[str] | None = None, millimetres: bool = True,
                     allow_missing: bool = False) -> Evaluation:
    """Evaluate every ground-truth case of ``truth_dir`` against the same-named prediction in ``pred_dir``.

    ``class_names`` (background first) fixes the classes; otherwise ``num_classes``, the names of a
    dataset.json in ``truth_dir`` or its parent (nnU-Net's ``labelsTr/``), or the largest label seen plus one. A ground-truth case without a prediction is an error unless
    ``allow_missing`` (then it is skipped); predictions without ground truth are ignored.
    Raises ValueError with one line for unreadable files or mismatched geometry.
    """
    from segmentation.io import read_volume

    pred_files, truth_files = _niftis(Path(pred_dir)), _niftis(Path(truth_dir))
    missing = sorted(set(truth_files) - set(pred_files))
    if missing and not allow_missing:
        raise ValueError(f"{pred_dir}: no prediction for {len(missing)} case(s), e.g. {missing[0]!r}")
    names = [n for n in truth_files if n in pred_files]
    if not names:
        raise ValueError(f"no case names in common between {pred_dir} and {truth_dir}")
    loaded = []
    for n in names:
        pred, truth = read_volume(pred_files[n]), read_volume(truth_files[n])
        if pred.shape != truth.shape:
            raise ValueError(f"{n}: prediction shape {pred.shape} differs from the ground truth's {truth.shape}")
        if not np.allclose(pred.affine, truth.affine, atol=1e-3):
            raise ValueError(f"{n}: prediction and ground truth have different affines (not the same voxel grid)")
        for what, v in (("prediction", pred), ("ground truth", truth)):
            if not np.array_equal(v.array, np.round(v.array)) or v.array.min(initial=0) < 0:
                raise ValueError(f"{n}: the {what} is not a label map (non-negative integers)")
        loaded.append((n, pred.array.astype(np.int64), truth.array.astype(np.int64),
                       truth.spacing if millimetres else None))
    if class_names is None and num_classes is None:  # nnU-Net layout: DATASET/labelsTr + DATASET/dataset.json
        from segmentation.dataset import read_dataset_json

        for folder in (Path(truth_dir), Path(truth_dir).parent):
            meta = read_dataset_json(folder)
            if meta and meta.get("class_names"):
                class_names = meta["class_names"]
                break
    if class_names is not None:
        k = len(class_names)
    elif num_classes is not None:
        k = int(num_classes)
    else:
        k = int(max(max(p.max(), t.max()) for _, p, t, _ in loaded)) + 1
    top = max(max(p.max(), t.max()) for _, p, t, _ in loaded)
    if top >= k:
        raise ValueError(f"label {top} found, but only {k} classes (0..{k - 1}) were given")
    return evaluate_cases(loaded, k, class_names)


def format_table(result: Evaluation, *, unit: str = "mm") -> str:
    """A plain-text table: one row per class, then the foreground mean Dice."""
    rows = [("class", "Dice", f"HD95 ({unit})", "HD95 inf", "detected")]
    for name, s in result.summary().items():
        rows.append((name, "n/a" if math.isnan(s["dice"]) else f"{s['dice']:.4f}",
                     "n/a" if math.isnan(s["hd95_mm"]) else f"{s['hd95_mm']:.2f}",
                     str(s["hd95_inf_cases"]), f"{s['detected']}/{s['components']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"mean foreground Dice {result.mean_dice():.4f} over {len(result.cases)} case(s)")
    return "\n".join(lines)
