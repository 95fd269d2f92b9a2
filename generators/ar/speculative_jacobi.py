"""Speculative Jacobi Decoding (Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image
Generation with Training-free Speculative Jacobi Decoding"; github.com/tyshiwo1/Accelerating-T2I-AR-with-SJD,
`scheduler/jacobi_iteration_lumina_mgpt.py`).

Each iteration feeds the last decided token followed by up to `window - 1` draft tokens through the
model in one forward pass. Output j is the model's processed distribution p_j (CFG, temperature,
top-k, top-p: the same `guided_probabilities` as the plain sampler) for the position of draft j.
Drafts are verified left to right: draft x at j is accepted with probability min(1, p_j(x) / q(x)),
where q is the distribution x was drawn from when it was drafted (a freshly initialised draft has a
one-hot q, so it is accepted with probability p_j(x)). At the first rejection the token is redrawn
from normalize(max(0, p_j - q)) and the later outputs are not kept; if every draft is accepted, the
last output is a plain sample of p and is kept too. So each iteration decides between 1 and
`window` tokens, each distributed exactly as plain autoregressive sampling would draw it.

The outputs after the rejection become the next iteration's drafts, each with its current p as its
q (Jacobi iteration: they were sampled from p given the drafts before them); the window is then
filled up with fresh drafts by `init`:

* `random`: a uniformly random token (the paper's default);
* `repeat_horizon` / `sample_horizon`: the token to the left in the grid, or the most likely token
  of the left position's distribution (the official code's top-1 "sample"); a random token at the
  start of a row;
* `repeat_vertical` / `sample_vertical`: the same with the token above (random in the first row);
  `horizontal` and `vertical` are short for the repeat variants.

Keys/values of rejected drafts are left in the cache and overwritten by the next iteration, which
writes from the first undecided position on; the causal mask by absolute position keeps every query
away from them (the same as truncating the cache back to the accepted length).

Batches: the official code advances the whole batch by the smallest number of accepted tokens. Here
every sample advances by its own count (its own absolute positions in the cache and the rotary table),
so one sample's rejection does not discard another's accepted tokens, and each sample is exactly the
single-sequence algorithm. The batch runs until its slowest sample is done.

Stats: `nfe` counts forward passes (one per iteration; the cond+uncond batch of CFG is one pass);
`accepted_per_iter` gets, for every sample still running, the tokens it decided in that iteration.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from generators.ar.model import LlamaGenGPT
from generators.ar.plain import guided_probabilities
from generators.base import SamplerOption, register_sampler
from generators.sampling import residual_distribution, sample_categorical
from vision.tokens import GenerationStats, Tokens

INITS = ("random", "repeat_horizon", "sample_horizon", "repeat_vertical", "sample_vertical", "horizontal", "vertical")
INIT_ALIASES = {"horizontal": "repeat_horizon", "vertical": "repeat_vertical"}


def acceptance_probability(p_x: Tensor, q_x: Tensor) -> Tensor:
    """min(1, p(x) / q(x)) for a draft x drawn from q."""
    return (p_x / q_x.clamp(min=torch.finfo(q_x.dtype).tiny)).clamp(max=1.0)


def _fresh_drafts(init: str, drafts: Tensor, q: Tensor, carried: Tensor, n: Tensor, seq: Tensor,
                  seq_top: Tensor, side: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Drafts (B, K) and their q with slots i >= carried[b] (token n[b] + i) freshly initialised (one-hot q).

    A neighbour-copying draft whose neighbour is itself a fresh draft copies what that one copies, so
    each fresh slot follows its chain of neighbours back to a root: a decided token, a carried draft,
    or a slot with no neighbour (first column / first row), which gets a random token. The chains are
    followed by pointer jumping, a few vectorised steps instead of a loop over the window.
    """
    B, K = drafts.shape
    V = q.shape[-1]
    slot = torch.arange(K, device=drafts.device).expand(B, K)
    fresh = slot >= carried[:, None]
    value = torch.randint(0, V, (B, K), generator=generator, device=drafts.device)
    if init != "random" and K:
        step = 1 if init.endswith("horizon") else side
        token = n[:, None] + slot
        has = token % side > 0 if step == 1 else token >= side
        neighbour = slot - step  # relative slot of the neighbour; < 0: a decided token
        in_window = neighbour >= 0
        neighbour_slot = neighbour.clamp(min=0)
        sample = init.startswith("sample")
        decided_value = (seq_top if sample else seq).gather(1, (token - step).clamp(min=0))
        window_value = (q.argmax(-1) if sample else drafts).gather(1, neighbour_slot)
        follows = fresh & has & in_window & fresh.gather(1, neighbour_slot)  # chained to a fresh neighbour
        value = torch.where(has & ~in_window, decided_value, value)
        value = torch.where(has & in_window & ~follows, window_value, value)
        root = torch.where(follows, neighbour_slot, slot)
        for _ in range(max(K - 1, 1).bit_length()):
            root = root.gather(1, root)
        value = value.gather(1, root)
    drafts = torch.where(fresh, value, drafts)
    q = torch.where(fresh[..., None], F.one_hot(drafts, V).to(q.dtype), q)
    return drafts, q


