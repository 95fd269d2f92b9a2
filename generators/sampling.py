"""The one sampling toolkit shared by every generator family.

Each rule follows the official code of the family that uses it:

* temperature, top-k, top-p and classifier-free guidance as LlamaGen samples them
  (FoundationVision/LlamaGen, `autoregressive/models/generate.py`: `top_k_top_p_filtering`,
  `sample`, `logits_to_probs`, CFG in `decode_one_token`);
* VAR's top-p, its CFG ramp and its `more_smooth` Gumbel-softmax (FoundationVision/VAR,
  `models/helpers.py`: `sample_with_top_k_top_p_`, `gumbel_softmax_with_rng`; `models/var.py`:
  `autoregressive_infer_cfg`);
* MaskGIT's mask schedule and noisy confidence (google-research/maskgit, `libml/mask_schedule.py`
  and `libml/parallel_decode.py`: `decode`, `mask_by_random_topk`);
* the residual distribution of speculative sampling (Leviathan et al. 2023; Chen et al. 2023),
  as speculative Jacobi decoding resamples after a rejection
  (tyshiwo1/Accelerating-T2I-AR-with-SJD, `scheduler/jacobi_iteration_lumina_mgpt.py`).

Randomness: every random function takes a `torch.Generator` and draws only from it, never from
the global RNG, so a seeded generator reproduces a run and nothing else in the program is
disturbed. The generator must live on the device of the tensors (`torch.Generator(device="cuda")`
for CUDA tensors); a mismatch raises `ValueError`. All functions work on any leading batch
dimensions; the vocabulary (or sequence, for the MaskGIT helpers) is the last dimension.
Half-precision logits are processed in float32; nothing modifies its inputs in place (the
official filters do).

`probabilities` is the processed distribution itself: a speculative sampler computes both the
target's p and the draft's q with it, so both went through the same temperature and filtering.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TOP_P_STYLES", "MASK_SCHEDULES", "MIN_TEMPERATURE",
    "filter_logits", "process_logits", "probabilities",
    "cfg_llamagen", "cfg_var", "var_step_ratio", "var_cfg_ratio",
    "sample_categorical", "gumbel_noise", "sample_gumbel_max",
    "maskgit_choice_temperature", "maskgit_confidence", "maskgit_mask_ratio", "maskgit_mask_len",
    "mask_lowest_confidence", "annealed_temperature",
    "more_smooth_gumbel_softmax", "var_smooth_tau", "var_more_smooth",
    "residual_distribution",
]

TOP_P_STYLES = ("llamagen", "var")
MASK_SCHEDULES = ("cosine", "uniform", "pow<e>", "log", "exp")
MIN_TEMPERATURE = 1e-5  # LlamaGen divides by max(temperature, 1e-5): temperature 0 is near-greedy
MASKGIT_MIN_MASK_RATIO = 1e-6  # mask_schedule.schedule clips the ratio to [1e-6, 1]


# --------------------------------------------------------------------------- checks


def _check_generator(generator: torch.Generator, device: torch.device | str | None) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"a torch.Generator is required (got {type(generator).__name__}); the global RNG is never used")
    if device is None:
        return
    device = torch.device(device)
    if generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the tensor is on {device}: "
            f"create it with torch.Generator(device={device.type!r})")


def _float_logits(logits: Tensor) -> Tensor:
    """Half-precision logits are processed in float32; float32/float64 keep their dtype."""
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def _noise_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- filtering


def _top_k_mask(logits: Tensor, top_k: int) -> Tensor:
    """True where a token is removed: below the k-th largest value. Ties with it are kept, so
    more than k tokens can survive (both LlamaGen and VAR remove `logits < kth_value`)."""
    k = min(top_k, logits.shape[-1])
    kth_value = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits < kth_value


def _top_p_mask_llamagen(logits: Tensor, top_p: float) -> Tensor:
    # Descending order; a token goes when the mass *including* the tokens before it exceeds
    # top_p, shifted right by one so the token that crosses top_p stays; the first always stays.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    remove_sorted[..., 1:] = cumulative[..., :-1] > top_p
    return remove_sorted.scatter(-1, order, remove_sorted)


def _top_p_mask_var(logits: Tensor, top_p: float) -> Tensor:
    # Ascending order; a token goes while the mass of it and everything below is <= 1 - top_p;
    # the most likely token always stays. The descending stable sort reversed ranks tied tokens
    # as the llamagen style does (lower vocabulary position first).
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_logits, order = sorted_logits.flip(-1), order.flip(-1)
    remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove_sorted[..., -1] = False
    return remove_sorted.scatter(-1, order, remove_sorted)


_TOP_P_MASKS = {"llamagen": _top_p_mask_llamagen, "var": _top_p_mask_var}


def _sorted_ascending(rows: Tensor) -> Tensor:
    """The rows' values in ascending order (values only: which of equal tokens goes is decided by position
    below). On the CPU numpy's vectorised sort, several times faster than torch.sort with its indices."""
    if rows.device.type == "cpu":
        ascending = rows.detach().clone()  # sorted in place: the buffer stays torch's (and its profiler's)
        ascending.numpy().sort(axis=-1)
        return ascending
    return torch.sort(rows, dim=-1).values


