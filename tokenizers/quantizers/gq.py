"""Group-wise lookup-free quantization (GQ), as in WeTok.

WeTok (zhuangshaobin/WeTok, ``src/WeTok/modules/vqvae/lookup_free_quantize.py::GFQ``) splits the
``G * d`` latent channels into ``G`` groups of ``d`` *adjacent* channels
(``b n (c d) -> b n c d``), binarises every channel with ``sign`` (values ±1, straight-through
gradient) and reads each group as a ``d``-bit sub-code whose bit ``j`` is channel ``j`` of the
group: ``id = sum((q > 0) * 2**arange(d))``. A position therefore carries ``G`` sub-codes of
``2**d`` values each, i.e. an implicit vocabulary of ``2**(G*d)`` that is never materialised.

The auxiliary entropy loss (MAGVIT-v2 / Open-MAGVIT2, as WeTok computes it) uses logits
``2 * x . c`` against the ``2**d`` sub-codes ``c`` of one group, at temperature 0.01::

    loss = mean_n H(softmax(logits_n / T)) - H(mean_n softmax(logits_n / T))

so the largest tensor is ``(B * N * G, 2**d)``. Two readings of the codebook term exist:

- ``codebook_entropy="pooled"`` (WeTok, the default): the average distribution pools every
  position *and every group* into one ``2**d`` distribution. Estimators as WeTok's
  ``entropy_loss``: per-sample entropy exact (``log_softmax``), codebook entropy
  ``-sum p log(p + 1e-5)``.
- ``codebook_entropy="per_group"`` (vector-quantize-pytorch ``LFQ(num_codebooks=G)``): one
  average distribution per group, entropies averaged over groups; estimators as LFQ's
  ``entropy``: ``-sum p log(max(p, 1e-5))`` for both terms.

Each mode thus reproduces its reference's numbers, not just its pooling: the two ``eps``
conventions differ by about ``2**d * 1e-5`` (0.0026 at d = 8) in the codebook entropy.

Defaults follow WeTok's configs: 4 groups of 8 bits (``n_embed: 256, num_codebooks: 4``), loss
weights entropy 0.1 (``codebook_weight``) and commitment 0.25 (``commit_weight``); the
commitment term is ``MSE(x, sg(q))``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.nn.distributed import global_mean, world_size

from . import QuantizerOutput, straight_through


class GroupQuantizer(nn.Module):
    """WeTok's group-wise lookup-free quantizer.

    Input ``(B, G*d, *spatial)`` (channel-first); ``ids`` are ``(B, G, *spatial)`` int64 in
    ``[0, 2**d)``, matching ``TokenSpec(groups=G, vocab_size=2**d)``. (WeTok itself flattens
    its ids as ``b h w g``; Tessera keeps the group axis second.)
    """

    def __init__(
        self,
        groups: int = 4,
        bits: int = 8,
        *,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        codebook_entropy: Literal["pooled", "per_group"] = "pooled",
        temperature: float = 0.01,
        sample_minimization_weight: float = 1.0,
        batch_maximization_weight: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if codebook_entropy not in ("pooled", "per_group"):
            raise ValueError(f"codebook_entropy must be 'pooled' or 'per_group', got {codebook_entropy!r}")
        if not 1 <= bits <= 16:
            raise ValueError(f"bits per group must be in [1, 16] (the entropy needs 2**bits logits), got {bits}")
        self.groups = groups
        self.bits = bits
        self.entropy_weight = entropy_weight
        self.commitment_weight = commitment_weight
        self.codebook_entropy = codebook_entropy
        self.temperature = temperature
        self.sample_minimization_weight = sample_minimization_weight
        self.batch_maximization_weight = batch_maximization_weight
        self.eps = eps
        self.register_buffer("bit_values", 2 ** torch.arange(bits), persistent=False)
        # all 2**d sub-codes of one group, bit j = channel j, values +-1: (2**d, d)
        all_ids = torch.arange(2**bits)
        self.register_buffer("codebook", self._ids_to_codes(all_ids, bits).float(), persistent=False)

    @property
    def dim(self) -> int:
        return self.groups * self.bits

    @property
    def codebook_size(self) -> int:
        """Sub-codes per group (the ``vocab_size`` of the token spec)."""
        return 2**self.bits

    @staticmethod
    def _ids_to_codes(ids: Tensor, bits: int) -> Tensor:
        shifts = torch.arange(bits, device=ids.device)
        return ((ids.unsqueeze(-1) >> shifts) & 1) * 2 - 1

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim < 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}, ...) channel-first input, got {tuple(z.shape)}")
        b, spatial = z.shape[0], z.shape[2:]
        x = z.movedim(1, -1).reshape(b, -1, self.groups, self.bits)  # b n c d
        positive = x > 0
        code = positive.to(x.dtype) * 2 - 1
        ids = (positive.long() * self.bit_values).sum(-1)  # b n c

        commitment = F.mse_loss(x, code.detach())
        losses = {"commitment": self.commitment_weight * commitment}
        metrics = {"commitment": commitment.item()}
        if self.training:
            per_sample, codebook = self.entropy_terms(x)
            entropy = self.sample_minimization_weight * per_sample - self.batch_maximization_weight * codebook
            losses["entropy"] = self.entropy_weight * entropy
            metrics.update(per_sample_entropy=per_sample.item(), codebook_entropy=codebook.item())
        with torch.no_grad():
            used = torch.zeros(self.groups, self.codebook_size, device=z.device)
            used.scatter_(1, ids.reshape(-1, self.groups).T, 1.0)
            if self.training and world_size() > 1:  # codes used anywhere in the global batch
                torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
            metrics["utilisation"] = used.mean().item()

        quantized = straight_through(code, x).reshape(b, -1, self.dim).movedim(-1, 1).reshape(z.shape)
        ids = ids.movedim(-1, 1).reshape(b, self.groups, *spatial)
        return QuantizerOutput(quantized, ids, losses, metrics)

    def entropy_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample entropy, codebook entropy) of ``x`` shaped ``(..., G, d)``.

        Only ``(..., G, 2**d)`` logits are formed, never the ``2**(G*d)`` joint codebook. Under
        torch.distributed the average distribution is that of the global batch (WeTok's code takes
        each process's own), so N processes train what one process would on the whole batch.
        """
        logits = 2 * x.float() @ self.codebook.T / self.temperature  # (..., G, 2**d)
        probs = logits.softmax(-1)
        if self.codebook_entropy == "pooled":  # WeTok entropy_loss
            per_sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
            avg = global_mean(probs.reshape(-1, self.codebook_size))  # all groups in one distribution
            codebook = -(avg * torch.log(avg + self.eps)).sum()
        else:  # vector-quantize-pytorch LFQ
            per_sample = -(probs * probs.clamp(min=self.eps).log()).sum(-1).mean()
            avg = global_mean(probs.reshape(-1, self.groups, self.codebook_size))
            codebook = -(avg * avg.clamp(min=self.eps).log()).sum(-1).mean()
        return per_sample, codebook

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """``(B, G, *spatial)`` ids -> ``(B, G*d, *spatial)`` ±1 latents, exactly ``forward``'s values."""
        if ids.ndim < 2 or ids.shape[1] != self.groups:
            raise ValueError(f"expected ids (B, {self.groups}, ...), got {tuple(ids.shape)}")
        code = self._ids_to_codes(ids.long(), self.bits).to(self.codebook.dtype)  # b c *s d
        code = code.movedim(-1, 2)  # b c d *s
        return code.reshape(ids.shape[0], self.dim, *ids.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, bits={self.bits}, codebook_entropy={self.codebook_entropy!r}, "
            f"entropy_weight={self.entropy_weight}, commitment_weight={self.commitment_weight}"
        )
