"""Metrics of image folders: FID, KID, IS, statistics files, PSNR/SSIM/LPIPS of paired folders, classification.

These are the protocols behind `python -m apps.evaluate`, usable from Python:

    from vision.metrics import fid_from_folders, Runner
    fid_from_folders("real/", "samples/")                                  # TF FID Inception, found locally
    fid_from_folders("digits/", "generated/", features="mnist-classifier")
    fid_from_folders("imagenet_val.npz", "samples/", runner=Runner(device="cuda", batch_size=200))

Images are read as uint8 in sorted order of their paths (see `vision.metrics.folders`) and fed to
the networks in batches of `runner.batch_size`; under torchrun pass each process's rank and world
size in the Runner, and every process gets the figures of one process. Each function returns a flat
dict of figures: the metric, and `n_real` / `n_fake` for the number of images on each side. Bad input
raises `EvaluationInputError`, whose message names the sides as the command line does (--real, ...).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from vision.metrics.batches import Runner, map_dataset
from vision.metrics.errors import EvaluationInputError, first_line
from vision.metrics.extractors import Extractor, build_extractor, load_classifier
from vision.metrics.fid_statistics import FIDStatistics, fid_between, read_fid_statistics, statistics_of_features
from vision.metrics.folders import ImageFiles, PairedFiles, image_files, labels_from_folders, paired_files, size_text

Figures = dict[str, float]
PathLike = str | os.PathLike


def extract_folder(runner: Runner, extractor: Extractor, files: list[Path], desc: str,
                   logits: bool = False) -> Tensor:
    """Features (or logits) of every file, in file order."""
    name = "logits" if logits else "features"

    def fn(batch: Tensor) -> dict[str, Tensor]:
        batch = batch.to(runner.device)
        return {name: extractor.logits(batch) if logits else extractor.features(batch)}

    return map_dataset(runner, ImageFiles(files), fn, desc=desc)[name]


def _side(value: PathLike, what: str) -> FIDStatistics | list[Path]:
    """One side of FID, checked before any network loads: a statistics file, or a folder's images."""
    path = Path(value)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise EvaluationInputError(f"{what} {value} is neither a folder of images nor a .npz statistics file")
        return read_fid_statistics(path)
    return image_files(path, what)


def fid_from_folders(real: PathLike, fake: PathLike, *, features: PathLike | None = None,
                     inception: PathLike | None = None, runner: Runner | None = None) -> Figures:
    """FID between two folders of images and/or statistics files (.npz).

    The features are those of the FID Inception (`inception`: a weights file, default found locally)
    or, with `features`, of a Tessera classifier (a shipped name such as "mnist-classifier" or a
    save_pretrained folder). No network is loaded when both sides are statistics files.
    """
    runner = runner or Runner()
    sides = {"real": _side(real, "--real"), "fake": _side(fake, "--fake")}
    extractor = None
    for name, side in sides.items():
        if isinstance(side, list):
            extractor = extractor or build_extractor(features=features, inception=inception, device=runner.device)
            feats = extract_folder(runner, extractor, side, desc=name)
            sides[name] = statistics_of_features(feats, extractor.tag, f"--{name}")
    real_s, fake_s = sides["real"], sides["fake"]
    if real_s.mu.shape != fake_s.mu.shape:
        raise EvaluationInputError(f"--real has {real_s.mu.shape[0]}-d features but --fake {fake_s.mu.shape[0]}-d; "
                                   "both sides must come from the same feature extractor")
    if real_s.tag and fake_s.tag and real_s.tag != fake_s.tag:
        warnings.warn(f"--real features are from {real_s.tag}, --fake from {fake_s.tag}")
    figures = {"fid": fid_between(real_s, fake_s)}
    figures.update({f"n_{k}": s.n for k, s in (("real", real_s), ("fake", fake_s)) if s.n is not None})
    return figures


def statistics_of_folder(folder: PathLike, *, features: PathLike | None = None, inception: PathLike | None = None,
                         runner: Runner | None = None) -> FIDStatistics:
    """FID statistics of a folder's images (write them with `write_fid_statistics`)."""
    runner = runner or Runner()
    files = image_files(folder, "folder")
    extractor = build_extractor(features=features, inception=inception, device=runner.device)
    return statistics_of_features(extract_folder(runner, extractor, files, "stats"), extractor.tag, str(folder))


def kid_from_folders(real: PathLike, fake: PathLike, *, subsets: int = 100, subset_size: int = 1000,
                     seed: int = 2020, features: PathLike | None = None, inception: PathLike | None = None,
                     runner: Runner | None = None) -> Figures:
    """KID (cubic polynomial kernel MMD^2, unbiased, averaged over random subsets) of two folders."""
    from vision.metrics.kid import kid_from_features

    runner = runner or Runner()
    for value, what in ((real, "--real"), (fake, "--fake")):
        if Path(value).is_file():
            raise EvaluationInputError(f"{what} {value}: KID needs the images (a statistics file keeps only "
                                       "mu and sigma)")
    if subsets < 1 or subset_size < 2:
        raise EvaluationInputError("--subsets must be >= 1 and --subset-size >= 2")
    real_files, fake_files = image_files(real, "--real"), image_files(fake, "--fake")
    extractor = build_extractor(features=features, inception=inception, device=runner.device)
    real_f = extract_folder(runner, extractor, real_files, "real")
    fake_f = extract_folder(runner, extractor, fake_files, "fake")
    if min(len(real_f), len(fake_f)) < 2:
        raise EvaluationInputError(f"KID needs at least 2 images per set, have {len(real_f)} real and "
                                   f"{len(fake_f)} fake")
    mean, std = kid_from_features(real_f, fake_f, subsets=subsets, subset_size=subset_size, seed=seed)
    return {"kid_mean": mean, "kid_std": std, "n_real": len(real_f), "n_fake": len(fake_f)}


