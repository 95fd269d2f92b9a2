"""MaskGIT's samplers: `plain`, google-research/maskgit's `libml/parallel_decode.py` `decode`, and `recap`.

plain, step t of T (0-based), every masked position:
  1. logits of the current grid (guided `uncond + (cond - uncond) * cfg` when cfg != 1, the batch
     running as [cond; null class]), then temperature, top-k, top-p (`generators.sampling.probabilities`;
     at the defaults this is MaskGIT's softmax of the logits);
  2. one categorical draw at every position, kept only where the token is masked;
  3. confidence = log p(sampled) + choice_temperature (1 - (t + 1) / T) Gumbel, +inf where known
     (`maskgit_confidence`);
  4. mask_len = floor(N cos(pi/2 (t + 1) / T)) clamped to [1, unknown - 1] (`maskgit_mask_len`), and
     the mask_len least confident tokens are masked again (`mask_lowest_confidence`); the last step
     keeps every sample.

Defaults: 16 steps (the number of iterations of MaskGIT's class-conditional ImageNet generator,
`inference.py`; `decode` itself defaults to 12 and the paper uses 8 at 256 px), choice temperature
4.5 (MaskGIT's class-conditional config) and no guidance, unless the model's config says otherwise
(`default_cfg`, `default_choice_temperature`: maskgit-mnist samples with 2 and 2). ReCAP's own runs
of the U-ViT checkpoint use choice temperature 5.5 and a sampling temperature of 0.65-0.75.

recap: `generators.recap.sample_tokens` on this model; with --num-cache-iters 0 it is plain, draw for
draw (as long as no two confidences tie, which Gumbel noise makes a probability-0 event).

Both samplers also run the recipe of ReCAP's MaskGIT scripts (liebenxj/ReCAP,
`examples/MaskGIT+ReCAP/cache_decoding.py`), which differs from MaskGIT's `decode` in three places:
`--mask-schedule recap` (how many tokens each step decodes: 1 - (t/T)^2.5, counted their way),
`--draw recap` (a position is ranked on one draw at temperature 1 and keeps a second draw at the step's
temperature) and `--final-temperature` (the sampling temperature annealed from --temperature to it,
`generators.sampling.annealed_temperature`). Their runs: `--choice-temperature 5.5 --final-temperature
0.65` at 16 steps (0.72 at 24, 0.75 at 32), no guidance.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from generators.base import SamplerOption, register_sampler
from generators.maskgit.model import MaskGIT
from generators.recap import DRAWS, RECAP_OPTIONS, draw_kept, sample_tokens, score_positions, unmask_counts
from generators.sampling import (annealed_temperature, cfg_llamagen, mask_lowest_confidence, maskgit_confidence,
                                 maskgit_mask_len, probabilities)
from vision.tokens import GenerationStats, Tokens

MASKGIT_OPTIONS = (
    SamplerOption("steps", int, 16, "decoding steps (MaskGIT's class-conditional generator uses 16)", min=1),
    SamplerOption("choice_temperature", float, 4.5, "Gumbel noise on the confidence, annealed linearly to 0",
                  min=0.0),
    SamplerOption("mask_schedule", str, "cosine", "how many tokens each step decodes: cosine (MaskGIT), uniform, "
                  "pow<e> (1 - r^e), log, exp, or recap (ReCAP's scripts: pow2.5 counted their way)"),
    SamplerOption("final_temperature", float, None, "anneal the sampling temperature from --temperature at the "
                  "first step to this at the last (ReCAP's scripts: 1 -> 0.65-0.75); default: constant", min=0.0),
    SamplerOption("draw", str, "maskgit", "which sample a position keeps: maskgit (the one its confidence scores) "
                  "or recap (ReCAP's scripts: scored on a draw at temperature 1, keeps one at the step's "
                  "temperature)", choices=DRAWS),
)


def guided_probabilities(logits: Tensor, *, cfg: float, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The processed distribution of the sampled rows: logits of [cond; uncond] guided when cfg != 1."""
    if cfg != 1.0:
        cond, uncond = logits.chunk(2, dim=0)
        logits = cfg_llamagen(cond, uncond, cfg)
    return probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)


