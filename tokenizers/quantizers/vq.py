"""Nearest-neighbour vector quantization (VQ-VAE / VQGAN / SimVQ).

One module covers the usual variants:

- ``distance="l2"`` (squared Euclidean) or ``"cosine"`` (both ``z`` and the codes are
  l2-normalised before the lookup and the output lies on the unit sphere, as in ViT-VQGAN);
- ``codebook="learned"``: codes are parameters trained by the codebook loss
  ``||sg(z) - e||^2`` while the encoder gets ``beta * ||z - sg(e)||^2`` (van den Oord et al.).
  Taming's legacy ``VectorQuantizer`` puts ``beta`` on the codebook term instead; Tessera
  does not reproduce that bug;
- ``codebook="ema"``: codes are buffers updated by exponential moving averages of the
  assigned vectors (decay 0.99) with Laplace smoothing of the cluster sizes (VQ-VAE-2 /
  Sonnet; the initialisation ``cluster_size = 1, embed_avg = embed`` is that of
  vector-quantize-pytorch). Only the commitment term is a loss;
- ``codebook="simvq"``: SimVQ (Zhu et al. 2024) -- a frozen random codebook ``C``
  (``randn / sqrt(dim)``) reparameterised by a learned linear map ``W``; lookups are against
  ``C W^T`` and the losses are those of the learned codebook (they train ``W``). This matches
  ``vector_quantize_pytorch.SimVQ(rotation_trick=False)``.

Dead-code restart (``dead_code_steps > 0``, learned/EMA codebooks): a code that no vector of
the last ``dead_code_steps`` training batches chose is replaced by a random vector of the
current batch (the EMA statistics restart at cluster size 1).

Metrics: ``utilisation`` (fraction of codes used in this batch), ``utilisation_recent``
(fraction used at least once in the last ``usage_window`` training steps), ``perplexity``
(exp of the entropy of the batch's code histogram).

In training mode the EMA update and dead-code restart happen *after* the lookup, so
``ids_to_latents(ids)`` reproduces ``quantized`` exactly for the codebook state at lookup time
(always, in eval mode).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import QuantizerOutput, straight_through


def _sum_over_processes(t: Tensor) -> Tensor:
    """All-reduce (sum) under torch.distributed, so codebook statistics are those of the global batch."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer.

    Input ``(B, dim, *spatial)`` when ``channel_first`` (default) else ``(..., dim)``; ``ids``
    drop the ``dim`` axis: ``(B, *spatial)`` or ``(...)``.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        distance: Literal["l2", "cosine"] = "l2",
        codebook: Literal["learned", "ema", "simvq"] = "learned",
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_steps: int = 0,
        usage_window: int = 100,
        channel_first: bool = True,
    ) -> None:
        super().__init__()
        if distance not in ("l2", "cosine"):
            raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")
        if codebook not in ("learned", "ema", "simvq"):
            raise ValueError(f"codebook must be 'learned', 'ema' or 'simvq', got {codebook!r}")
        if codebook == "simvq" and dead_code_steps > 0:
            raise ValueError("dead-code restart is not defined for SimVQ (its codes are C W^T, not free vectors)")
        self.codebook_size = codebook_size
        self.dim = dim
        self.distance = distance
        self.kind = codebook
        self.beta = beta
        self.decay = decay
        self.eps = eps
        self.dead_code_steps = dead_code_steps
        self.usage_window = usage_window
        self.channel_first = channel_first

        if codebook == "learned":
            self.embed = nn.Parameter(torch.randn(codebook_size, dim))
        elif codebook == "ema":
            embed = torch.randn(codebook_size, dim)
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)
            self.code_transform = nn.Linear(dim, dim, bias=False)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    # ------------------------------------------------------------------ codebook

    @property
    def codebook(self) -> Tensor:
        """The ``(codebook_size, dim)`` codes as looked up (normalised when cosine)."""
        e = self.code_transform(self.frozen_codebook) if self.kind == "simvq" else self.embed
        return F.normalize(e, dim=-1) if self.distance == "cosine" else e

    def ids_to_latents(self, ids: Tensor) -> Tensor:
        """ids -> codes, laid out like the input (``(B, dim, *spatial)`` when channel-first)."""
        codes = F.embedding(ids.long(), self.codebook)
        return codes.movedim(-1, 1) if self.channel_first else codes

    # ------------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> QuantizerOutput:
        x = z.movedim(1, -1) if self.channel_first else z
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected dim {self.dim} on axis {1 if self.channel_first else -1}, got {tuple(z.shape)}")
        if self.distance == "cosine":
            x = F.normalize(x, dim=-1)
        flat = x.reshape(-1, self.dim)
        codebook = self.codebook
        with torch.no_grad():
            dist = (
                flat.pow(2).sum(1, keepdim=True)
                - 2 * flat @ codebook.T
                + codebook.pow(2).sum(1)
            )
            ids = dist.argmin(1)
        code = F.embedding(ids, codebook)

        commitment = F.mse_loss(flat, code.detach())
        losses = {"commitment": self.beta * commitment}
        metrics = {"commitment": commitment.item()}
        if self.kind != "ema":
            codebook_loss = F.mse_loss(flat.detach(), code)
            losses["codebook"] = codebook_loss
            metrics["codebook"] = codebook_loss.item()

        counts = torch.bincount(ids, minlength=self.codebook_size)
        if self.training:
            counts = _sum_over_processes(counts)  # code usage of the global batch, the same on every rank
            with torch.no_grad():
                if self.kind == "ema":
                    self._ema_update(flat.detach(), ids, counts)
                self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
                if self.dead_code_steps > 0:
                    self._restart_dead_codes(flat.detach())
        with torch.no_grad():
            p = counts.float() / counts.sum().clamp(min=1)
            metrics["utilisation"] = (counts > 0).float().mean().item()
            metrics["utilisation_recent"] = (self.steps_unused < self.usage_window).float().mean().item()
            metrics["perplexity"] = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item()

        quantized = straight_through(code, flat).reshape(x.shape)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        return QuantizerOutput(quantized, ids.reshape(x.shape[:-1]), losses, metrics)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, ids: Tensor, counts: Tensor) -> None:
        """N <- g N + (1-g) n;  m <- g m + (1-g) sum z;  e = m / laplace(N)."""
        embed_sum = torch.zeros_like(self.embed_avg).index_add_(0, ids, flat.to(self.embed_avg.dtype))
        embed_sum = _sum_over_processes(embed_sum)
        self.cluster_size.mul_(self.decay).add_(counts.to(self.cluster_size.dtype), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor) -> None:
        dead = self.steps_unused >= self.dead_code_steps
        num_dead = int(dead.sum())
        if num_dead == 0 or flat.shape[0] == 0:
            return
        pick = torch.randint(flat.shape[0], (num_dead,), device=flat.device)
        new = flat[pick].to(self.embed.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, src=0)  # every rank revives the same codes with rank 0's vectors
        self.embed.data[dead] = new
        if self.kind == "ema":
            self.cluster_size[dead] = 1.0
            self.embed_avg[dead] = new
        self.steps_unused[dead] = 0

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, distance={self.distance!r}, "
            f"codebook={self.kind!r}, beta={self.beta}, dead_code_steps={self.dead_code_steps}"
        )
