"""Training data for segmenters: nnU-Net/MSD-layout folders and random patches with foreground oversampling.

Folder layout (the Medical Segmentation Decathlon / nnU-Net raw layout)::

    DATASET/
      imagesTr/case_001.nii.gz     (or case_001_0000.nii.gz: nnU-Net's channel suffix, one channel)
      labelsTr/case_001.nii.gz     integer labels 0 (background), 1..K-1, same grid as the image
      dataset.json                 optional: {"labels": {"background": 0, "liver": 1, ...},
                                              "channel_names": {"0": "CT"}}

Images and labels are matched by case name (the file name without ``.nii``/``.nii.gz`` and a
trailing ``_0000``); an image without a label or a label without an image is an error.

`PatchDataset` draws training patches as nnU-Net's data loader does: with probability
``fg_fraction`` (nnU-Net: 0.33) the patch is centred on a voxel of a foreground class chosen
uniformly among the classes present in the case (so tiny lesions are seen as often as large
organs), otherwise it is placed uniformly at random; then it is mirrored along each spatial axis
with probability 1/2 (which also makes mirroring test-time augmentation valid). Every random
draw goes through the per-sample generator of ``sample(index, generator)``, so the toolkit's
data order makes training deterministic on CPU.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Case", "case_name", "find_cases", "read_dataset_json", "PatchDataset"]

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path | None


def case_name(path: str | Path, *, image: bool = True) -> str:
    """``case_001_0000.nii.gz`` -> ``case_001``: the extension removed and, for an image, nnU-Net's
    channel suffix ``_0000`` (label files have none: ``labelsTr/case_001.nii.gz``)."""
    stem = _NIFTI.sub("", Path(path).name)
    return re.sub(r"_0000$", "", stem) if image else stem


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _NIFTI.search(p.name) and not p.name.startswith("."))


def find_cases(folder: str | Path, *, images: str = "imagesTr", labels: str | None = "labelsTr") -> list[Case]:
    """Pair the images and labels of a dataset folder by case name (see the module docstring)."""
    folder = Path(folder)
    img_dir = folder / images
    if not img_dir.is_dir():
        raise ValueError(f"{folder}: no {images}/ folder (expected {images}/*.nii.gz and {labels}/*.nii.gz)")
    image_files = _nifti_files(img_dir)
    if not image_files:
        raise ValueError(f"{img_dir}: no .nii/.nii.gz images")
    multi = [p.name for p in image_files if re.search(r"_(\d{4})$", _NIFTI.sub("", p.name))
             and not _NIFTI.sub("", p.name).endswith("_0000")]
    if multi:
        raise ValueError(f"{img_dir}: {multi[0]} is a second input channel; only single-channel images are supported")
    by_name: dict[str, Path] = {}
    for p in image_files:
        name = case_name(p)
        if name in by_name:
            raise ValueError(f"{img_dir}: two images for case {name!r} ({by_name[name].name}, {p.name})")
        by_name[name] = p
    if labels is None:
        return [Case(n, p, None) for n, p in sorted(by_name.items())]
    lab_dir = folder / labels
    if not lab_dir.is_dir():
        raise ValueError(f"{folder}: no {labels}/ folder beside {images}/")
    label_by_name = {case_name(p, image=False): p for p in _nifti_files(lab_dir)}
    no_label = sorted(set(by_name) - set(label_by_name))
    no_image = sorted(set(label_by_name) - set(by_name))
    if no_label:
        raise ValueError(f"{folder}: {len(no_label)} image(s) without a label in {labels}/, e.g. {no_label[0]!r}")
    if no_image:
        raise ValueError(f"{folder}: {len(no_image)} label(s) without an image in {images}/, e.g. {no_image[0]!r}")
    return [Case(n, by_name[n], label_by_name[n]) for n in sorted(by_name)]


def read_dataset_json(folder: str | Path) -> dict | None:
    """The folder's dataset.json (nnU-Net v2 or MSD style), or None when there is none."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    labels = data.get("labels")
    if isinstance(labels, dict) and labels:
        # nnU-Net v2: {"name": id}; MSD: {"id": "name"}
        if all(str(k).isdigit() for k in labels):
            pairs = {int(k): str(v) for k, v in labels.items()}
        else:
            pairs = {int(v): str(k) for k, v in labels.items()}
        if sorted(pairs) != list(range(len(pairs))):
            raise ValueError(f"{path}: label ids {sorted(pairs)} are not 0..{len(pairs) - 1}")
        data["class_names"] = [pairs[i] for i in range(len(pairs))]
    channels = data.get("channel_names", data.get("modality"))
    if isinstance(channels, dict) and channels:
        data["modality_name"] = str(channels.get("0", next(iter(channels.values()))))
    return data


