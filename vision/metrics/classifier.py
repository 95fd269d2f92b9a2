"""A small MNIST classifier: the feature extractor for FID/KID on generated digits, and their accuracy.

Inception features mean little on 32x32 greyscale digits, so digit generators are scored with
a network trained on digits, as in the MNIST columns of GAN papers. `features(x)` returns the
penultimate activations (`feature_dim`-d, after ReLU); `forward(x)` the 10 class logits.

Inputs: (B, 1 or 3, H, W) as uint8 in [0, 255] or float in [-1, 1] (Tessera's model boundary).
RGB is averaged to grey (exact for the R = G = B images a digit generator saves). 28x28 digits
are zero-padded to 32x32 as MNIST-5k is (`vision.data.mnist.load_mnist5k`); other sizes are
resized to 32x32 (bilinear, antialiased). White digits on black, as in MNIST.

Trained by `python -m apps.train_classifier`; shipped as `mnist-classifier`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.hub import register_model

INPUT_SIZE = 32


@dataclass
class MNISTClassifierConfig:
    widths: tuple[int, ...] = (32, 64, 128)  # conv stages; each halves the resolution
    feature_dim: int = 128  # penultimate features (FID/KID on digits)
    num_classes: int = 10
    dropout: float = 0.3


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


@register_model("mnist-classifier")
class MNISTClassifier(nn.Module):
    """Conv-BN-ReLU-maxpool stages (32 -> 16 -> 8 -> 4 pixels) -> flatten -> feature_dim -> logits."""

    config_class = MNISTClassifierConfig

    def __init__(self, config: MNISTClassifierConfig):
        super().__init__()
        self.config = config
        widths = (1, *config.widths)
        self.stages = nn.Sequential(*[_stage(a, b) for a, b in zip(widths[:-1], widths[1:])])
        side = INPUT_SIZE >> len(config.widths)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * side * side, config.feature_dim),
                                   nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """(B, 1|3, H, W) uint8 or [-1, 1] float -> (B, 1, 32, 32) float32 in [-1, 1]."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1 or 3, H, W) digit images, got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not torch.is_floating_point(images):
            raise TypeError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
        x = images.to(torch.float32)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)  # exact on integer pixels with R = G = B
        if images.dtype == torch.uint8:
            x = x / 127.5 - 1
        h, w = x.shape[-2:]
        if (h, w) == (28, 28):
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        elif (h, w) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, images: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim)."""
        return self.embed(self.stages(self.prepare(images)))

    def logits_of_features(self, features: Tensor) -> Tensor:
        """Class logits from `features(x)`'s output: both from one pass when a caller needs both."""
        return self.head(self.dropout(features))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.logits_of_features(self.features(images))
