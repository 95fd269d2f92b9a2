"""RMSNorm as LLaMA and LlamaGen apply it.

torch's own `nn.RMSNorm` (torch >= 2.4) gives the same numbers in float32. In bfloat16/float16
it does not: LlamaGen normalises in float32, rounds the result to the input dtype, and only then
multiplies by the weight (two roundings), while torch multiplies before its one rounding. The
official checkpoints were trained and evaluated with the former, so this class keeps torch's
module (same `weight` parameter, same constructor) and only changes where the rounding happens.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    """y = (x / sqrt(mean(x^2) + eps)) computed in float32, cast back to x.dtype, times `weight`."""

    def __init__(self, dim: int, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(dim, eps=eps, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), self.normalized_shape, None, self.eps).type_as(x)
        return normed if self.weight is None else normed * self.weight
