"""Continuous speculative decoding (CSpD) for MAR, exact (Wang et al. 2024, "Continuous Speculative Decoding
for Autoregressive Image Generation"; github.com/MarkXCloud/CSpD, `spec_decode/spec_decode_runner.py`).

Structure, as the official runner: a small draft MAR proposes tokens step by step; the target checks a
window of drafted steps in one forward pass; draft and target use the same noise for a position
(trajectory alignment: one initial noise and K-1 step noises per position, drawn once per run); the
first steps are sampled by the target itself (pre-filling). Unlike the official runner -- whose ratio
uses the last denoising step's Gaussians flattened by `inner_temperature = 42`, and whose residual
proposes from that last-step Gaussian and leaves a token at 0 after 100 failures -- every token here
is distributed exactly as the target's plain sampler would draw it.

THE TARGET PROCEDURE IT IS EXACT AGAINST: the target's `plain` sampler (generators/mar/plain.py) with the
same steps, diffusion steps, temperature (> 0), cfg and cfg schedule: a uniformly random order per sample,
MAR's cosine mask schedule (the same groups of positions per step, the last step taking every remaining
position), and the positions of step k sampled independently given the class and the tokens of ALL steps
before k (those of earlier steps of the same window included). With the same order tensor the two
samplers fill the same positions at the same steps.

THE RATIO. A token's sampled variables are v = (y_K, ..., y_2, x): the initial noise, the states of the
noisy denoising steps and the token x = g(y_1), the last (noise-free) step. Its density under a model m
given the context c (generators/mar/diffusion.py):

    p_m(v | c) = N(y_K; 0, I) prod_{i=2}^{K-1} N(y_i; mu_m(y_{i+1}), T^2 s_m^2(y_{i+1}))
                 N(g_m^{-1}(x); mu_m(y_2), T^2 s_m^2(y_2)) |det dg_m/dy (g_m^{-1}(x))|^{-1}

(every factor conditioned on c, guided when cfg != 1). A drafted v is accepted with probability
min(1, p_target(v | c) / p_draft(v | c)), in log space. The last step is deterministic and differs between
the models, so the ratio is taken over v, which includes the token itself rather than y_1: an accepted
v keeps the DRAFT's token x, and later steps of the window -- drafted on x -- are then conditioned on
exactly the committed token. (A ratio over (y_K .. y_1) alone would make the target's token g_t(y_1) differ
from the x later drafts were conditioned on, and no window could be verified in one pass.)

THE RESIDUAL. A rejected token is drawn from r(v) = max(0, p(v) - q(v)) / TV(p, q): target trajectories v ~ p
(fresh noise) are proposed and each accepted with probability max(0, 1 - q(v) / p(v)); the first accepted
one is kept. Each proposal succeeds with probability TV(p, q), which is also the probability that the
draft was rejected, so the expected number of proposals for one verified token is
P(reject) E[tries | reject] = TV (1 / TV) = 1. Proposals are drawn in rounds of `residual_batch` per token,
doubling each round (the number of sequential rounds grows like log(1/TV)); the proposals drawn up to the
round holding the first success are fewer than 2 N* + residual_batch for N* the index of that success, so
E[proposals per verified token] <= 2 + residual_batch TV <= 2 + residual_batch. `stats.residual_tries`
counts them all. There is no cap: after any number of failures the law still needed is r (the tries are
i.i.d.), so stopping or substituting anything else (the official keeps a 0) would bias the token. The
loop ends with probability 1; it is exact all the way.

WHY THE OUTPUT IS THE TARGET'S. Step by step, with c_k the committed tokens before step k:
1. pre-filled steps are plain target steps.
2. In a window starting at step k0, the draft samples the positions of step k0 + w from q(. | c'_w), where
   c'_w = c_{k0} plus its drafts of steps k0 .. k0+w-1, and the target's pass computes p(. | c'_w) for each w
   (one batch row per w, seeing exactly c'_w). Slot w is used only if every token of slots < w was
   accepted, in which case those tokens are committed unchanged, so c'_w = c_{k0+w}: the draft's q and
   the target's p are conditionals on the committed context.
3. Given that context, each token of the step is an independent draft with its own uniform; accepting with
   min(1, p/q) and otherwise drawing from r gives exactly p (the speculative sampling lemma; q(v) and p(v)
   are densities of the same variables v with respect to the same measure, since both sampled tokens
   have a density by the change of variables above). Tokens of one step are independent under both
   models given the context, and so are their decisions.
4. At the first slot with a rejection the window stops: that slot's tokens are committed (accepted or
   resampled) and every later slot, drafted on the rejected value, is invalidated. Their noise is reused
   by the next window's drafts: the invalidation depends only on earlier slots, never on the noise of the
   invalidated positions, so that noise is still independent of everything committed.
Induction over the steps gives the target's joint law, order and schedule included.

Assumptions, stated: temperature > 0 (at 0 the trajectories are deterministic and have no density); the
last step g_m is invertible, checked at run time by the convergence of the fixed-point inversion
(guaranteed when the network's Lipschitz constant in y at t = 0 is below ~155, see diffusion.py);
float arithmetic (log densities in float64; the inversion to ~1e-6 relative in float32).

Passes: `stats.nfe` counts target encoder/decoder passes (one per pre-filled step and one per window),
`stats.draft_nfe` the draft's (one per drafted step); diffusion-head evaluations are not counted (the
target's verification evaluates its head on all K states of every drafted token in one batch).
`accepted_per_iter` gets, per sample and window, the drafted tokens it kept; `rejected_tokens` and
`residual_tries` count the resampled tokens and the target proposals drawn for them. Samples advance
independently (a sample's rejection does not discard another's accepted tokens).

WHAT TO EXPECT. The acceptance rate is 1 - TV between the two models' trajectory laws, which are close only
when the two networks agree at every denoising step. Measured on the shipped mar-mnist (target) and
mar-mnist-small (draft), 16 steps, 25 ddim-spaced diffusion steps, cfg 2 / 5: 15 % / 21 % of drafted tokens
accepted (51 % / 79 % with the lossy `inner_temperature` 42). Two things then limit the speed, exact or not:
1. a window passes a step only if every token of that step is accepted (four per step for 64 tokens in 16
   steps), so most windows end at their first slot and few target passes are saved;
2. verifying a token evaluates the target's head on every state of its trajectory -- the same computation
   as the target sampling the token itself, only batched instead of sequential -- and the draft runs its
   own head as well. CSpD saves encoder/decoder passes, never head FLOPs: where the head dominates (these
   small models on a CPU) it is slower than plain sampling even with an identical draft that is always
   accepted (6.7 s against 2.7 s for 20 images at cfg 2, one thread). The batching pays where the head's sequential
   steps are latency-bound (small batches on a GPU).
Under MAR's own even spacing, the first step (t = 999, abar = 2.4e-9) multiplies each network's noise
error by ~10^4, so two networks that are not accurate to ~1e-4 there disagree by many standard deviations
and almost nothing is accepted (plain.py explains why the MNIST models sample with the ddim spacing).

`inner_temperature` != 1 is the official flattening of the ratio -- every standardised deviation divided by
it, in both densities -- and is LOSSY: the output is then no longer the target's distribution. It is off
(1) by default. It flattens the acceptance only; the residual keeps the true densities (a residual of
flattened densities would accept almost nothing: p and q flattened by 42 nearly coincide).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from generators.base import SamplerOption, register_sampler
from generators.mar.diffusion import (GaussianDiffusion, Trajectory, final_map_log_det, gaussian_log_density,
                                      invert_final_map, sample_trajectory)
from generators.mar.model import MAR, diffusion_for
from generators.mar.plain import MAR_OPTIONS, make_predict, make_predict_one, mask_schedule, random_orders
from vision.tokens import GenerationStats, Tokens

MAX_RESIDUAL_ROWS = 1 << 15  # proposals per residual round, all tokens together (memory bound, not a cap)

CSPD_OPTIONS = MAR_OPTIONS + (
    SamplerOption("draft", "model", None, "the draft MAR (same tokenizer, grid, patch size and classes)"),
    SamplerOption("window", int, 8, "draft steps verified by one target pass (the official num_draft: 8)", min=1),
    SamplerOption("prefill", float, 0.15, "the target samples steps k <= prefill * steps itself (official 0.15); "
                  "0 = none", min=0.0),
    SamplerOption("residual_batch", int, 4, "target proposals per rejected token in the first residual round "
                  "(doubling each round)", min=1),
    SamplerOption("inner_temperature", float, 1.0, "LOSSY when != 1: flattens the acceptance ratio (the official "
                  "runner uses 42); 1 = exact", min=1e-6),
)


# ---------------------------------------------------------------------- one model's head, conditioned per token


@dataclass
class HeadCondition:
    """A model's diffusion head for a set of tokens: conditions z_cond (M, Dz), z_uncond (M, Dz) or None
    (no guidance), guidance scale (M,)."""

    model: MAR
    diffusion: GaussianDiffusion
    z_cond: Tensor
    z_uncond: Tensor | None
    scale: Tensor

    def rows(self, index: Tensor) -> "HeadCondition":
        pick = None if self.z_uncond is None else self.z_uncond[index]
        return HeadCondition(self.model, self.diffusion, self.z_cond[index], pick, self.scale[index])

    def predict(self):
        return make_predict(self.model, self.diffusion, self.z_cond, self.z_uncond, self.scale)

    def log_det(self, y1: Tensor) -> Tensor:
        """log |det dg/dy| of the last step at y1 (M, D)."""
        if y1.shape[0] == 0:
            return y1.new_zeros(0, dtype=torch.float64)
        one = make_predict_one(self.model, self.z_uncond is not None)
        extra = () if self.z_uncond is None else (self.z_uncond, self.scale.to(y1.dtype))
        return final_map_log_det(self.diffusion, one, y1, self.z_cond, *extra)

    def sample(self, noise: Tensor, temperature: float) -> Trajectory:
        return sample_trajectory(self.diffusion, self.predict(), noise, temperature, record=True)

    def own_log_density(self, traj: Trajectory, flatten: float = 1.0) -> Tensor:
        """log density of trajectories this head sampled itself (their y_1 is known: no inversion)."""
        return traj.log_density(flatten) - self.log_det(traj.states[:, -1])

    def log_density(self, states: Tensor, token: Tensor, temperature: float, flatten: float = 1.0) -> Tensor:
        """log p(v) of v = (states[:, 0] .. states[:, K-2], token) sampled by another model (rows aligned with
        this condition): the Gaussians at y_K .. y_2, the last one at y_1 = g^{-1}(token), minus log|det g'|."""
        M, K, D = states.shape
        y_k = states[:, 0]
        out = gaussian_log_density(y_k, torch.zeros_like(y_k), torch.zeros_like(y_k))
        y1 = invert_final_map(self.diffusion, self.predict(), token, start=states[:, -1])
        if K > 1:
            prev = states[:, :K - 1].reshape(M * (K - 1), D)
            t = torch.arange(K - 1, 0, -1, device=states.device).repeat(M)
            expanded = self.rows(torch.arange(M, device=states.device).repeat_interleave(K - 1))
            mean, log_var = self.diffusion.mean_log_variance(expanded.predict()(prev, t), prev, t)
            mean, log_std = mean.view(M, K - 1, D), (0.5 * log_var + math.log(temperature)).view(M, K - 1, D)
            reached = torch.cat([states[:, 1:K - 1], y1[:, None]], dim=1)
            out = out + gaussian_log_density(reached, mean, log_std, flatten).sum(dim=1)
        return out - self.log_det(y1)


