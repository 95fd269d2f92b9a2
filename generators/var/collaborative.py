"""Collaborative Decoding (CoDe) for VAR (Chen, Ma, Fang & Wang, CVPR 2025, "Collaborative Decoding Makes
Visual Auto-Regressive Modeling Efficient"; github.com/czg1225/CoDe, `models/var.py`:
`autoregressive_infer_cfg_draft` and `autoregressive_infer_cfg_refine`, called by `infer_CoDe.py`).

A large VAR (the drafter) generates the first N scales, where the image's content is decided and the token
maps are small; a small VAR (the refiner) generates the remaining large scales, which only add detail:

* the drafter runs scales 0..N-1 on its own KV cache (plain.py's steps) and hands over f_hat and its
  next-scale inputs of scales 1..N;
* the refiner rebuilds the prefix in one block-causal pass over scales 0..N (class embedding, then the
  drafter's next-scale inputs), filling its own cache; the last pn_N^2 logits give scale N; then it continues
  scale by scale on its cache to the end.

Both use the same guidance ramp, filtering and temperature as plain sampling, and the one torch.Generator
continues from the drafter to the refiner. (The official refiner re-seeds its generator and draws -- and
discards -- a sample for every prefix scale before drawing scale N, which leaves its generator where the
drafter's was: `torch.multinomial` consumes random numbers by shape only. One stream is the same thing,
except with `more_smooth`, where the official refiner does not re-draw the drafter's Gumbel noise.) So CoDe
with N = K is the drafter's plain sampling, and with the drafter as its own refiner it is plain sampling for
any N (up to float rounding of the one-pass prefix).

The drafter's passes count in `GenerationStats.nfe`, the refiner's in `refiner_nfe` (N and K - N);
`per_model_time_s` holds each model's share of the wall time and, on CUDA, `per_model_peak_memory_mb` the
peak while the drafter ran and overall. The specialised fine-tuning of the paper (each model on its own
scales, the refiner distilled from the drafter with KL T^2 and CE, alpha 0.5) runs through
`apps.train_generator --train-scales A:B --teacher MODEL`.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from generators.base import SamplerOption, register_sampler
from generators.var.model import VAR
from generators.var.plain import (MORE_SMOOTH, SCALE_TEMPERATURE, finish, new_state, prefill, run_scales,
                                  sample_scale, sampling_labels, scale_temperatures)
from vision.tokens import GenerationStats, Tokens

REFINER = SamplerOption("refiner", "model", None, "the small VAR that generates the last scales (same VQVAE)")
DRAFT_STEPS = SamplerOption("draft_steps", int, None, "scales the drafter generates, N in 1..K (default K - 2, "
                            "CoDe's 8 of 10)", min=1)


def check_pair(drafter: VAR, refiner, draft_steps: int | None) -> int:
    """Refuse a refiner that cannot continue the drafter's tokens, or N outside 1..K; return N."""
    if refiner is None:
        raise ValueError("--sampler code needs --refiner MODEL (a smaller VAR on the same VQVAE)")
    if not isinstance(refiner, VAR):
        raise ValueError(f"the refiner must be a VAR model, got {type(refiner).__name__}")
    a, b = drafter.config, refiner.config
    if a.tokenizer is not None and b.tokenizer is not None and a.tokenizer != b.tokenizer:
        raise ValueError(f"the refiner speaks tokenizer {b.tokenizer}, the drafter {a.tokenizer}: "
                         "they must share a VQVAE")
    if refiner.spec != drafter.spec or a.cvae != b.cvae:
        raise ValueError(f"the refiner's tokens (vocabulary {b.vocab_size}, code width {b.cvae}, scales "
                         f"{b.patch_nums}) differ from the drafter's ({a.vocab_size}, {a.cvae}, {a.patch_nums}): "
                         "they must share a VQVAE")
    if refiner.num_classes != drafter.num_classes:
        raise ValueError(f"the refiner has {refiner.num_classes} classes, the drafter {drafter.num_classes}")
    K = drafter.num_scales
    n = K - 2 if draft_steps is None else int(draft_steps)
    if not 1 <= n <= K:
        raise ValueError(f"--draft-steps must lie in 1..{K} (the model has {K} scales), got {n}")
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@register_sampler(VAR, "code", options=(REFINER, DRAFT_STEPS, SCALE_TEMPERATURE, MORE_SMOOTH),
                  help="CoDe: this model drafts the first N scales, --refiner generates the rest")
def sample_code(model: VAR, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float, refiner=None,
                draft_steps: int | None = None, scale_temperature: str | None = None,
                more_smooth: int = 0) -> Tokens:
    n = check_pair(model, refiner, draft_steps)
    K = model.num_scales
    temps = scale_temperatures(scale_temperature, temperature, K)
    if "_bound_tokenizer" not in refiner.__dict__:
        refiner.bind_tokenizer(model.tokenizer)
    smooth = bool(more_smooth)
    options = dict(generator=generator, stats=stats, cfg=cfg, temperature=temps, top_k=top_k, top_p=top_p,
                   more_smooth=smooth)
    device = model.pos_1LC.device
    was_training = refiner.training
    refiner.eval()
    try:
        t0 = time.perf_counter()
        draft = new_state(model, sampling_labels(model, labels, batch_size, generator), cfg, scales=n)
        run_scales(model, draft, n, **options)
        _sync(device)
        t1 = time.perf_counter()
        stats.per_model_time_s["drafter"] = t1 - t0
        if device.type == "cuda":
            stats.per_model_peak_memory_mb["drafter"] = torch.cuda.max_memory_allocated(device) / 2**20
        if n == K:
            return finish(model, draft, smooth)
        draft.caches = []  # the drafter's cache is not needed any more
        state = new_state(refiner, draft.labels, cfg)
        state.f_hat, state.next_input, state.done = draft.f_hat, draft.next_input, n
        state.scale_ids, state.inputs = list(draft.scale_ids), list(draft.inputs)
        logits = prefill(refiner, state, draft.inputs)
        stats.refiner_nfe += 1
        sample_scale(refiner, state, n, logits, generator=generator, cfg=cfg, temperature=temps, top_k=top_k,
                     top_p=top_p, more_smooth=smooth)
        run_scales(refiner, state, K, count="refiner_nfe", **options)
        _sync(device)
        stats.per_model_time_s["refiner"] = time.perf_counter() - t1
        if device.type == "cuda":
            stats.per_model_peak_memory_mb["overall"] = torch.cuda.max_memory_allocated(device) / 2**20
        return finish(refiner, state, smooth)
    finally:
        refiner.train(was_training)
