"""ImageNet-layout folders: root/<class>/<image>; a flat folder of images is one class (label 0).

Files whose suffix is not an image's (a README, labels.csv, ...) are skipped, and counted in one
warning for the whole folder. Hidden files and folders (a leading dot) are ignored silently."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Literal

import torch
from torch.utils.data import Dataset

from vision.data.images import ImageReadError, is_image_file, read_image


class ImageFolder(Dataset):
    """Images in [-1, 1] with integer labels from sorted class folder names.

    on_error: what a corrupt or unreadable file does when it is read.
      "skip"  - warn once (naming the file), remember it in `self.bad_files`, and return the next
                readable sample instead, so an epoch over ImageNet never dies on one bad JPEG;
      "raise" - raise ImageReadError naming the file.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 on_error: Literal["skip", "raise"] = "skip"):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        samples: list[tuple[Path, int]] = []
        others: list[Path] = []
        for label, name in enumerate(classes):
            images, skipped = _image_files(root / name, recursive=True)
            samples += [(p, label) for p in images]
            others += skipped
        flat, skipped = _image_files(root, recursive=False)
        others += skipped
        if flat and not classes:
            samples = [(p, 0) for p in flat]
            classes = [root.name]
        if not samples:
            raise ImageReadError(f"{root}: no images found (looked for class sub-folders and image files)")
        if others:  # one note for the folder, not one line per file
            kinds = sorted({p.suffix.lower() or p.name for p in others})
            warnings.warn(f"{root}: skipped {len(others)} file(s) that are not images ({', '.join(kinds[:5])}"
                          f"{', ...' if len(kinds) > 5 else ''}; e.g. {others[0].relative_to(root)})", stacklevel=2)
        self.skipped_files = others  # non-image files, not read
        self.root, self.transform, self.on_error = root, transform, on_error
        self.classes = classes
        self.samples = samples
        self.bad_files: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            if path in self.bad_files:
                continue
            try:
                image = read_image(path)
            except ImageReadError as e:
                if self.on_error == "raise":
                    raise
                self.bad_files.add(path)
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
                continue
            return (self.transform(image) if self.transform else image), label
        raise ImageReadError(f"{self.root}: none of the {len(self.samples)} images is readable")


def _image_files(folder: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    """(image files, other files) in `folder`, sorted, hidden ones left out."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [p for p in files if is_image_file(p)], [p for p in files if not is_image_file(p)]