def concat_heads(heads: list[HeadCondition]) -> HeadCondition:
    first = heads[0]
    z_u = None if first.z_uncond is None else torch.cat([h.z_uncond for h in heads])
    return HeadCondition(first.model, first.diffusion, torch.cat([h.z_cond for h in heads]), z_u,
                         torch.cat([h.scale for h in heads]))


def concat_trajectories(trajs: list[Trajectory]) -> Trajectory:
    return Trajectory(*(torch.cat([getattr(t, f) for t in trajs]) for f in ("states", "token", "means", "log_stds")))


# ---------------------------------------------------------------------- the residual step


@dataclass
class ResidualJob:
    """Rejected tokens to resample: the target's and the draft's heads conditioned on each token's context, the
    draft's trajectories (and the aligned noise they used, for the test-only variants)."""

    target: HeadCondition
    draft: HeadCondition
    temperature: float
    flatten: float
    batch: int
    draft_traj: Trajectory
    noise: Tensor


Residual = Callable[[ResidualJob, torch.Generator], tuple[Tensor, int]]


def exact_residual(job: ResidualJob, generator: torch.Generator) -> tuple[Tensor, int]:
    """One draw of max(0, p - q) / TV per token by rejection from p (see the module docstring); returns the tokens
    and the number of target proposals drawn."""
    n, K, D = job.noise.shape
    out = job.noise.new_empty(n, D)
    pending = torch.arange(n, device=out.device)
    per_token, tries = job.batch, 0
    while pending.numel():
        P = pending.numel()
        per_token = max(1, min(per_token, MAX_RESIDUAL_ROWS // P))
        index = pending.repeat_interleave(per_token)
        noise = torch.randn(index.numel(), K, D, generator=generator, device=out.device, dtype=out.dtype)
        target = job.target.rows(index)
        traj = target.sample(noise, job.temperature)
        log_p = target.own_log_density(traj, job.flatten)
        log_q = job.draft.rows(index).log_density(traj.states, traj.token, job.temperature, job.flatten)
        accept = -torch.expm1((log_q - log_p).clamp(max=0.0))  # max(0, 1 - q/p)
        u = torch.rand(index.numel(), generator=generator, device=out.device, dtype=torch.float64)
        ok = (u < accept).view(P, per_token)
        tries += index.numel()
        done = ok.any(dim=1)
        first = ok.to(torch.int8).argmax(dim=1)
        out[pending[done]] = traj.token.view(P, per_token, D)[done, first[done]]
        pending = pending[~done]
        per_token *= 2
    return out, tries


# ---------------------------------------------------------------------- the sampler


def check_draft(target: MAR, draft) -> None:
    if draft is None:
        raise ValueError("cspd needs a draft model: give --draft NAME (a smaller MAR on the same tokens)")
    if not isinstance(draft, MAR) and not getattr(draft, "is_mar_like", False):
        raise ValueError(f"the draft must be a MAR, got {type(draft).__name__}")
    if draft.spec != target.spec:
        raise ValueError(f"the draft emits {draft.spec} but the target {target.spec}: they must share the tokenizer")
    if (draft.seq_len, draft.token_dim) != (target.seq_len, target.token_dim):
        raise ValueError(f"the draft cuts the latents into {draft.seq_len} tokens of {draft.token_dim}, the target "
                         f"into {target.seq_len} of {target.token_dim} (different patch sizes)")
    if draft.tokenizer_name and target.tokenizer_name and draft.tokenizer_name != target.tokenizer_name:
        raise ValueError(f"the draft speaks tokenizer {draft.tokenizer_name}, the target {target.tokenizer_name}")
    if draft.num_classes != target.num_classes:
        raise ValueError(f"the draft has {draft.num_classes} classes, the target {target.num_classes}")


def prefill_steps(prefill: float, steps: int) -> int:
    """The official rule `step <= prefill * steps` (10 of 64 steps at 0.15); 0 turns pre-filling off."""
    return 0 if prefill <= 0 else min(steps, math.floor(prefill * steps) + 1)


def speculative_latents(target: MAR, draft: MAR, labels: Tensor | None, *, batch_size: int, steps: int,
                        diffusion_steps: int, cfg: float, cfg_schedule: str, temperature: float, window: int,
                        prefill: float, residual_batch: int, inner_temperature: float, generator: torch.Generator,
                        stats: GenerationStats, diffusion_spacing: str = "even", orders: Tensor | None = None,
                        residual: Residual = exact_residual) -> Tensor:
    """CSpD (see the module docstring) -> token latents (B, N, D). `orders` replaces the generator's draw of the
    orders; `residual` the residual step (tests swap in wrong rules to show the distribution tests notice)."""
    check_draft(target, draft)
    if steps < 1 or window < 1 or residual_batch < 1:
        raise ValueError("steps, window and residual_batch must be >= 1")
    if temperature <= 0:
        raise ValueError("cspd needs temperature > 0: at 0 the denoising trajectories have no density to compare")
    if inner_temperature <= 0:
        raise ValueError(f"inner_temperature must be > 0, got {inner_temperature}")
    param = target.fake_latent
    device, dtype = param.device, param.dtype
    B, N, D = batch_size, target.seq_len, target.token_dim
    guided = cfg != 1.0
    repeat = 2 if guided else 1
    cls_t = target.class_embedding(labels, B, guided)
    cls_d = draft.class_embedding(labels, B, guided)
    if orders is None:
        orders = random_orders(B, N, generator, device)
    rank = orders.argsort(dim=1)
    schedule = mask_schedule(N, steps)
    lo = torch.tensor(schedule.lo, device=device)
    hi = torch.tensor(schedule.hi, device=device)
    scales = torch.tensor(schedule.guidance(cfg, cfg_schedule, N), device=device, dtype=dtype)
    diffusion = diffusion_for(diffusion_steps, diffusion_spacing)
    K = diffusion.num_timesteps
    noise = torch.randn(B, N, K, D, generator=generator, device=device, dtype=dtype)  # aligned: one per position
    tokens = torch.zeros(B, N, D, device=device, dtype=dtype)
    known = torch.zeros(B, N, dtype=torch.bool, device=device)

    def conditions(model, z: Tensor, rows: Tensor, group: Tensor, scale: Tensor) -> HeadCondition:
        """z of `model`'s pass over `rows` conditioned samples ([cond; uncond] when guided) at the group's tokens."""
        n_rows = rows.numel()
        z_c = z[:n_rows][group[rows]]
        z_u = z[n_rows:][group[rows]] if guided else None
        return HeadCondition(model, diffusion, z_c, z_u, scale)

    # ---- pre-filling: plain target steps on the aligned noise
    first = prefill_steps(prefill, steps)
    everyone = torch.arange(B, device=device)
    for k in range(first):
        z = target(tokens.repeat(repeat, 1, 1), known.repeat(repeat, 1), cls_t)
        stats.nfe += 1
        group = (rank >= lo[k]) & (rank < hi[k])
        if group.any():
            head = conditions(target, z, everyone, group, scales[k].expand(int(group.sum())))
            tokens[group] = sample_trajectory(diffusion, head.predict(), noise[group], temperature)
            known |= group
    step = torch.full((B,), first, dtype=torch.long, device=device)

    # ---- windows: draft ahead, verify in one target pass, commit up to the first rejection
    while bool((step < steps).any()):
        active = (step < steps).nonzero()[:, 0]
        A = active.numel()
        a_rank, a_step, a_noise = rank[active], step[active], noise[active]
        slots = torch.minimum(torch.full_like(a_step, window), steps - a_step)  # valid slots per sample
        drafted = tokens[active].clone()
        visible = [known[active].clone()]
        groups, drafts, draft_heads = [], [], []
        for w in range(window):
            valid = w < slots
            if not bool(valid.any()):
                break
            k = (a_step + w).clamp(max=steps - 1)
            group = valid[:, None] & (a_rank >= lo[k][:, None]) & (a_rank < hi[k][:, None])
            rows = valid.nonzero()[:, 0]
            z = draft(drafted[rows].repeat(repeat, 1, 1), visible[-1][rows].repeat(repeat, 1),
                      torch.cat([cls_d[active][rows], cls_d[B:][active][rows]]) if guided else cls_d[active][rows])
            stats.draft_nfe += 1
            sample_of_token = group.nonzero()[:, 0]
            head = conditions(draft, z, rows, group, scales[k][sample_of_token])
            traj = head.sample(a_noise[group], temperature)
            drafted[group] = traj.token
            visible.append(visible[-1] | group)
            groups.append(group)
            drafts.append(traj)
            draft_heads.append(head)
        W = len(groups)
        # one target pass: row (sample, w) sees the committed tokens and the drafts of slots < w
        pair_valid = torch.arange(W, device=device)[None, :] < slots[:, None]  # (A, W)
        pair_sample, pair_slot = pair_valid.nonzero(as_tuple=True)
        row_of = torch.full((A, W), -1, dtype=torch.long, device=device)
        row_of[pair_sample, pair_slot] = torch.arange(pair_sample.numel(), device=device)
        vis_rows = torch.stack(visible[:W], dim=1)[pair_sample, pair_slot]
        cls_rows = cls_t[active][pair_sample]
        if guided:
            cls_rows = torch.cat([cls_rows, cls_t[B:][active][pair_sample]])
        z_t = target(drafted[pair_sample].repeat(repeat, 1, 1), vis_rows.repeat(repeat, 1), cls_rows)
        stats.nfe += 1
        n_pairs = pair_sample.numel()
        target_heads = []
        for w in range(W):
            b_idx, pos = groups[w].nonzero(as_tuple=True)
            r = row_of[b_idx, w]
            z_u = z_t[n_pairs:][r, pos] if guided else None
            target_heads.append(HeadCondition(target, diffusion, z_t[:n_pairs][r, pos], z_u, draft_heads[w].scale))
        # every drafted token's density under both models, all slots in one batch
        all_t, all_d, all_traj = concat_heads(target_heads), concat_heads(draft_heads), concat_trajectories(drafts)
        log_p = all_t.log_density(all_traj.states, all_traj.token, temperature, inner_temperature)
        log_q = all_d.own_log_density(all_traj, inner_temperature)
        log_ratio = list((log_p - log_q).split([g.token.shape[0] for g in drafts]))
        # accept each token with min(1, p/q); a sample stops at its first slot with a rejection
        stop = slots.clone()  # first slot with a rejection (slots: none)
        accepted = []
        for w in range(W):
            b_idx = groups[w].nonzero()[:, 0]
            u = torch.rand(b_idx.numel(), generator=generator, device=device, dtype=torch.float64)
            ok = u < torch.exp(log_ratio[w].clamp(max=0.0))
            accepted.append(ok)
            rejected_here = torch.zeros(A, dtype=torch.bool, device=device)
            rejected_here[b_idx[~ok]] = True
            stop = torch.where(rejected_here & (stop == slots), torch.full_like(stop, w), stop)
        new_tokens, new_known = tokens[active].clone(), known[active].clone()
        kept = torch.zeros(A, dtype=torch.long, device=device)
        for w in range(W):
            b_idx, pos = groups[w].nonzero(as_tuple=True)
            use = w <= stop[b_idx]  # slots after the first rejection are invalidated
            if not bool(use.any()):
                continue
            ok = accepted[w]
            values = drafts[w].token.clone()
            redo = use & ~ok
            if bool(redo.any()):
                pick = redo.nonzero()[:, 0]
                job = ResidualJob(target_heads[w].rows(pick), draft_heads[w].rows(pick), temperature, 1.0,
                                  residual_batch,
                                  Trajectory(drafts[w].states[pick], drafts[w].token[pick], drafts[w].means[pick],
                                             drafts[w].log_stds[pick]), a_noise[groups[w]][pick])
                values[pick], tries = residual(job, generator)
                stats.residual_tries += int(tries)
                stats.rejected_tokens += int(pick.numel())
            new_tokens[b_idx[use], pos[use]] = values[use]
            new_known[b_idx[use], pos[use]] = True
            kept.index_add_(0, b_idx[use & ok], torch.ones_like(b_idx[use & ok]))
        committed = torch.where(stop < slots, stop + 1, slots)
        tokens[active], known[active] = new_tokens, new_known
        step[active] = a_step + committed
        stats.accepted_per_iter.extend(kept.tolist())
    return tokens


@register_sampler(MAR, "cspd", options=CSPD_OPTIONS,
                  help="continuous speculative decoding: a draft MAR proposes, the target verifies a window per pass "
                       "(exact: trajectory-density ratio and residual)")
def sample_cspd(model: MAR, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float, steps: int,
                diffusion_steps: int, diffusion_spacing: str, cfg_schedule: str, draft, window: int, prefill: float,
                residual_batch: int, inner_temperature: float) -> Tokens:
    latents = speculative_latents(model, draft, labels, batch_size=batch_size, steps=steps,
                                  diffusion_steps=diffusion_steps, diffusion_spacing=diffusion_spacing, cfg=cfg,
                                  cfg_schedule=cfg_schedule,
                                  temperature=temperature, window=window, prefill=prefill,
                                  residual_batch=residual_batch, inner_temperature=inner_temperature,
                                  generator=generator, stats=stats)
    return Tokens(model.spec, latents=model.unpatchify(latents))
