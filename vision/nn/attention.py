"""Multi-head self-attention on `F.scaled_dot_product_attention`, with a key/value cache.

One module serves every generator family:

* masks: `None` (bidirectional: MaskGIT, U-ViT, MAR, and VAR's cached steps), `"causal"`
  (LlamaGen; with a cache the new queries sit after the cached positions) or an explicit tensor
  (VAR's block-causal training mask from `block_causal_mask`; bool True = may attend, or an
  additive float mask).
* VAR's variant: `qk_norm="l2"` L2-normalises queries and keys and multiplies the queries by a
  learned per-head scale exp(min(log_head_scale, log 100)), initialised at log 4 (official
  `scale_mul_1H11`), with attention scale 1; `qv_bias=True` adds learned query and value biases
  and a zero key bias (official `q_bias`, `v_bias`, `zero_k_bias`).
* rotary embeddings (LlamaGen) are applied to queries and keys before they are cached.

`KVCache` holds one layer's keys and values. Speculative decoding appends a window of drafts and
`truncate`s back to the accepted length; ReCAP's cheap steps pass `positions=` with
`update_cache=False`: the subset's fresh keys/values replace the cached ones at those positions
for this call only, and the queries of the subset attend to every position.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.nn.rotary import apply_rotary

Mask = Tensor | str | None


class KVCache:
    """Keys and values (B, heads, length, head_dim) of one layer, stored in a buffer grown on demand."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity_hint = capacity
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def read(self) -> tuple[Tensor, Tensor]:
        """The cached keys and values, length positions (views, not copies)."""
        if self.k is None:
            raise RuntimeError("KVCache.read on an empty cache")
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, heads, n, head_dim) after the cached positions; return all of them."""
        n = k.shape[2]
        self._reserve(k, self.length + n)
        self.k[:, :, self.length: self.length + n] = k
        self.v[:, :, self.length: self.length + n] = v
        self.length += n
        return self.read()

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding's rollback)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def write(self, k: Tensor, v: Tensor, positions: Tensor, end: int | None = None) -> tuple[Tensor, Tensor]:
        """Store k, v (B, heads, n, head_dim) at `positions`: (n,), or (B, n) when each sample writes
        elsewhere. Positions at or past the length extend the cache (to the largest one + 1), earlier
        ones are overwritten in place; returns all cached keys/values. With per-sample positions the
        samples advance at different speeds: read a sample's entries only up to its own position
        (a causal mask by absolute position does that). `end` (largest position + 1), when the caller
        knows it, spares reading the positions back from the device."""
        if end is None:
            end = self._check_range(positions, None)
        index = self._index(k, positions)
        self._reserve(k, end)
        self.length = max(self.length, end)
        keys, values = self.read()
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        return keys, values

    def substitute(self, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """All cached keys/values with those at `positions` (< length) replaced by k, v; the cache is not
        written (ReCAP's cheap step)."""
        self._check_range(positions, self.length)
        index = self._index(k, positions)
        keys, values = self.read()
        return keys.scatter(2, index, k), values.scatter(2, index, v)

    def reset(self) -> None:
        self.length = 0
        self.k = self.v = None

    @staticmethod
    def _check_range(positions: Tensor, limit: int | None) -> int:
        """Refuse negative positions (and any >= limit); return the largest + 1."""
        if not positions.numel():
            raise ValueError("positions is empty")
        low, end = int(positions.min()), int(positions.max()) + 1
        if low < 0 or (limit is not None and end > limit):
            bound = "inf" if limit is None else limit
            raise ValueError(f"positions must lie in [0, {bound}), got {low}..{end - 1}")
        return end

    @staticmethod
    def _index(k: Tensor, positions: Tensor) -> Tensor:
        """positions (n,) or (B, n) -> a scatter index shaped like k."""
        B, H, n, D = k.shape
        per_sample_ok = positions.ndim == 1 or positions.shape[0] == B
        if positions.ndim not in (1, 2) or positions.shape[-1] != n or not per_sample_ok:
            raise ValueError(f"positions must be (n,) or (B, n) with n = {n}, B = {B}; got {tuple(positions.shape)}")
        return positions.to(k.device).reshape(-1, 1, n, 1).expand(B, H, n, D)

    def _reserve(self, like: Tensor, needed: int) -> None:
        if self.k is not None and (self.k.shape[:2] != like.shape[:2] or self.k.shape[3] != like.shape[3]):
            raise ValueError(f"cache holds {tuple(self.k.shape)}, got keys of shape {tuple(like.shape)}")
        if self.k is not None and self.k.shape[2] >= needed:
            return
        capacity = max(needed, self.capacity_hint, 2 * (0 if self.k is None else self.k.shape[2]))
        shape = (*like.shape[:2], capacity, like.shape[3])
        k = like.new_zeros(shape)
        v = like.new_zeros(shape)
        if self.k is not None:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v


def causal_mask(query_positions: Tensor, key_length: int) -> Tensor:
    """(..., Lq, key_length) bool from query positions (..., Lq): the query at absolute position p
    may attend keys 0..p."""
    return torch.arange(key_length, device=query_positions.device) <= query_positions[..., None]


def block_causal_mask(block_lengths: list[int] | tuple[int, ...], device=None) -> Tensor:
    """(L, L) bool for blocks of the given lengths: a token attends its own block and all earlier ones
    (VAR's training mask, one block per scale)."""
    block = torch.repeat_interleave(torch.arange(len(block_lengths), device=device),
                                    torch.tensor(list(block_lengths), device=device))
    return block[None, :] <= block[:, None]


class Attention(nn.Module):
    """Multi-head self-attention; parameters `qkv` (fused projection) and `proj` (output)."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, proj_bias: bool = False,
                 qv_bias: bool = False, qk_norm: str | None = None, scale: float | None = None,
                 attn_dropout: float = 0.0, proj_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if qk_norm not in (None, "l2"):
            raise ValueError(f"qk_norm must be None or 'l2', got {qk_norm!r}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.qk_norm = qk_norm
        if qk_norm == "l2":
            self.log_head_scale = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
            self.max_log_head_scale = math.log(100.0)
            self.scale = 1.0 if scale is None else scale
        else:
            self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_dropout = nn.Dropout(proj_dropout)

    def project(self, x: Tensor, rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) -> q, k, v (B, heads, L, head_dim), normalised/rotated as configured."""
        B, L, _ = x.shape
        bias = self.qkv.bias
        if hasattr(self, "q_bias"):
            bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # (B, L, heads, head_dim)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "l2":
            q = F.normalize(q, dim=-1) * self.log_head_scale.clamp_max(self.max_log_head_scale).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x: Tensor, *, mask: Mask = None, rope: Tensor | None = None,
                cache: KVCache | None = None, positions: Tensor | None = None,
                update_cache: bool = True, positions_end: int | None = None) -> Tensor:
        """Attend from the tokens x (B, L, dim).

        cache None: x attends to itself. With a cache and no `positions`, x's keys/values come after
        the cached ones (appended unless update_cache=False). With `positions` (L,) or per sample
        (B, L), x are the tokens at those absolute positions: their keys/values are written there
        (`KVCache.write`, update_cache=True) or stand in for the cached ones during this call only
        (False; positions must be cached already), and they attend to every cached position.
        mask: None, "causal" (by absolute position), or a tensor broadcastable to (B, heads, L, keys).
        positions_end: max(positions) + 1 if known (see KVCache.write).
        """
        q, k, v = self.project(x, rope)
        L = x.shape[1]
        if cache is None:
            keys, values = k, v
            query_positions = None  # 0..L-1
        elif positions is None:
            query_positions = torch.arange(len(cache), len(cache) + L, device=x.device)
            if update_cache:
                keys, values = cache.append(k, v)
            elif len(cache):
                cached_k, cached_v = cache.read()
                keys, values = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
            else:
                keys, values = k, v
        else:
            query_positions = positions.to(x.device)
            if update_cache:
                keys, values = cache.write(k, v, query_positions, positions_end)
            else:
                keys, values = cache.substitute(k, v, query_positions)

        is_causal = False
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"mask must be None, 'causal' or a tensor, got {mask!r}")
            if query_positions is None:
                is_causal, mask = True, None
            else:
                mask = causal_mask(query_positions, keys.shape[2])
                mask = mask[:, None] if mask.ndim == 3 else mask  # per-sample positions: (B, 1, L, keys)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0, scale=self.scale,
        )
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(x.shape[0], L, self.dim)))
