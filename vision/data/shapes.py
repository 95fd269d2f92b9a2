"""Seeded scenes of coloured shapes with masks, class names, captions and referring phrases.

A small, honest test of open-vocabulary segmentation: a class is a colour-shape combination
("red circle"), and some combinations are held out of training altogether. Every colour and every
shape is seen in training (with other partners), so a model whose text side composes words can
name a held-out combination it has never seen labelled; one that memorised class ids cannot.

Scene: a smoothly shaded grey "ground" (a stuff class) with 1..`max_objects` non-overlapping
shapes, each of a distinct class. Colours are jittered per object and shading/noise is added,
so colour is a range, not a value. Objects are listed left to right (by centre x), which is the
order of the caption: "a red circle", "a red circle and a blue square",
"a red circle, a blue square and an orange cross". The referring phrase of an object is
"the red circle" (a class appears at most once per scene, so a phrase names one object).

Everything is drawn from `numpy.random.default_rng(seed)`: the same seed gives the same scene.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["COLOURS", "SHAPES", "GROUND", "HELD_OUT", "all_classes", "seen_classes", "held_out_classes",
           "Scene", "make_scene", "ShapeScenes", "caption_of", "collate_scenes"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
    "yellow": (230, 210, 40), "purple": (140, 60, 190), "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
GROUND = "ground"
# one held-out shape per colour, each shape held out at most twice: every word stays in training
HELD_OUT = ("red triangle", "green cross", "blue square", "yellow circle", "purple triangle", "orange cross")


def all_classes() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def held_out_classes() -> list[str]:
    return list(HELD_OUT)


def seen_classes() -> list[str]:
    return [name for name in all_classes() if name not in HELD_OUT]


@dataclass
class Scene:
    image: np.ndarray          # (H, W, 3) uint8
    masks: np.ndarray          # (n, H, W) bool, one per object, left to right
    classes: list[str]         # n class names, left to right
    ground: np.ndarray         # (H, W) bool: pixels of no object

    @property
    def caption(self) -> str:
        return caption_of(self.classes)

    def referring(self, i: int) -> str:
        return f"the {self.classes[i]}"


def caption_of(classes: list[str]) -> str:
    parts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c}" for c in classes]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                angle: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy  # rotated coordinates
    if shape == "square":
        h = r / np.sqrt(2) * 1.15
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "cross":
        arm = r * 0.38
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "triangle":  # equilateral, circumradius r
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            t = angle + np.pi / 2 + 2 * np.pi * k / 3 + np.pi  # outward normals of the three edges
            inside &= (np.cos(t) * dx + np.sin(t) * dy) <= r / 2
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def make_scene(seed: int, size: int = 64, classes: list[str] | None = None, max_objects: int = 3,
               must_include: list[str] | None = None) -> Scene:
    """One scene. Objects' classes are drawn without repetition from `classes` (default: all);
    `must_include` names classes one of which the scene contains (for held-out test scenes)."""
    rng = np.random.default_rng(seed)
    pool = list(classes or all_classes())
    n = int(rng.integers(1, max_objects + 1))
    chosen: list[str] = []
    if must_include:
        chosen.append(must_include[int(rng.integers(len(must_include)))])
    rest = [c for c in pool if c not in chosen]
    chosen += [rest[i] for i in rng.permutation(len(rest))[: max(0, n - len(chosen))]]

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # ground: grey with a smooth gradient and noise
    base = rng.uniform(90, 150)
    gy, gx = rng.uniform(-40, 40, 2)
    grey = base + gy * (yy / size - 0.5) + gx * (xx / size - 0.5)
    image = np.repeat(grey[..., None], 3, axis=2) + rng.normal(0, 4, (size, size, 3))

    placed: list[tuple[float, float, float]] = []
    objects: list[tuple[float, str, np.ndarray]] = []
    r_min, r_max = 0.1 * size, 0.2 * size
    for name in chosen:
        for _ in range(100):
            r = rng.uniform(r_min, r_max)
            cy, cx = rng.uniform(r + 1, size - r - 1, 2)
            if all((cy - py) ** 2 + (cx - px) ** 2 > (r + pr + 2) ** 2 for py, px, pr in placed):
                break
        else:
            continue  # no room: the scene has fewer objects
        colour, shape = name.split(" ")
        mask = _shape_mask(shape, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        if mask.sum() < 12:
            continue
        rgb = np.clip(np.asarray(COLOURS[colour], float) + rng.normal(0, 12, 3), 0, 255)
        shade = 1.0 + 0.15 * ((yy - cy) / r) * rng.uniform(-1, 1)  # a little shading across the object
        image[mask] = (rgb[None, :] * shade[mask][:, None])
        placed.append((cy, cx, r))
        objects.append((cx, name, mask))
    objects.sort(key=lambda o: o[0])
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).round().astype(np.uint8)
    masks = np.stack([m for _, _, m in objects]) if objects else np.zeros((0, size, size), bool)
    return Scene(image=image, masks=masks, classes=[c for _, c, _ in objects], ground=~masks.any(0))


class ShapeScenes(Dataset):
    """`n` scenes with seeds `first_seed + i`. split "train": only seen classes; "test": scenes that
    each contain at least one held-out class (mixed with seen ones); "seen-test": seen classes only.
    Items: dict(image float (3, H, W) in [0, 1], masks bool (n, H, W), labels long (n,) indexing `classes`
    (the split's vocabulary, ground last), objects int (the things come first), caption str, phrases list[str]
    and phrase_index list[int] (the mask each phrase names))."""

    def __init__(self, n: int, *, split: str = "train", size: int = 64, first_seed: int = 0, max_objects: int = 3):
        if split not in ("train", "test", "seen-test"):
            raise ValueError(f"split must be train, test or seen-test, got {split!r}")
        if n < 1 or size < 16 or max_objects < 1:
            raise ValueError("need n >= 1, size >= 16 and max_objects >= 1")
        self.n, self.split, self.size, self.first_seed, self.max_objects = n, split, size, first_seed, max_objects
        self.classes = (seen_classes() if split != "test" else all_classes()) + [GROUND]

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        # disjoint seed streams per split, so a test scene is never a training scene
        offset = {"train": 0, "seen-test": 1 << 28, "test": 1 << 29}[self.split]
        seed = offset + self.first_seed + i
        if self.split == "test":
            return make_scene(seed, self.size, all_classes(), self.max_objects, must_include=held_out_classes())
        return make_scene(seed, self.size, seen_classes(), self.max_objects)

    def __getitem__(self, i: int) -> dict:
        s = self.scene(int(i))
        index = {c: k for k, c in enumerate(self.classes)}
        masks = np.concatenate([s.masks, s.ground[None]]) if s.ground.any() else s.masks
        labels = [index[c] for c in s.classes] + ([index[GROUND]] if s.ground.any() else [])
        return {
            "image": torch.from_numpy(s.image).permute(2, 0, 1).float() / 255.0,
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor(labels, dtype=torch.long),
            "objects": len(s.classes),  # the first `objects` masks are things, then the ground (stuff)
            "caption": s.caption,
            "phrases": [s.referring(k) for k in range(len(s.classes))],
            "phrase_index": list(range(len(s.classes))),  # the mask each phrase refers to
        }


def collate_scenes(items: list[dict]) -> dict:
    """Stack images; keep per-image targets as lists (their object counts differ)."""
    return {"image": torch.stack([it["image"] for it in items]),
            **{k: [it[k] for it in items] for k in ("masks", "labels", "objects", "caption", "phrases",
                                                   "phrase_index")}}
