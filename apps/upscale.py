"""python -m apps.upscale — upscale photos to any scale or size with LIIF, or diversely with latent diffusion.

    python -m apps.upscale --scale 3.7 photo.jpg                 # writes photo_x3.7.png beside it
    python -m apps.upscale --size 1920x1080 photo.jpg -o big.webp
    python -m apps.upscale --scale 2 a.jpg b.png photos/ -o out/  # several inputs: -o names a folder
    python -m apps.upscale --scale 2 photos/                      # every image, into photos_x2/ beside it
    python -m apps.upscale --scale 4 --model edsr-baseline-liif.pth photo.png   # an official checkpoint
    python -m apps.upscale --scale 4 --device cuda --half photos/ -o big/        # GPU, half-precision MLP
    python -m apps.upscale --method diffusion --scale 4 --steps 50 --seed 1 photo.png   # diverse SR (latent diffusion)

The output is exactly round(H*S) x round(W*S) (or the --size given). Greyscale stays
greyscale, an alpha channel is upscaled separately by the same model (bicubically with --method
diffusion, so that a mask does not change with the seed), EXIF orientation is
applied and the ICC profile is kept. 16-bit inputs are written as 8-bit. The model is loaded
once for all inputs, and every input is checked before the first output is written.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from vision import argtypes
from vision.cli import (ArgumentParser, UserError, add_common_args, atomic_output, check_output, progress,
                        resolve_device, run)
from vision.data.images import IMAGE_EXTENSIONS, float_array, format_for_path, open_image, save_image

DEFAULT_MODEL = "liif-lite"
DEFAULT_DIFFUSION_MODEL = "ldm-sr"
CPU_TILE = 256  # input pixels; on CUDA the tile is sized from free memory instead
MAX_OUTPUT_PIXELS = 400_000_000  # 20000 x 20000: about 1.2 GB as 8-bit RGB in memory
PNG_COMPRESSION = 2  # zlib level: about 4.5x faster than Pillow's 6 for ~12% larger files, same pixels


def parse(argv):
    p = ArgumentParser(prog="python -m apps.upscale", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("inputs", nargs="+", metavar="input", help="image files and/or folders of images")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--scale", type=float, help="scale factor S > 0 (output round(H*S) x round(W*S))")
    what.add_argument("--size", help="output size WxH in pixels, e.g. 1920x1080")
    p.add_argument("-o", "--output", help="output file for one input file; a folder for several inputs or a "
                   "folder input. Default: NAME_xS.png (or NAME_WxH.png) beside each input file, and a "
                   "folder input's images into FOLDER_xS/ beside that folder")
    p.add_argument("--method", choices=["liif", "diffusion"], default="liif",
                   help="liif: deterministic LIIF; diffusion: arbitrary-scale latent diffusion, a different plausible "
                   "output for each --seed")
    p.add_argument("--model", default=None,
                   help=f"shipped model name, a save_pretrained folder, or an official LIIF .pth file "
                   f"(edsr-baseline-liif.pth, rdn-liif.pth). Default: {DEFAULT_MODEL}; with --method diffusion "
                   f"{DEFAULT_DIFFUSION_MODEL}%(default).0s")
    d = p.add_argument_group("--method diffusion")
    d.add_argument("--steps", type=argtypes.positive_int, default=None,
                   help="denoising steps (default: the model's)%(default).0s")
    d.add_argument("--scheduler", default=None, help="diffusers scheduler: ddim, ddpm, dpm, euler or any diffusers "
                   "scheduler class name (default: the model's)%(default).0s")
    d.add_argument("--color-fix", choices=["none", "adain", "wavelet"], default=None,
                   help="StableSR's colour corrections (not in the paper): adain gives each output channel the mean "
                   "and spread of the bicubic upsampling, wavelet its low frequencies (colours follow the input "
                   "locally; the shipped ldm-sr's default: its small denoiser drifts in colour). "
                   "Default: the model's%(default).0s")
    d.add_argument("--seed", type=int, default=None, help="seed of the diffusion's noise (default 0); the same seed "
                   "gives the same output%(default).0s")
    # "%(default).0s" prints nothing; it only stops argparse from appending "(default: None)"
    p.add_argument("--tile", type=argtypes.positive_int, default=None,
                   help=f"input tile side in pixels; bounds memory, the result does not depend on it "
                   f"(default: {CPU_TILE}; on CUDA sized from free GPU memory)%(default).0s")
    p.add_argument("--chunk", type=argtypes.positive_int, default=None,
                   help="queries per MLP batch, memory vs speed (default: the model's; on CUDA sized from free "
                   "GPU memory)%(default).0s")
    p.add_argument("--half", action="store_true",
                   help="run the MLP in bfloat16 (float16 on GPUs without it): CUDA, or a CPU with native "
                   "bfloat16; about 1%% of the 8-bit values move by a grey level")
    p.add_argument("--png-compression", type=argtypes.number(int, min=0, max=9), default=PNG_COMPRESSION,
                   help="zlib level of PNG outputs (0-9; Pillow's default is 6); the pixels do not depend on it")
    p.add_argument("--max-pixels", type=argtypes.positive_int, default=MAX_OUTPUT_PIXELS,
                   help="refuse outputs with more pixels than this")
    add_common_args(p, seed=False)
    return p.parse_args(argv)


def check_method_args(args) -> None:
    """Options of one method given with the other: one line, exit 2."""
    if args.method == "liif":
        given = [flag for flag, v in (("--steps", args.steps), ("--scheduler", args.scheduler), ("--seed", args.seed),
                                      ("--color-fix", args.color_fix)) if v is not None]
        if given:
            raise UserError(f"{given[0]} is for --method diffusion (LIIF is deterministic)")
    else:
        given = [flag for flag, v in (("--half", args.half), ("--tile", args.tile), ("--chunk", args.chunk)) if v]
        if given:
            raise UserError(f"{given[0]} is for --method liif (the diffusion runs on the whole input)")


def load_diffusion_upscaler(spec: str, device: torch.device):
    """A latent diffusion SR model (condition 'concat') with its first stage bound."""
    from generators.latent_diffusion import LatentDiffusion
    from generators.pipeline import load_tokenizer_for
    from vision.hub import resolve_model

    model = resolve_model(spec, device=device)
    if not isinstance(model, LatentDiffusion) or model.config.condition != "concat":
        what = type(model).__name__ if not isinstance(model, LatentDiffusion) else "an unconditional latent diffusion model"
        raise UserError(f"--method diffusion needs a diffusion super-resolution model; {spec} is {what}")
    load_tokenizer_for(model, device=device)
    return model.eval()


def load_upscaler(spec: str, device: torch.device):
    """--model through vision.hub.resolve_model (shipped name, save_pretrained folder, released LIIF file)."""
    from vision.decoders.liif import LIIF
    from vision.hub import resolve_model

    model = resolve_model(spec, kind="decoder")
    if not isinstance(model, LIIF):
        raise UserError(f"{spec} is a {type(model).__name__}, not an upscaling (LIIF) model")
    return model.to(device).eval()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere it is emulated, slowly."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def half_dtype(device: torch.device) -> torch.dtype:
    """The MLP precision --half uses on `device`, or a UserError where it would be slow or untested.

    Measured with liif-lite on the 18 sample photos at x2 and x3.7: a bfloat16 MLP changed 0.1-2.4%
    of the 8-bit values, each by 1 grey level (a bfloat16 encoder too moved some by 2, so it stays
    float32).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return torch.bfloat16
        raise UserError("--half on CPU needs native bfloat16 (AVX512-BF16 or AMX), which this CPU lacks; "
                        "run without --half")
    raise UserError(f"--half runs on CUDA or on a CPU with native bfloat16, not on {device.type}")


