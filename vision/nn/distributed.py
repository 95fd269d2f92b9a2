"""Differentiable reductions over all processes of a torch.distributed world (identity in a world of one).

Batch-level statistics inside a loss (a codebook's average usage, BatchNorm's moments) must be
taken over the global batch for N processes to train the same model as one process. The
all-reduce's backward sums the gradients of every process, so once DDP averages the parameter
gradients they equal the single-process gradient of the mean loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of `t` over processes, with gradients (torch.distributed.nn)."""
    if world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def global_mean(t: Tensor, dim: int = 0) -> Tensor:
    """Mean over `dim` of the tensor concatenated along `dim` across processes (sizes may differ)."""
    if world_size() == 1:
        return t.mean(dim)
    count = all_reduce_sum(torch.tensor(float(t.shape[dim]), dtype=torch.float64, device=t.device))
    return (all_reduce_sum(t.sum(dim)) / count).to(t.dtype)
