"""rFID (+ PSNR, SSIM, LPIPS) of a tokenizer on a folder of originals: the protocol of tokenizer papers.

Each original is resized so its short side is `image_size` (bicubic, antialiased), centre-cropped
square and quantised to uint8; the tokenizer encodes and decodes it (in [-1, 1]) and the
reconstruction is quantised to uint8 again. rFID is the FID between the originals and the
reconstructions; PSNR, SSIM and LPIPS are means over the pairs. ImageNet papers use the 50k val
images at 256x256.

    from vision.metrics import rfid_of_tokenizer
    rfid_of_tokenizer("vq-mnist", "digits/", image_size=32, features="mnist-classifier")
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from vision.metrics.batches import Runner, map_dataset
from vision.metrics.errors import EvaluationInputError
from vision.metrics.extractors import build_extractor
from vision.metrics.fid_statistics import fid_between, statistics_of_features
from vision.metrics.folder_metrics import Figures, lpips_rows
from vision.metrics.folders import CroppedFiles, image_files

PathLike = str | os.PathLike


def load_tokenizer(spec: PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """A model with encode()/decode(): a shipped name, a save_pretrained folder or a released tokenizer file
    (vision.hub.resolve_model), in eval mode."""
    from vision.hub import resolve_model

    model = resolve_model(spec, kind="tokenizer", device=device)
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise EvaluationInputError(f"--tokenizer {spec} is a {type(model).__name__}, which has no encode()/decode()")
    return model.eval()


def optional_lpips(net: str, backbone: PathLike | None, device: torch.device) -> nn.Module | None:
    """LPIPS when its backbone weights are found; None with a warning when not (an error if `backbone` was given)."""
    from vision.metrics.image_quality import load_lpips, locate_lpips_backbone

    try:
        locate_lpips_backbone(net, backbone)
    except FileNotFoundError as e:
        if backbone:
            raise EvaluationInputError(str(e)) from None
        warnings.warn(f"LPIPS skipped: {e}")
        return None
    return load_lpips(net, backbone, device=device)


def rfid_of_tokenizer(tokenizer: PathLike | nn.Module, data: PathLike, *, image_size: int = 256,
                      num: int | None = None, lpips_net: str = "alex", lpips_backbone: PathLike | None = None,
                      features: PathLike | None = None, inception: PathLike | None = None,
                      runner: Runner | None = None) -> Figures:
    """{"fid", "psnr", "ssim", "lpips" (when its backbone is found), "n_real", "n_fake"}.

    tokenizer: a shipped name, a save_pretrained folder, a released tokenizer file (WeTok.ckpt, vq_ds16_c2i.pt,
        ...) or a loaded model with encode()/decode().
    num: score `num` images evenly spaced in sorted order instead of all. features / inception: the
    FID network, as in `fid_from_folders`.
    """
    from vision.data import to_uint8
    from vision.metrics.image_quality import psnr, ssim

    runner = runner or Runner()
    if image_size < 8:
        raise EvaluationInputError(f"--image-size must be >= 8, got {image_size}")
    files = image_files(data, "--data")
    if num is not None:
        if not 2 <= num <= len(files):
            raise EvaluationInputError(f"--num must be in 2..{len(files)} (images in {data}), got {num}")
        files = [files[i * len(files) // num] for i in range(num)]
    name = tokenizer if not isinstance(tokenizer, nn.Module) else type(tokenizer).__name__
    if not isinstance(tokenizer, nn.Module):
        tokenizer = load_tokenizer(tokenizer, runner.device)
    spec = getattr(tokenizer, "spec", None)
    if spec is not None and image_size % spec.downsample:
        raise EvaluationInputError(f"--image-size {image_size} is not a multiple of the tokenizer's downsample "
                                   f"factor {spec.downsample}")
    extractor = build_extractor(features=features, inception=inception, device=runner.device)
    lpips_model = optional_lpips(lpips_net, lpips_backbone, runner.device)

    def fn(originals: Tensor) -> dict[str, Tensor]:
        originals = originals.to(runner.device)
        recon = to_uint8(tokenizer.decode(tokenizer.encode(originals.to(torch.float32) / 127.5 - 1)))
        if recon.shape != originals.shape:
            raise EvaluationInputError(f"--tokenizer {name} turned {tuple(originals.shape)} images into "
                                       f"{tuple(recon.shape)} reconstructions")
        a, b = originals.to(torch.float64) / 255, recon.to(torch.float64) / 255
        rows = {"real": extractor.features(originals), "fake": extractor.features(recon),
                "psnr": psnr(b, a, reduction="none"), "ssim": ssim(b, a, reduction="none")}
        if lpips_model is not None:
            rows["lpips"] = lpips_rows(b, a, lpips_model)
        return rows

    rows = map_dataset(runner, CroppedFiles(files, image_size), fn, desc="rfid")
    real = statistics_of_features(rows["real"], extractor.tag, "--data")
    fake = statistics_of_features(rows["fake"], extractor.tag, "--data")
    return {"fid": fid_between(real, fake), "psnr": float(rows["psnr"].mean()), "ssim": float(rows["ssim"].mean()),
            **({"lpips": float(rows["lpips"].mean())} if "lpips" in rows else {}),
            "n_real": real.n, "n_fake": fake.n}
