"""ReCAP: masked generation made cheaper by reusing the context's keys and values
(liebenxj/ReCAP, `examples/MaskGIT+ReCAP/cache_decoding.py`; the MAR variant in
`examples/MAR+ReCAP/models/mar.py`).

Decoding steps are grouped. A group opens with a *full step*: every position runs through the
transformer and each layer's keys/values are cached; the positions the whole group will decode are
chosen there, ranked by that step's confidence, and the first step's share of them is decoded. Each
following *cheap step* of the group feeds only the group's positions (with what has been decoded
so far) and the condition tokens as queries through all layers; they attend to the cached
keys/values of every other position, which do not change within the group. A cheap step therefore
costs about (group + 1) / (N + 1) of a full step, and decodes the next share of the group from its
fresh logits (which share: `group_order`, below). `pre_full_iters` steps run as groups of one
full step first, then groups of one full step plus `num_cache_iters` cheap ones; with
`num_cache_iters = 0` every step is a full step and the decoding is the family's plain sampler.

The MaskGIT rule applied to groups (`sample_tokens`): a step decodes as many tokens as the mask
schedule (MaskGIT's cosine by default) unmasks there (`unmask_counts`); the full step samples every masked token, scores
it `log p(sampled) + choice_temperature (1 - (g + 1) / G) Gumbel` (g the group, G the number of
groups: ReCAP anneals the noise over full steps, which is MaskGIT's rule when every group is one
step) and keeps the most confident ones; a group of one step is exactly MaskGIT's step (with
`draw="maskgit"`; with `draw="recap"` the kept token is drawn again at the step's temperature, in a group of
one step too, as ReCAP's script draws `local_x` from the group's logits at `local_temp` in every group).

Which of the group's positions a cheap step decodes (`group_order`):

* "fixed" (the official code's): the next ones in the order the full step ranked them, sampled
  from the cheap step's logits and all kept;
* "confidence": every undecoded position of the group is sampled and the most confident samples
  are kept (MaskGIT's rule inside the group; the group's last step takes what is left). The set of
  positions is still fixed at the full step. It keeps MaskGIT's filtering of unlikely samples,
  which "fixed" gives up: on maskgit-mnist at 16 steps, cfg 2 and choice temperature 2 (its earlier
defaults), with 3 cheap steps per full step, FD 70.1
  and accuracy 0.986 against 86.2 and 0.942 for "fixed" (plain: 82.3 and 0.997; 1000 samples).
  With 1 cheap step the two are the same rule. On a model trained half as long, running full
  passes in place of the cheap steps (fresh keys/values, same groups, "fixed") did not help: FD
  253 against 250 with 1 cheap step, 403 against 368 with 3 (plain 146, 500 samples). The order
  rule, not the stale context, cost the quality there.

ReCAP's own MaskGIT runs decode with a recipe of their own (`draw="recap"`, `mask_schedule="recap"`,
a sampling temperature annealed from 1 to 0.65-0.75; see `generators.maskgit.samplers`). Ranking
positions on an untempered draw while keeping a tempered one is what makes the fixed order work: the
kept tokens no longer need MaskGIT's filtering of unlikely samples, because the low temperature has
already removed them. On maskgit-mnist (16 steps, 3 cheap steps per full step, 1000 samples against
the held-out digits, seeds 0-4) ReCAP with the recipe has the same mean FD as plain decoding by
MaskGIT's rule (48.1) at 1.99-2.28x its speed (README.md).

A model serves ReCAP by offering the `CachedMaskedModel` interface (MaskGIT does; MAR has its own
continuous variant, generators/mar/recap.py).
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import Tensor

from generators.base import SamplerOption
from generators.sampling import (MASK_SCHEDULES, annealed_temperature, maskgit_confidence, maskgit_mask_len,
                                 maskgit_mask_ratio, sample_categorical)
from vision.nn import KVCache
from vision.tokens import GenerationStats

GROUP_ORDERS = ("fixed", "confidence")
RECAP_OPTIONS = (
    SamplerOption("num_cache_iters", int, 1, "cheap steps after each full step (0 = plain decoding)", min=0),
    SamplerOption("pre_full_iters", int, 0, "full-only steps before the first cached group (at most --steps)", min=0),
    SamplerOption("group_order", str, "fixed", "which of a group's positions a cheap step decodes: the next ones "
                  "in the full step's confidence order (fixed, ReCAP's), or the most confident of its own samples "
                  "(confidence)", choices=GROUP_ORDERS),
)


class CachedMaskedModel(Protocol):
    """What ReCAP needs from a bidirectional masked generator."""

    mask_id: int
    seq_len: int

    def new_caches(self) -> list[KVCache]:
        """One empty cache per attention layer."""

    def forward_full(self, ids: Tensor, labels: Tensor, caches: list[KVCache]) -> Tensor:
        """Logits (B, N, vocab) of every position of `ids` (B, N); resets `caches` and writes every layer's
        keys/values into them."""

    def forward_cheap(self, positions: Tensor, ids: Tensor, labels: Tensor, caches: list[KVCache]) -> Tensor:
        """Logits (B, n, vocab) of the positions (B, n) holding `ids` (B, n), which (with the condition
        tokens) are the only queries; every other position's keys/values come from `caches`, unchanged."""


