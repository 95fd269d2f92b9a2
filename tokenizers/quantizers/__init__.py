"""Quantizers: the bottlenecks that turn continuous latents into discrete ids.

Every quantizer is an ``nn.Module`` whose ``forward(z)`` returns a :class:`QuantizerOutput`
and whose ``ids_to_latents(ids)`` maps ids back to exactly the values that ``forward``
produced (``out.quantized`` equals ``ids_to_latents(out.ids)`` bit for bit).

- :class:`GroupQuantizer` (gq.py): WeTok's group-wise lookup-free quantization (GFQ).
- :class:`VectorQuantizer` (vq.py): nearest-neighbour VQ, L2 or cosine, EMA or learned
  codebook, dead-code restart, and the SimVQ reparameterisation.
- :class:`ScalarQuantizer` (scalar.py): QLAE's per-dimension learnable scalar codebooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class QuantizerOutput:
    """What every quantizer's forward returns.

    quantized: the quantized latents, same shape as the input; the forward value is exactly the
        code (``ids_to_latents(ids)``) and the gradient flows straight through to the input.
    ids: int64 code indices (layout documented by each quantizer).
    losses: the *weighted* auxiliary terms to add to the training loss (``sum(losses.values())``
        is the quantizer's contribution; see :attr:`loss`).
    metrics: detached floats for logging (unweighted loss terms, utilisation, perplexity...).
    """

    quantized: Tensor
    ids: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses (a zero scalar if there are none)."""
        if not self.losses:
            return self.quantized.new_zeros(())
        return torch.stack([v.to(self.quantized.dtype) for v in self.losses.values()]).sum()


def straight_through(code: Tensor, z: Tensor) -> Tensor:
    """Return ``code`` in the forward pass with the identity gradient to ``z`` (and none to ``code``).

    Same gradients as the usual ``z + sg(code - z)``, but written as ``sg(code) + (z - sg(z))``
    so that the forward value is *exactly* ``code`` (the usual form can be off by one ulp),
    which is what makes ``ids_to_latents(ids) == quantized`` an exact identity.
    """
    return code.detach() + (z - z.detach())


from .gq import GroupQuantizer  # noqa: E402
from .scalar import ScalarQuantizer  # noqa: E402
from .vq import VectorQuantizer  # noqa: E402

__all__ = ["QuantizerOutput", "straight_through", "GroupQuantizer", "VectorQuantizer", "ScalarQuantizer"]
