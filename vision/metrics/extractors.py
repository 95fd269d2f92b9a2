"""The network whose features FID, KID and IS are computed in, chosen by name, with a tag saying which.

Either the TF FID Inception (`InceptionFeatures`, weights found locally) or a Tessera classifier
with a `features()` method, such as the shipped `mnist-classifier` for digits. The tag is written
into statistics files, so that comparing statistics from two different networks can be flagged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vision.metrics.errors import EvaluationInputError, first_line
from vision.metrics.features import features_of

INCEPTION_TAG = "fid-inception-2015-12-05:tf1"


class ClassifierFeatures(nn.Module):
    """A Tessera classifier as a feature extractor: `features(x)`, and its logits for IS / classify."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.features(images)

    def logits(self, images: Tensor) -> Tensor:
        return self.model(images)

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Both in one pass when the model has `logits_of_features` (as `mnist-classifier`), else two."""
        features = self.model.features(images)
        if callable(getattr(self.model, "logits_of_features", None)):
            return features, self.model.logits_of_features(features)
        return features, self.model(images)


@dataclass
class Extractor:
    """A feature network and its tag; `features` and `logits` return float32 rows."""

    module: nn.Module
    tag: str

    def features(self, images: Tensor) -> Tensor:
        return features_of(self.module(images)).to(torch.float32)

    def logits(self, images: Tensor) -> Tensor:
        if isinstance(self.module, ClassifierFeatures):
            return self.module.logits(images).to(torch.float32)
        _, logits = self.module(images)
        return logits.to(torch.float32)

    @property
    def has_logits(self) -> bool:
        return isinstance(self.module, ClassifierFeatures) or self.module.has_logits


def load_classifier(spec: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A classifier with `features()` by shipped name or save_pretrained folder, in eval mode."""
    from vision.hub import from_pretrained

    model = from_pretrained(spec, device=device)
    if not callable(getattr(model, "features", None)):
        raise EvaluationInputError(f"--features {spec} is a {type(model).__name__}, which has no features() method")
    return model.eval()


def load_inception(path: str | Path | None = None) -> nn.Module:
    """The FID Inception from `path`, or found locally; the error says where to put the weights."""
    from vision.hub import HubError
    from vision.metrics.features import (PYTORCH_FID_FILE, InceptionFeatures, _hub_checkpoints,
                                         default_inception_path, locate_inception)

    if path is not None and not Path(path).expanduser().is_file():
        raise EvaluationInputError(f"--inception {path} does not exist")
    try:
        weights = locate_inception(path)
    except FileNotFoundError:
        raise EvaluationInputError(
            f"Inception weights not found: put pytorch-fid's {PYTORCH_FID_FILE} in {_hub_checkpoints()}/, "
            f"or run `python -m apps.evaluate import-inception FILE` to write {default_inception_path()}, "
            "or pass --inception FILE") from None
    try:
        return InceptionFeatures(weights)
    except (ValueError, HubError, RuntimeError) as e:
        raise EvaluationInputError(f"{weights}: not usable FID Inception weights ({first_line(e)})") from None


def build_extractor(*, features: str | Path | None = None, inception: str | Path | None = None,
                    device: torch.device | str = "cpu") -> Extractor:
    """`features` (a classifier's name or folder) when given, else the FID Inception (`inception` or found locally)."""
    if features:
        return Extractor(ClassifierFeatures(load_classifier(features, device)), f"features:{features}")
    return Extractor(load_inception(inception).to(device), INCEPTION_TAG)