def _top_p_mask(logits: Tensor, top_p: float, style: str) -> Tensor:
    """The top-p mask of `_TOP_P_MASKS[style]`, equal to it entry for entry, without sorting indices.

    The full rule sorts each row, takes the softmax of the sorted row and its cumulative sum, and removes
    the tokens at the low end of that order. The cumulative sum is non-decreasing, so the removed tokens are
    the `count` smallest ones, and `count` is found by a binary search; the softmax and the sum are taken
    over the same sorted values in the same direction, so every rounding is the rule's own. Which tokens
    are the `count` smallest: every token below the largest removed value t, and of the tokens equal to t
    the ones at the highest vocabulary positions (the rule's tie order). Rows whose largest logit is not
    finite (where the rule's softmax is NaN) go through the full rule."""
    if logits.device.type == "mps":  # keep to the plain rule there (searchsorted's MPS support varies)
        return _TOP_P_MASKS[style](logits, top_p)
    V = logits.shape[-1]
    rows = logits.reshape(-1, V).contiguous()
    ascending = _sorted_ascending(rows)
    odd = (~ascending[:, -1].isfinite()).nonzero()[:, 0]
    if style == "var":  # ascending cumulative mass; a token goes while it is <= 1 - top_p; the largest stays
        cumulative = ascending.softmax(-1).cumsum(-1)
        count = _count_at_most(cumulative, 1 - top_p).clamp(max=V - 1)
    else:  # descending cumulative mass; a token goes when the mass before it exceeds top_p; the first stays
        cumulative = ascending.flip(-1).softmax(-1).cumsum(-1)
        at_most = _count_at_most(cumulative, top_p) - (cumulative[:, -1:] <= top_p).long()  # among all but the last
        count = V - 1 - at_most
    largest_removed = ascending.gather(1, (count - 1).clamp(min=0))
    largest_removed = largest_removed.masked_fill(count == 0, math.nan)  # nothing goes: x <= nan is False
    remove = rows <= largest_removed
    below = torch.searchsorted(ascending, largest_removed)  # tokens strictly below t
    equal = torch.searchsorted(ascending, largest_removed, right=True) - below
    partial = ((count - below < equal) & (count > 0))[:, 0].nonzero()[:, 0]
    if len(partial):  # only count - below of the tokens equal to t go: those at the highest positions
        tied = rows[partial] == largest_removed[partial]
        from_right = tied.flip(-1).cumsum(-1).flip(-1)  # tied tokens at this position or later
        remove[partial] = (rows[partial] < largest_removed[partial]) | (tied & (from_right <= (count - below)[partial]))
    if len(odd):
        remove[odd] = _TOP_P_MASKS[style](rows[odd], top_p)
    return remove.view_as(logits)


