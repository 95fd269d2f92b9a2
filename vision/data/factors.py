"""A seeded synthetic dataset with known generative factors (a small dSprites / Shapes3D).

Each image shows one shape on a black background. Five discrete factors generate it:

=========  ================================================
shape      square, circle, triangle (apex up), diamond
size       half-width from 0.12 to 0.22 of the image side
x, y       centre positions evenly spaced inside the image
colour     red, green, blue, yellow, magenta, cyan, white
=========  ================================================

``num_*`` in :class:`FactorsConfig` pick how many values of each factor are used (the first
ones of each list above). Images are float32 ``(N, 3, H, W)`` in [-1, 1]; factors are int64
``(N, 5)`` in the order of :data:`FACTOR_NAMES`. Rendering is deterministic (hard masks
evaluated at pixel centres); sampling goes through a seeded ``torch.Generator``, so the
same seed always gives the same dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

FACTOR_NAMES = ("shape", "size", "x", "y", "colour")
SHAPES = ("square", "circle", "triangle", "diamond")
PALETTE = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0.35, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.float32
)


@dataclass(frozen=True)
class FactorsConfig:
    image_size: int = 32
    num_shapes: int = 3
    num_sizes: int = 3
    num_x: int = 5
    num_y: int = 5
    num_colours: int = 4

    def __post_init__(self) -> None:
        limits = {"num_shapes": len(SHAPES), "num_colours": len(PALETTE)}
        for name in ("num_shapes", "num_sizes", "num_x", "num_y", "num_colours"):
            value = getattr(self, name)
            if not 1 <= value <= limits.get(name, self.image_size):
                raise ValueError(f"FactorsConfig.{name}={value} out of range")
        if self.image_size < 8:
            raise ValueError(f"FactorsConfig.image_size must be >= 8, got {self.image_size}")

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        return (self.num_shapes, self.num_sizes, self.num_x, self.num_y, self.num_colours)


def _levels(n: int, lo: float, hi: float) -> Tensor:
    return torch.full((1,), (lo + hi) / 2) if n == 1 else torch.linspace(lo, hi, n)


def render(factors: Tensor, config: FactorsConfig = FactorsConfig()) -> Tensor:
    """Render integer factors ``(N, 5)`` to images ``(N, 3, H, W)`` in [-1, 1]."""
    factors = torch.as_tensor(factors, dtype=torch.long)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"factors must be (N, {len(FACTOR_NAMES)}), got {tuple(factors.shape)}")
    sizes = torch.tensor(config.factor_sizes)
    if (factors < 0).any() or (factors >= sizes).any():
        raise ValueError(f"factor values out of range for sizes {tuple(sizes.tolist())}")
    s = config.image_size
    radii = _levels(config.num_sizes, 0.12, 0.22) * s
    margin = float(radii.max()) + 0.5
    xs = _levels(config.num_x, margin, s - margin)
    ys = _levels(config.num_y, margin, s - margin)
    shape, size, x, y, colour = factors.unbind(1)
    r = radii[size].view(-1, 1, 1)
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, s) - xs[x].view(-1, 1, 1)
    dy = coords.view(1, s, 1) - ys[y].view(-1, 1, 1)
    masks = torch.stack(
        [
            (dx.abs() <= r) & (dy.abs() <= r),  # square
            dx.square() + dy.square() <= r.square(),  # circle
            (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2),  # triangle, apex up (y grows downwards)
            dx.abs() + dy.abs() <= r,  # diamond
        ]
    )  # (4, N, s, s)
    mask = masks.gather(0, shape.view(1, -1, 1, 1).expand(1, -1, s, s))[0]
    rgb = PALETTE[colour].view(-1, 3, 1, 1)
    return torch.where(mask.unsqueeze(1), rgb, torch.zeros(())) * 2 - 1


def sample_factors(n: int, config: FactorsConfig = FactorsConfig(), *, seed: int = 0) -> Tensor:
    """``n`` factor vectors, each factor uniform and independent, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(k, (n,), generator=g) for k in config.factor_sizes], dim=1)


def all_factors(config: FactorsConfig = FactorsConfig()) -> Tensor:
    """Every factor combination once (``prod(factor_sizes)`` rows), in lexicographic order."""
    grids = torch.meshgrid(*[torch.arange(k) for k in config.factor_sizes], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def make_factors_dataset(n: int, config: FactorsConfig = FactorsConfig(), *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(images (n, 3, H, W) in [-1, 1], factors (n, 5) int64)``, reproducible from ``seed``."""
    factors = sample_factors(n, config, seed=seed)
    return render(factors, config), factors


class FactorsDataset(Dataset):
    """Map-style dataset of ``(image, factors)`` pairs; rendered once at construction."""

    def __init__(self, n: int, config: FactorsConfig = FactorsConfig(), *, seed: int = 0) -> None:
        self.config = config
        self.images, self.factors = make_factors_dataset(n, config, seed=seed)

    def __len__(self) -> int:
        return self.factors.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.factors[index]
