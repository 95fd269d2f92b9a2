"""Latent quantization (QLAE): a learnable scalar codebook per latent dimension.

Follows kylehkhsu/latent_quantization (``disentangle/latents/quantized.py`` and
``disentangle/models/quantized_ae.py``, JAX):

- latent ``j`` has its own values, initialised ``linspace(-0.5, 0.5, n_v)`` (``n_v = 10``);
- each coordinate snaps to its nearest value, straight-through to the encoder;
- quantization loss ``mean((sg(z) - zq)**2)`` moves the *values*, commitment loss
  ``mean((z - sg(zq))**2)`` moves the *encoder*; both weighted 0.01 in the official configs;
- the decoder's gradient does not reach the values (the official ``z + sg(zq - z)``).

``ids`` are the per-dimension index of the nearest value, and :meth:`ids_to_latents` reads the
*current* values, so ids stay consistent however the values have moved.

Why not ``vector_quantize_pytorch.LatentQuantize``: its values never receive a gradient (both
of its losses are taken on the straight-through output, whose code part is detached), its
``codes_to_indices`` inverts the *initial* evenly spaced grid (so ids are wrong as soon as the
values move), it flattens all dimensions into one mixed-radix index, initialises even ``n_v``
off the official grid, and its in-place optimiser path is inconsistent with the default
``optimize_values=True``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import QuantizerOutput, straight_through


class ScalarQuantizer(nn.Module):
    """Per-dimension scalar codebooks with learnable values.

    Input ``(B, L, *spatial)`` (latent dimension second); ``ids`` have the same shape (int64,
    index of the chosen value of that dimension). ``values`` is ``(L, max n_v)``; dimensions
    with fewer values are padded and the padding is never selected.
    """

    def __init__(
        self,
        num_latents: int,
        num_values: int | Sequence[int] = 10,
        *,
        quantization_weight: float = 0.01,
        commitment_weight: float = 0.01,
        optimize_values: bool = True,
    ) -> None:
        super().__init__()
        counts = [int(num_values)] * num_latents if isinstance(num_values, int) else [int(n) for n in num_values]
        if len(counts) != num_latents or min(counts) < 1:
            raise ValueError(f"num_values must be an int or {num_latents} positive ints, got {num_values}")
        self.num_latents = num_latents
        self.num_values = counts
        self.quantization_weight = quantization_weight
        self.commitment_weight = commitment_weight
        width = max(counts)
        values = torch.zeros(num_latents, width)
        valid = torch.zeros(num_latents, width, dtype=torch.bool)
        for j, n in enumerate(counts):
            values[j, :n] = torch.linspace(-0.5, 0.5, n)
            valid[j, :n] = True
        self.values = nn.Parameter(values, requires_grad=optimize_values)
        self.register_buffer("valid", valid, persistent=False)

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim < 2 or z.shape[1] != self.num_latents:
            raise ValueError(f"expected (B, {self.num_latents}, ...) input, got {tuple(z.shape)}")
        zl = z.movedim(1, -1)  # (..., L)
        with torch.no_grad():
            dist = (zl.unsqueeze(-1) - self.values).abs().masked_fill(~self.valid, float("inf"))
            ids = dist.argmin(-1)  # (..., L); ties -> lowest index, like jnp.argmin
        zq = self._lookup(ids)  # carries the gradient to the values
        quantization = (zl.detach() - zq).pow(2).mean()
        commitment = (zl - zq.detach()).pow(2).mean()
        losses = {
            "quantization": self.quantization_weight * quantization,
            "commitment": self.commitment_weight * commitment,
        }
        metrics = {"quantization": quantization.item(), "commitment": commitment.item()}
        with torch.no_grad():
            used = torch.zeros_like(self.values)
            used.scatter_(1, ids.reshape(-1, self.num_latents).T, 1.0)
            metrics["utilisation"] = (used.sum() / self.valid.sum()).item()
        quantized = straight_through(zq, zl).movedim(-1, 1)
        return QuantizerOutput(quantized, ids.movedim(-1, 1), losses, metrics)

    def _lookup(self, ids: Tensor) -> Tensor:
        """(..., L) ids -> (..., L) current values."""
        flat = ids.reshape(-1, self.num_latents)
        out = torch.gather(self.values.T, 0, flat)  # values.T: (n_v, L); out[i, j] = values[j, flat[i, j]]
        return out.reshape(ids.shape)

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """``(B, L, *spatial)`` ids -> the current values they index (same shape, float)."""
        if ids.ndim < 2 or ids.shape[1] != self.num_latents:
            raise ValueError(f"expected ids (B, {self.num_latents}, ...), got {tuple(ids.shape)}")
        return self._lookup(ids.long().movedim(1, -1)).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"num_latents={self.num_latents}, num_values={self.num_values}"
