"""MAR's plain sampler: `sample_tokens` of LTH14/mar (`models/mar.py`), every draw from the given generator.

For a batch of B samples with N tokens each:

1. a uniformly random order of the N positions per sample (the official `sample_orders`);
2. for step k = 0 .. steps-1 (MaskGIT's cosine schedule): mask_len = floor(N cos(pi/2 (k+1)/steps))
   clamped to [1, masked - 1] (`mask_schedule`); the positions predicted at step k are those still
   masked that are not among the first mask_len of the order (at the last step, all still masked);
3. one encoder/decoder pass over the known tokens (with guidance the batch runs as [cond; null class])
   gives each predicted position its condition z; its token is sampled by the diffusion head
   (generators/mar/diffusion.py, `sample_trajectory`) with `diffusion_steps` respaced steps and the
   temperature, guided with scale `1 + (cfg - 1) (N - mask_len) / N` ("linear", Muse's schedule; at the
   last step mask_len is 1) or `cfg` ("constant"); guidance is off when cfg == 1.

Spacing of the head's steps. MAR keeps them evenly over the 1000 training timesteps, t = 999 included
(`diffusion_spacing="even"`, the default and what the released checkpoints are evaluated with). At t = 999
the cosine schedule's clipped beta leaves abar = 2.4e-9, so the first step's mean carries the noise
prediction's error times coef1 / sqrt(abar) (about 350 at 100 steps, 1300 at 25): a head must predict the
noise there to ~1e-3 for the samples to stay finite. The small heads trained here on MNIST reach ~0.07
(measured on training latents), and their samples explode under that spacing (latent std ~1500 instead of
1). `"ddim"` is the official code's other respacing (`"ddimN"`: an integer stride from 0, so 25 steps keep
t = 0, 40, ..., 960, where abar = 3.7e-3): their samples are well-behaved, and it is their default.

Defaults: 64 steps and 100 diffusion steps (MAR's faster evaluation setting; its best FIDs use 256 steps),
no guidance, temperature 1 -- or the model's own `config.sampling` (the MNIST presets: 16 steps, 25
diffusion steps, cfg 2). `stats.nfe` counts encoder/decoder passes (one per step); the diffusion head's
passes are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from generators.base import SamplerOption, register_sampler
from generators.mar.diffusion import GaussianDiffusion, Predict, sample_trajectory
from generators.mar.model import MAR, SPACINGS, diffusion_for
from vision.tokens import GenerationStats, Tokens

CFG_SCHEDULES = ("linear", "constant")

MAR_OPTIONS = (
    SamplerOption("steps", int, 64, "autoregressive steps (MAR evaluates with 64 or 256)", min=1),
    SamplerOption("diffusion_steps", int, 100, "denoising steps of the per-token diffusion head (MAR: 100)", min=2),
    SamplerOption("diffusion_spacing", str, "even", "which of the 1000 timesteps the head's steps keep: even (MAR's, "
                  "t = 999 included) or ddim (an integer stride from 0; see generators/mar/plain.py)", choices=SPACINGS),
    SamplerOption("cfg_schedule", str, "linear", "guidance over the steps: linear (MAR's) or constant",
                  choices=CFG_SCHEDULES),
)


@dataclass(frozen=True)
class MaskSchedule:
    """Step k predicts the positions whose rank in the sample's order lies in [lo[k], hi[k]); mask_len[k] is the
    official mask_len of step k (what the linear guidance schedule reads)."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    mask_len: tuple[int, ...]

    def guidance(self, cfg: float, schedule: str, seq_len: int) -> list[float]:
        if schedule == "linear":
            return [1 + (cfg - 1) * (seq_len - m) / seq_len for m in self.mask_len]
        if schedule == "constant":
            return [cfg] * len(self.mask_len)
        raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}; got {schedule!r}")


def mask_schedule(seq_len: int, steps: int) -> MaskSchedule:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    masked, lo, hi, lens = seq_len, [], [], []
    for k in range(steps):
        ratio = np.cos(math.pi / 2. * (k + 1) / steps)  # the official expression, float64
        mask_len = max(1, min(masked - 1, int(np.floor(seq_len * ratio))))
        after = 0 if k == steps - 1 else mask_len
        lo.append(after)
        hi.append(masked)
        lens.append(mask_len)
        masked = after
    return MaskSchedule(tuple(lo), tuple(hi), tuple(lens))


def random_orders(batch_size: int, seq_len: int, generator: torch.Generator, device) -> Tensor:
    """(B, N): each row a uniformly random permutation of the positions (the generation order, reversed: the
    first ones of the order stay masked longest)."""
    return torch.rand(batch_size, seq_len, generator=generator, device=device).argsort(dim=1)