def _count_at_most(cumulative: Tensor, value: float) -> Tensor:
    """(R, 1): entries of each non-decreasing row that are <= value, compared in the rows' dtype as
    `cumulative <= value` compares (the float is rounded to it)."""
    if cumulative.device.type != "cpu":  # a parallel scan need not be monotone to the last bit: count directly
        return (cumulative <= value).sum(-1, keepdim=True)
    bound = torch.full((cumulative.shape[0], 1), value, dtype=cumulative.dtype)
    return torch.searchsorted(cumulative, bound, right=True)


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None,
                  top_p_style: str = "llamagen") -> Tensor:
    """Top-k then top-p filtering; removed entries become -inf. The input is not modified.

    `top_k` None or 0 and `top_p` None or 1.0 switch a filter off. Top-k keeps every token whose
    logit is >= the k-th largest one, so ties with the k-th token are all kept (k is clamped to
    the vocabulary size, as LlamaGen does).

    Top-p has two conventions, chosen by `top_p_style`. Call `before(x)` the probability mass of
    the tokens ranked above token x:

    * "llamagen" (the default; the Hugging Face rule LlamaGen copies) keeps x when
      `before(x) <= top_p`: the smallest set of top tokens whose mass exceeds top_p.
    * "var" keeps x when `before(x) < top_p`: the smallest set whose mass reaches top_p (VAR
      removes tokens whose ascending cumulative mass is `<= 1 - top_p`).

    They differ only at the boundary, when the mass of the top tokens equals top_p exactly: with
    probabilities (0.5, 0.25, 0.125, 0.125) and top_p 0.75, "llamagen" keeps three tokens and
    "var" two. Both keep at least the most likely token, so top_p 0 is greedy in both. (VAR's
    own default top_p=0.0 means "off"; pass None for that.) Among tokens with equal logits the
    lower vocabulary position ranks first, in both styles; the official code leaves that order
    to an unstable sort.
    """
    if top_p_style not in _TOP_P_MASKS:
        raise ValueError(f"top_p_style must be one of {TOP_P_STYLES}, got {top_p_style!r}")
    filtered = _float_logits(logits)
    if top_k is not None and top_k != 0:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if top_k < filtered.shape[-1]:  # k >= the vocabulary keeps every token: skip the full top-k
            filtered = filtered.masked_fill(_top_k_mask(filtered, int(top_k)), -math.inf)
    if top_p is not None:
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if top_p < 1.0:
            remove = _top_p_mask(filtered, float(top_p), top_p_style)
            filtered = filtered.masked_fill(remove, -math.inf)
    return filtered.clone() if filtered is logits else filtered  # never hand back the input


def process_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, top_p_style: str = "llamagen") -> Tensor:
    """LlamaGen's order: divide by max(temperature, 1e-5), then top-k, then top-p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = _float_logits(logits) / max(temperature, MIN_TEMPERATURE)
    return filter_logits(logits, top_k=top_k, top_p=top_p, top_p_style=top_p_style)


def probabilities(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, top_p_style: str = "llamagen") -> Tensor:
    """The processed distribution p = softmax(process_logits(...)) over the last dimension.

    Sampling from it is what `sample_categorical(probabilities(...))` does; a speculative sampler
    evaluates both its target p and its draft q with this one function.
    """
    return process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          top_p_style=top_p_style).softmax(dim=-1)


# --------------------------------------------------------------------------- guidance


def cfg_llamagen(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    """LlamaGen's guidance `uncond + (cond - uncond) * scale` (scale 1 gives cond)."""
    return uncond + (cond - uncond) * scale


def cfg_var(cond: Tensor, uncond: Tensor, t: float | Tensor) -> Tensor:
    """VAR's guidance `(1 + t) * cond - t * uncond`, i.e. `cfg_llamagen` with scale 1 + t."""
    return (1 + t) * cond - t * uncond


def var_step_ratio(step: int, num_steps: int) -> float:
    """VAR's progress ratio `step / (num_steps - 1)`: 0 at the first scale, 1 at the last."""
    if num_steps < 2:
        raise ValueError(f"VAR's ratio needs at least 2 steps (scales), got {num_steps}")
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}), got {step}")
    return step / (num_steps - 1)


