"""python -m apps.evaluate — FID, KID, IS, rFID, PSNR/SSIM/LPIPS and digit accuracy from image folders.

    python -m apps.evaluate fid --real real/ --fake samples/              # or --real imagenet_val.npz
    python -m apps.evaluate stats real/ -o real.npz                         # pytorch-fid's mu/sigma .npz
    python -m apps.evaluate kid --real real/ --fake samples/
    python -m apps.evaluate is --fake samples/
    python -m apps.evaluate rfid --tokenizer wetok-mnist --data digits/ --image-size 32
    python -m apps.evaluate rfid --tokenizer WeTok.ckpt --data imagenet_val/ --image-size 256
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
from typing import Callable

from vision.cli import ArgumentParser, UserError, add_common_args, check_output, resolve_device, run
from vision.metrics.batches import Runner

Figures = dict[str, float]


# Subcommand registry: each subcommand adds its options and returns its figures (or None).
# A new one is one more `@subcommand(...)` function; the protocols live in vision.metrics.

@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Runner], Figures | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    def wrap(fn):
        SUBCOMMANDS[name] = Subcommand(name, help, configure, fn)
        return fn

    return wrap


def _features_args(p: argparse.ArgumentParser, logits: bool = False) -> None:
    g = p.add_argument_group("feature extractor")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--inception", metavar="PATH", help="FID Inception weights (Tessera .safetensors, pytorch-fid "
                       ".pth or NVIDIA TorchScript .pt); default: found locally, see import-inception")
    which.add_argument("--features", metavar="NAME|DIR", help="use this Tessera classifier's features() instead "
                       "(a shipped name such as mnist-classifier, or a save_pretrained folder)"
                       + ("; IS then uses its logits" if logits else ""))


def _extractor(args) -> dict:
    return {"features": args.features, "inception": args.inception}


def _fid_args(p):
    p.add_argument("--real", required=True, metavar="DIR|NPZ", help="reference images, or their statistics file")
    p.add_argument("--fake", required=True, metavar="DIR|NPZ", help="generated images, or their statistics file")
    _features_args(p)


@subcommand("fid", "Fréchet Inception Distance between two folders and/or statistics files", _fid_args)
def cmd_fid(args, runner: Runner) -> Figures:
    from vision.metrics.folder_metrics import fid_from_folders

    return fid_from_folders(args.real, args.fake, **_extractor(args), runner=runner)


def _kid_args(p):
    p.add_argument("--real", required=True, metavar="DIR", help="reference images")
    p.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    p.add_argument("--subsets", type=int, default=100, help="random subsets averaged")
    p.add_argument("--subset-size", type=int, default=1000, help="samples per subset (capped at the smaller set)")
    p.add_argument("--seed", type=int, default=2020, help="seed of the subset draws")
    _features_args(p)


@subcommand("kid", "Kernel Inception Distance (cubic polynomial MMD^2 over random subsets)", _kid_args)
def cmd_kid(args, runner: Runner) -> Figures:
    from vision.metrics.folder_metrics import kid_from_folders

    return kid_from_folders(args.real, args.fake, subsets=args.subsets, subset_size=args.subset_size, seed=args.seed,
                            **_extractor(args), runner=runner)


def _is_args(p):
    p.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    p.add_argument("--splits", type=int, default=10, help="splits the score is averaged over")
    p.add_argument("--seed", type=int, default=2020, help="seed of the shuffle before splitting")
    _features_args(p, logits=True)


@subcommand("is", "Inception Score of a folder (Inception classifier, or --features' logits)", _is_args)
def cmd_is(args, runner: Runner) -> Figures:
    from vision.metrics.folder_metrics import inception_score_of_folder

    return inception_score_of_folder(args.fake, splits=args.splits, seed=args.seed, **_extractor(args), runner=runner)


def _stats_args(p):
    p.add_argument("folder", metavar="DIR", help="images to summarise")
    p.add_argument("-o", "--output", required=True, metavar="NPZ", help="statistics file to write (.npz)")
    _features_args(p)


@subcommand("stats", "write the feature mean and covariance of a folder (pytorch-fid's mu/sigma .npz)", _stats_args)
def cmd_stats(args, runner: Runner) -> Figures:
    from vision.metrics.fid_statistics import write_fid_statistics
    from vision.metrics.folder_metrics import statistics_of_folder

    out = check_output(args.output, args.overwrite)
    if out.suffix.lower() != ".npz":
        raise UserError(f"-o {out}: a statistics file must end in .npz")
    stats = statistics_of_folder(args.folder, **_extractor(args), runner=runner)
    if runner.is_main:
        write_fid_statistics(out, stats, args.overwrite)
        print(f"wrote {out} ({stats.n} images, {stats.mu.shape[0]}-d {stats.tag})", file=sys.stderr)
    return {"n_real": stats.n}


def _rfid_args(p):
    p.add_argument("--tokenizer", required=True, metavar="NAME|DIR|FILE",
                   help="shipped tokenizer name, save_pretrained folder or released tokenizer file (e.g. WeTok.ckpt)")
    p.add_argument("--data", required=True, metavar="DIR", help="original images (e.g. ImageNet val, any layout)")
    p.add_argument("--num", type=int, default=None, metavar="N",
                   help="use N images evenly spaced in sorted order (default: all)")
    p.add_argument("--image-size", type=int, default=256, help="short side resized to this, then centre-cropped square")
    p.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone")
    p.add_argument("--lpips-backbone", metavar="PATH", help="torchvision weights for LPIPS (default: torch hub cache; "
                   "LPIPS is skipped with a note when they are not there)")
    _features_args(p)


@subcommand("rfid", "reconstruction FID (+ PSNR, SSIM, LPIPS) of a tokenizer on a folder of originals", _rfid_args)
def cmd_rfid(args, runner: Runner) -> Figures:
    from vision.metrics.reconstruction import rfid_of_tokenizer

    return rfid_of_tokenizer(args.tokenizer, args.data, image_size=args.image_size, num=args.num,
                             lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, **_extractor(args),
                             runner=runner)


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
    def cmd(args, runner: Runner) -> Figures:
        from vision.metrics.folder_metrics import paired_folder_metric

        if metric == "lpips":
            options = {"net": args.net, "backbone": args.backbone}
        else:
            options = {"y_channel": args.y_channel, "shave": args.shave}
        return paired_folder_metric(metric, args.ref, args.test, **options, runner=runner)

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
def cmd_classify(args, runner: Runner) -> Figures:
    from vision.metrics.folder_metrics import classify_folder

    return classify_folder(args.fake, classifier=args.features, labels_from_folder_names=args.labels_from_folders,
                           runner=runner)


def _import_args(p):
    p.add_argument("path", metavar="PATH", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or NVIDIA's "
                   "inception-2015-12-05.pt (TorchScript)")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write (default: Tessera's cache, "
                   "$TESSERA_HOME/inception-2015-12-05.safetensors, which is found without --inception)")


@subcommand("import-inception", "convert FID Inception weights into the .safetensors file Tessera uses", _import_args)
def cmd_import_inception(args, runner: Runner) -> None:
    from safetensors import SafetensorError

    from vision.hub import HubError
    from vision.metrics.errors import first_line
    from vision.metrics.features import convert_inception, default_inception_path, read_inception_weights
    from vision.metrics.inception import FIDInceptionV3, load_fid_inception_state_dict

    src = Path(args.path)
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    dst = Path(args.output) if args.output else default_inception_path()
    if args.output is None:
        dst.parent.mkdir(parents=True, exist_ok=True)
    check_output(dst, args.overwrite)
    if dst.suffix != ".safetensors":
        raise UserError(f"-o {dst}: the output must end in .safetensors")
    if not runner.is_main:
        return None
    try:  # the input alone: an error writing the output must not be blamed on it
        state = read_inception_weights(src)
        load_fid_inception_state_dict(FIDInceptionV3(with_classifier="fc.weight" in state), state)
    except (ValueError, HubError, RuntimeError, OSError, SafetensorError) as e:
        raise UserError(f"{src}: not FID Inception weights ({first_line(e)})") from None
    convert_inception(src, dst)  # reads src again; run() reports an OSError here as `error: PATH: reason`
    classifier = "fc.weight" in state
    print(f"wrote {dst} ({'with' if classifier else 'without'} the classifier"
          f"{'' if classifier else ': FID and KID only, no Inception Score'})")
    return None


def _seg_args(p):
    p.add_argument("--pred", required=True, help="folder of predicted label maps (NAME.nii.gz)")
    p.add_argument("--truth", required=True, help="folder of ground-truth label maps, same NAMEs (e.g. labelsTr/)")
    p.add_argument("--labels", help="class names, background first, comma-separated (default: dataset.json or class_1, ...)")
    p.add_argument("--voxels", action="store_true", help="HD95 in voxels instead of millimetres")


@subcommand("seg", "per-class Dice / HD95 / detected components of NIfTI label maps against ground truth", _seg_args)
def cmd_seg(args, runner: Runner) -> Figures:
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
    runner = Runner(info.device, info.rank, info.world_size, args.batch_size, args.workers, args.quiet)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            figures = SUBCOMMANDS[args.command].run(args, runner)
        if runner.is_main:
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