def speculative_jacobi(model: LlamaGenGPT, labels: Tensor | None, *, generator: torch.Generator,
                       stats: GenerationStats, batch_size: int, cfg: float, temperature: float, top_k: int,
                       top_p: float, window: int = 16, init: str = "repeat_horizon",
                       accept: Callable[[Tensor, Tensor], Tensor] = acceptance_probability) -> Tokens:
    """SJD for a LlamaGen GPT (see the module docstring). `accept(p_x, q_x)` is the acceptance rule."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    init = INIT_ALIASES.get(init, init)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    B, L, K, side = batch_size, model.seq_len, window - 1, model.config.grid
    V = model.config.vocab_size
    guided = cfg > 1.0
    repeat = 2 if guided else 1
    cond_embed = model.class_embed(model.condition_labels(labels, B, guided))  # (repeat*B, dim)
    device = cond_embed.device
    caches = model.new_caches()
    offsets = torch.arange(K + 1, device=device)

    seq = torch.zeros(B, L + K + 1, dtype=torch.long, device=device)  # decided tokens (padded past the end)
    seq_top = torch.zeros_like(seq)  # the most likely token of each decided position's distribution
    n = torch.zeros(B, dtype=torch.long, device=device)  # decided tokens per sample
    n_host = [0] * B
    drafts = torch.zeros(B, K, dtype=torch.long, device=device)  # drafts for tokens n .. n+K-1
    q = torch.zeros(B, K, V, device=device)
    carried = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)

    while min(n_host) < L:
        drafts, q = _fresh_drafts(init, drafts, q, carried, n, seq, seq_top, side, generator)
        last = seq[rows, (n - 1).clamp(min=0)]
        first = torch.where((n == 0).repeat(repeat)[:, None], cond_embed, model.token_embed(last).repeat(repeat, 1))
        h = torch.cat([first[:, None], model.token_embed(drafts).repeat(repeat, 1, 1)], dim=1)
        positions = (n[:, None] + offsets).repeat(repeat, 1)  # token t sits at position t + 1
        logits = model.run(h, positions, caches, end=max(n_host) + K + 1)
        stats.nfe += 1
        p = guided_probabilities(logits, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p)  # (B, K+1, V)

        sampled = sample_categorical(p, generator)[..., 0]  # a plain sample of every output
        u = torch.rand(B, K, generator=generator, device=device, dtype=p.dtype)
        p_x = p[:, :K].gather(-1, drafts[..., None])[..., 0]
        q_x = q.gather(-1, drafts[..., None])[..., 0]
        remaining = L - n
        ok = (u < accept(p_x, q_x)) & (offsets[:K] < remaining[:, None])
        accepted = ok.long().cumprod(dim=1).sum(dim=1)  # leading accepted drafts
        decided = torch.minimum(accepted + 1, remaining)
        rejected = (accepted < K) & (accepted < remaining)
        at = accepted.clamp(max=max(K - 1, 0))
        if K:
            redrawn = sample_categorical(residual_distribution(p[rows, at], q[rows, at]), generator)[:, 0]
        else:
            redrawn = sampled[:, 0]

        # the token each output stands for: accepted drafts, the redrawn or plain sample, later samples
        tokens = sampled.clone()
        tokens[:, :K] = torch.where(offsets[:K] < accepted[:, None], drafts, sampled[:, :K])
        tokens[rows, accepted] = torch.where(rejected, redrawn, sampled[rows, accepted])
        targets = n[:, None] + offsets  # past the decided ones: overwritten before they are read
        seq.scatter_(1, targets, tokens)
        seq_top.scatter_(1, targets, p.argmax(-1))

        # outputs after the decided ones are the next drafts, their p as q
        source = offsets[:K][None, :] + decided[:, None]
        carried = (source <= K).long().sum(dim=1)
        source = source.clamp(max=K)
        drafts = tokens.gather(1, source)
        q = p.gather(1, source[..., None].expand(B, K, V))

        decided_host = decided.tolist()
        stats.accepted_per_iter.extend(d for d, done in zip(decided_host, n_host) if done < L)
        n_host = [a + b for a, b in zip(n_host, decided_host)]
        n = n + decided
    return Tokens(model.spec, ids=seq[:, :L].reshape(B, side, side))


@register_sampler(
    LlamaGenGPT, "sjd",
    options=(
        SamplerOption("window", int, 16, "at most this many tokens decided per forward pass: window - 1 drafts are "
                      "verified (1 = plain sampling)", min=1),
        SamplerOption("init", str, "repeat_horizon", "how fresh drafts start: random, repeat/sample the token to "
                      "the left (_horizon) or above (_vertical); horizontal/vertical = the repeat variants",
                      choices=INITS),
    ),
    help="speculative Jacobi decoding: lossless, several tokens per forward pass",
)
def sample_sjd(model: LlamaGenGPT, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
               batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float, window: int,
               init: str) -> Tokens:
    return speculative_jacobi(model, labels, generator=generator, stats=stats, batch_size=batch_size, cfg=cfg,
                              temperature=temperature, top_k=top_k, top_p=top_p, window=window, init=init)