def exact_float32(device: torch.device) -> None:
    """Keep CUDA convolutions and matmuls in IEEE float32 (PyTorch lets cuDNN use TF32 by default)."""
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # older PyTorch
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


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


def size_tag(args) -> str:
    return f"x{args.scale:g}" if args.size is None else args.size.strip().lower().replace(" ", "")


def default_name(src: Path, args) -> str:
    return f"{src.stem}_{size_tag(args)}.png"


def folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{folder}: no images found")
    return files


def plan(args) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(input, output) pairs and the output folders to create, all checked before any work is done.

    No output goes into a folder given as an input, where the next run would take it for an
    input: a folder's outputs go to -o, or by default to a sibling folder FOLDER_xS/.
    """
    inputs = [Path(p) for p in args.inputs]
    for src in inputs:
        if not src.exists():
            raise UserError(f"{src}: no such file or folder")
    out = Path(args.output) if args.output else None
    several = len(inputs) > 1 or any(src.is_dir() for src in inputs)
    to_folder = several or (out is not None and (out.is_dir() or args.output.endswith(("/", os.sep))))
    if out is not None and several:
        what = "with several inputs" if len(inputs) > 1 else f"with a folder input ({inputs[0]})"
        if out.suffix.lower() in IMAGE_EXTENSIONS:
            raise UserError(f"-o {out} looks like an image file, but {what} -o names a folder")
        if out.exists() and not out.is_dir():
            raise UserError(f"-o {out} is a file, but {what} -o names a folder")

    pairs: list[tuple[Path, Path]] = []
    for src in inputs:
        if src.is_dir():
            dest = out if out is not None else src.parent / f"{src.name}_{size_tag(args)}"
            pairs += [(f, dest / default_name(f, args)) for f in folder_images(src)]
        elif out is not None and to_folder:
            pairs.append((src, out / default_name(src, args)))
        else:
            pairs.append((src, out if out is not None else src.with_name(default_name(src, args))))

    input_folders = {src.resolve(): src for src in inputs if src.is_dir()}
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        if dst.parent.resolve() in input_folders:
            raise UserError(f"{dst} would land in the input folder {input_folders[dst.parent.resolve()]}, where the "
                            "next run would read it as an input; choose another -o")
        key = dst.resolve()
        if key in seen:
            raise UserError(f"{seen[key]} and {src} would both be written to {dst}")
        seen[key] = src
        format_for_path(dst)
        if dst.parent.is_dir() or not to_folder:
            check_output(dst, args.overwrite)
    new_folders = sorted({dst.parent for _, dst in pairs if not dst.parent.exists()})
    return pairs, new_folders


def has_alpha(im) -> bool:
    """Whether `float_array` returns an alpha channel for this image (mode check only, no pixels read)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa") or (im.mode == "P" and "transparency" in im.info)


