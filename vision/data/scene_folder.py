"""A folder of annotated scenes for open-vocabulary segmentation training (X-Decoder), panoptic style:

    DIR/classes.json           {"classes": ["dog", "grass", ...], "stuff": ["grass", ...]}
    DIR/images/NAME.png        (or .jpg, ...) RGB
    DIR/panoptic/NAME.png      segment ids (8- or 16-bit greyscale), 0 = unlabelled (in no target)
    DIR/annotations/NAME.json  {"segments": [{"id": 1, "class": "dog", "phrase": "the dog on the left"}, ...],
                                "caption": "a dog on the grass"}

"phrase" (a referring expression for that segment) is optional per segment; "caption" is needed.
Items are the same dicts as `vision.data.shapes.ShapeScenes` gives (image resized so its shorter
side is `size`, then centre-cropped square; masks resized with nearest neighbours), so the same
trainer reads both. `write_shape_scenes` writes seeded shape scenes in this layout (a template).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vision.data.images import IMAGE_EXTENSIONS
from vision.output_folder import FolderKind, check_folder_output, first_foreign, publish_folder, remove_staging, staging_for

__all__ = ["SceneFolder", "write_shape_scenes"]


def _square(im: Image.Image, size: int, resample) -> Image.Image:
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


class SceneFolder(Dataset):
    def __init__(self, root: str | Path, size: int = 64):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder")
        meta_path = root / "classes.json"
        if not meta_path.is_file():
            raise ValueError(f"{meta_path} is missing (it names the classes)")
        try:
            meta = json.loads(meta_path.read_text())
            self.classes = [str(c) for c in meta["classes"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: expected {{\"classes\": [...], \"stuff\": [...]}} ({e})") from None
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{meta_path}: the class list is empty or names a class twice")
        stuff = set(meta.get("stuff", []))
        self.is_thing = [c not in stuff for c in self.classes]
        images = root / "images"
        self.names = sorted(p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) \
            if images.is_dir() else []
        if not self.names:
            raise ValueError(f"{images} holds no images")
        self.files = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        for name in self.names:
            for need in (root / "panoptic" / f"{name}.png", root / "annotations" / f"{name}.json"):
                if not need.is_file():
                    raise ValueError(f"{need} is missing (every image needs its panoptic PNG and annotation)")
        self.root, self.size = root, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        name = self.names[int(i)]
        image = _square(Image.open(self.files[name]).convert("RGB"), self.size, Image.BICUBIC)
        ids = np.asarray(_square(Image.open(self.root / "panoptic" / f"{name}.png"), self.size, Image.NEAREST))
        ann = json.loads((self.root / "annotations" / f"{name}.json").read_text())
        masks, labels, phrases, phrase_index = [], [], [], []
        for seg in ann["segments"]:
            mask = ids == int(seg["id"])
            if not mask.any():
                continue  # cropped away
            if seg["class"] not in self.classes:
                raise ValueError(f"{name}.json: class {seg['class']!r} is not in classes.json")
            if seg.get("phrase"):
                phrases.append(str(seg["phrase"]))
                phrase_index.append(len(masks))
            masks.append(mask)
            labels.append(self.classes.index(seg["class"]))
        return {
            "image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0,
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, self.size, self.size, dtype=torch.bool),
            "labels": torch.tensor(labels, dtype=torch.long),
            "objects": sum(self.is_thing[k] for k in labels),
            "caption": str(ann["caption"]),
            "phrases": phrases,
            "phrase_index": phrase_index,
        }


# what write_shape_scenes writes, and so all that its overwrite may replace
SHAPE_SCENES = FolderKind("a folder of shape scenes (classes.json, images/, panoptic/, annotations/ of scene_NNNNNN)",
                          lambda folder: first_foreign(folder, r"classes\.json", {
                              "images": r"scene_-?\d+\.png", "panoptic": r"scene_-?\d+\.png",
                              "annotations": r"scene_-?\d+\.json"}))


def write_shape_scenes(folder: str | Path, n: int, size: int = 64, first_seed: int = 0,
                       overwrite: bool = False) -> None:
    """Write `n` shape training scenes (vision.data.shapes, seen classes) in the scene-folder layout.
    Written into a temporary sibling and renamed at the end: an interrupted run leaves no half folder.
    `overwrite` replaces only a folder this function wrote (vision.output_folder)."""
    from vision.data.shapes import GROUND, ShapeScenes

    folder = check_folder_output(folder, overwrite, SHAPE_SCENES)
    remove_staging(folder)
    tmp = staging_for(folder)
    try:
        _write_scenes(tmp, ShapeScenes(n, split="train", size=size, first_seed=first_seed), GROUND)
        publish_folder(tmp, folder, overwrite, SHAPE_SCENES)
    except BaseException:
        remove_staging(folder)
        raise


def _write_scenes(tmp: Path, data, ground: str) -> None:
    for sub in ("images", "panoptic", "annotations"):
        (tmp / sub).mkdir(parents=True)
    (tmp / "classes.json").write_text(json.dumps({"classes": data.classes, "stuff": [ground]}, indent=1))
    for i in range(len(data)):
        scene = data.scene(i)
        name = f"scene_{data.first_seed + i:06d}"
        Image.fromarray(scene.image).save(tmp / "images" / f"{name}.png")
        ids = np.zeros(scene.ground.shape, np.uint8)
        segments = []
        for k, (mask, cls) in enumerate(zip(scene.masks, scene.classes)):
            ids[mask] = k + 1
            segments.append({"id": k + 1, "class": cls, "phrase": scene.referring(k)})
        if scene.ground.any():
            ids[scene.ground] = len(segments) + 1
            segments.append({"id": len(segments) + 1, "class": ground})
        Image.fromarray(ids).save(tmp / "panoptic" / f"{name}.png")
        (tmp / "annotations" / f"{name}.json").write_text(json.dumps({"segments": segments, "caption": scene.caption}))