def inception_score_of_folder(fake: PathLike, *, splits: int = 10, seed: int = 2020,
                              features: PathLike | None = None, inception: PathLike | None = None,
                              runner: Runner | None = None) -> Figures:
    """Inception Score of a folder: the Inception's classifier, or the logits of the `features` classifier."""
    from vision.metrics.inception_score import inception_score

    runner = runner or Runner()
    if splits < 1:
        raise EvaluationInputError(f"--splits must be >= 1, got {splits}")
    files = image_files(fake, "--fake")
    if len(files) < splits:
        raise EvaluationInputError(f"--splits {splits} needs at least that many images; have {len(files)}")
    extractor = build_extractor(features=features, inception=inception, device=runner.device)
    if not extractor.has_logits:
        raise EvaluationInputError(
            f"Inception Score needs the Inception classifier, which {extractor.module.weights_path} lacks; pass "
            "--inception with pytorch-fid's pt_inception-2015-12-05-6726825d.pth or NVIDIA's inception-2015-12-05.pt")
    logits = extract_folder(runner, extractor, files, "fake", logits=True)
    mean, std = inception_score(logits, splits=splits, seed=seed)
    return {"is_mean": mean, "is_std": std, "n_fake": len(logits)}


# ---------------------------------------------------------------------------------------------
# Paired folders: PSNR, SSIM, LPIPS
# ---------------------------------------------------------------------------------------------

def lpips_rows(test: Tensor, ref: Tensor, model: nn.Module) -> Tensor:
    """Per-image LPIPS (float64) of [0, 1] images."""
    from vision.metrics.image_quality import lpips_distance

    try:
        return lpips_distance(test.float(), ref.float(), model, reduction="none").to(torch.float64)
    except RuntimeError as e:  # e.g. images smaller than the backbone's receptive field
        raise EvaluationInputError(f"LPIPS cannot score {size_text(test)} images ({first_line(e)})") from None


PAIRED_METRICS = ("psnr", "ssim", "lpips")


def paired_folder_metric(metric: str, ref: PathLike, test: PathLike, *, y_channel: bool = False, shave: int = 0,
                         net: str = "alex", backbone: PathLike | None = None, runner: Runner | None = None) -> Figures:
    """Mean PSNR (dB), SSIM or LPIPS over images of `test` paired with `ref` by relative path without extension.

    psnr/ssim: `y_channel` scores BT.601 luma, `shave` cuts that many pixels from every border first.
    lpips: `net` "alex" or "vgg", `backbone` the torchvision weights file (default: the torch hub cache).
    """
    from vision.metrics.image_quality import load_lpips, psnr, ssim

    if metric not in PAIRED_METRICS:
        raise ValueError(f"metric must be one of {PAIRED_METRICS}, got {metric!r}")
    runner = runner or Runner()
    pairs = paired_files(ref, test)
    if metric == "lpips":
        model = load_lpips(net, backbone, device=runner.device)
        score = lambda t, r: lpips_rows(t, r, model)  # noqa: E731
        shave = 0
    else:
        if shave < 0:
            raise EvaluationInputError(f"--shave must be >= 0, got {shave}")
        f = psnr if metric == "psnr" else ssim
        score = lambda t, r: f(t, r, y_channel=y_channel, shave=shave, reduction="none")  # noqa: E731

    def fn(batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        ref_b, test_b = (x.to(runner.device, torch.float64) / 255 for x in batch)
        if shave and min(ref_b.shape[-2:]) <= 2 * shave:
            raise EvaluationInputError(f"--shave {shave} leaves nothing of a {size_text(ref_b)} image")
        return {metric: score(test_b, ref_b).to(torch.float64)}

    values = map_dataset(runner, PairedFiles(pairs), fn, desc=metric)[metric]
    return {metric: float(values.mean()), "n_real": len(values), "n_fake": len(values)}


# ---------------------------------------------------------------------------------------------
# Classification of generated images
# ---------------------------------------------------------------------------------------------

def classify_folder(fake: PathLike, *, classifier: PathLike = "mnist-classifier",
                    labels_from_folder_names: bool = False, runner: Runner | None = None) -> Figures:
    """Class histogram (`count_0`, ...) of a folder under a classifier, and with `labels_from_folder_names`
    (images in sub-folders 0/, 1/, ... named by their intended class) the `accuracy` on those labels."""
    runner = runner or Runner()
    files = image_files(fake, "--fake")
    labels = labels_from_folders(files, fake) if labels_from_folder_names else None
    model = load_classifier(classifier, runner.device)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if labels is not None and num_classes is not None and int(labels.max()) >= num_classes:
        raise EvaluationInputError(f"--labels-from-folders: class {int(labels.max())}, but the classifier has "
                                   f"{num_classes} classes")

    def fn(batch: Tensor) -> dict[str, Tensor]:
        return {"pred": model(batch.to(runner.device)).argmax(1)}

    pred = map_dataset(runner, ImageFiles(files), fn, desc="classify")["pred"]
    num_classes = num_classes or int(pred.max()) + 1
    figures: Figures = {"n_fake": len(pred)}
    if labels is not None:
        figures["accuracy"] = float((pred == labels).double().mean())
    counts = torch.bincount(pred, minlength=num_classes)
    figures.update({f"count_{c}": int(counts[c]) for c in range(num_classes)})
    return figures