def check_recap_options(steps: int, pre_full_iters: int, num_cache_iters: int) -> None:
    """ValueError (one line) for options ReCAP cannot run with."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if num_cache_iters < 0:
        raise ValueError(f"--num-cache-iters must be >= 0, got {num_cache_iters}")
    if not 0 <= pre_full_iters <= steps:
        raise ValueError(f"--pre-full-iters must lie in [0, --steps = {steps}], got {pre_full_iters}")


def group_sizes(steps: int, pre_full_iters: int, num_cache_iters: int) -> list[int]:
    """Steps per group (1 full + the cheap ones), as the official code builds its local schedules:
    `pre_full_iters` groups of 1, then groups of 1 + num_cache_iters, the last one cut at `steps`."""
    check_recap_options(steps, pre_full_iters, num_cache_iters)
    sizes, done = [], 0
    while done < steps:
        size = 1 if done < pre_full_iters else min(1 + num_cache_iters, steps - done)
        sizes.append(size)
        done += size
    return sizes


def recap_counts(num_tokens: int, steps: int) -> list[int]:
    """ReCAP's `ntoken_schedule` (its MaskGIT script, from AutoNAT): the masked fraction before step t is
    1 - (t / T)^2.5; step t decodes floor(N r_t) - floor(N r_(t+1)) tokens (float64) and the last step
    the rest; a step that would decode none decodes one, taken from the last step (which can leave the
    last step with none, as in the official code)."""
    if steps > num_tokens:
        raise ValueError(f"--mask-schedule recap decodes at least one token a step: --steps must be at most "
                         f"{num_tokens}, got {steps}")
    # t * (1 / T), as numpy's linspace(0, 1, T + 1) computes it: t / T rounds differently now and then
    # (N = 243, T = 45, t = 20: 211 against the official 210 masked)
    masked = [math.floor((1.0 - (t * (1.0 / steps)) ** 2.5) * num_tokens) for t in range(steps)]
    counts = [a - b for a, b in zip(masked, masked[1:])]
    counts.append(num_tokens - sum(counts))
    for t in range(steps):  # as the official loop: the last entry, once reached, ends up 0 when it was 0
        if counts[t] == 0:
            counts[t] = 1
            counts[-1] -= 1
    if min(counts) < 0:
        raise ValueError(f"--mask-schedule recap cannot spread {num_tokens} tokens over {steps} steps")
    return counts


def unmask_counts(num_tokens: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens decoded at each step when all `num_tokens` start masked. schedule "recap": `recap_counts`;
    any schedule of `generators.sampling.maskgit_mask_len` (cosine, MaskGIT's, by default): unknown -
    mask_len, and everything left at the last step. (MAR's schedule is the cosine rule.)"""
    if schedule == "recap":
        return recap_counts(num_tokens, steps)
    try:
        maskgit_mask_ratio(torch.tensor(0.5), torch.tensor(float(num_tokens)), schedule)
    except ValueError:
        raise ValueError(f"unknown mask schedule {schedule!r}; use one of {', '.join(MASK_SCHEDULES)} or recap") from None
    counts, unknown = [], num_tokens
    for step in range(steps):
        if step == steps - 1 or unknown == 0:
            keep = unknown
        else:
            keep = unknown - int(maskgit_mask_len(num_tokens, unknown, step, steps, schedule))
        counts.append(keep)
        unknown -= keep
    return counts


ProbsFn = Callable[[Tensor, float], Tensor]
DRAWS = ("maskgit", "recap")


def score_positions(probs: ProbsFn, logits: Tensor, temperature: float, draw: str,
                    generator: torch.Generator) -> tuple[Tensor | None, Tensor]:
    """What ranks each position of `logits`: (the sample it keeps or None, the log-probability it is ranked by).

    draw "maskgit": a sample drawn at `temperature`, scored by its own log-probability (MaskGIT's `decode`).
    draw "recap" (ReCAP's scripts): the log-probability of a draw at temperature 1; the position keeps another
    draw, made at `temperature` once it is chosen (`draw_kept`), so a low sampling temperature sharpens the
    tokens without changing which positions are confident. None then: only chosen positions draw again."""
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
    p = probs(logits, temperature if draw == "maskgit" else 1.0)
    drawn = sample_categorical(p, generator)[..., 0]
    log_p = torch.log(p.gather(-1, drawn[..., None])[..., 0])
    return (drawn if draw == "maskgit" else None), log_p


