"""Image folders as metric inputs: sorted file lists, pairing by name, and datasets of uint8 images.

Every image under a folder counts (sub-folders included, hidden files and folders skipped), in
sorted order of the paths, so a folder always gives the same rows in the same order. Datasets
return uint8 (3, H, W) RGB tensors; a file that fails to read comes back as an `Unreadable`,
which `vision.metrics.batches.map_dataset` raises in the main process (a DataLoader worker
cannot raise a clean one-line error itself).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vision.metrics.errors import EvaluationInputError


class Unreadable:
    """Returned by the datasets in place of a sample that failed to read."""

    def __init__(self, message: str):
        self.message = message


def size_text(image: Tensor) -> str:
    """'WxH' of a (..., H, W) tensor, as error messages name image sizes."""
    return f"{image.shape[-1]}x{image.shape[-2]}"


def read_uint8_chw(path: Path) -> Tensor | Unreadable:
    from vision.data.images import ImageReadError, read_image_uint8

    try:
        return torch.from_numpy(read_image_uint8(path)).permute(2, 0, 1).contiguous()
    except ImageReadError as e:
        return Unreadable(str(e))


class ImageFiles(torch.utils.data.Dataset):
    """uint8 (3, H, W) RGB images of a list of files."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return read_uint8_chw(self.files[i])


class PairedFiles(ImageFiles):
    """(reference, test) uint8 images of paired files, which must have the same size."""

    def __init__(self, pairs: list[tuple[Path, Path]]):
        self.pairs = pairs
        super().__init__([a for a, _ in pairs])

    def __getitem__(self, i: int):
        a, b = (read_uint8_chw(p) for p in self.pairs[i])
        for x in (a, b):
            if isinstance(x, Unreadable):
                return x
        if a.shape != b.shape:
            return Unreadable(f"{self.pairs[i][0]} is {size_text(a)} but {self.pairs[i][1]} is {size_text(b)}; "
                              "paired images must have the same size")
        return a, b


class CroppedFiles(ImageFiles):
    """The rFID protocol's input: short side to `size` (bicubic, antialiased), centre crop, quantised to uint8."""

    def __init__(self, files: list[Path], size: int):
        super().__init__(files)
        self.size = size

    def __getitem__(self, i: int):
        from vision.data import ImageReadError, center_crop_resize, read_image, to_uint8

        try:
            return to_uint8(center_crop_resize(read_image(self.files[i]), self.size))
        except ImageReadError as e:
            return Unreadable(str(e))


def image_files(folder: str | Path, what: str = "folder") -> list[Path]:
    """Every image under `folder` (sub-folders included), sorted by path.

    `what` names the folder in error messages (e.g. "--real"); there is one when the folder is
    missing or holds no images.
    """
    from vision.data.images import is_image_file

    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationInputError(f"{what} {folder} is not a folder" if folder.exists()
                                   else f"{what} {folder} does not exist")
    files, others = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            (files if is_image_file(p) else others).append(p)
    if not files:
        extra = f" ({len(others)} other file(s), e.g. {others[0].name})" if others else " (it is empty)"
        raise EvaluationInputError(f"{what} {folder} has no images{extra}")
    return files


def paired_files(ref: str | Path, test: str | Path) -> list[tuple[Path, Path]]:
    """(reference, test) files with the same relative path up to the extension, in sorted order."""

    def keyed(folder: Path, what: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in image_files(folder, what):
            key = p.relative_to(folder).with_suffix("").as_posix()
            if key in out:
                raise EvaluationInputError(f"{what} {folder} has both {out[key].name} and {p.name}; "
                                           "pairing by name is ambiguous")
            out[key] = p
        return out

    a, b = keyed(Path(ref), "--ref"), keyed(Path(test), "--test")
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = [f"{len(only_a)} only in --ref (e.g. {only_a[0]})"] if only_a else []
        parts += [f"{len(only_b)} only in --test (e.g. {only_b[0]})"] if only_b else []
        raise EvaluationInputError(f"--ref and --test images do not pair up by file name: {', '.join(parts)}")
    return [(a[k], b[k]) for k in sorted(a)]


def labels_from_folders(files: list[Path], root: str | Path) -> Tensor:
    """Class ids from the first sub-folder of each file under `root` (root/3/x.png -> 3), int64."""
    root = Path(root)
    names = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None for f in files]
    bad = next((f for f, n in zip(files, names) if n is None or not n.isdigit()), None)
    if bad is not None:
        raise EvaluationInputError(f"--labels-from-folders: {bad} is not in a sub-folder named by a class id "
                                   "(0, 1, ...)")
    return torch.tensor([int(n) for n in names])
