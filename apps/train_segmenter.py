"""python -m apps.train_segmenter — train an HBFormer (2-D) or neU-Net (3-D) segmenter on NIfTI pairs.

    python -m apps.train_segmenter --make-phantoms data/phantom8 24 --lesions 8       # seeded phantom CT set
    python -m apps.train_segmenter --make-phantoms data/phantom_val 8 --first-seed 1000
    python -m apps.train_segmenter --model neunet --patch 32,32,32 --data data/phantom8 --val data/phantom_val \
        --out runs/neunet --steps 1000 --batch-size 2                               # as neunet-phantom (~5 min)
    python -m apps.train_segmenter --model hbformer --img-size 64 --lr 1e-3 --data data/phantom8 \
        --val data/phantom_val --out runs/hbformer --steps 800 --batch-size 16       # as hbformer-phantom (~4 min)
    torchrun --nproc_per_node 4 -m apps.train_segmenter --model neunet --data /data/Task09_Spleen --out runs/ddp
    python -m apps.train_segmenter --model xdecoder --data shapes --out runs/xdecoder --steps 4000   # X-Decoder

Data: a folder in the nnU-Net / Medical Segmentation Decathlon layout, imagesTr/NAME.nii.gz (or
NAME_0000.nii.gz) with labelsTr/NAME.nii.gz, matched by NAME, and optionally a dataset.json
({"labels": {"background": 0, ...}, "channel_names": {"0": "CT"}}) for class names and modality.
Whole volumes are held in memory.

Recipe (nnU-Net's, shortened): volumes reoriented to RAS and resampled to the training set's
median spacing; CT clipped to the foreground's 0.5/99.5 percentiles and z-scored with its
statistics (HBFormer: the same window scaled to [0, 1], what its pseudo-HDR input expects), MRI
z-scored per case; random patches, a third centred on a foreground class drawn uniformly among
those present (so tiny lesions are seen as often as organs), mirrored along each axis; soft Dice
+ cross-entropy (deep supervision with nnU-Net's weights for neU-Net); AdamW with polynomial
learning-rate decay (power 0.9); then, per class, keep-the-largest-connected-component
post-processing where it does not lower the Dice. That choice is made on a share of the training
cases held out of training (--postprocess-split, as nnU-Net decides it on its cross-validation
folds), never on --val, so the --val score is not tuned to --val. Everything (preparation, window,
class names, post-processing) is stored with the model, so OUT/model runs with
`python -m apps.segment --model OUT/model`. With --val, the held-out cases are segmented as
apps.segment does and per-class Dice / HD95 (mm) are printed.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from vision import argtypes
from vision.atomic import atomic_path
from vision.cli import ArgumentParser, UserError, add_common_args, resolve_device, run, seed_everything
from vision.train import Phase, Trainer, add_train_args, train_config_from_args
from vision.train.trainer import add_ship_args

DEFAULT_LR = {"neunet": 3e-3, "hbformer": 5e-4}
DEFAULT_PATCH = {"neunet": "64,64,32"}


def _ints(text: str, what: str, n: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or (n is not None and len(values) != n) or min(values) < 1:
        raise UserError(f"{what} must be {n or 'some'} positive integers, got {text!r}")
    return values


def parse(argv):
    p = ArgumentParser(prog="python -m apps.train_segmenter", description=__doc__.split("\n\n")[0].split(" — ")[1])
    g = p.add_argument_group("phantom data (writes a dataset and exits)")
    g.add_argument("--make-phantoms", nargs=2, metavar=("DIR", "N"),
                   help="write N seeded phantom CT volumes as DIR/imagesTr + DIR/labelsTr + DIR/dataset.json")
    g.add_argument("--first-seed", type=argtypes.non_negative_int, default=0, help="phantom i is vision.data.phantom.make_phantom(first_seed + i)")
    g.add_argument("--phantom-shape", default="64,64,48", help="phantom volume shape in voxels")
    g.add_argument("--phantom-spacing", default="1.5,1.5,3.0", help="phantom voxel size in mm")
    g.add_argument("--organs", type=argtypes.positive_int, default=4, help="organs per phantom")
    g.add_argument("--lesions", type=argtypes.non_negative_int, default=3, help="lesions (radius 1-2 voxels) per phantom")

    g = p.add_argument_group("data")
    g.add_argument("--data", help="training folder (imagesTr/ + labelsTr/ [+ dataset.json])")
    g.add_argument("--val", help="held-out folder in the same layout, evaluated after training")
    g.add_argument("--modality", choices=["CT", "MR"], help="default: dataset.json's channel 0 name, else CT")
    g.add_argument("--spacing", default="auto", help="target spacing in mm x,y,z; auto: the median of the training "
                   "set; none: no resampling")
    g.add_argument("--fg-fraction", type=argtypes.fraction, default=0.33, help="share of patches centred on foreground")
    g.add_argument("--repeat", type=argtypes.positive_int, default=50, help="patches per case per epoch")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["neunet", "hbformer", "xdecoder"], default="neunet",
                   help="architecture (xdecoder: 2-D open-vocabulary segmentation, see apps/train_xdecoder.py and "
                   "`--model xdecoder --help`)")
    g.add_argument("--patch", help="neU-Net patch (= inference window) x,y,z; default 64,64,32 (HBFormer: "
                   "--img-size squared slices)")
    g.add_argument("--features", default="8,16,32,48", help="neU-Net channels per stage")
    g.add_argument("--strides", default="auto", help="neU-Net strides per stage, e.g. 1x1x1,2x2x1,2x2x2,2x2x2; auto: "
                   "nnU-Net's rule (halve axes whose spacing is < 2x the finest)")
    g.add_argument("--no-wavelets", action="store_true", help="neU-Net without the wavelet inputs (PlainneUNet)")
    g.add_argument("--img-size", type=argtypes.positive_int, default=64,
                   help="HBFormer input side, a multiple of 4 (slices are padded/windowed)")
    g.add_argument("--embed-dim", type=argtypes.positive_int, default=24, help="HBFormer Swin embedding width (official 96)")
    g.add_argument("--depths", default="2,2,2,2", help="HBFormer Swin blocks per stage (official 2,2,6,2)")
    g.add_argument("--heads", default="1,2,4,8", help="HBFormer Swin heads per stage (official 3,6,12,24)")
    g.add_argument("--feature-size", type=argtypes.positive_int, default=16, help="HBFormer decoder width (official 48)")
    g.add_argument("--drop-path", type=argtypes.number(float, min=0, max=1, max_open=True), default=0.1,
                   help="HBFormer stochastic depth (official 0.2)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=argtypes.positive_float, default=None,
                   help="AdamW learning rate (default 3e-3 neU-Net, 5e-4 HBFormer)")
    g.add_argument("--weight-decay", type=argtypes.non_negative_float, default=3e-5, help="AdamW weight decay (nnU-Net's)")
    g.add_argument("--postprocess", choices=["auto", "none"], default="auto",
                   help="auto: keep only the largest connected component of each class where that does not lower "
                   "the Dice on training cases held out of training (--postprocess-split), as nnU-Net decides it "
                   "on its cross-validation folds; none: no post-processing, every training case is trained on")
    g.add_argument("--postprocess-split", type=argtypes.number(float, min=0, max=1, min_open=True, max_open=True),
                   default=0.2, metavar="F",
                   help="with --postprocess auto: the share of the training cases (at least one, drawn with --seed) "
                   "held out of training to choose the post-processing on")
    add_ship_args(p, "after training, write weights/NAME.safetensors and its index.json "
                  "entry (command, time, held-out Dice/HD95; needs --val)", g)
    add_train_args(p, batch_size=4, max_steps=1000, checkpoint_every=250, log_every=10)
    add_common_args(p)
    for action in p._actions:  # --out is only needed when training (not with --make-phantoms)
        if action.dest == "out":
            action.required = False
    p.add_check(check_model_options)
    return p.parse_args(argv)


def check_model_options(args) -> None:
    """Refuse bad --spacing and architecture options while parsing, before any data is read (the data adds only
    the class count, and with --strides auto the strides, which then fit the patch by construction)."""
    from segmentation.hbformer import HBFormerConfig
    from segmentation.neunet import NeUNetConfig

    if args.make_phantoms:
        return
    if args.spacing not in ("auto", "none"):
        try:
            spacing = [float(v) for v in args.spacing.split(",")]
        except ValueError:
            spacing = []
        if len(spacing) != 3 or not all(0 < v < float("inf") for v in spacing):
            raise UserError(f"--spacing must be auto, none or three positive numbers x,y,z in mm, got {args.spacing!r}")
    try:
        if args.model == "hbformer":
            if args.patch:
                raise UserError("--patch is for neU-Net; HBFormer windows are --img-size squared slices")
            heads = _ints(args.heads, "--heads", 4)
            HBFormerConfig(in_channels=1, num_classes=2, img_size=args.img_size, feature_size=args.feature_size,
                           embed_dim=args.embed_dim, depths=_ints(args.depths, "--depths", 4), num_heads=heads)
            for i, h in enumerate(heads):  # Swin stage i is embed_dim * 2**i wide, split into heads
                if args.embed_dim * 2**i % h:
                    raise UserError(f"--embed-dim {args.embed_dim}: stage {i} ({args.embed_dim * 2**i} channels) does "
                                    f"not split into {h} heads (--heads {args.heads})")
        else:
            patch = _ints(args.patch or DEFAULT_PATCH["neunet"], "--patch", 3)
            features = _ints(args.features, "--features")
            if args.strides != "auto":
                strides = tuple(_ints(s, "--strides", 3) for s in args.strides.split(","))
                NeUNetConfig(spatial_dims=3, in_channels=1, num_classes=2, features=features, strides=strides,
                             kernel_sizes=None, wavelet_inputs=not args.no_wavelets)
                total = np.prod(strides, axis=0)
                if any(p % t for p, t in zip(patch, total)):
                    raise UserError(f"--patch {args.patch or DEFAULT_PATCH['neunet']} must be divisible by the total "
                                    f"stride {'x'.join(map(str, total))} of --strides {args.strides}")
    except ValueError as e:
        raise UserError(f"--model {args.model}: {e}") from None


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- phantoms


def make_phantoms(args, argv=None) -> int:
    import nibabel as nib

    from segmentation.io import save_nifti
    from vision.data.phantom import make_phantom

    folder, n = Path(args.make_phantoms[0]), args.make_phantoms[1]
    if not n.isdigit() or int(n) < 1:
        raise UserError(f"--make-phantoms DIR N: N must be a positive integer, got {n!r}")
    n = int(n)
    shape = _ints(args.phantom_shape, "--phantom-shape", 3)
    try:
        spacing = tuple(float(v) for v in args.phantom_spacing.split(","))
    except ValueError:
        raise UserError(f"--phantom-spacing must be three numbers, got {args.phantom_spacing!r}") from None
    if len(spacing) != 3 or min(spacing) <= 0:
        raise UserError(f"--phantom-spacing must be three positive numbers, got {args.phantom_spacing!r}")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder")
    seeds = [args.first_seed + i for i in range(n)]
    names = [f"phantom_{s:04d}" for s in seeds]
    targets = [folder / "dataset.json"] + [folder / "imagesTr" / f"{m}_0000.nii.gz" for m in names] \
        + [folder / "labelsTr" / f"{m}.nii.gz" for m in names]
    clash = [t for t in targets if t.exists()]
    if clash and not args.overwrite:
        raise UserError(f"{clash[0]} exists; pass --overwrite to replace it")
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    for seed, name in zip(seeds, names):
        try:
            image, labels = make_phantom(seed, shape=shape, spacing=spacing, n_organs=args.organs,
                                         n_lesions=args.lesions)
        except ValueError as e:
            raise UserError(str(e)) from None
        for data, path in ((np.round(image).astype(np.int16), folder / "imagesTr" / f"{name}_0000.nii.gz"),
                           (labels, folder / "labelsTr" / f"{name}.nii.gz")):
            img = nib.Nifti1Image(data, affine)
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm")
            save_nifti(img, path)
    labels = {"background": 0, **{f"organ_{i}": i for i in range(1, args.organs + 1)}}
    if args.lesions:
        labels["lesion"] = args.organs + 1
    meta = {"name": "Phantom", "description": f"seeded synthetic CT (vision.data.phantom.make_phantom), seeds "
            f"{seeds[0]}..{seeds[-1]}, shape {list(shape)}, spacing {list(spacing)} mm, {args.organs} organs, "
            f"{args.lesions} lesions of radius 1-2 voxels", "channel_names": {"0": "CT"}, "labels": labels,
            "numTraining": n, "file_ending": ".nii.gz",
            "command": "python -m apps.train_segmenter " + shlex.join(sys.argv[1:] if argv is None else argv)}
    write_json(folder / "dataset.json", meta)
    print(f"wrote {n} phantoms (seeds {seeds[0]}..{seeds[-1]}) to {folder}/imagesTr and {folder}/labelsTr")
    return 0


# ---------------------------------------------------------------------------------------------- data


def load_folder(folder: str, what: str):
    """[(name, Volume image, Volume labels)] and dataset.json of a dataset folder."""
    from segmentation.dataset import find_cases, read_dataset_json
    from segmentation.io import read_volume

    if not Path(folder).is_dir():
        raise UserError(f"{what} {folder}: no such folder")
    try:
        cases = find_cases(folder)
        meta = read_dataset_json(folder) or {}
        out = []
        for c in cases:
            image, labels = read_volume(c.image), read_volume(c.label)
            if image.shape != labels.shape:
                raise ValueError(f"{c.name}: image {image.shape} and labels {labels.shape} differ in shape")
            if not np.allclose(image.affine, labels.affine, atol=1e-3):
                raise ValueError(f"{c.name}: image and labels have different affines")
            if not np.array_equal(labels.array, np.round(labels.array)) or labels.array.min() < 0:
                raise ValueError(f"{c.name}: labels must be non-negative integers")
            out.append((c.name, image, labels))
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    return out, meta


def plan_strides(spacing, patch, n_stages: int) -> tuple[tuple[int, ...], ...]:
    """nnU-Net's rule, simplified: after stage 0, halve every axis whose current spacing is < 2x the finest
    and whose feature map stays >= 4 voxels and even."""
    sp, size = list(spacing), list(patch)
    strides = [(1, 1, 1)]
    for _ in range(1, n_stages):
        finest = min(sp)
        st = tuple(2 if sp[i] / finest < 2 and size[i] % 2 == 0 and size[i] // 2 >= 4 else 1 for i in range(3))
        strides.append(st)
        sp = [s * f for s, f in zip(sp, st)]
        size = [s // f for s, f in zip(size, st)]
    return tuple(strides)


def build_segmenter(args, class_names, spacing, modality, ct_stats):
    from segmentation.hbformer import HBFormer, HBFormerConfig
    from segmentation.neunet import NeUNet, NeUNetConfig
    from segmentation.pipeline import Segmenter

    k = len(class_names)
    try:
        if args.model == "neunet":
            patch = _ints(args.patch or DEFAULT_PATCH["neunet"], "--patch", 3)
            features = _ints(args.features, "--features")
            if args.strides == "auto":
                strides = plan_strides(spacing or (1.0, 1.0, 1.0), patch, len(features))
            else:
                strides = tuple(_ints(s, "--strides", 3) for s in args.strides.split(","))
            net = NeUNet(NeUNetConfig(spatial_dims=3, in_channels=1, num_classes=k, features=features, strides=strides,
                                      kernel_sizes=None, wavelet_inputs=not args.no_wavelets))
            window = patch
            intensity = "ct" if modality == "CT" else "zscore"
        else:
            if args.patch:
                raise UserError("--patch is for neU-Net; HBFormer windows are --img-size squared slices")
            net = HBFormer(HBFormerConfig(in_channels=1, num_classes=k, img_size=args.img_size,
                                          feature_size=args.feature_size, embed_dim=args.embed_dim,
                                          depths=_ints(args.depths, "--depths", 4), num_heads=_ints(args.heads, "--heads", 4),
                                          drop_path_rate=args.drop_path))
            window = (args.img_size, args.img_size)
            intensity = "ct_window" if modality == "CT" else "percentile_window"
        stats = {}
        if ct_stats is not None and intensity.startswith("ct"):
            stats = dict(ct_lower=ct_stats.lower, ct_upper=ct_stats.upper, ct_mean=ct_stats.mean, ct_std=ct_stats.std)
        return Segmenter.wrap(net, class_names=tuple(class_names), window=tuple(window), overlap=0.5, spacing=spacing,
                              orientation="RAS", intensity=intensity, modality=modality, **stats)
    except ValueError as e:
        raise UserError(str(e)) from None


def foreground_statistics(images, labels, per_case: int = 100_000):
    """CT statistics (segmentation.intensity.ct_statistics) from at most `per_case` random foreground voxels per case."""
    from segmentation.intensity import ct_statistics

    rng = np.random.default_rng(0)
    values = []
    for img, lab in zip(images, labels):
        v = np.asarray(img, dtype=np.float64)[np.asarray(lab) > 0]
        if v.size > per_case:
            v = v[rng.choice(v.size, per_case, replace=False)]
        values.append(v)
    try:
        return ct_statistics(values, [np.ones(v.shape, dtype=np.uint8) for v in values])
    except ValueError as e:
        raise UserError(f"--data: {e}") from None


def postprocess_split(cases: list, share: float, seed: int) -> tuple[list, list]:
    """(cases to train on, cases held out to choose the post-processing on): round(share * n) cases, at least one,
    drawn with `seed`; with fewer than two cases nothing is held out."""
    if len(cases) < 2:
        return cases, []
    k = min(len(cases) - 1, max(1, round(share * len(cases))))
    held = set(np.random.default_rng(seed).permutation(len(cases))[:k].tolist())
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]


def choose_postprocessing(segmenter, cases, device) -> tuple[int, ...]:
    """Foreground classes for which keeping the largest connected component does not lower the mean Dice on
    `cases`, which must be cases the model was not trained on and that are not used to report its score."""
    from segmentation.metrics import dice_per_class
    from segmentation.pipeline import keep_largest_component

    k = segmenter.num_classes
    raw = [(segmenter.segment(img.array, img.affine, device=device, postprocess=False), lab.array.astype(np.int64))
           for _, img, lab in cases]
    chosen = []
    for c in range(1, k):
        before = [dice_per_class(p, t, k)[c] for p, t in raw]
        after = [dice_per_class(keep_largest_component(p, [c]), t, k)[c] for p, t in raw]
        if np.isfinite(before).any() and np.nanmean(after) >= np.nanmean(before):
            chosen.append(c)
    return tuple(chosen)


def evaluate_segmenter(segmenter, cases, device, quiet: bool = True):
    """Segment held-out cases as apps.segment does (default overlap, no TTA) and score them (mm)."""
    from segmentation.evaluation import evaluate_cases

    pairs = []
    for name, image, labels in cases:
        pred = segmenter.segment(image.array, image.affine, device=device, progress=not quiet)
        pairs.append((name, pred, labels.array.astype(np.int64), labels.spacing))
    k = segmenter.num_classes
    top = max(int(t.max()) for _, _, t, _ in pairs)
    if top >= k:
        raise UserError(f"--val: label {top} found, but the model has {k} classes")
    return evaluate_cases(pairs, k, segmenter.config.class_names)


# ---------------------------------------------------------------------------------------------- main


def _wants_xdecoder(argv) -> bool:
    import argparse

    peek = argparse.ArgumentParser(add_help=False)  # the same abbreviation rules as the real parsers
    peek.add_argument("--model")
    known, _ = peek.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return known.model == "xdecoder"


def main(argv=None) -> int:
    if _wants_xdecoder(argv):  # 2-D open-vocabulary segmentation: its own data and options (apps/train_xdecoder.py)
        from apps import train_xdecoder

        return train_xdecoder.main(argv)
    from segmentation.dataset import PatchDataset
    from segmentation.evaluation import format_table
    from segmentation.losses import DeepSupervisionLoss, DiceCELoss
    from vision.hub import register_shipped, save_pretrained, shipped_provenance

    args = parse(argv)
    if args.make_phantoms:
        return make_phantoms(args, argv)
    command = "python -m apps.train_segmenter " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.data or not args.out:
        raise UserError("--data and --out are needed to train (or --make-phantoms DIR N to write data)")
    if args.ship and not args.val:
        raise UserError("--ship needs --val: a shipped model records its held-out Dice/HD95")
    if not 0 <= args.fg_fraction <= 1 or args.repeat < 1:
        raise UserError("--fg-fraction must be in [0, 1] and --repeat >= 1")
    device = resolve_device(args.device)
    seed_everything(args.seed)

    cases, meta = load_folder(args.data, "--data")
    val, val_meta = load_folder(args.val, "--val") if args.val else ([], {})
    num_classes = int(max(int(lab.array.max()) for _, _, lab in cases)) + 1
    train, choose_on = postprocess_split(cases, args.postprocess_split, args.seed) if args.postprocess == "auto" \
        else (cases, [])
    if args.postprocess == "auto" and not choose_on:
        print("note: one training case, none to hold out: no post-processing", file=sys.stderr)
    names = meta.get("class_names") or ["background"] + [f"class_{i}" for i in range(1, num_classes)]
    if len(names) < num_classes:
        raise UserError(f"--data: labels go up to {num_classes - 1} but dataset.json names {len(names)} classes")
    modality = args.modality or ("CT" if meta.get("modality_name", "CT").upper() == "CT" else "MR")

    # target spacing (after reorientation to RAS)
    from segmentation.pipeline import grid_spacing, to_model_grid

    spacings = np.array([grid_spacing(img.affine, "RAS") for _, img, _ in train])
    if args.spacing == "auto":
        spacing = tuple(float(s) for s in np.median(spacings, axis=0))
    elif args.spacing == "none":
        spacing = None
    else:
        try:
            spacing = tuple(float(v) for v in args.spacing.split(","))
        except ValueError:
            raise UserError(f"--spacing must be auto, none or x,y,z in mm, got {args.spacing!r}") from None
        if len(spacing) != 3 or min(spacing) <= 0:
            raise UserError(f"--spacing must be three positive numbers, got {args.spacing!r}")
    grids = [(to_model_grid(img.array, img.affine, "RAS", spacing),
              to_model_grid(lab.array, lab.affine, "RAS", spacing, is_label=True)) for _, img, lab in train]
    stats = foreground_statistics([g[0] for g in grids], [g[1] for g in grids]) if modality == "CT" else None
    segmenter = build_segmenter(args, names, spacing, modality, stats)
    images = [segmenter.normalize(img) for img, _ in grids]
    labels = [lab.astype(np.int64) for _, lab in grids]
    del grids
    try:
        data = PatchDataset(images, labels, segmenter.config.window, num_classes=segmenter.num_classes,
                            samples_per_epoch=len(images) * args.repeat, fg_fraction=args.fg_fraction)
        trainer = Trainer(train_config_from_args(args, str(device), command), data)
    except ValueError as e:
        raise UserError(str(e)) from None
    lr = args.lr or DEFAULT_LR[args.model]
    opt = torch.optim.AdamW(segmenter.parameters(), lr=lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (1 - min(step, args.steps - 1) / args.steps) ** 0.9)
    models = trainer.prepare({"segmenter": segmenter}, {"adamw": opt}, {"adamw": sched}, ema_of="segmenter")
    criterion = DiceCELoss(include_background=False, batch=True)
    deep = DeepSupervisionLoss(criterion)

    def loss(batch, step):
        image, target = batch
        out = models["segmenter"](image)
        main_out = out[0] if isinstance(out, (list, tuple)) else out
        dice, ce = criterion.parts(main_out.detach(), target)
        return deep(out, target), {"dice_loss": float(dice), "ce": float(ce)}

    held = f" ({len(choose_on)} more held out to choose the post-processing: {', '.join(n for n, _, _ in choose_on)})" \
        if choose_on else ""
    print(f"{len(train)} training cases{held}, {segmenter.num_classes} classes ({', '.join(segmenter.config.class_names)}), "
          f"spacing {spacing}, window {segmenter.config.window}, intensity {segmenter.config.intensity}, "
          f"{sum(p.numel() for p in segmenter.parameters()) / 1e6:.2f} M parameters", file=sys.stderr)
    trainer.fit([Phase("dice_ce", "adamw", loss, models=("segmenter",), clip_grad_norm=12.0)])
    elapsed = trainer.train_seconds  # every session of the run, resumes included
    if not trainer.dist.is_main:
        return 0
    final = trainer.final_model().eval()
    if choose_on:
        final.config.largest_component = choose_postprocessing(final, choose_on, device)
        named = [final.config.class_names[c] for c in final.config.largest_component]
        print(f"post-processing (chosen on {len(choose_on)} held-out training case(s)): largest connected component "
              f"kept for {', '.join(named) or 'no class'}")
    save_pretrained(final, Path(args.out) / "model")
    print(f"model saved to {Path(args.out) / 'model'} ({elapsed / 60:.1f} min)")
    if val:
        result = evaluate_segmenter(final, val, device, quiet=args.quiet)
        print(format_table(result))
        write_json(Path(args.out) / "val_metrics.json", result.flat_metrics())
        if args.ship:
            trained_with, train_time = shipped_provenance(trainer, command)
            entry = register_shipped(
                args.ship, final.cpu(), replace=args.replace_shipped, kind="segmenter", trained_with=trained_with,
                data=f"{len(train)} cases from {args.data} ({meta.get('description', 'NIfTI pairs')})"
                + (f", written by `{meta['command']}`" if meta.get("command") else "")
                + (f", {len(choose_on)} of its cases held out of training to choose the post-processing "
                   f"({', '.join(n for n, _, _ in choose_on)})" if choose_on else "")
                + (f"; held-out {args.val}" + (f" written by `{val_meta['command']}`" if val_meta.get("command") else "")),
                train_time=train_time,
                metrics=result.flat_metrics(),
                metrics_protocol=f"held-out {args.val} ({len(val)} cases), segmented with the defaults of apps.segment "
                f"(overlap {segmenter.config.overlap}, no TTA), Dice and HD95 in mm per case averaged per class "
                "(HD95 over cases where it is finite; *_inf_cases counts the rest), detected = ground-truth connected "
                "components touched; post-processing "
                + (f"chosen on the {len(choose_on)} held-out training cases, not on the scored ones"
                   if choose_on else "none")
                + f"; rerun: python -m apps.segment --model {args.ship} {args.val}/imagesTr -o PRED && "
                f"python -m apps.evaluate seg --pred PRED --truth {args.val}/labelsTr",
            )
            print(f"shipped as {args.ship}: weights/{entry['file']}")
    return 0


if __name__ == "__main__":
    run(main)
