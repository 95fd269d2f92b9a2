"""Super-resolution data as LIIF trains and evaluates it (yinboc/liif `datasets/wrappers.py`, `test.py`).

Training sample (`SRImplicitDownsampled`): scale s ~ U(1, 4); a random HR crop of side
round(48 s); the LR input is that crop bicubic-downsampled to 48 x 48 (PIL bicubic on uint8,
as the official `resize_fn`); random h-flip, v-flip and transpose; 2304 HR pixels sampled
without replacement give the query coordinates (pixel centres in [-1, 1]), their RGB and the
cell (2/H, 2/W). Everything is in [-1, 1].

Evaluation pair at a fixed scale: h_lr = floor(H / s), the HR image cropped to
round(h_lr s) x round(w_lr s) and bicubic-downsampled to h_lr x w_lr.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vision.data.images import read_image_uint8


def _pil_bicubic(hr: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(hr).resize((size_hw[1], size_hw[0]), Image.BICUBIC))


def _to_unit(a: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float() / 127.5 - 1


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """(h*w, 2) pixel-centre coordinates (row, col) in [-1, 1], row-major: -1 + 1/n + 2i/n."""
    ys = -1 + (2 * torch.arange(h, dtype=torch.float32) + 1) / h
    xs = -1 + (2 * torch.arange(w, dtype=torch.float32) + 1) / w
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).view(-1, 2)


class SRImplicitDownsampled(Dataset):
    """LIIF's training wrapper over a list of HR images (paths, loaded once as uint8).

    `rgb_permute` (off in the official recipe) shuffles the colour channels of each crop, the
    "RGB permutation" augmentation of Yoo et al. (CVPR 2020): with only a few training photos it
    keeps the model from learning their colour statistics as a prior (which shows as a colour cast
    on saturated images it has not seen).
    """

    def __init__(self, images: Sequence[str | Path | np.ndarray], *, inp_size: int = 48, scale_min: float = 1.0,
                 scale_max: float = 4.0, sample_q: int = 2304, augment: bool = True, repeat: int = 1,
                 rgb_permute: bool = False):
        self.images = [img if isinstance(img, np.ndarray) else read_image_uint8(img) for img in images]
        small = [i for i, im in enumerate(self.images) if min(im.shape[:2]) < round(inp_size * scale_max)]
        if small:
            raise ValueError(f"images {small} are smaller than the largest HR crop {round(inp_size * scale_max)}")
        if sample_q > inp_size * inp_size * scale_min ** 2:
            raise ValueError(f"sample_q {sample_q} exceeds the pixels of the smallest HR crop")
        self.inp_size, self.scale_min, self.scale_max = inp_size, scale_min, scale_max
        self.sample_q, self.augment, self.repeat = sample_q, augment, repeat
        self.rgb_permute = rgb_permute

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def sample(self, index: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        img = self.images[index % len(self.images)]
        u = lambda: torch.rand((), generator=g).item()  # noqa: E731
        s = self.scale_min + (self.scale_max - self.scale_min) * u()
        w_lr = self.inp_size
        w_hr = round(w_lr * s)
        x0 = int(torch.randint(0, img.shape[0] - w_hr + 1, (), generator=g))
        y0 = int(torch.randint(0, img.shape[1] - w_hr + 1, (), generator=g))
        crop_hr = img[x0:x0 + w_hr, y0:y0 + w_hr]
        crop_lr = _pil_bicubic(crop_hr, (w_lr, w_lr))
        hr, lr = _to_unit(crop_hr), _to_unit(crop_lr)
        if self.augment:
            hflip, vflip, dflip = (u() < 0.5 for _ in range(3))
            for flag, op in ((hflip, lambda x: x.flip(-2)), (vflip, lambda x: x.flip(-1)),
                             (dflip, lambda x: x.transpose(-2, -1))):
                if flag:
                    hr, lr = op(hr), op(lr)
        if self.rgb_permute:  # not in LIIF's recipe; see the class docstring
            order = torch.randperm(3, generator=g)
            hr, lr = hr[order], lr[order]
        coord = pixel_centres(*hr.shape[-2:])
        rgb = hr.reshape(3, -1).t()
        pick = torch.randperm(len(coord), generator=g)[: self.sample_q]
        cell = torch.tensor([2 / hr.shape[-2], 2 / hr.shape[-1]]).expand(self.sample_q, 2).clone()
        return {"inp": lr.contiguous(), "coord": coord[pick], "cell": cell, "gt": rgb[pick].contiguous()}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(index, torch.Generator().manual_seed(index))


def downsampled_pair(hr: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lr, hr) in [-1, 1] for evaluation at a fixed scale, as the official SRImplicitDownsampled test mode."""
    h_lr = math.floor(hr.shape[0] / scale + 1e-9)
    w_lr = math.floor(hr.shape[1] / scale + 1e-9)
    hr = hr[: round(h_lr * scale), : round(w_lr * scale)]
    return _to_unit(_pil_bicubic(hr, (h_lr, w_lr))), _to_unit(hr)


def div2k_shave(scale: float) -> int:
    """LIIF's DIV2K protocol shaves scale + 6 pixels (RGB PSNR); for fractional scales, ceil(scale) + 6."""
    return math.ceil(scale - 1e-9) + 6


class HRCrops(Dataset):
    """Square HR crops with their LR versions, as arbitrary-scale latent diffusion trains on them
    (zhenshij/arbitrary-scale-diffusion `DIV2KBase`): a random `crop` x `crop` crop, random h-flip,
    v-flip and transpose, and the LR = PIL bicubic (antialiased) downscale by `factor` (the first
    stage's downsampling, so the LR has the latent's size). Items: {"hr", "lr", "seed"}, [-1, 1];
    "seed" feeds the loss's per-sample noise (`generators.base.per_sample_rand`).

    `images` may be paths, (H, W, 3) uint8 arrays, or an (N, 3, H, W) tensor in [-1, 1] (MNIST).
    """

    def __init__(self, images, *, crop: int, factor: int, repeat: int = 1, augment: bool = True):
        if crop % factor:
            raise ValueError(f"crop {crop} must be a multiple of the downsampling factor {factor}")
        if isinstance(images, torch.Tensor):
            self.images = [((im.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy() for im in images]
        else:
            self.images = [img if isinstance(img, np.ndarray) else read_image_uint8(img) for img in images]
        small = [i for i, im in enumerate(self.images) if min(im.shape[:2]) < crop]
        if small:
            raise ValueError(f"images {small[:5]} are smaller than the crop {crop}")
        self.crop, self.factor, self.repeat, self.augment = crop, factor, repeat, augment

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def sample(self, index: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        img = self.images[index % len(self.images)]
        c = self.crop
        y0 = int(torch.randint(0, img.shape[0] - c + 1, (), generator=g))
        x0 = int(torch.randint(0, img.shape[1] - c + 1, (), generator=g))
        hr = img[y0:y0 + c, x0:x0 + c]
        if self.augment:
            if torch.rand((), generator=g) < 0.5:
                hr = hr[::-1]
            if torch.rand((), generator=g) < 0.5:
                hr = hr[:, ::-1]
            if torch.rand((), generator=g) < 0.5:
                hr = hr.transpose(1, 0, 2)
        hr = np.ascontiguousarray(hr)
        lr = _pil_bicubic(hr, (c // self.factor, c // self.factor))
        return {"hr": _to_unit(hr), "lr": _to_unit(lr), "seed": torch.randint(0, 2**62, (), generator=g)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(index, torch.Generator().manual_seed(index))