def draw_kept(probs: ProbsFn, logits: Tensor, positions: Tensor, temperature: float,
              generator: torch.Generator) -> Tensor:
    """Draw recap's kept tokens at `positions` (B, n) of `logits` (repeat * B, N, V) at `temperature`."""
    repeat = len(logits) // len(positions)
    rows = logits.gather(1, positions.repeat(repeat, 1)[..., None].expand(-1, -1, logits.shape[-1]))
    return sample_categorical(probs(rows, temperature), generator)[..., 0]


def sample_tokens(model: CachedMaskedModel, labels: Tensor, *, batch_size: int, steps: int,
                  choice_temperature: float, num_cache_iters: int, pre_full_iters: int, probs: ProbsFn,
                  generator: torch.Generator, stats: GenerationStats, group_order: str = "fixed",
                  temperature: float = 1.0, final_temperature: float | None = None,
                  mask_schedule: str = "cosine", draw: str = "maskgit") -> Tensor:
    """Discrete ReCAP decoding; returns the token ids (batch_size, N).

    `labels` is the condition batch the model runs on: batch_size rows, or a multiple (guidance runs
    [cond; uncond]); the ids are repeated to match. `probs(logits, temperature)` turns the model's logits
    of that batch into the batch_size rows of processed probabilities (guidance, temperature, top-k,
    top-p). Step s (full or cheap) samples at `annealed_temperature(temperature, final_temperature, s,
    steps)`; `mask_schedule` says how many tokens each step decodes (`unmask_counts`); `draw` which
    sample a position keeps and what ranks it (`score_positions`); `group_order` (see GROUP_ORDERS) which
    of the group's positions a cheap step decodes.
    The random draws, in order: at a full step `score_positions`'s draw at every position (as MaskGIT
    draws), the confidence noise, then (draw "recap") one draw per position decoded; at a cheap step one
    draw per position it decodes ("fixed"), or `score_positions`'s draws, the noise and (recap) the kept
    draws ("confidence", except at the group's last step, which takes everything left).
    """
    if group_order not in GROUP_ORDERS:
        raise ValueError(f"group_order must be one of {', '.join(GROUP_ORDERS)}, got {group_order!r}")
    N, mask_id = model.seq_len, model.mask_id
    repeat = len(labels) // batch_size
    counts = unmask_counts(N, steps, mask_schedule)
    temps = [annealed_temperature(temperature, final_temperature, s, steps) for s in range(steps)]
    groups = group_sizes(steps, pre_full_iters, num_cache_iters)
    device = labels.device
    ids = torch.full((batch_size, N), mask_id, dtype=torch.long, device=device)
    caches = model.new_caches()
    step = 0
    for g, size in enumerate(groups):
        logits = model.forward_full(ids.repeat(repeat, 1), labels, caches)
        stats.nfe += 1
        unknown = ids == mask_id
        drawn, log_p = score_positions(probs, logits, temps[step], draw, generator)
        confidence = maskgit_confidence(log_p, ~unknown, choice_temperature=choice_temperature, step=g,
                                        num_steps=len(groups), generator=generator)
        confidence = confidence.masked_fill(~unknown, -math.inf)  # rank the unknown positions only
        group_end = sum(counts[step: step + size])
        # the group's positions, most confident first; order[:, :done] are the decoded ones
        order = confidence.argsort(dim=-1, descending=True, stable=True)[:, :group_end]
        first = order[:, : counts[step]]
        kept = drawn.gather(1, first) if drawn is not None else draw_kept(probs, logits, first, temps[step], generator)
        ids.scatter_(1, first, kept)
        done, step = counts[step], step + 1
        for j in range(1, size):
            logits = model.forward_cheap(order.repeat(repeat, 1), ids.gather(1, order).repeat(repeat, 1),
                                         labels, caches)
            stats.nfe += 1
            n = counts[step]
            if group_order == "fixed" or j == size - 1:  # the next n in the full step's order
                if n:  # 0 only when there are more steps than tokens
                    drawn = sample_categorical(probs(logits[:, done: done + n], temps[step]), generator)[..., 0]
                    ids.scatter_(1, order[:, done: done + n], drawn)
            else:  # sample every undecoded position of the group, keep the n most confident
                rest = logits[:, done:]
                drawn, log_p = score_positions(probs, rest, temps[step], draw, generator)
                confidence = maskgit_confidence(log_p, torch.zeros_like(log_p, dtype=torch.bool),
                                                choice_temperature=choice_temperature, step=g,
                                                num_steps=len(groups), generator=generator)
                rank = confidence.argsort(dim=-1, descending=True, stable=True)
                order[:, done:] = order[:, done:].gather(1, rank)
                top = rank[:, :n]
                kept = drawn.gather(1, top) if drawn is not None else draw_kept(probs, rest, top, temps[step], generator)
                ids.scatter_(1, order[:, done: done + n], kept)
            done, step = done + n, step + 1
    return ids