class Upscaler:
    """The loaded model plus how it runs: device, MLP precision (None: float32), tile and chunk (None: auto)."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype | None, tile: int | None, chunk: int | None):
        self.model, self.device, self.dtype, self.tile, self.chunk = model, device, dtype, tile, chunk

    def tile_and_chunk(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> tuple[int, int | None]:
        tile, chunk = self.tile, self.chunk
        if self.device.type == "cuda" and (tile is None or chunk is None):
            free, _ = torch.cuda.mem_get_info(self.device)
            auto_tile, auto_chunk = self.model.render_plan(free, in_size, out_size, self.dtype or torch.float32)
            return tile or auto_tile, chunk or auto_chunk
        return tile or CPU_TILE, chunk

    def alpha(self, x: torch.Tensor, size: tuple[int, int], on_pixels) -> torch.Tensor:
        """An alpha channel (given as a grey image) goes through the same model."""
        return self(x, size, on_pixels)

    def __call__(self, x: torch.Tensor, size: tuple[int, int], on_pixels) -> torch.Tensor:
        tile, chunk = self.tile_and_chunk(tuple(x.shape[-2:]), size)
        try:
            return self.model.upscale(x.to(self.device), size, tile=tile, chunk=chunk, dtype=self.dtype,
                                      progress=on_pixels)[0]
        except torch.OutOfMemoryError:
            raise UserError(f"out of {self.device.type} memory at tile {tile}, chunk {chunk}; "
                            "pass a smaller --tile or --chunk") from None


class DiffusionUpscaler:
    """A latent diffusion SR model: each image draws its noise from --seed alone, so an output does not depend on
    the other inputs of the run. An alpha channel is upscaled bicubically (see `alpha`)."""

    def __init__(self, model, device: torch.device, steps: int | None, scheduler: str | None, seed: int,
                 color_fix: str | None = None):
        self.model, self.device, self.steps, self.scheduler, self.seed = model, device, steps, scheduler, seed
        self.color_fix = color_fix

    def __call__(self, x: torch.Tensor, size: tuple[int, int], on_pixels) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(self.seed)
        try:
            out = self.model.upscale(x.to(self.device), size, steps=self.steps, scheduler=self.scheduler,
                                     generator=g, color_fix=self.color_fix)[0].clamp_(-1, 1)
        except torch.OutOfMemoryError:
            raise UserError(f"out of {self.device.type} memory; the diffusion runs on the whole input at once "
                            f"(its encoder on the input upsampled x{self.model.tokenizer.downsample})") from None
        except RuntimeError as e:
            if "alloc" not in str(e):  # the CPU allocator's "can't allocate memory"
                raise
            raise UserError(f"out of memory; the diffusion runs on the whole input at once (its encoder on the "
                            f"input upsampled x{self.model.tokenizer.downsample}); try a smaller input") from None
        except ValueError as e:
            raise UserError(str(e)) from None
        on_pixels(size[0] * size[1])
        return out

    def alpha(self, x: torch.Tensor, size: tuple[int, int], on_pixels) -> torch.Tensor:
        """An alpha channel is a mask, not a picture: bicubic, so that it does not vary with the seed."""
        out = torch.nn.functional.interpolate(x[:, :1], size=size, mode="bicubic", align_corners=False)
        on_pixels(size[0] * size[1])
        return out[0].clamp_(-1, 1)


def upscale_file(upscaler: Upscaler, src: Path, dst: Path, args, on_pixels) -> tuple[int, int]:
    im = open_image(src)
    rgb, alpha = float_array(im)
    grey = im.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1")
    h, w = rgb.shape[:2]
    H, W = output_size(h, w, args)
    y = upscaler(torch.from_numpy(rgb).permute(2, 0, 1)[None] * 2 - 1, (H, W), on_pixels)
    a = None
    if alpha is not None:  # alpha through the same model as a grey image, then averaged back to one channel
        xa = (torch.from_numpy(alpha)[None, None] * 2 - 1).expand(1, 3, h, w)
        a = upscaler.alpha(xa, (H, W), on_pixels).mean(0, keepdim=True)
    with atomic_output(dst, args.overwrite) as tmp:
        save_image(y.cpu(), tmp, alpha=None if a is None else a.cpu(), icc_profile=im.info.get("icc_profile"),
                   mode="L" if grey else None, format=format_for_path(dst), png_compression=args.png_compression)
    return H, W


def main(argv=None) -> int:
    args = parse(argv)
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale > 0):
        raise UserError(f"--scale must be a finite number > 0, got {args.scale}")
    pairs, new_folders = plan(args)
    pixels = 0
    for src, _ in pairs:  # every input readable and within the pixel limit before the first output
        im = open_image(src)
        H, W = output_size(im.height, im.width, args)
        pixels += H * W * (1 + has_alpha(im))
    check_method_args(args)
    device = resolve_device(args.device)
    exact_float32(device)
    if args.method == "diffusion":
        model = load_diffusion_upscaler(args.model or DEFAULT_DIFFUSION_MODEL, device)
        try:  # refuse a bad --scheduler before the first output
            model.sampling_options("plain", scheduler=args.scheduler)
        except ValueError as e:
            raise UserError(str(e)) from None
        upscaler = DiffusionUpscaler(model, device, args.steps, args.scheduler, 0 if args.seed is None else args.seed,
                                     args.color_fix)
    else:
        dtype = half_dtype(device) if args.half else None
        upscaler = Upscaler(load_upscaler(args.model or DEFAULT_MODEL, device), device, dtype, args.tile, args.chunk)
    for folder in new_folders:
        folder.mkdir(parents=True, exist_ok=True)
    bar = progress(total=pixels, quiet=args.quiet, unit="px", unit_scale=True)
    for i, (src, dst) in enumerate(pairs, 1):
        bar.set_description(f"{i}/{len(pairs)} {src.name}" if len(pairs) > 1 else src.name)
        H, W = upscale_file(upscaler, src, dst, args, bar.update)
        bar.write(f"{dst}  ({W}x{H})")  # on stdout, above the bar
    bar.close()
    return 0


if __name__ == "__main__":
    run(main, skip_teardown=True)
