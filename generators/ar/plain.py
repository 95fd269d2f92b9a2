"""LlamaGen's plain sampler: one token per forward pass, on the KV cache.

As `autoregressive/models/generate.py` does it: with cfg > 1 the batch is [cond; null class] and
the logits are guided `uncond + (cond - uncond) * cfg` (cfg <= 1 samples the conditional model
alone); then temperature, top-k, top-p and softmax (`generators.sampling.probabilities`), and one
categorical draw per sample from the given torch.Generator. The first pass reads the class
position (prefill), each later pass the token just drawn.
"""
from __future__ import annotations

import torch
from torch import Tensor

from generators.ar.model import LlamaGenGPT
from generators.base import register_sampler
from generators.sampling import cfg_llamagen, probabilities, sample_categorical
from vision.tokens import GenerationStats, Tokens


def guided_probabilities(logits: Tensor, *, cfg: float, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The processed next-token distribution p from logits (B or 2B, ..., vocab): guided when cfg > 1
    (the batch is [cond; uncond]), then temperature, top-k, top-p. Every AR sampler uses this one p."""
    if cfg > 1.0:
        cond, uncond = logits.chunk(2, dim=0)
        logits = cfg_llamagen(cond, uncond, cfg)
    return probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)


@register_sampler(LlamaGenGPT, "plain", help="one token per forward pass (LlamaGen's sampler)")
def sample_plain(model: LlamaGenGPT, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                 batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float) -> Tokens:
    guided = cfg > 1.0
    cond = model.condition_labels(labels, batch_size, guided)
    repeat = 2 if guided else 1
    caches = model.new_caches()
    device = cond.device
    ids = torch.empty(batch_size, model.seq_len, dtype=torch.long, device=device)
    h = model.class_embed(cond)[:, None]
    for t in range(model.seq_len):
        logits = model.run(h, torch.arange(t, t + 1, device=device), caches, end=t + 1)
        stats.nfe += 1
        p = guided_probabilities(logits[:, -1], cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p)
        ids[:, t] = sample_categorical(p, generator)[:, 0]
        h = model.token_embed(ids[:, t: t + 1].repeat(repeat, 1))
    return Tokens(model.spec, ids=ids.view(batch_size, *model.spec.grid))
