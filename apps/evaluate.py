"""python -m apps.evaluate — FID, KID, IS, rFID, PSNR/SSIM/LPIPS and digit accuracy from image folders.

    python -m apps.evaluate fid --real real/ --fake samples/              # or --real imagenet_val.npz
    python -m apps.evaluate stats real/ -o real.npz                         # pytorch-fid's mu/sigma .npz
    python -m apps.evaluate kid --real real/ --fake samples/
    python -m apps.evaluate is --fake samples/
    python -m apps.evaluate rfid --tokenizer wetok --data /data/imagenet/val --num 50000
    python -m apps.evaluate psnr --ref hr/ --test upscaled/ --y-channel --shave 4
    python -m apps.evaluate fid --features mnist-classifier --real digits/ --fake generated/
    python -m apps.evaluate classify --fake generated/ --labels-from-folders   # folders 0/ .. 9/
    python -m apps.evaluate import-inception pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node 4 -m apps.evaluate fid --real real/ --fake samples/

Images are read in sorted order of their paths (sub-folders included). FID, KID and IS use the
TF FID Inception (`vision.metrics`: TF1 bilinear resize to 299, pool3 features, unbiased logits),
found locally (`--inception`, or see `import-inception`); `--features NAME|DIR` uses a Tessera
classifier's `features()` (e.g. the shipped `mnist-classifier`) instead. Under torchrun the images
are split across processes and the features gathered in file order, so the figures are those of
one process. Results print as a table; `--json PATH` writes them as one flat object (null where a
value is not finite, e.g. the PSNR of identical images).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from vision.cli import ArgumentParser, UserError, add_common_args, check_output, progress, resolve_device, run

Figures = dict[str, float]


# ---------------------------------------------------------------------------------------------
# Subcommand registry: each subcommand adds its options and returns its figures.
# A new one is one more `@subcommand(...)` function.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, "Context"], Figures | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    def wrap(fn):
        SUBCOMMANDS[name] = Subcommand(name, help, configure, fn)
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------
# Running over images: file lists, batches, ranks
# ---------------------------------------------------------------------------------------------

@dataclass
class Context:
    """Where and how to run: device, process group, batching, progress."""

    device: torch.device
    rank: int = 0
    world: int = 1
    batch_size: int = 64
    workers: int = 0
    quiet: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _Unreadable:
    """Returned by datasets in place of a sample that failed to read (raised as a UserError in the main process)."""

    def __init__(self, message: str):
        self.message = message


def _uint8_chw(path: Path) -> Tensor | _Unreadable:
    from vision.data.images import ImageReadError, read_image_uint8

    try:
        return torch.from_numpy(read_image_uint8(path)).permute(2, 0, 1).contiguous()
    except ImageReadError as e:
        return _Unreadable(str(e))


class ImageFiles(torch.utils.data.Dataset):
    """uint8 (3, H, W) RGB images of a list of files."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return _uint8_chw(self.files[i])


class PairedFiles(ImageFiles):
    """(reference, test) uint8 images of paired files."""

    def __init__(self, pairs: list[tuple[Path, Path]]):
        self.pairs = pairs
        super().__init__([a for a, _ in pairs])

    def __getitem__(self, i: int):
        a, b = (_uint8_chw(p) for p in self.pairs[i])
        for x in (a, b):
            if isinstance(x, _Unreadable):
                return x
        if a.shape != b.shape:
            return _Unreadable(f"{self.pairs[i][0]} is {_size(a)} but {self.pairs[i][1]} is {_size(b)}; "
                               "paired images must have the same size")
        return a, b


def _size(x: Tensor) -> str:
    return f"{x.shape[-1]}x{x.shape[-2]}"


def image_files(folder: str | Path, what: str = "folder") -> list[Path]:
    """Every image under `folder` (sub-folders included), sorted by path; UserError when there are none."""
    from vision.data.images import is_image_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder" if folder.exists() else f"{what} {folder} does not exist")
    files, others = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            (files if is_image_file(p) else others).append(p)
    if not files:
        extra = f" ({len(others)} other file(s), e.g. {others[0].name})" if others else " (it is empty)"
        raise UserError(f"{what} {folder} has no images{extra}")
    return files