def var_cfg_ratio(cfg: float, step: int, num_steps: int) -> float:
    """VAR's guidance ramp `t = cfg * step / (num_steps - 1)`, from 0 at the first scale to cfg
    at the last; use it as `cfg_var(cond, uncond, t)`."""
    return cfg * var_step_ratio(step, num_steps)


# --------------------------------------------------------------------------- sampling


def sample_categorical(probs: Tensor, generator: torch.Generator, num_samples: int = 1, *,
                       replacement: bool = True) -> Tensor:
    """`torch.multinomial` over the last dimension with the given generator.

    Returns a LongTensor of shape `probs.shape[:-1] + (num_samples,)`, like VAR's sampler and
    LlamaGen's `idx`. With one sample, replacement does not change the distribution (VAR passes
    True, LlamaGen leaves torch's default False). One sample from sparse CPU float32 rows (after top-k or
    top-p) is drawn by `_multinomial_one_cpu`: torch.multinomial's draws, bit for bit, in about half its
    time.
    """
    _check_generator(generator, probs.device)
    flat = probs.reshape(-1, probs.shape[-1])
    if num_samples == 1 and _sparse_cpu_rows(flat):
        drawn = _multinomial_one_cpu(flat, generator)
    else:
        drawn = torch.multinomial(flat, num_samples, replacement=replacement, generator=generator)
    return drawn.reshape(*probs.shape[:-1], num_samples)


_DRAW_BLOCK = 1 << 19  # uniform doubles drawn at a time by _multinomial_one_cpu (4 MB)
_SPARSE_DRAW_MIN = 8192  # entries below which torch.multinomial's one call is quicker


def _sparse_cpu_rows(flat: Tensor) -> bool:
    """Whether `_multinomial_one_cpu` pays off: CPU float32 rows (contiguous, at least _SPARSE_DRAW_MIN
    entries) of which at most a quarter are not zero, as after top-k or top-p (a dense distribution needs a
    logarithm of every entry either way), and valid for torch.multinomial (finite, >= 0, every row's sum
    > 0; an invalid one goes to it for its error message)."""
    if not (flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.is_contiguous()
            and flat.numel() >= _SPARSE_DRAW_MIN):
        return False
    if 4 * int(torch.count_nonzero(flat)) > flat.numel():
        return False
    valid = bool((flat.max() < math.inf) & (flat.min() >= 0) & (flat.sum(-1) > 0).all())
    return valid and _draws_as_torch()


@functools.cache
def _draws_as_torch() -> bool:
    """Whether this torch draws as `_multinomial_one_cpu` reproduces it (its CPU `exponential_` and
    `multinomial` kernels), checked once per process on fixed inputs; if not, torch.multinomial is used."""
    ours, theirs = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    q = torch.empty(1 << 16).exponential_(generator=theirs)
    u = torch.empty(1 << 16, dtype=torch.float64).uniform_(generator=ours)
    if not torch.equal(_exponential_from_uniform(u), q):
        return False
    probs = (torch.randn(64, 512, generator=ours) * 4).softmax(-1)
    probs = probs * (probs >= probs.topk(8, dim=-1).values[:, -1:])  # sparse, unnormalised rows
    theirs.set_state(ours.get_state())
    drawn = torch.multinomial(probs, 1, replacement=True, generator=theirs)
    return torch.equal(_multinomial_one_cpu(probs, ours), drawn) and torch.equal(ours.get_state(), theirs.get_state())


