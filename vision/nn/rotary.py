"""Rotary position embeddings (RoPE), 1-D and LlamaGen's 2-D grid layout.

A table has shape (positions, head_dim // 2, 2): the cosine and sine of each rotation angle.
`apply_rotary` rotates adjacent channel pairs (x[2i], x[2i+1]) by the angle of pair i, in
float32, as gpt-fast and LlamaGen do.

2-D layout (LlamaGen `precompute_freqs_cis_2d`): the head dimension is split in two halves; the
first half's angles follow the token's row, the second half's its column, each with the 1-D
frequencies of a head_dim/2 rotary embedding. Tokens are in raster order (row-major). The
`prefix` rows (LlamaGen's class/condition tokens) are all zeros, so the rotation maps those
tokens' queries and keys to zero. That looks like a bug but it is what the released models were
trained with: their condition token contributes through its value only.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotary_frequencies(head_dim: int, base: float = 10000.0) -> Tensor:
    """The head_dim // 2 rotation speeds base^(-2i / head_dim)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))


def _table(angles: Tensor) -> Tensor:
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_1d(length: int, head_dim: int, base: float = 10000.0, prefix: int = 0) -> Tensor:
    """(prefix + length, head_dim // 2, 2); positions 0..length-1 after `prefix` zero rows."""
    angles = torch.outer(torch.arange(length).float(), rotary_frequencies(head_dim, base))
    return torch.cat([torch.zeros(prefix, head_dim // 2, 2), _table(angles)])


def rope_2d(grid: int | tuple[int, int], head_dim: int, base: float = 10000.0, prefix: int = 0) -> Tensor:
    """(prefix + h*w, head_dim // 2, 2) for a raster-ordered h x w grid (LlamaGen's layout)."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding needs head_dim divisible by 4, got {head_dim}")
    freqs = rotary_frequencies(head_dim // 2, base)  # (head_dim // 4,)
    rows = torch.outer(torch.arange(h).float(), freqs)  # (h, head_dim // 4)
    cols = torch.outer(torch.arange(w).float(), freqs)  # (w, head_dim // 4)
    angles = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)
    return torch.cat([torch.zeros(prefix, head_dim // 2, 2), _table(angles.flatten(0, 1))])


def apply_rotary(x: Tensor, table: Tensor) -> Tensor:
    """Rotate x (B, L, heads, head_dim) by table (L, head_dim // 2, 2) or (B, L, head_dim // 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    if table.ndim == 3:
        table = table[None]
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]  # (B|1, L, 1, head_dim // 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    out = torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1)
    return out.flatten(-2).type_as(x)
