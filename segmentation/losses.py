"""Segmentation losses: soft Dice + cross-entropy, and nnU-Net's deep-supervision weighting.

`DiceCELoss` computes what ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)`` computes
(and, up to a constant, nnU-Net's ``DC_and_CE_loss``):

- soft Dice per class ``1 - (2 sum(p g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` on the
  softmax ``p`` and the one-hot target ``g``, summed over the spatial axes (and the batch when
  ``batch=True``, nnU-Net's "batch Dice"), background dropped unless ``include_background``,
  averaged over classes (and samples);
- plus the mean voxel-wise cross-entropy of the logits, weighted ``lambda_dice`` / ``lambda_ce``.

`DeepSupervisionLoss` applies a loss to every output of a deep-supervised decoder (full
resolution first) against the target downsampled by nearest neighbour to each output's size,
with nnU-Net's weights ``1, 1/2, 1/4, ...``, the lowest resolution weighted 0, normalised to sum 1.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["soft_dice_loss", "DiceCELoss", "DeepSupervisionLoss", "deep_supervision_weights"]


def soft_dice_loss(logits: Tensor, target: Tensor, *, include_background: bool = False, batch: bool = True,
                   smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> Tensor:
    """Soft Dice loss of ``(B, K, *spatial)`` logits against ``(B, *spatial)`` integer labels."""
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target {tuple(target.shape)} must be logits {tuple(logits.shape)} without the class axis")
    k = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target.long(), k).movedim(-1, 1).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = (0, *range(2, probs.ndim)) if batch else tuple(range(2, probs.ndim))
    intersection = (probs * onehot).sum(axes)
    denominator = probs.sum(axes) + onehot.sum(axes)
    return (1 - (2 * intersection + smooth_nr) / (denominator + smooth_dr)).mean()


class DiceCELoss(nn.Module):
    """Soft Dice (foreground classes by default) + cross-entropy; see the module docstring."""

    def __init__(self, *, include_background: bool = False, batch: bool = True, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
        super().__init__()
        self.include_background, self.batch = include_background, batch
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr

    def parts(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(dice loss, cross-entropy), unweighted."""
        dice = soft_dice_loss(logits, target, include_background=self.include_background, batch=self.batch,
                              smooth_nr=self.smooth_nr, smooth_dr=self.smooth_dr)
        return dice, F.cross_entropy(logits.float(), target.long())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        dice, ce = self.parts(logits, target)
        return self.lambda_dice * dice + self.lambda_ce * ce


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for n outputs (full resolution first): 1/2^i, the last 0, normalised (n = 1: [1])."""
    if n < 1:
        raise ValueError("need at least one output")
    w = [0.5**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss(output_i, target resized to output_i)` over a list of outputs."""

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss, self.weights = loss, None if weights is None else list(weights)

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.loss(outputs, target)
        weights = self.weights or deep_supervision_weights(len(outputs))
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} weights for {len(outputs)} outputs")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for out, w in zip(outputs, weights):
            if w == 0:
                continue
            t = target
            if tuple(out.shape[2:]) != tuple(target.shape[1:]):
                t = F.interpolate(target[:, None].float(), size=tuple(out.shape[2:]), mode="nearest-exact")[:, 0].long()
            total = total + w * self.loss(out, t)
        return total