def make_predict(model: MAR, diffusion: GaussianDiffusion, z_cond: Tensor, z_uncond: Tensor | None,
                 scale: Tensor | float) -> Predict:
    """predict(y (M, D), t (M,) respaced) -> the head's output (M, 2D) for conditions z_cond (M, Dz); guided
    with z_uncond and `scale` (a float or (M,)) as the official `forward_with_cfg`: eps = uncond + scale (cond -
    uncond), the variance channels the conditional ones."""
    head = model.head
    D = model.token_dim

    def predict(y: Tensor, t: Tensor) -> Tensor:
        tm = diffusion.model_timesteps(t)
        if z_uncond is None:
            return head(y, tm, z_cond)
        out = head(torch.cat([y, y]), torch.cat([tm, tm]), torch.cat([z_cond, z_uncond]))
        cond, uncond = out.chunk(2)
        s = scale[:, None] if isinstance(scale, Tensor) else scale
        eps = uncond[:, :D] + s * (cond[:, :D] - uncond[:, :D])
        return torch.cat([eps, cond[:, D:]], dim=1)

    return predict


def make_predict_one(model: MAR, guided: bool) -> Callable[..., Tensor]:
    """The same for one row (vmapped for Jacobians): (y (D,), t () model timestep, z_cond[, z_uncond, scale])."""
    head = model.head
    D = model.token_dim

    def one(y: Tensor, t: Tensor, z_cond: Tensor, z_uncond: Tensor | None = None, scale: Tensor | None = None):
        if not guided:
            return head(y[None], t.reshape(1), z_cond[None])[0]
        out = head(torch.stack([y, y]), t.reshape(1).expand(2), torch.stack([z_cond, z_uncond]))
        eps = out[1, :D] + scale * (out[0, :D] - out[1, :D])
        return torch.cat([eps, out[0, D:]])

    return one


def sample_latents(model: MAR, labels: Tensor | None, *, batch_size: int, steps: int, diffusion_steps: int,
                   diffusion_spacing: str = "even", cfg: float, cfg_schedule: str, temperature: float, generator: torch.Generator,
                   stats: GenerationStats, orders: Tensor | None = None,
                   noise_fn: Callable[[int, int, int], Tensor] | None = None) -> Tensor:
    """MAR's sample_tokens -> token latents (B, N, D). `orders` and `noise_fn(n, K, D)` (noise of the n tokens of
    a step: initial noise and the K-1 step noises) replace the generator's draws (parity checks)."""
    param = model.fake_latent
    device, dtype = param.device, param.dtype
    B, N, D = batch_size, model.seq_len, model.token_dim
    guided = cfg != 1.0
    cls = model.class_embedding(labels, B, guided)
    if orders is None:
        orders = random_orders(B, N, generator, device)
    rank = orders.argsort(dim=1)
    schedule = mask_schedule(N, steps)
    scales = schedule.guidance(cfg, cfg_schedule, N)
    diffusion = diffusion_for(diffusion_steps, diffusion_spacing)
    K = diffusion.num_timesteps
    tokens = torch.zeros(B, N, D, device=device, dtype=dtype)
    known = torch.zeros(B, N, dtype=torch.bool, device=device)
    repeat = 2 if guided else 1
    for k in range(steps):
        z = model(tokens.repeat(repeat, 1, 1), known.repeat(repeat, 1), cls)
        stats.nfe += 1
        group = (rank >= schedule.lo[k]) & (rank < schedule.hi[k])
        n = int(group.sum())
        if n == 0:
            continue
        z_u = z[B:][group] if guided else None
        predict = make_predict(model, diffusion, z[:B][group], z_u, scales[k])
        noise = noise_fn(n, K, D) if noise_fn is not None else \
            torch.randn(n, K, D, generator=generator, device=device, dtype=dtype)
        tokens[group] = sample_trajectory(diffusion, predict, noise.to(dtype), temperature)
        known |= group
    return tokens


@register_sampler(MAR, "plain", options=MAR_OPTIONS,
                  help="MAR's masked autoregressive sampling: random order, cosine schedule, diffusion head per token")
def sample_plain(model: MAR, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                 batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float, steps: int,
                 diffusion_steps: int, diffusion_spacing: str, cfg_schedule: str) -> Tokens:
    tokens = sample_latents(model, labels, batch_size=batch_size, steps=steps, diffusion_steps=diffusion_steps,
                            diffusion_spacing=diffusion_spacing,
                            cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature, generator=generator,
                            stats=stats)
    return Tokens(model.spec, latents=model.unpatchify(tokens))