def _exponential_from_uniform(u: Tensor) -> Tensor:
    """The float32 Exp(1) draws torch's CPU `exponential_` makes from the uniform doubles `u`, bit for bit.

    That kernel takes u = (random64 & (2^53 - 1)) 2^-53, exactly what `uniform_` draws into a float64 tensor,
    and returns float(-log1p(-u)) with the C library's log1p. torch's vectorised log1p can differ from it by
    an ulp of the double, which moves the float32 result only when the double lies within a few ulps of a
    float32 rounding midpoint (about 1e-8 of the draws): those few are recomputed with the C library's log1p
    (`math.log1p`)."""
    e = -torch.log1p(-u)
    q = e.float()
    near = ((e * (1 - 2.0 ** -50)).float() != q) | ((e * (1 + 2.0 ** -50)).float() != q)
    if bool(near.any()):
        exact = [-math.log1p(-x) for x in u[near].tolist()]
        q[near] = torch.tensor(exact, dtype=torch.float64).float()
    return q


def _multinomial_one_cpu(flat: Tensor, generator: torch.Generator) -> Tensor:
    """`torch.multinomial(flat, 1, generator=generator)` for CPU float32 rows, the same draws and the same
    generator state afterwards, about twice as fast on a large vocabulary.

    torch draws one sample as argmax(p / q) with q = exponential_(1) over the whole tensor (one random64 per
    entry, in memory order), and its serial kernel spends most of its time in log1p. Here the same random64
    stream is drawn as uniform doubles, a block of rows at a time (the same order, in bounded memory), and q
    is computed only where it can matter: entries with p > 0 (p / q is 0 elsewhere, as in torch) and the
    draws of exactly 0 (q = 0 there, so 0 / 0 as in torch)."""
    drawn = []
    for part in flat.split(max(1, _DRAW_BLOCK // flat.shape[1])):
        u = torch.empty(part.shape, dtype=torch.float64).uniform_(generator=generator)
        live = part > 0
        if bool(u.min() == 0):
            live |= u == 0
        live = live.view(-1).nonzero()[:, 0]
        ratio = torch.zeros_like(part)
        ratio.view(-1)[live] = part.reshape(-1)[live] / _exponential_from_uniform(u.view(-1)[live])
        drawn.append(ratio.argmax(-1, keepdim=True))
    return torch.cat(drawn)


def _gumbel_from_uniform(u: Tensor) -> Tensor:
    """-log(-log(u)) with u raised to the smallest normal number, as jax.random.gumbel draws
    u from [tiny, 1): u = 0 would give -inf, and u < 1 always, so the result is finite."""
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))


def gumbel_noise(shape, generator: torch.Generator, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard Gumbel noise -log(-log(U)), finite everywhere. `device` defaults to the
    generator's; half dtypes are drawn in float32 and cast."""
    _check_generator(generator, device)
    device = generator.device if device is None else torch.device(device)
    u = torch.rand(tuple(shape), generator=generator, device=device, dtype=_noise_dtype(dtype))
    return _gumbel_from_uniform(u).to(dtype)


def sample_gumbel_max(logits: Tensor, generator: torch.Generator) -> Tensor:
    """argmax(logits + Gumbel noise): an exact sample of softmax(logits) over the last dimension.

    Returns a LongTensor of shape `logits.shape[:-1]`. Process the logits first
    (`process_logits`) for temperature and filtering; -inf entries are never drawn.
    """
    logits = _float_logits(logits)
    noise = gumbel_noise(logits.shape, generator, device=logits.device, dtype=logits.dtype)
    return (logits + noise).argmax(dim=-1)


# --------------------------------------------------------------------------- MaskGIT


def maskgit_choice_temperature(choice_temperature: float, step: int, num_steps: int) -> float:
    """MaskGIT anneals the confidence noise linearly to 0: `choice_temperature * (1 - r)` with
    `r = (step + 1) / num_steps`, so the last step (r = 1) adds no noise."""
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}), got {step}")
    return choice_temperature * (1.0 - (step + 1) / num_steps)


