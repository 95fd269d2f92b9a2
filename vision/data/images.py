"""Image files <-> tensors. Files are uint8 (or 16-bit); models see float32 RGB in [-1, 1].

Reading applies the EXIF orientation, turns palette/greyscale/CMYK into RGB, composites
nothing (alpha is returned separately by `read_image_with_alpha`), and scales 16-bit
images by 65535 so they are not clipped.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """A file that is not a readable image."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and EXIF-orient an image; ImageReadError on anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                oriented = ImageOps.exif_transpose(im)
                if oriented is im:
                    oriented = im.copy()
                oriented.info.update({k: v for k, v in im.info.items() if k == "icc_profile"})
                return oriented
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def float_array(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """HxWx3 float32 RGB in [0, 1] and an optional HxW alpha in [0, 1]."""
    alpha = None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if a.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
        rgb = np.repeat((a / scale).clip(0, 1)[..., None], 3, axis=2)
        return rgb.astype(np.float32), None
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return np.repeat(a.clip(0, 1)[..., None], 3, axis=2), None
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "RGBa"):
        alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return rgb, alpha


def read_image_with_alpha(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(3, H, W) in [-1, 1] and, when the file has one, the alpha channel (1, H, W) in [-1, 1]."""
    rgb, alpha = float_array(open_image(path))
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1) * 2 - 1
    return image, None if alpha is None else torch.from_numpy(alpha)[None] * 2 - 1


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """(3, H, W) float32 RGB in [-1, 1]."""
    return read_image_with_alpha(path)[0]


def read_image_uint8(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 RGB, as metrics protocols expect."""
    rgb, _ = float_array(open_image(path))
    return np.round(rgb * 255).astype(np.uint8)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 with rounding (the quantisation every metric protocol applies)."""
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor, alpha: torch.Tensor | None = None, mode: str | None = None) -> Image.Image:
    """(3, H, W) in [-1, 1] (plus optional (1, H, W) alpha) -> PIL image. mode "L" keeps greyscale."""
    arr = to_uint8(image).permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(arr, "RGB")
    if mode == "L":
        im = im.convert("L")
    if alpha is not None:
        a = Image.fromarray(to_uint8(alpha)[0].cpu().numpy(), "L")
        im = im.convert("LA" if mode == "L" else "RGBA")
        im.putalpha(a)
    return im


def save_image(image: torch.Tensor, path: str | os.PathLike, alpha: torch.Tensor | None = None,
               icc_profile: bytes | None = None, mode: str | None = None, format: str | None = None,
               png_compression: int | None = None) -> None:
    """Write (3, H, W) in [-1, 1] to `path` (format from the suffix unless given).

    `png_compression` is the PNG zlib level 0-9 (None: Pillow's 6); the pixels do not depend on it.
    """
    im = to_pil(image, alpha, mode)
    fmt = format or format_for_path(path)
    kwargs = {}
    if icc_profile:
        kwargs["icc_profile"] = icc_profile
    if fmt == "JPEG":
        if im.mode in ("RGBA", "LA"):
            im = im.convert("RGB" if im.mode == "RGBA" else "L")
        kwargs["quality"] = 95
    if fmt == "WEBP":
        kwargs.update(lossless=True)
    if fmt == "PNG" and png_compression is not None:
        kwargs["compress_level"] = png_compression
    im.save(path, format=fmt, **kwargs)


def format_for_path(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
               ".bmp": "BMP"}
    if ext not in formats:
        raise ImageReadError(f"{path}: unsupported output format {ext or '(none)'}; use one of {', '.join(formats)}")
    return formats[ext]
