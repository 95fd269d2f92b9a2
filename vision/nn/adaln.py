"""Adaptive layer-norm modulation (DiT, VAR): a condition vector sets per-channel scales and shifts.

`AdaLNModulation(cond_dim, dim, n)` is VAR's `ada_lin = Sequential(SiLU, Linear(cond_dim, n*dim))`
(state-dict keys `ada_lin.1.weight`, `ada_lin.1.bias`) and returns the n vectors in the order the
linear layer lays them out; a VAR block uses n = 6 (gamma1, gamma2, scale1, scale2, shift1, shift2)
and its head n = 2 (scale, shift). `modulate` is x * (1 + scale) + shift.
"""
from __future__ import annotations

from torch import Tensor, nn


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    def __init__(self, cond_dim: int, dim: int, n_vectors: int = 6) -> None:
        super().__init__()
        self.dim, self.n_vectors = dim, n_vectors
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, n_vectors * dim))

    def forward(self, cond: Tensor) -> tuple[Tensor, ...]:
        """cond (B, cond_dim) -> n_vectors tensors of shape (B, 1, dim), broadcastable over tokens."""
        return self.ada_lin(cond).view(-1, 1, self.n_vectors, self.dim).unbind(2)