class PatchDataset:
    """Random training patches from whole preprocessed volumes (see the module docstring).

    Args:
        images: one float32 ``(X, Y, Z)`` array per case, already oriented/resampled/normalised.
        labels: matching integer label maps.
        patch: patch size; 3 entries, or 2 for a 2-D network (one slice ``(px, py)`` of the last axis).
        num_classes: classes including background (labels must be below it).
        samples_per_epoch: dataset length seen by the sampler (cases are cycled).
        fg_fraction: probability that a patch is centred on a foreground voxel.
        mirror: mirror each spatial axis with probability 1/2.
        max_locations: foreground voxel positions kept per class and case (nnU-Net keeps 10,000).

    ``sample(index, generator)`` returns ``(image (1, *patch) float32, labels (*patch) int64)``.
    Volumes smaller than the patch are padded (image 0, the normalised mean for z-scored data; labels 0).
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch: Sequence[int], *,
                 num_classes: int, samples_per_epoch: int | None = None, fg_fraction: float = 0.33,
                 mirror: bool = True, max_locations: int = 10_000):
        if len(images) != len(labels) or not images:
            raise ValueError(f"{len(images)} images and {len(labels)} label maps")
        if len(patch) not in (2, 3):
            raise ValueError(f"patch must have 2 or 3 entries, got {tuple(patch)}")
        if not 0 <= fg_fraction <= 1:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        self.slice_mode = len(patch) == 2
        self.patch = tuple(int(p) for p in patch) + ((1,) if self.slice_mode else ())
        self.num_classes, self.fg_fraction, self.mirror = num_classes, fg_fraction, mirror
        self.samples_per_epoch = samples_per_epoch or len(images)
        self.images, self.labels, self.locations = [], [], []
        subsample = np.random.default_rng(0)  # fixed: which voxels are kept is part of the dataset
        for i, (img, lab) in enumerate(zip(images, labels)):
            img, lab = np.asarray(img, dtype=np.float32), np.asarray(lab)
            if img.shape != lab.shape or img.ndim != 3:
                raise ValueError(f"case {i}: image {img.shape} and labels {lab.shape} must be the same 3-D shape")
            if lab.min(initial=0) < 0 or lab.max(initial=0) >= num_classes:
                raise ValueError(f"case {i}: label values {lab.min()}..{lab.max()} outside 0..{num_classes - 1}")
            pad = [(d // 2, d - d // 2) for d in (max(p - s, 0) for p, s in zip(self.patch, img.shape))]
            if any(sum(p) for p in pad):
                img, lab = np.pad(img, pad), np.pad(lab, pad)
            locs = {}
            for c in range(1, num_classes):
                where = np.argwhere(lab == c)
                if len(where) > max_locations:
                    where = where[np.sort(subsample.choice(len(where), max_locations, replace=False))]
                if len(where):
                    locs[c] = where.astype(np.int32)
            self.images.append(torch.from_numpy(np.ascontiguousarray(img)))
            self.labels.append(torch.from_numpy(np.ascontiguousarray(lab.astype(np.int64))))
            self.locations.append(locs)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.sample(index, torch.Generator().manual_seed(index))

    def _randint(self, high: int, g: torch.Generator) -> int:
        return int(torch.randint(high, (1,), generator=g)) if high > 1 else 0

    def sample(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        case = index % len(self.images)
        image, labels, locs = self.images[case], self.labels[case], self.locations[case]
        size = image.shape
        fg = float(torch.rand((), generator=generator)) < self.fg_fraction
        if fg and locs:
            classes = sorted(locs)
            c = classes[self._randint(len(classes), generator)]
            voxel = locs[c][self._randint(len(locs[c]), generator)]
            lo = [min(max(int(v) - p // 2, 0), s - p) for v, p, s in zip(voxel, self.patch, size)]
        else:
            lo = [self._randint(s - p + 1, generator) for p, s in zip(self.patch, size)]
        window = tuple(slice(a, a + p) for a, p in zip(lo, self.patch))
        img, lab = image[window], labels[window]
        if self.mirror:
            flips = torch.rand(3, generator=generator) < 0.5
            axes = [a for a in range(3 if not self.slice_mode else 2) if flips[a]]
            if axes:
                img, lab = img.flip(axes), lab.flip(axes)
        if self.slice_mode:
            img, lab = img[..., 0], lab[..., 0]
        return img[None].contiguous(), lab.contiguous()