def maskgit_confidence(log_prob_sampled: Tensor, known: Tensor, *, choice_temperature: float,
                       step: int, num_steps: int, generator: torch.Generator) -> Tensor:
    """MaskGIT's noisy confidence (`mask_by_random_topk`): `log p(sampled) + T_step * Gumbel`
    with `T_step = maskgit_choice_temperature(choice_temperature, step, num_steps)`, and +inf
    where the token was already known, so it is never re-masked.

    `log_prob_sampled` is the log-probability of each sampled token under the distribution it
    was drawn from (MaskGIT: softmax of the logits); `known` is True at given positions. The
    noise is drawn for every position, known ones included, as the official code does.
    """
    temperature = maskgit_choice_temperature(choice_temperature, step, num_steps)
    noise = gumbel_noise(log_prob_sampled.shape, generator, device=log_prob_sampled.device,
                         dtype=_noise_dtype(log_prob_sampled.dtype))
    confidence = log_prob_sampled.to(noise.dtype) + temperature * noise
    return confidence.masked_fill(known.to(torch.bool), math.inf)


def maskgit_mask_ratio(ratio: Tensor, num_tokens: Tensor, schedule: str = "cosine") -> Tensor:
    """`mask_schedule.schedule`: the fraction still masked after progress `ratio`, clipped to
    [1e-6, 1]. Schedules: "cosine" cos(pi/2 r), "uniform" 1 - r, "pow<e>" 1 - r^e (e.g.
    "pow2.5"), "log" -log2(r)/log2(N), "exp" 1 - 2^(-log2(N) (1 - r))."""
    if schedule == "cosine":
        mask_ratio = torch.cos(math.pi / 2 * ratio)
    elif schedule == "uniform":
        mask_ratio = 1.0 - ratio
    elif schedule.startswith("pow"):
        try:
            exponent = float(schedule[3:])
        except ValueError:
            raise ValueError(f"unknown mask schedule {schedule!r}; use one of {MASK_SCHEDULES}") from None
        if not (math.isfinite(exponent) and exponent > 0):
            raise ValueError(f"mask schedule {schedule!r}: the exponent must be a finite number above 0")
        mask_ratio = 1.0 - ratio ** exponent
    elif schedule == "log":
        mask_ratio = -torch.log2(ratio) / torch.log2(num_tokens)
    elif schedule == "exp":
        mask_ratio = 1.0 - torch.exp2(-torch.log2(num_tokens) * (1.0 - ratio))
    else:
        raise ValueError(f"unknown mask schedule {schedule!r}; use one of {MASK_SCHEDULES}")
    return mask_ratio.clamp(MASKGIT_MIN_MASK_RATIO, 1.0)