def paired_files(ref: str | Path, test: str | Path) -> list[tuple[Path, Path]]:
    """Pairs of (reference, test) files with the same relative path up to the extension."""

    def keyed(folder: Path, what: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in image_files(folder, what):
            key = p.relative_to(folder).with_suffix("").as_posix()
            if key in out:
                raise UserError(f"{what} {folder} has both {out[key].name} and {p.name}; pairing by name is ambiguous")
            out[key] = p
        return out

    a, b = keyed(Path(ref), "--ref"), keyed(Path(test), "--test")
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = [f"{len(only_a)} only in --ref (e.g. {only_a[0]})"] if only_a else []
        parts += [f"{len(only_b)} only in --test (e.g. {only_b[0]})"] if only_b else []
        raise UserError(f"--ref and --test images do not pair up by file name: {', '.join(parts)}")
    return [(a[k], b[k]) for k in sorted(a)]


def _runs(items: list) -> Iterator[Any]:
    """Stack consecutive samples of equal shape into batches (folders may mix image sizes)."""
    shape = lambda x: tuple(t.shape for t in x) if isinstance(x, tuple) else x.shape  # noqa: E731
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or shape(items[i]) != shape(items[start]):
            chunk = items[start:i]
            if isinstance(chunk[0], tuple):
                yield tuple(torch.stack(parts) for parts in zip(*chunk))
            else:
                yield torch.stack(chunk)
            start = i


def map_dataset(ctx: Context, dataset, fn: Callable[[Any], dict[str, Tensor]], desc: str) -> dict[str, Tensor]:
    """fn over every sample in batches of ctx.batch_size, split across ranks; fn's rows in dataset order.

    The batches are those of one process (images [kB, (k+1)B)); rank r of W runs batches r, r + W,
    ... and the rows are gathered back in order on every rank. Each batch holds the same images
    whatever W is, so the result is bit for bit that of one process.
    """
    n, b = len(dataset), ctx.batch_size
    batches = [list(range(k, min(k + b, n))) for k in range(0, n, b)]
    mine = batches[ctx.rank::ctx.world]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=ctx.workers, collate_fn=list)
    rows: dict[str, list[Tensor]] = {}
    bar = progress(total=n, quiet=ctx.quiet, desc=desc, unit="img")
    try:
        for items in loader:
            for item in items:
                if isinstance(item, _Unreadable):
                    raise UserError(item.message)
            with torch.no_grad():
                for batch in _runs(items):
                    for k, v in fn(batch).items():
                        rows.setdefault(k, []).append(v.detach().cpu())
            bar.update(min(len(items) * ctx.world, n - bar.n))
    except BaseException:
        bar.leave = False  # an error message follows: leave no half-drawn bar above it
        raise
    finally:
        bar.close()
    local = {k: torch.cat(v) for k, v in sorted(rows.items())}
    if ctx.world == 1:
        return local
    return _gather_rows(local, ctx, batches)