@register_sampler(MaskGIT, "plain", options=MASKGIT_OPTIONS,
                  help="MaskGIT's parallel decoding: sample every masked token, re-mask the least confident")
def sample_plain(model: MaskGIT, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                 batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float, steps: int,
                 choice_temperature: float, mask_schedule: str, final_temperature: float | None,
                 draw: str) -> Tokens:
    guided = cfg != 1.0
    cond = model.condition_labels(labels, batch_size, guided)
    N = model.seq_len
    counts = unmask_counts(N, steps, mask_schedule) if mask_schedule == "recap" else None

    def probs(logits: Tensor, t: float) -> Tensor:
        return guided_probabilities(logits, cfg=cfg, temperature=t, top_k=top_k, top_p=top_p)

    ids = torch.full((batch_size, N), model.mask_id, dtype=torch.long, device=cond.device)
    for step in range(steps):
        logits = model(ids.repeat(2 if guided else 1, 1), cond)
        stats.nfe += 1
        t = annealed_temperature(temperature, final_temperature, step, steps)
        unknown = ids == model.mask_id
        drawn, log_p = score_positions(probs, logits, t, draw, generator)
        confidence = maskgit_confidence(log_p, ~unknown, choice_temperature=choice_temperature, step=step,
                                        num_steps=steps, generator=generator)
        if step == steps - 1:
            mask_len = torch.zeros((), dtype=torch.long)  # MaskGIT returns the last step's samples
        elif counts is None:
            mask_len = maskgit_mask_len(N, unknown.sum(-1), step, steps, mask_schedule)
        else:  # ReCAP's counts: what is still masked after this step
            mask_len = torch.tensor(N - sum(counts[: step + 1]))
        if drawn is not None:  # MaskGIT's rule: keep the samples, mask the least confident again
            ids = torch.where(mask_lowest_confidence(confidence, mask_len), model.mask_id,
                              torch.where(unknown, drawn, ids))
            continue
        # recap's draw: the most confident unknown positions, as many as every row decodes, draw their tokens
        n = int(unknown[0].sum()) - int(mask_len.reshape(-1)[0])
        chosen = confidence.masked_fill(~unknown, -math.inf).argsort(dim=-1, descending=True, stable=True)[:, :n]
        ids = ids.scatter(1, chosen, draw_kept(probs, logits, chosen, t, generator))
    return Tokens(model.spec, ids=ids.view(batch_size, *model.spec.grid))


@register_sampler(MaskGIT, "recap", options=MASKGIT_OPTIONS + RECAP_OPTIONS,
                  help="ReCAP: full steps cache every layer's keys/values, cheap steps recompute only the "
                       "positions being decoded")
def sample_recap(model: MaskGIT, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                 batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float, steps: int,
                 choice_temperature: float, mask_schedule: str, final_temperature: float | None, draw: str,
                 num_cache_iters: int, pre_full_iters: int, group_order: str) -> Tokens:
    cond = model.condition_labels(labels, batch_size, cfg != 1.0)

    def probs(logits: Tensor, t: float) -> Tensor:
        return guided_probabilities(logits, cfg=cfg, temperature=t, top_k=top_k, top_p=top_p)

    ids = sample_tokens(model, cond, batch_size=batch_size, steps=steps, choice_temperature=choice_temperature,
                        num_cache_iters=num_cache_iters, pre_full_iters=pre_full_iters, probs=probs,
                        generator=generator, stats=stats, group_order=group_order, temperature=temperature,
                        final_temperature=final_temperature, mask_schedule=mask_schedule, draw=draw)
    return Tokens(model.spec, ids=ids.view(batch_size, *model.spec.grid))
