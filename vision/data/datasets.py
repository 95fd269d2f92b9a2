"""Image datasets the trainers and the token extractor share: MNIST-5k digits and centre-cropped folders."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vision.data.folder import ImageFolder
from vision.data.mnist import mnist5k_split
from vision.data.transforms import center_crop_resize


def digits_as_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 32, 32) uint8 digits -> (N, 3, size, size) in [-1, 1] (bilinear + antialias when resized)."""
    x = x.float().div(127.5).sub(1)[:, None].expand(-1, 3, -1, -1)
    x = x if size == x.shape[-1] else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.contiguous()


class MNISTImages(Dataset):
    """MNIST-5k digits as 3-channel images in [-1, 1]: the training split (held-out digits excluded), or the
    held-out split with `heldout=True`."""

    def __init__(self, size: int = 32, *, heldout: bool = False):
        train, held = mnist5k_split()
        x, y = held if heldout else train
        self.x = digits_as_images(x, size)
        self.y = y
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].contiguous(), int(self.y[i])


class CenterCrop:
    """The rFID crop: short side to `size` (bicubic + antialias), centre crop."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return center_crop_resize(image, self.size)


class FolderImages(Dataset):
    """Centre-cropped images of an ImageNet-layout folder; `sample` adds a random horizontal flip drawn from
    the sample's own generator (for the training toolkit's SeededDataset)."""

    def __init__(self, root: str, size: int):
        self.folder = ImageFolder(root, transform=CenterCrop(size))
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        return self.folder[index]

    def sample(self, index: int, g: torch.Generator):
        image, label = self.folder[index]
        if torch.rand((), generator=g) < 0.5:
            image = image.flip(-1)
        return image, label
