"""Scoring generated digits: Fréchet distance and accuracy under the shipped `mnist-classifier`.

Inception features say little about 32x32 greyscale digits, so digit generators are scored in
the feature space of a classifier trained on digits (as the MNIST columns of GAN papers are):

- `fd`: the Fréchet distance between Gaussian fits of the classifier's penultimate features
  (128-d for `mnist-classifier`) of the generated digits and of the 1000 held-out MNIST-5k
  digits (`vision.data.mnist.mnist5k_split()`, which the classifier never saw);
- `accuracy`: the fraction of generated digits the classifier assigns to the class they were
  generated for.

Float images are quantised to 8 bits first, as saving them to PNG does, so `score_digits` gives
the figures `python -m apps.evaluate fid --features mnist-classifier` and `classify` give on the
saved files (with the held-out digits as `--real`). The reference statistics are computed once
per process and classifier/device. Like any FID, `fd` is biased upward for small sets (below 128
images the covariance is singular); compare samplers at equal counts, ideally 1000 or more.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

from vision.metrics.extractors import ClassifierFeatures, Extractor, load_classifier
from vision.metrics.features import module_device
from vision.metrics.fid_statistics import FIDStatistics, fid_between, statistics_of_features

DIGIT_CLASSIFIER = "mnist-classifier"
REFERENCE_BATCH = 500  # the held-out digits' features are always computed in these batches


def heldout_digits() -> tuple[Tensor, Tensor]:
    """The 1000 held-out MNIST-5k digits as (1000, 1, 32, 32) uint8 (zero-padded from 28x28) and their labels."""
    from vision.data.mnist import mnist5k_split

    (_, _), (images, labels) = mnist5k_split()
    return images[:, None], labels


def digit_features_and_logits(classifier: ClassifierFeatures, images: Tensor,
                              batch_size: int) -> tuple[Tensor, Tensor]:
    """The classifier's features and logits (float32, on the CPU) of digits, in batches on its device."""
    device = module_device(classifier)
    features, logits = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f, z = classifier.features_and_logits(images[i:i + batch_size].to(device))
            features.append(f.float().cpu())
            logits.append(z.float().cpu())
    return torch.cat(features), torch.cat(logits)


@lru_cache(maxsize=8)
def _classifier_and_reference(classifier: str, device: str) -> tuple[Extractor, FIDStatistics]:
    extractor = Extractor(ClassifierFeatures(load_classifier(classifier, device)), f"features:{classifier}")
    features, _ = digit_features_and_logits(extractor.module, heldout_digits()[0], REFERENCE_BATCH)
    return extractor, statistics_of_features(features, extractor.tag, "held-out digits")


def reference_statistics(classifier: str | os.PathLike = DIGIT_CLASSIFIER,
                         device: torch.device | str = "cpu") -> FIDStatistics:
    """Mean and covariance of the classifier's features of the held-out digits (cached)."""
    return _classifier_and_reference(str(classifier), str(torch.device(device)))[1]


def _as_uint8(images: Tensor) -> Tensor:
    from vision.data import to_uint8

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected digit images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not torch.is_floating_point(images):
        raise TypeError(f"images must be float in [-1, 1] or uint8, got {images.dtype}")
    return to_uint8(images)


def score_digits(images: Tensor, labels: Tensor | None, *, classifier: str | os.PathLike = DIGIT_CLASSIFIER,
                 device: torch.device | str | None = None, batch_size: int = 500) -> dict[str, float]:
    """{"fd", "accuracy"} of generated digits and the class ids they were generated for ({"fd"} alone for an
    unconditional generator's digits, labels None).

    images: (N, 1 or 3, H, W) float in [-1, 1] as generators decode them (or uint8); 32x32 is the
        classifier's size, 28x28 is zero-padded to it, other sizes are resized.
    labels: (N,) int class ids. device: where the classifier runs (default: the images' device).
    classifier: a shipped name or save_pretrained folder of a classifier with features().
    """
    if labels is not None and (labels.dim() != 1 or len(labels) != len(images) or torch.is_floating_point(labels)):
        raise ValueError(f"labels must be (N,) integer class ids for {len(images)} images, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if len(images) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 images, got {len(images)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pixels = _as_uint8(images)
    device = torch.device(device) if device is not None else images.device
    extractor, reference = _classifier_and_reference(str(classifier), str(device))
    features, logits = digit_features_and_logits(extractor.module, pixels, batch_size)
    fd = fid_between(reference, statistics_of_features(features, extractor.tag, "generated digits"))
    if labels is None:
        return {"fd": fd}
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must be class ids in 0..{logits.shape[1] - 1}, got {int(labels.min())}.."
                         f"{int(labels.max())}")
    accuracy = (logits.argmax(1) == labels.cpu()).double().mean()
    return {"fd": fd, "accuracy": float(accuracy)}
