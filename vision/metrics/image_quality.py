"""Full-reference image quality: PSNR, SSIM, LPIPS. Inputs are NCHW RGB in [0, 1].

PSNR follows the super-resolution convention of EDSR/LIIF (`utils.calc_psnr`): optionally on
the BT.601 luma Y = 16 + (65.738 R + 129.057 G + 25.064 B) / 256 (R, G, B in [0, 255]; the
offset cancels in the difference), with `shave` pixels cut from every border. LIIF shaves
`scale` pixels on the benchmark sets (Set5, Set14, B100, Urban100; Y channel) and `scale + 6`
on DIV2K (RGB). Scores are per image, then averaged.

SSIM is torchmetrics' (Gaussian window 11, sigma 1.5, K = (0.01, 0.03)). It averages the SSIM map
over the whole image (borders from reflect padding); skimage and Wang et al.'s MATLAB code drop a
5-pixel border, which changes small images by ~1e-3 (the interiors agree to 1e-6).

LPIPS is the `lpips` package (Zhang et al., 2018, v0.1 linear heads shipped in its wheel). Its
AlexNet/VGG16 backbone normally comes from torchvision's download; here it is read from the
local torch hub cache or a given file, so nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

Reduction = Literal["mean", "none"]
_Y_COEFFS = (65.738, 129.057, 25.064)


def rgb_to_y(images: Tensor) -> Tensor:
    """BT.601 luma of RGB in [0, 1], scaled to [0, 1] by 255 (values in [16/255, 235/255]), (N, 1, H, W)."""
    if images.shape[-3] != 3:
        raise ValueError(f"expected 3 RGB channels, got shape {tuple(images.shape)}")
    coeffs = images.new_tensor(_Y_COEFFS).view(3, 1, 1) / 256
    return 16 / 255 + (images * coeffs).sum(dim=-3, keepdim=True)


def _prepare(pred: Tensor, target: Tensor, y_channel: bool, shave: int) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() == 3:
        pred, target = pred[None], target[None]
    pred, target = pred.to(torch.float64), target.to(torch.float64)
    if y_channel:
        pred, target = rgb_to_y(pred), rgb_to_y(target)
    if shave:
        if min(pred.shape[-2:]) <= 2 * shave:
            raise ValueError(f"shave {shave} leaves nothing of a {tuple(pred.shape[-2:])} image")
        pred, target = pred[..., shave:-shave, shave:-shave], target[..., shave:-shave, shave:-shave]
    return pred, target


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(pred: Tensor, target: Tensor, *, data_range: float = 1.0, y_channel: bool = False, shave: int = 0,
         reduction: Reduction = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB, per image (inf for identical images), float64."""
    pred, target = _prepare(pred, target, y_channel, shave)
    mse = (pred - target).pow(2).flatten(1).mean(dim=1)
    return _reduce(10 * torch.log10(data_range ** 2 / mse), reduction)


def ssim(pred: Tensor, target: Tensor, *, data_range: float = 1.0, y_channel: bool = False, shave: int = 0,
         reduction: Reduction = "mean") -> Tensor:
    """Structural similarity (torchmetrics, Gaussian 11x11, sigma 1.5), per image, float64."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = _prepare(pred, target, y_channel, shave)
    values = structural_similarity_index_measure(pred, target, data_range=data_range, reduction="none")
    return _reduce(values, reduction)


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

LpipsNet = Literal["alex", "vgg"]


def _torchvision_weights_file(net: LpipsNet) -> str:
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    weights = {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1}[net]
    return weights.url.rsplit("/", 1)[1]  # alexnet-owt-7be5be79.pth, vgg16-397923af.pth


def locate_lpips_backbone(net: LpipsNet = "alex", path: str | os.PathLike | None = None) -> Path:
    """The torchvision ImageNet weights LPIPS uses: `path`, else the torch hub cache."""
    if net not in ("alex", "vgg"):
        raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"LPIPS {net} backbone {p} does not exist")
        return p
    name = _torchvision_weights_file(net)
    p = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not p.is_file():
        raise FileNotFoundError(f"LPIPS {net} backbone not found: put torchvision's {name} in {p.parent}/ "
                                f"or pass its path")
    return p


def load_lpips(net: LpipsNet = "alex", backbone_path: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """An `lpips.LPIPS` (v0.1) in eval mode with its backbone read from a local file.

    The linear heads come from the lpips wheel; the backbone is built random (`pnet_rand=True`,
    so torchvision downloads nothing) and then filled from the torchvision state dict, whose
    `features.<i>.*` become the package's `net.slice<k>.<i>.*`. Every backbone tensor must be set.
    """
    import lpips

    from vision.hub import load_official_state_dict

    path = locate_lpips_backbone(net, backbone_path)
    source = load_official_state_dict(path)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about lpips' legacy `pretrained=False`
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    load_lpips_backbone(model, source)
    return model.eval().requires_grad_(False).to(device)


def load_lpips_backbone(model: nn.Module, torchvision_state: dict[str, Tensor]) -> None:
    """Copy torchvision `features.<i>.*` tensors into an lpips model's `net.slice<k>.<i>.*`."""
    targets = model.net.state_dict()
    new = {}
    for key, value in targets.items():
        _, index, leaf = key.split(".")  # slice<k>.<i>.<weight|bias>
        src = f"features.{index}.{leaf}"
        if src not in torchvision_state:
            raise ValueError(f"LPIPS backbone file lacks {src!r}")
        if torchvision_state[src].shape != value.shape:
            raise ValueError(f"LPIPS backbone {src!r}: shape {tuple(torchvision_state[src].shape)}, "
                             f"expected {tuple(value.shape)}")
        new[key] = torchvision_state[src]
    model.net.load_state_dict(new, strict=True)


def lpips_distance(pred: Tensor, target: Tensor, model: nn.Module, reduction: Reduction = "mean") -> Tensor:
    """LPIPS between images in [0, 1] (per image, or their mean)."""
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}")
    with torch.no_grad():
        values = model(pred, target, normalize=True).flatten()
    return _reduce(values, reduction)
