"""python -m apps.upscale — upscale photos to any scale or size with LIIF.

    python -m apps.upscale --scale 3.7 photo.jpg                 # writes photo_x3.7.png beside it
    python -m apps.upscale --size 1920x1080 photo.jpg -o big.webp
    python -m apps.upscale --scale 2 photos/ -o photos_x2/        # every image in a folder
    python -m apps.upscale --scale 4 --model edsr-baseline-liif.pth photo.png   # an official checkpoint

The output is exactly round(H*S) x round(W*S) (or the --size given). Greyscale stays
greyscale, an alpha channel is upscaled separately by the same model, EXIF orientation is
applied and the ICC profile is kept. 16-bit inputs are written as 8-bit.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from vision.cli import (ArgumentParser, UserError, add_common_args, atomic_output, check_output, progress,
                        resolve_device, run)
from vision.data.images import IMAGE_EXTENSIONS, float_array, format_for_path, open_image, save_image

DEFAULT_MODEL = "liif-lite"
MAX_OUTPUT_PIXELS = 400_000_000  # 20000 x 20000: about 1.2 GB as 8-bit RGB in memory
OFFICIAL_SUFFIXES = (".pth", ".pt", ".ckpt")


def parse(argv):
    p = ArgumentParser(prog="python -m apps.upscale", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("input", help="an image file, or a folder of images")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--scale", type=float, help="scale factor S > 0 (output round(H*S) x round(W*S))")
    what.add_argument("--size", help="output size WxH in pixels, e.g. 1920x1080")
    p.add_argument("-o", "--output", help="output file (or folder when the input is a folder); "
                   "default: beside the input as NAME_xS.png (or NAME_WxH.png)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="shipped model name, a save_pretrained folder, or an official LIIF .pth file")
    p.add_argument("--tile", type=int, default=256,
                   help="input tile side in pixels; bounds memory, the result does not depend on it")
    p.add_argument("--chunk", type=int, default=16384, help="queries per MLP batch (memory vs speed)")
    p.add_argument("--max-pixels", type=int, default=MAX_OUTPUT_PIXELS,
                   help="refuse outputs with more pixels than this")
    add_common_args(p, seed=False)
    return p.parse_args(argv)


def load_upscaler(spec: str, device: torch.device):
    from vision.decoders.liif import LIIF, from_official
    from vision.hub import from_pretrained, load_official_state_dict

    path = Path(spec)
    if path.suffix in OFFICIAL_SUFFIXES:
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        model = from_official(load_official_state_dict(path))
    else:
        model = from_pretrained(spec)
    if not isinstance(model, LIIF):
        raise UserError(f"{spec} is a {type(model).__name__}, not an upscaling (LIIF) model")
    return model.to(device).eval()


def output_size(h: int, w: int, args) -> tuple[int, int]:
    if args.size is not None:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", args.size)
        if not m or min(int(m[1]), int(m[2])) < 1:
            raise UserError(f"--size must be WxH with positive integers, got {args.size!r}")
        H, W = int(m[2]), int(m[1])
    else:
        s = args.scale
        H, W = round(h * s), round(w * s)
        if min(H, W) < 1:
            raise UserError(f"--scale {s} turns {w}x{h} into an empty image")
    if H * W > args.max_pixels:
        raise UserError(f"output {W}x{H} has {H * W:,} pixels, over the limit of {args.max_pixels:,} (--max-pixels)")
    return H, W


def default_name(src: Path, args) -> str:
    tag = f"x{args.scale:g}" if args.size is None else args.size.strip().lower().replace(" ", "")
    return f"{src.stem}_{tag}.png"


def plan(args) -> list[tuple[Path, Path]]:
    """(input, output) pairs, all checked before any work is done."""
    src = Path(args.input)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"{src}: no images found")
        out_dir = Path(args.output) if args.output else src
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"{out_dir} is a file; with a folder input, -o must be a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        pairs = [(f, out_dir / default_name(f, args)) for f in files]
    elif src.is_file():
        pairs = [(src, Path(args.output) if args.output else src.with_name(default_name(src, args)))]
    else:
        raise UserError(f"{src}: no such file or folder")
    for _, dst in pairs:
        check_output(dst, args.overwrite)
        format_for_path(dst)
    return pairs


def upscale_file(model, src: Path, dst: Path, args, device: torch.device) -> tuple[int, int]:
    im = open_image(src)
    rgb, alpha = float_array(im)
    grey = im.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1")
    h, w = rgb.shape[:2]
    H, W = output_size(h, w, args)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device) * 2 - 1
    bar = progress(total=1 + (alpha is not None), quiet=args.quiet, desc=src.name, unit="pass")
    y = model.upscale(x, (H, W), tile=args.tile, chunk=args.chunk)[0]
    bar.update(1)
    a = None
    if alpha is not None:  # alpha through the same model as a grey image, then averaged back to one channel
        xa = (torch.from_numpy(alpha)[None, None].to(device) * 2 - 1).expand(1, 3, h, w)
        a = model.upscale(xa, (H, W), tile=args.tile, chunk=args.chunk)[0].mean(0, keepdim=True)
        bar.update(1)
    bar.close()
    with atomic_output(dst, args.overwrite) as tmp:
        save_image(y.cpu(), tmp, alpha=None if a is None else a.cpu(), icc_profile=im.info.get("icc_profile"),
                   mode="L" if grey else None, format=format_for_path(dst))
    return H, W


def main(argv=None) -> int:
    args = parse(argv)
    if args.tile < 1 or args.chunk < 1 or args.max_pixels < 1:
        raise UserError("--tile, --chunk and --max-pixels must be positive")
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale > 0):
        raise UserError(f"--scale must be a finite number > 0, got {args.scale}")
    pairs = plan(args)
    for src, _ in pairs:  # every input readable and within the pixel limit before the first output
        im = open_image(src)
        output_size(im.height, im.width, args)
    device = resolve_device(args.device)
    model = load_upscaler(args.model, device)
    for src, dst in pairs:
        H, W = upscale_file(model, src, dst, args, device)
        print(f"{dst}  ({W}x{H})")
    return 0


if __name__ == "__main__":
    run(main)
