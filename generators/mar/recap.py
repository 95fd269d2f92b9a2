"""ReCAP for MAR: masked autoregressive sampling made cheaper by reusing the context's keys and values
("Plug-and-Play Context Feature Reuse for Efficient Masked Generation", arXiv 2505.19089; official code
liebenxj/ReCAP, `examples/MAR+ReCAP/models/mar.py` `sample_tokens`, run by `cache_decoding.py` and
`run_mar_recap.sh`).

The schedule is generators/recap.py's (`group_sizes`): `pre_full_iters` groups of one full step, then groups of
one full step plus `num_cache_iters` cheap ones, the last group cut at `steps`. MAR's own schedule decides which
positions each step decodes (plain.py's `mask_schedule` over the sample's random order), so a group's positions
are the union of its steps' positions, all fixed at the full step.

* Full step: MAR's encoder/decoder pass over the current tokens (`MAR.forward_full`). Its z condition the
  group's first step, sampled with the full `diffusion_steps`. It also keeps the context the cheap steps read
  (`MARCache`): each encoder layer's keys/values of the known tokens, and each decoder layer's keys/values of
  every position outside the group (known tokens and the positions left masked for later groups).
* Cheap step (`MAR.forward_cheap`): the only queries are the buffer (the class embedding, recomputed: the
  official scripts run without `--cache_buffer`), the group's tokens decoded so far (encoder) and all of the
  group's positions (decoder); they attend to the cached context plus themselves. Its z condition the next
  step's share of the group, sampled by the diffusion head with int(diffusion_steps diff_fast_ratio) steps
  (the official `diff_fast_ratio`; same spacing). A cheap step costs about (buffer + group) / (buffer + N) of
  a full step's transformer.
* Why a cheap step is exact when the cache is fresh: the cached keys/values are those of positions whose
  inputs a cheap step does not change; if nothing has been decoded since the full step, every query's input
  equals the full step's at the first layer, so (by induction over layers) every query's keys/values and
  outputs do too, and z of the group's positions equal the full pass's (test_mar_recap.py checks it). Once
  the group decodes tokens the context is stale: known tokens and masked positions outside the group would
  see them in a full pass, here they do not -- that is ReCAP's approximation.

As in the official code:
* within a group, the steps take the group's positions in raster order (the official `torch.where` of the
  group's mask), not in the sample's random order; which positions form the group still follows that order;
* except one detail: the official ReCAP-MAR's linear guidance reads mask_len = 0 at the last step, so its scale
  there is cfg, where LTH14/mar's is 1 + (cfg - 1) (N - 1) / N. Tessera keeps MAR's scale, so that with every
  group one step (`num_cache_iters = 0`, or only `pre_full_iters`) `recap` draws plain's tokens from the same
  seed, token for token, whatever the guidance; `official_last_guidance=True` (Python only) gives the official
  scale, which the parity test uses;
* diff_fast_ratio: the official `DiffLoss.sample` builds its fast diffusion once, at its first call -- always
  a full step, which passes no ratio -- so every official run samples the cheap steps with the default
  int(0.5 diffusion_steps) steps, whatever `--diff_fast_ratio` says (the scripts' 0.4, parsed as a string,
  is never read). Here the ratio is honoured; its default 0.5 is what the official runs do. The other
  defaults are the official command line's: one cheap step per full step, no full-only steps first (its
  scripts run `pre_full_iters = steps / 2`).

`stats.nfe` counts full and cheap passes alike (as generators/recap.py does); the head's passes are not counted.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from generators.base import SamplerOption, register_sampler
from generators.mar.diffusion import GaussianDiffusion, sample_trajectory
from generators.mar.model import MAR, diffusion_for
from generators.mar.plain import MAR_OPTIONS, make_predict, mask_schedule, random_orders
from generators.recap import RECAP_OPTIONS, check_recap_options, group_sizes
from vision.tokens import GenerationStats, Tokens

RECAP_MAR_OPTIONS = MAR_OPTIONS + tuple(o for o in RECAP_OPTIONS if o.name in ("num_cache_iters", "pre_full_iters")) + (
    SamplerOption("diff_fast_ratio", float, 0.5, "cheap steps sample the diffusion head with int(diffusion_steps x "
                  "this) steps, in (0, 1] (what ReCAP's runs use: 0.5; 1 = as many as the full steps)"),
)


def fast_diffusion_steps(diffusion_steps: int, diff_fast_ratio: float) -> int:
    """The official `int(int(num_sampling_steps) * fast_ratio)`."""
    return int(int(diffusion_steps) * diff_fast_ratio)


def check_options(options: dict) -> None:
    """ValueError (one line) for options ReCAP-MAR cannot run with."""
    check_recap_options(options["steps"], options["pre_full_iters"], options["num_cache_iters"])
    ratio = options["diff_fast_ratio"]
    if not 0 < ratio <= 1:
        raise ValueError(f"--diff-fast-ratio must lie in (0, 1], got {ratio}")
    if options["num_cache_iters"] > 0:
        fast = fast_diffusion_steps(options["diffusion_steps"], ratio)
        if fast < 2:
            raise ValueError(f"--diff-fast-ratio {ratio} leaves {fast} diffusion step(s) for the cheap steps; "
                             "the head needs at least 2")
        try:
            diffusion_for(fast, options["diffusion_spacing"])
        except ValueError as e:
            raise ValueError(f"--diff-fast-ratio {ratio} ({fast} diffusion steps): {e}") from None


def guidance_scales(seq_len: int, steps: int, cfg: float, cfg_schedule: str, official_last_guidance: bool = False
                    ) -> list[float]:
    """Each step's guidance scale: plain MAR's, or with `official_last_guidance` the official ReCAP-MAR's (the last
    step reads mask_len 0)."""
    schedule = mask_schedule(seq_len, steps)
    if not official_last_guidance:
        return schedule.guidance(cfg, cfg_schedule, seq_len)
    lens = schedule.mask_len[:-1] + (0,)
    return dataclasses.replace(schedule, mask_len=lens).guidance(cfg, cfg_schedule, seq_len)


def sample_latents(model: MAR, labels: Tensor | None, *, batch_size: int, steps: int, diffusion_steps: int,
                   diffusion_spacing: str = "even", cfg: float, cfg_schedule: str, temperature: float,
                   num_cache_iters: int, pre_full_iters: int, diff_fast_ratio: float, generator: torch.Generator,
                   stats: GenerationStats, orders: Tensor | None = None,
                   noise_fn: Callable[[int, int, int], Tensor] | None = None,
                   official_last_guidance: bool = False) -> Tensor:
    """ReCAP-MAR's sample_tokens -> token latents (B, N, D). The draws, in order: the orders (plain's
    `random_orders`), then per step the noise of its n tokens (n, K, D), K that step's diffusion steps; `orders`
    and `noise_fn(n, K, D)` replace the generator's draws (parity checks)."""
    check_options(dict(steps=steps, pre_full_iters=pre_full_iters, num_cache_iters=num_cache_iters,
                       diff_fast_ratio=diff_fast_ratio, diffusion_steps=diffusion_steps,
                       diffusion_spacing=diffusion_spacing))
    param = model.fake_latent
    device, dtype = param.device, param.dtype
    B, N, D = batch_size, model.seq_len, model.token_dim
    guided = cfg != 1.0
    repeat = 2 if guided else 1
    cls = model.class_embedding(labels, B, guided)
    if orders is None:
        orders = random_orders(B, N, generator, device)
    rank = orders.argsort(dim=1)
    schedule = mask_schedule(N, steps)
    scales = guidance_scales(N, steps, cfg, cfg_schedule, official_last_guidance)
    full = diffusion_for(diffusion_steps, diffusion_spacing)
    fast = diffusion_for(fast_diffusion_steps(diffusion_steps, diff_fast_ratio), diffusion_spacing) \
        if num_cache_iters > 0 else full

    def draw(z_cond: Tensor, z_uncond: Tensor | None, scale: float, diffusion: GaussianDiffusion) -> Tensor:
        n, K = len(z_cond), diffusion.num_timesteps
        noise = noise_fn(n, K, D) if noise_fn is not None else \
            torch.randn(n, K, D, generator=generator, device=device, dtype=dtype)
        predict = make_predict(model, diffusion, z_cond, z_uncond, scale)
        return sample_trajectory(diffusion, predict, noise.to(dtype), temperature)

    tokens = torch.zeros(B, N, D, device=device, dtype=dtype)
    known = torch.zeros(B, N, dtype=torch.bool, device=device)
    step = 0
    for size in group_sizes(steps, pre_full_iters, num_cache_iters):
        # the group: every position its steps decode (ranks [lo of its last step, hi of its first))
        group = (rank >= schedule.lo[step + size - 1]) & (rank < schedule.hi[step])
        if size == 1:  # a full step alone: MAR's step (plain.py)
            z = model(tokens.repeat(repeat, 1, 1), known.repeat(repeat, 1), cls)
            stats.nfe += 1
            if group.any():
                tokens[group] = draw(z[:B][group], z[B:][group] if guided else None, scales[step], full)
            known |= group
            step += 1
            continue
        positions = group.nonzero()[:, 1].view(B, -1)  # raster order within the group (the official torch.where)
        rows = positions.repeat(repeat, 1)
        z, cache = model.forward_full(tokens.repeat(repeat, 1, 1), known.repeat(repeat, 1), cls, group.repeat(repeat, 1))
        stats.nfe += 1
        z = z.gather(1, rows[..., None].expand(-1, -1, z.shape[-1]))
        local = tokens.new_zeros(B, positions.shape[1], D)
        decoded = torch.zeros(B, positions.shape[1], dtype=torch.bool, device=device)
        start = 0
        for j in range(size):
            if j:
                z = model.forward_cheap(local.repeat(repeat, 1, 1), decoded.repeat(repeat, 1), rows, cls, cache)
                stats.nfe += 1
            n = schedule.hi[step] - schedule.lo[step]
            if n:
                zs = z[:, start:start + n]
                out = draw(zs[:B].reshape(B * n, -1), zs[B:].reshape(B * n, -1) if guided else None, scales[step],
                           fast if j else full)
                local[:, start:start + n] = out.view(B, n, D)
                decoded[:, start:start + n] = True
            start += n
            step += 1
        tokens.scatter_(1, positions[..., None].expand(-1, -1, D), local)
        known |= group
    return tokens


@register_sampler(MAR, "recap", options=RECAP_MAR_OPTIONS,
                  help="ReCAP: full steps cache the context's keys/values, cheap steps recompute only the group being "
                       "decoded (and sample the diffusion head with diff_fast_ratio of its steps)")
def sample_recap(model: MAR, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                 batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float, steps: int,
                 diffusion_steps: int, diffusion_spacing: str, cfg_schedule: str, num_cache_iters: int,
                 pre_full_iters: int, diff_fast_ratio: float) -> Tokens:
    tokens = sample_latents(model, labels, batch_size=batch_size, steps=steps, diffusion_steps=diffusion_steps,
                            diffusion_spacing=diffusion_spacing, cfg=cfg, cfg_schedule=cfg_schedule,
                            temperature=temperature, num_cache_iters=num_cache_iters, pre_full_iters=pre_full_iters,
                            diff_fast_ratio=diff_fast_ratio, generator=generator, stats=stats)
    return Tokens(model.spec, latents=model.unpatchify(tokens))