def _gather_rows(local: dict[str, Tensor], ctx: Context, batches: list[list[int]]) -> dict[str, Tensor]:
    """Undo the round-robin batch split: every rank gets all rows in dataset order."""
    import torch.distributed as dist

    meta = [None] * ctx.world  # key -> (row shape, dtype) from ranks that had work
    layout = {k: (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in local.items()}
    dist.all_gather_object(meta, layout)
    layout = next(m for m in meta if m)
    n = sum(len(bt) for bt in batches)
    counts = [sum(len(bt) for bt in batches[r::ctx.world]) for r in range(ctx.world)]
    out = {}
    for k, (shape, dtype) in layout.items():
        dtype = getattr(torch, dtype)
        v = local.get(k, torch.empty((0, *shape), dtype=dtype))
        padded = torch.zeros((max(counts), *shape), dtype=dtype)
        padded[:len(v)] = v
        padded = padded.to(ctx.device)
        parts = [torch.empty_like(padded) for _ in range(ctx.world)]
        dist.all_gather(parts, padded)
        full = torch.empty((n, *shape), dtype=dtype)
        for r, part in enumerate(parts):
            index = [i for bt in batches[r::ctx.world] for i in bt]
            full[index] = part[:len(index)].cpu()
        out[k] = full
    return out


# ---------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------

class ClassifierFeatures(nn.Module):
    """A Tessera classifier as a FeatureExtractor: `features(x)` (and its logits for IS / classify)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.features(images)

    def logits(self, images: Tensor) -> Tensor:
        return self.model(images)


@dataclass
class Extractor:
    module: nn.Module
    tag: str  # recorded in statistics files: which network made the features

    def features(self, images: Tensor) -> Tensor:
        from vision.metrics.features import features_of

        return features_of(self.module(images)).to(torch.float32)

    def logits(self, images: Tensor) -> Tensor:
        if isinstance(self.module, ClassifierFeatures):
            return self.module.logits(images).to(torch.float32)
        _, logits = self.module(images)
        return logits.to(torch.float32)

    @property
    def has_logits(self) -> bool:
        return isinstance(self.module, ClassifierFeatures) or self.module.has_logits


def load_classifier(spec: str, device: torch.device) -> nn.Module:
    from vision.hub import from_pretrained

    model = from_pretrained(spec, device=device)
    if not callable(getattr(model, "features", None)):
        raise UserError(f"--features {spec} is a {type(model).__name__}, which has no features() method")
    return model.eval()


def build_extractor(args, ctx: Context) -> Extractor:
    if getattr(args, "features", None):
        return Extractor(ClassifierFeatures(load_classifier(args.features, ctx.device)), f"features:{args.features}")
    return Extractor(load_inception(getattr(args, "inception", None)).to(ctx.device), "fid-inception-2015-12-05:tf1")


def load_inception(path: str | None) -> nn.Module:
    from vision.hub import HubError
    from vision.metrics.features import (PYTORCH_FID_FILE, InceptionFeatures, _hub_checkpoints,
                                         default_inception_path, locate_inception)

    if path is not None and not Path(path).expanduser().is_file():
        raise UserError(f"--inception {path} does not exist")
    try:
        weights = locate_inception(path)
    except FileNotFoundError:
        raise UserError(f"Inception weights not found: put pytorch-fid's {PYTORCH_FID_FILE} in {_hub_checkpoints()}/, "
                        f"or run `python -m apps.evaluate import-inception FILE` to write {default_inception_path()}, "
                        "or pass --inception FILE") from None
    try:
        return InceptionFeatures(weights)
    except (ValueError, HubError, RuntimeError) as e:
        raise UserError(f"{weights}: not usable FID Inception weights ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Statistics files (pytorch-fid format: mu, sigma; Tessera adds n and the extractor)
# ---------------------------------------------------------------------------------------------

@dataclass
class Stats:
    mu: Tensor
    sigma: Tensor
    n: int | None
    tag: str | None


def read_stats(path: Path) -> Stats:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise UserError(f"{path} has no {' or '.join(missing)}; a statistics file holds mu and sigma "
                                "(pytorch-fid's format, written by `python -m apps.evaluate stats`)")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else None
            tag = str(f["extractor"]) if "extractor" in f.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz statistics file ({_first_line(e)})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    return Stats(torch.from_numpy(mu), torch.from_numpy(sigma), n, tag)


def write_stats(path: Path, stats: Stats, overwrite: bool) -> None:
    from vision.cli import atomic_output

    with atomic_output(path, overwrite) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu.numpy(), sigma=stats.sigma.numpy(), n=np.int64(stats.n), extractor=np.str_(stats.tag))


def stats_of_features(features: Tensor, tag: str, what: str) -> Stats:
    from vision.metrics.fid import FeatureStatistics

    if len(features) < 2:
        raise UserError(f"{what}: FID needs at least 2 images, found {len(features)}")
    s = FeatureStatistics().update(features)
    return Stats(s.mean, s.cov, s.n, tag)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------

def _features_args(p: argparse.ArgumentParser, logits: bool = False) -> None:
    g = p.add_argument_group("feature extractor")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--inception", metavar="PATH", help="FID Inception weights (Tessera .safetensors, pytorch-fid "
                       ".pth or NVIDIA TorchScript .pt); default: found locally, see import-inception")
    which.add_argument("--features", metavar="NAME|DIR", help="use this Tessera classifier's features() instead "
                       "(a shipped name such as mnist-classifier, or a save_pretrained folder)"
                       + ("; IS then uses its logits" if logits else ""))


def _extract(ctx: Context, extractor: Extractor, files: list[Path], desc: str,
             logits: bool = False) -> dict[str, Tensor]:
    def fn(batch: Tensor) -> dict[str, Tensor]:
        batch = batch.to(ctx.device)
        if logits:
            return {"logits": extractor.logits(batch)}
        return {"features": extractor.features(batch)}

    return map_dataset(ctx, ImageFiles(files), fn, desc=desc)


def _side(value: str, what: str) -> Stats | list[Path]:
    """One side of FID, checked before any network loads: a statistics file, or a folder's images."""
    path = Path(value)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise UserError(f"{what} {value} is neither a folder of images nor a .npz statistics file")
        return read_stats(path)
    return image_files(path, what)


def _fid_args(p):
    p.add_argument("--real", required=True, metavar="DIR|NPZ", help="reference images, or their statistics file")
    p.add_argument("--fake", required=True, metavar="DIR|NPZ", help="generated images, or their statistics file")
    _features_args(p)


@subcommand("fid", "Fréchet Inception Distance between two folders and/or statistics files", _fid_args)
def cmd_fid(args, ctx: Context) -> Figures:
    sides = {"real": _side(args.real, "--real"), "fake": _side(args.fake, "--fake")}
    extractor = None
    for name, side in sides.items():
        if isinstance(side, list):
            extractor = extractor or build_extractor(args, ctx)
            feats = _extract(ctx, extractor, side, desc=name)["features"]
            sides[name] = stats_of_features(feats, extractor.tag, f"--{name}")
    real, fake = sides["real"], sides["fake"]
    if real.mu.shape != fake.mu.shape:
        raise UserError(f"--real has {real.mu.shape[0]}-d features but --fake {fake.mu.shape[0]}-d; "
                        "both sides must come from the same feature extractor")
    if real.tag and fake.tag and real.tag != fake.tag:
        warnings.warn(f"--real features are from {real.tag}, --fake from {fake.tag}")
    figures = {"fid": _fid_of(real, fake)}
    figures.update({f"n_{k}": s.n for k, s in (("real", real), ("fake", fake)) if s.n is not None})
    return figures


def _kid_args(p):
    p.add_argument("--real", required=True, metavar="DIR", help="reference images")
    p.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    p.add_argument("--subsets", type=int, default=100, help="random subsets averaged")
    p.add_argument("--subset-size", type=int, default=1000, help="samples per subset (capped at the smaller set)")
    p.add_argument("--seed", type=int, default=2020, help="seed of the subset draws")
    _features_args(p)


@subcommand("kid", "Kernel Inception Distance (cubic polynomial MMD^2 over random subsets)", _kid_args)
def cmd_kid(args, ctx: Context) -> Figures:
    from vision.metrics.kid import kid_from_features

    for value, what in ((args.real, "--real"), (args.fake, "--fake")):
        if Path(value).is_file():
            raise UserError(f"{what} {value}: KID needs the images (a statistics file keeps only mu and sigma)")
    if args.subsets < 1 or args.subset_size < 2:
        raise UserError("--subsets must be >= 1 and --subset-size >= 2")
    real_files, fake_files = image_files(args.real, "--real"), image_files(args.fake, "--fake")
    extractor = build_extractor(args, ctx)
    real = _extract(ctx, extractor, real_files, "real")["features"]
    fake = _extract(ctx, extractor, fake_files, "fake")["features"]
    if min(len(real), len(fake)) < 2:
        raise UserError(f"KID needs at least 2 images per set, have {len(real)} real and {len(fake)} fake")
    mean, std = kid_from_features(real, fake, subsets=args.subsets, subset_size=args.subset_size, seed=args.seed)
    return {"kid_mean": mean, "kid_std": std, "n_real": len(real), "n_fake": len(fake)}


def _is_args(p):
    p.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    p.add_argument("--splits", type=int, default=10, help="splits the score is averaged over")
    p.add_argument("--seed", type=int, default=2020, help="seed of the shuffle before splitting")
    _features_args(p, logits=True)


@subcommand("is", "Inception Score of a folder (Inception classifier, or --features' logits)", _is_args)
def cmd_is(args, ctx: Context) -> Figures:
    from vision.metrics.inception_score import inception_score

    if args.splits < 1:
        raise UserError(f"--splits must be >= 1, got {args.splits}")

    files = image_files(args.fake, "--fake")
    if len(files) < args.splits:
        raise UserError(f"--splits {args.splits} needs at least that many images; have {len(files)}")
    extractor = build_extractor(args, ctx)
    if not extractor.has_logits:
        raise UserError(f"Inception Score needs the Inception classifier, which {extractor.module.weights_path} "
                        "lacks; pass --inception with pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
                        "NVIDIA's inception-2015-12-05.pt")
    logits = _extract(ctx, extractor, files, "fake", logits=True)["logits"]
    mean, std = inception_score(logits, splits=args.splits, seed=args.seed)
    return {"is_mean": mean, "is_std": std, "n_fake": len(logits)}


def _stats_args(p):
    p.add_argument("folder", metavar="DIR", help="images to summarise")
    p.add_argument("-o", "--output", required=True, metavar="NPZ", help="statistics file to write (.npz)")
    _features_args(p)


@subcommand("stats", "write the feature mean and covariance of a folder (pytorch-fid's mu/sigma .npz)", _stats_args)
def cmd_stats(args, ctx: Context) -> Figures:
    out = check_output(args.output, args.overwrite)
    if out.suffix.lower() != ".npz":
        raise UserError(f"-o {out}: a statistics file must end in .npz")
    files = image_files(args.folder, "folder")
    extractor = build_extractor(args, ctx)
    stats = stats_of_features(_extract(ctx, extractor, files, "stats")["features"], extractor.tag, args.folder)
    if ctx.is_main:
        write_stats(out, stats, args.overwrite)
        print(f"wrote {out} ({stats.n} images, {stats.mu.shape[0]}-d {stats.tag})", file=sys.stderr)
    return {"n_real": stats.n}


def _rfid_args(p):
    p.add_argument("--tokenizer", required=True, metavar="NAME|DIR",
                   help="shipped tokenizer name or save_pretrained folder")
    p.add_argument("--data", required=True, metavar="DIR", help="original images (e.g. ImageNet val, any layout)")
    p.add_argument("--num", type=int, default=None, metavar="N",
                   help="use N images evenly spaced in sorted order (default: all)")
    p.add_argument("--image-size", type=int, default=256, help="short side resized to this, then centre-cropped square")
    p.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone")
    p.add_argument("--lpips-backbone", metavar="PATH", help="torchvision weights for LPIPS (default: torch hub cache; "
                   "LPIPS is skipped with a note when they are not there)")
    _features_args(p)


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
            return _Unreadable(str(e))


def load_tokenizer(spec: str, device: torch.device) -> nn.Module:
    from vision.hub import from_pretrained

    model = from_pretrained(spec, device=device)
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise UserError(f"--tokenizer {spec} is a {type(model).__name__}, which has no encode()/decode()")
    return model.eval()


def _optional_lpips(args, ctx: Context) -> nn.Module | None:
    from vision.metrics.image_quality import load_lpips, locate_lpips_backbone

    try:
        locate_lpips_backbone(args.lpips_net, args.lpips_backbone)
    except FileNotFoundError as e:
        if args.lpips_backbone:
            raise UserError(str(e)) from None
        warnings.warn(f"LPIPS skipped: {e}")
        return None
    return load_lpips(args.lpips_net, args.lpips_backbone, device=ctx.device)


@subcommand("rfid", "reconstruction FID (+ PSNR, SSIM, LPIPS) of a tokenizer on a folder of originals", _rfid_args)
def cmd_rfid(args, ctx: Context) -> Figures:
    from vision.data import to_uint8
    from vision.metrics.image_quality import psnr, ssim

    if args.image_size < 8:
        raise UserError(f"--image-size must be >= 8, got {args.image_size}")
    files = image_files(args.data, "--data")
    if args.num is not None:
        if not 2 <= args.num <= len(files):
            raise UserError(f"--num must be in 2..{len(files)} (images in {args.data}), got {args.num}")
        files = [files[i * len(files) // args.num] for i in range(args.num)]
    tokenizer = load_tokenizer(args.tokenizer, ctx.device)
    spec = getattr(tokenizer, "spec", None)
    if spec is not None and args.image_size % spec.downsample:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the tokenizer's downsample factor "
                        f"{spec.downsample}")
    extractor = build_extractor(args, ctx)
    lpips_model = _optional_lpips(args, ctx)

    def fn(originals: Tensor) -> dict[str, Tensor]:
        originals = originals.to(ctx.device)
        recon = to_uint8(tokenizer.decode(tokenizer.encode(originals.to(torch.float32) / 127.5 - 1)))
        if recon.shape != originals.shape:
            raise UserError(f"--tokenizer {args.tokenizer} turned {tuple(originals.shape)} images into "
                            f"{tuple(recon.shape)} reconstructions")
        a, b = originals.to(torch.float64) / 255, recon.to(torch.float64) / 255
        rows = {"real": extractor.features(originals), "fake": extractor.features(recon),
                "psnr": psnr(b, a, reduction="none"), "ssim": ssim(b, a, reduction="none")}
        if lpips_model is not None:
            rows["lpips"] = _lpips(b, a, lpips_model)
        return rows

    rows = map_dataset(ctx, CroppedFiles(files, args.image_size), fn, desc="rfid")
    real = stats_of_features(rows["real"], extractor.tag, "--data")
    fake = stats_of_features(rows["fake"], extractor.tag, "--data")
    return {"fid": _fid_of(real, fake), "psnr": float(rows["psnr"].mean()), "ssim": float(rows["ssim"].mean()),
            **({"lpips": float(rows["lpips"].mean())} if "lpips" in rows else {}),
            "n_real": real.n, "n_fake": fake.n}


def _fid_of(real: Stats, fake: Stats) -> float:
    from vision.metrics.fid import frechet_distance

    for s, name in ((real, "real"), (fake, "fake")):
        if s.n is not None and s.n < s.mu.shape[0]:
            warnings.warn(f"{name} set has {s.n} images for {s.mu.shape[0]}-d features: the covariance is "
                          "rank-deficient and FID is biased upward (published FIDs use 50k images)")
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)


def _lpips(test: Tensor, ref: Tensor, model: nn.Module) -> Tensor:
    from vision.metrics.image_quality import lpips_distance

    try:
        return lpips_distance(test.float(), ref.float(), model, reduction="none").to(torch.float64)
    except RuntimeError as e:  # e.g. images smaller than the backbone's receptive field
        raise UserError(f"LPIPS cannot score {_size(test)} images ({_first_line(e)})") from None


def _paired_args(metric: str):
    def configure(p):
        p.add_argument("--ref", required=True, metavar="DIR", help="reference images")
        p.add_argument("--test", required=True, metavar="DIR",
                       help="images to score, paired with --ref by file name (relative path without extension)")
        if metric == "lpips":
            p.add_argument("--net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone")
            p.add_argument("--backbone", metavar="PATH", help="torchvision weights of the backbone "
                           "(default: the torch hub cache)")
        else:
            p.add_argument("--y-channel", action="store_true", help="on BT.601 luma, as super-resolution papers")
            p.add_argument("--shave", type=int, default=0, help="pixels cut from every border first")

    return configure


def _paired(metric: str):
    def cmd(args, ctx: Context) -> Figures:
        from vision.metrics.image_quality import load_lpips, psnr, ssim

        pairs = paired_files(args.ref, args.test)
        if metric == "lpips":
            model = load_lpips(args.net, args.backbone, device=ctx.device)
            score = lambda t, r: _lpips(t, r, model)  # noqa: E731
        else:
            if args.shave < 0:
                raise UserError(f"--shave must be >= 0, got {args.shave}")
            f = psnr if metric == "psnr" else ssim
            score = lambda t, r: f(t, r, y_channel=args.y_channel, shave=args.shave, reduction="none")  # noqa: E731

        shave = getattr(args, "shave", 0)

        def fn(batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
            ref, test = (x.to(ctx.device, torch.float64) / 255 for x in batch)
            if shave and min(ref.shape[-2:]) <= 2 * shave:
                raise UserError(f"--shave {shave} leaves nothing of a {_size(ref)} image")
            return {metric: score(test, ref).to(torch.float64)}

        values = map_dataset(ctx, PairedFiles(pairs), fn, desc=metric)[metric]
        return {metric: float(values.mean()), "n_real": len(values), "n_fake": len(values)}

    return cmd


for _metric, _help in (("psnr", "PSNR in dB of paired images (mean over pairs)"),
                       ("ssim", "SSIM of paired images (Gaussian 11x11, sigma 1.5; mean over pairs)"),
                       ("lpips", "LPIPS of paired images (v0.1; backbone from a local file)")):
    subcommand(_metric, _help, _paired_args(_metric))(_paired(_metric))


def _classify_args(p):
    p.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    p.add_argument("--features", default="mnist-classifier", metavar="NAME|DIR",
                   help="the classifier (shipped name or save_pretrained folder)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="images sit in sub-folders named by their intended class id (0/, 1/, ...): report accuracy")


@subcommand("classify", "class histogram (and accuracy) of generated images under a classifier", _classify_args)
def cmd_classify(args, ctx: Context) -> Figures:
    files = image_files(args.fake, "--fake")
    labels = None
    if args.labels_from_folders:
        root = Path(args.fake)
        names = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None for f in files]
        bad = next((f for f, n in zip(files, names) if n is None or not n.isdigit()), None)
        if bad is not None:
            raise UserError(f"--labels-from-folders: {bad} is not in a sub-folder named by a class id (0, 1, ...)")
        labels = torch.tensor([int(n) for n in names])
    model = load_classifier(args.features, ctx.device)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if labels is not None and num_classes is not None and int(labels.max()) >= num_classes:
        raise UserError(f"--labels-from-folders: class {int(labels.max())}, but the classifier has "
                        f"{num_classes} classes")

    def fn(batch: Tensor) -> dict[str, Tensor]:
        return {"pred": model(batch.to(ctx.device)).argmax(1)}

    pred = map_dataset(ctx, ImageFiles(files), fn, desc="classify")["pred"]
    num_classes = num_classes or int(pred.max()) + 1
    figures: Figures = {"n_fake": len(pred)}
    if labels is not None:
        figures["accuracy"] = float((pred == labels).double().mean())
    counts = torch.bincount(pred, minlength=num_classes)
    figures.update({f"count_{c}": int(counts[c]) for c in range(num_classes)})
    return figures


def _import_args(p):
    p.add_argument("path", metavar="PATH", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or NVIDIA's "
                   "inception-2015-12-05.pt (TorchScript)")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write (default: Tessera's cache, "
                   "$TESSERA_HOME/inception-2015-12-05.safetensors, which is found without --inception)")


@subcommand("import-inception", "convert FID Inception weights into the .safetensors file Tessera uses", _import_args)
def cmd_import_inception(args, ctx: Context) -> None:
    from vision.hub import HubError
    from vision.metrics.features import convert_inception, default_inception_path, read_inception_weights

    src = Path(args.path)
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    dst = Path(args.output) if args.output else default_inception_path()
    if args.output is None:
        dst.parent.mkdir(parents=True, exist_ok=True)
    check_output(dst, args.overwrite)
    if dst.suffix != ".safetensors":
        raise UserError(f"-o {dst}: the output must end in .safetensors")
    if not ctx.is_main:
        return None
    try:
        convert_inception(src, dst)
    except (ValueError, HubError, RuntimeError, OSError) as e:
        raise UserError(f"{src}: not FID Inception weights ({_first_line(e)})") from None
    classifier = "fc.weight" in read_inception_weights(dst)
    print(f"wrote {dst} ({'with' if classifier else 'without'} the classifier"
          f"{'' if classifier else ': FID and KID only, no Inception Score'})")
    return None


def _seg_args(p):
    p.add_argument("--pred", required=True, help="folder of predicted label maps (NAME.nii.gz)")
    p.add_argument("--truth", required=True, help="folder of ground-truth label maps, same NAMEs (e.g. labelsTr/)")
    p.add_argument("--labels", help="class names, background first, comma-separated (default: dataset.json or class_1, ...)")
    p.add_argument("--voxels", action="store_true", help="HD95 in voxels instead of millimetres")


@subcommand("seg", "per-class Dice / HD95 / detected components of NIfTI label maps against ground truth", _seg_args)
def cmd_seg(args, ctx: Context) -> Figures:
    from segmentation.evaluation import evaluate_folders, format_table as seg_table

    names = [n.strip() for n in args.labels.split(",")] if args.labels else None
    try:
        result = evaluate_folders(args.pred, args.truth, class_names=names, millimetres=not args.voxels)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(seg_table(result, unit="voxels" if args.voxels else "mm"))
    return result.flat_metrics()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse(argv):
    doc = __doc__.split("\n\n")
    p = ArgumentParser(prog="python -m apps.evaluate", description=doc[0].split(" — ")[1],
                       epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    for cmd in SUBCOMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(sp)
        g = sp.add_argument_group("running and output")
        g.add_argument("--batch-size", type=int, default=64, help="images per forward pass (per process)")
        g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
        g.add_argument("--json", metavar="PATH", help="also write the figures as one flat JSON object")
        add_common_args(g, seed=False)
    return p.parse_args(argv)


def format_table(figures: Figures) -> str:
    width = max(len(k) for k in figures)
    lines = []
    for k, v in figures.items():
        text = str(v) if isinstance(v, int) else f"{v:.6g}" if math.isfinite(v) else str(v)
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


def write_json(path: str, figures: Figures, overwrite: bool) -> None:
    from vision.cli import atomic_output

    clean = {k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in figures.items()}
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(json.dumps(clean, indent=2) + "\n")


def main(argv=None) -> int:
    from vision.train.distributed import setup_distributed, teardown_distributed

    args = parse(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    if args.json:
        check_output(args.json, args.overwrite)
    device = resolve_device(args.device)
    info = setup_distributed(device)
    ctx = Context(info.device, info.rank, info.world_size, args.batch_size, args.workers, args.quiet)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            figures = SUBCOMMANDS[args.command].run(args, ctx)
        if ctx.is_main:
            for message in dict.fromkeys(str(w.message).splitlines()[0] for w in caught
                                         if issubclass(w.category, UserWarning)):
                print(f"note: {message}", file=sys.stderr)
            if figures:
                print(format_table(figures))
                if args.json:
                    write_json(args.json, figures, args.overwrite)
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    run(main)
