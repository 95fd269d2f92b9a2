"""Inception Score (Salimans et al., 2016): exp E_x KL(p(y|x) || p(y)), mean and std over splits.

As torchmetrics' `InceptionScore`: shuffle the logits (`randperm` from the generator), split
into `splits` chunks (`Tensor.chunk`), score each chunk with its own marginal p(y), and report
the mean and the unbiased standard deviation over chunks (NaN for one split). The reference (OpenAI's TF code,
torch-fidelity, torchmetrics) feeds the 1008-way logits *without* the fc bias, which is what
`InceptionFeatures` returns by default. Computed in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vision.metrics.features import InceptionFeatures, module_device


def inception_score(logits: Tensor, *, splits: int = 10, shuffle: bool = True, seed: int = 2020,
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """(mean, std) Inception Score of (N, classes) logits."""
    logits = logits.detach().to(torch.float64)
    if logits.dim() != 2 or len(logits) < splits:
        raise ValueError(f"need (N, classes) logits with N >= splits={splits}, got {tuple(logits.shape)}")
    if shuffle:
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        logits = logits[torch.randperm(len(logits), generator=generator).to(logits.device)]
    scores = []
    for chunk in logits.chunk(splits, dim=0):
        log_p = chunk.log_softmax(dim=1)
        log_marginal = log_p.exp().mean(dim=0, keepdim=True).log()
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1)
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std()) if len(scores) > 1 else float("nan")


class InceptionScore:
    """Streaming IS over images (uint8 NCHW or float [0, 1]); needs Inception weights with a classifier."""

    def __init__(self, extractor: InceptionFeatures | None = None, *, batch_size: int = 64, splits: int = 10,
                 seed: int = 2020, **inception_kwargs):
        self.extractor = extractor if extractor is not None else InceptionFeatures(**inception_kwargs)
        if isinstance(self.extractor, InceptionFeatures) and not self.extractor.has_logits:
            raise ValueError(f"Inception Score needs the classifier, which {self.extractor.weights_path} lacks; "
                             "use pytorch-fid's pt_inception-2015-12-05-6726825d.pth or NVIDIA's inception-2015-12-05.pt")
        self.batch_size, self.splits, self.seed = batch_size, splits, seed
        self.logits: list[Tensor] = []

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        device = module_device(self.extractor)
        for i in range(0, len(images), self.batch_size):
            out = self.extractor(images[i:i + self.batch_size].to(device))
            self.logits.append((out[1] if isinstance(out, tuple) else out).to(torch.float64).cpu())

    def compute(self) -> tuple[float, float]:
        return inception_score(torch.cat(self.logits), splits=self.splits, seed=self.seed)