def maskgit_mask_len(num_tokens: int | Tensor, unknown_count: int | Tensor, step: int,
                     num_steps: int, schedule: str = "cosine") -> Tensor:
    """How many tokens MaskGIT re-masks after step `step` (0-based) of `num_steps`.

    `floor(num_tokens * mask_ratio((step + 1) / num_steps))`, then clamped to
    `max(1, min(unknown_count - 1, .))`: at least one token is re-masked and at least one newly
    sampled token is kept. `num_tokens` is the number of unknown tokens at the start of
    decoding, `unknown_count` the number still unknown before this step. The official code
    computes in float32, and so does this: for 16 tokens in 3 steps, step 1 gives 7, not
    16 cos(pi/3) = 8, because cos(pi/3) rounds to 0.49999997 in float32. At the last step the
    result is 1, but MaskGIT keeps that step's samples before re-masking, so it does not matter.
    Returns a LongTensor broadcast from `num_tokens` and `unknown_count`.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}), got {step}")
    device = next((x.device for x in (num_tokens, unknown_count) if isinstance(x, Tensor)), None)
    total = torch.as_tensor(num_tokens, device=device).to(torch.float32)
    unknown = torch.as_tensor(unknown_count, device=device).to(torch.float32)
    ratio = (torch.tensor(step + 1, dtype=torch.float32, device=device)
             / torch.tensor(num_steps, dtype=torch.float32, device=device))
    mask_len = torch.floor(total * maskgit_mask_ratio(ratio, total, schedule))
    mask_len = torch.nan_to_num(mask_len, nan=0.0)  # "log" with one token is 0/0
    mask_len = torch.clamp(torch.minimum(unknown - 1, mask_len), min=1)
    return mask_len.to(torch.long)


def annealed_temperature(temperature: float, final: float | None, step: int, num_steps: int) -> float:
    """The sampling temperature of step `step` (0-based) of `num_steps` when it is annealed from
    `temperature` at the first step to `final` at the last, ReCAP's `samp_temp_schedule`
    (liebenxj/ReCAP, `examples/MaskGIT+ReCAP/cache_decoding.py`, from AutoNAT):
    `final + (1 - sqrt(step / (num_steps - 1))) (temperature - final)`; ReCAP starts from 1.
    `final` None: `temperature` at every step."""
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}), got {step}")
    if final is None:
        return temperature
    progress = step / (num_steps - 1) if num_steps > 1 else 0.0  # numpy's linspace(0, 1, 1) is [0]
    return final + (1.0 - math.sqrt(progress)) * (temperature - final)


def mask_lowest_confidence(confidence: Tensor, mask_len: int | Tensor) -> Tensor:
    """True where a token is re-masked: MaskGIT's `confidence < cut_off`, the cut-off being the
    `mask_len`-th smallest confidence of the row (0-based), so the mask_len least confident
    tokens are re-masked. A token tied with the cut-off stays, so with ties fewer can be masked
    (with Gumbel noise ties have probability 0). `mask_len` is an int or one value per row
    (shape `confidence.shape[:-1]`, or with a trailing 1); a mask_len at or beyond the row
    length re-masks every finite entry.
    """
    length = confidence.shape[-1]
    mask_len = torch.as_tensor(mask_len, device=confidence.device).to(torch.long)
    if mask_len.ndim < confidence.ndim:
        mask_len = mask_len.unsqueeze(-1)
    mask_len = mask_len.expand(*confidence.shape[:-1], 1).clamp(0, length)
    sorted_confidence = torch.sort(confidence, dim=-1).values
    beyond = sorted_confidence.new_full((*confidence.shape[:-1], 1), math.inf)
    cut_off = torch.cat([sorted_confidence, beyond], dim=-1).gather(-1, mask_len)
    return confidence < cut_off


# --------------------------------------------------------------------------- VAR's more_smooth


def more_smooth_gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """Soft Gumbel-softmax `softmax((logits + Gumbel) / tau)` over the last dimension (VAR's
    `gumbel_softmax_with_rng`, hard=False). Returns weights that sum to 1; -inf logits get 0."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = _float_logits(logits)
    noise = gumbel_noise(logits.shape, generator, device=logits.device, dtype=logits.dtype)
    return ((logits + noise) / tau).softmax(dim=-1)


def var_smooth_tau(ratio: float) -> float:
    """VAR's `more_smooth` temperature: max(0.27 (1 - 0.95 ratio), 0.005)."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)


def var_more_smooth(logits: Tensor, step: int, num_steps: int, generator: torch.Generator) -> Tensor:
    """VAR's `more_smooth` option (visualisation only, not used for its FID): instead of a hard
    token, each position gets the soft weights `gumbel_softmax(logits * (1 + r), tau(r))` with
    `r = step / (num_steps - 1)`; multiply them by the codebook to get the embedding. VAR's
    sampler filters its logits in place before this, so pass the guided, top-k/top-p filtered
    logits to match it."""
    ratio = var_step_ratio(step, num_steps)
    return more_smooth_gumbel_softmax(logits * (1 + ratio), var_smooth_tau(ratio), generator)


# --------------------------------------------------------------------------- speculative


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """normalize(max(0, p - q)) over the last dimension: what speculative sampling draws from
    after rejecting a draft token drawn from q, so that the accepted-or-resampled token is
    distributed exactly as p.

    A rejection has probability sum(max(0, q - p)) = sum(max(0, p - q)), so a row where p - q
    has no positive entry (p == q) can never reach the resampling step; such rows return p.
    SJD computes softmax(log(max(p - q, 0))), the same distribution, and re-applies its top-k
    warper, which keeps it unchanged since the residual lies inside p's top-k support.
    """
    residual = (p - q).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    safe_total = total.clamp(min=torch.finfo(residual.dtype).tiny)
    return torch.where(total > 0, residual / safe_total, p)
