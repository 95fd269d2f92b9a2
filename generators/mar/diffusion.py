"""The per-token Gaussian diffusion behind MAR's diffusion head (Li et al. 2024, "Autoregressive Image
Generation without Vector Quantization"; github.com/LTH14/mar, `diffusion/` -- DiT's copy of improved DDPM,
Nichol & Dhariwal 2021 -- and `models/diffloss.py`).

MAR's settings, the only ones implemented: the cosine noise schedule over 1000 steps (betas clipped at
0.999), the network predicts the noise (epsilon) and a variance interpolation v in [-1, 1]
(LEARNED_RANGE: log variance = (v + 1)/2 log beta_t + (1 - v)/2 log posterior variance_t), loss "MSE"
(the noise MSE plus the variational bound term that trains v with the mean frozen), no clipping of the
predicted x_0.

Respacing (`space_timesteps`): a sampler with K steps keeps K of the 1000 timesteps, evenly spread
(`"100"`; `"ddimN"` is DDIM's stride), and recomputes betas from the kept alphas_cumprod; the network is
called with the original timestep of each kept step. Training uses all 1000 steps through the same
recomputation (as the official `create_diffusion(timestep_respacing="")`).

Sampling (`p_sample_loop`, MAR's temperature): y_K = noise ~ N(0, I); for respaced steps i = K-1 .. 1,
y_i = mean(y_{i+1}, i) + temperature * exp(0.5 log_var(y_{i+1}, i)) * eps_i; the token is
x = mean(y_1, 0), the last step adding no noise. With classifier-free guidance the network runs on the
conditional and the null condition, the noise predictions are mixed `uncond + cfg (cond - uncond)`,
and the variance is the conditional one (the official `forward_with_cfg`).

Trajectory densities (for continuous speculative decoding, `continuous_speculative.py`): the sampled
variables of one token are v = (y_K, ..., y_2, x). Because the last step is deterministic and depends on
the model, the density of v under a model m is the product of the per-step Gaussians and, for the last
step, the density of y_1 = g_m^{-1}(x) times the Jacobian of the inverse map:

    log p_m(v) = log N(y_K; 0, I) + sum_{i=2}^{K-1} log N(y_i; mean_m(y_{i+1}, i), T^2 var_m(y_{i+1}, i))
                 + log N(g_m^{-1}(x); mean_m(y_2, 1), T^2 var_m(y_2, 1)) - log |det dg_m/dy (g_m^{-1}(x))|,

where g_m(y) = mean_m(y, 0) is the last step. g_m(y) = (y - sqrt(1 - abar_0) eps_m(y, 0)) / sqrt(abar_0)
with sqrt(1 - abar_0) = 0.0064 for the cosine schedule, a small perturbation of the identity: it is
inverted by the fixed-point iteration y <- sqrt(abar_0) x + sqrt(1 - abar_0) eps_m(y, 0), a contraction
(hence g_m a bijection) whenever the network's Lipschitz constant in y at t = 0 is below
1 / sqrt(1 - abar_0) ~ 155; an iteration that does not converge raises instead of guessing.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

BASE_STEPS = 1000
LOG_2PI = math.log(2 * math.pi)


def cosine_betas(num_steps: int = BASE_STEPS, max_beta: float = 0.999) -> np.ndarray:
    """improved DDPM's cosine schedule: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, float64."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """The kept timesteps: `section_counts` "K" (or "K1,K2,..." per equal section) spreads K steps evenly
    with rounding as improved DDPM does; "ddimN" is DDIM's integer stride."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


class GaussianDiffusion:
    """The cosine-schedule diffusion respaced to `steps` (None or "" = all 1000). Tables are float64 and are
    read at the caller's dtype (the official code reads them as float32)."""

    def __init__(self, steps: int | str | None = None) -> None:
        base = cosine_betas()
        spec = [BASE_STEPS] if steps in (None, "") else str(steps)
        use = space_timesteps(BASE_STEPS, spec)
        base_cumprod = np.cumprod(1.0 - base)
        last, betas, timestep_map = 1.0, [], []
        for i, ac in enumerate(base_cumprod):
            if i in use:
                betas.append(1 - ac / last)
                last = ac
                timestep_map.append(i)
        b = np.array(betas, dtype=np.float64)
        if len(b) < 2:
            raise ValueError("the diffusion head needs at least 2 sampling steps")
        self.num_timesteps = len(b)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": b,
            "log_betas": np.log(b),
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        }
        self.tables = {k: torch.from_numpy(v) for k, v in tables.items()}
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.long)

    def table(self, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """tables[name][t] as a (M, 1) column of `dtype` (float32 reads as the official's `.float()`)."""
        values = self.tables[name].to(t.device)[t]
        return (values.float() if dtype != torch.float64 else values)[:, None].to(dtype)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original (1000-step) timestep the network sees for respaced step t."""
        return self.timestep_map.to(t.device)[t]

    # ------------------------------------------------------------------ the model's Gaussian

    def split_output(self, out: Tensor) -> tuple[Tensor, Tensor]:
        c = out.shape[-1] // 2
        return out[:, :c], out[:, c:]

    def predict_xstart(self, y: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self.table("sqrt_recip_alphas_cumprod", t, y.dtype) * y - \
            self.table("sqrt_recipm1_alphas_cumprod", t, y.dtype) * eps

    def posterior_mean(self, x0: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return self.table("posterior_mean_coef1", t, y.dtype) * x0 + self.table("posterior_mean_coef2", t, y.dtype) * y

    def mean_log_variance(self, out: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The model's Gaussian p(y_{t-1} | y_t): mean and log variance from its output (eps, v)."""
        eps, v = self.split_output(out)
        min_log = self.table("posterior_log_variance_clipped", t, y.dtype)
        max_log = self.table("log_betas", t, y.dtype)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        return self.posterior_mean(self.predict_xstart(y, t, eps), y, t), log_var

    # ------------------------------------------------------------------ training

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.table("sqrt_alphas_cumprod", t, x0.dtype) * x0 + \
            self.table("sqrt_one_minus_alphas_cumprod", t, x0.dtype) * noise

    def training_losses(self, net: Callable[[Tensor, Tensor, Tensor], Tensor], x0: Tensor, t: Tensor, z: Tensor,
                        noise: Tensor) -> dict[str, Tensor]:
        """Per-row losses {"mse", "vb", "loss"} at timesteps t (respaced indices) for noise `noise`:
        MSE of the noise prediction plus the variational-bound term (bits) training the variance with the
        mean frozen: KL(q(y_{t-1}|y_t, x_0) || p) for t > 0, the discretised decoder NLL at t = 0."""
        y_t = self.q_sample(x0, t, noise)
        out = net(y_t, self.model_timesteps(t), z)
        eps, v = self.split_output(out)
        frozen = torch.cat([eps.detach(), v], dim=1)
        mean, log_var = self.mean_log_variance(frozen, y_t, t)
        true_mean = self.posterior_mean(x0, y_t, t)
        true_log_var = self.table("posterior_log_variance_clipped", t, x0.dtype)
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        kl = kl.mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).mean(dim=1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """improved DDPM's decoder likelihood of data binned at 1/255 in [-1, 1] (applied to latents as is)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ---------------------------------------------------------------------- sampling and trajectory densities

# predict(y (M, C), t (M,) respaced step) -> the network output (M, 2C) already guided (eps mixed, cond variance)
Predict = Callable[[Tensor, Tensor], Tensor]


def gaussian_log_density(y: Tensor, mean: Tensor, log_std: Tensor, flatten: float = 1.0) -> Tensor:
    """sum over the last dimension of log N(y; mean, exp(log_std)^2), in float64. `flatten` != 1 divides the
    standardised deviation by it (CSpD's lossy `inner_temperature`; 1 is the density)."""
    y, mean, log_std = y.double(), mean.double(), log_std.double()
    return (-0.5 * ((y - mean) * torch.exp(-log_std) / flatten) ** 2 - log_std - 0.5 * LOG_2PI).sum(dim=-1)


@dataclass
class Trajectory:
    """Sampled trajectories, one per row: states (M, K, C) = y_K, ..., y_1 (states[:, j] is y_{K-j}); the token
    x (M, C) = g(y_1); the Gaussian of each noisy step, means and log standard deviations (M, K-1, C) (entry
    j-1 is the step that produced states[:, j])."""

    states: Tensor
    token: Tensor
    means: Tensor
    log_stds: Tensor

    def log_density(self, flatten: float = 1.0) -> Tensor:
        """log N(y_K; 0, I) + the K-1 noisy steps' log densities of the trajectory's own states (float64), without
        the last step's Jacobian term. `flatten` != 1 divides every standardised deviation by it (lossy)."""
        y_k = self.states[:, 0]
        out = gaussian_log_density(y_k, torch.zeros_like(y_k), torch.zeros_like(y_k))
        if self.means.shape[1]:
            out = out + gaussian_log_density(self.states[:, 1:], self.means, self.log_stds, flatten).sum(dim=1)
        return out


def step_log_std(log_var: Tensor, temperature: float) -> Tensor:
    return 0.5 * log_var + math.log(temperature)


def sample_trajectory(diffusion: GaussianDiffusion, predict: Predict, noise: Tensor, temperature: float,
                      record: bool = False) -> Trajectory | Tensor:
    """MAR's `p_sample_loop` with given noise (M, K, C): noise[:, 0] is y_K, noise[:, j] (j = 1 .. K-1) the noise of
    the j-th noisy step (respaced step K-j). Returns the tokens, or with `record` the Trajectory (temperature
    must then be > 0: the densities need noisy steps)."""
    M, K, C = noise.shape
    if K != diffusion.num_timesteps:
        raise ValueError(f"noise holds {K} steps, the diffusion has {diffusion.num_timesteps}")
    y = noise[:, 0]
    states, means, log_stds = [y], [], []
    for j, i in enumerate(range(K - 1, 0, -1), start=1):
        t = torch.full((M,), i, dtype=torch.long, device=noise.device)
        mean, log_var = diffusion.mean_log_variance(predict(y, t), y, t)
        y = mean + torch.exp(0.5 * log_var) * noise[:, j] * temperature
        if record:
            states.append(y)
            means.append(mean)
            log_stds.append(step_log_std(log_var, temperature))
    x = final_map(diffusion, predict, y)
    if not record:
        return x
    empty = noise.new_zeros(M, 0, C)
    return Trajectory(torch.stack(states, dim=1), x, torch.stack(means, dim=1) if means else empty,
                      torch.stack(log_stds, dim=1) if log_stds else empty)


def final_map(diffusion: GaussianDiffusion, predict: Predict, y1: Tensor) -> Tensor:
    """g(y_1) = mean(y_1, 0), the last (noise-free) step."""
    t0 = torch.zeros(y1.shape[0], dtype=torch.long, device=y1.device)
    return diffusion.mean_log_variance(predict(y1, t0), y1, t0)[0]


def final_map_log_det(diffusion: GaussianDiffusion, predict_one: Callable[..., Tensor], y1: Tensor,
                      *per_row: Tensor) -> Tensor:
    """log |det dg/dy| at y1 (M, C), float64. `predict_one(y (C,), t (), *row)` is the guided network output
    (2C,) for one row; `per_row` are its per-row arguments (conditions, guidance scale), vmapped over."""
    from torch.func import jacfwd, vmap

    C = y1.shape[1]
    a = diffusion.table("sqrt_recip_alphas_cumprod", torch.zeros(1, dtype=torch.long), y1.dtype)[0, 0].to(y1.device)
    b = diffusion.table("sqrt_recipm1_alphas_cumprod", torch.zeros(1, dtype=torch.long), y1.dtype)[0, 0].to(y1.device)
    c1 = diffusion.table("posterior_mean_coef1", torch.zeros(1, dtype=torch.long), y1.dtype)[0, 0].to(y1.device)
    c2 = diffusion.table("posterior_mean_coef2", torch.zeros(1, dtype=torch.long), y1.dtype)[0, 0].to(y1.device)
    t0 = diffusion.model_timesteps(torch.zeros((), dtype=torch.long)).to(y1.device)

    def eps(y: Tensor, *row: Tensor) -> Tensor:
        return predict_one(y, t0, *row)[:C]

    with warnings.catch_warnings():  # torch's forward-mode AD loads its decompositions through torch.jit.script
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        jac = vmap(jacfwd(eps), in_dims=(0,) + (0,) * len(per_row))(y1, *per_row)  # (M, C, C)
    eye = torch.eye(C, dtype=y1.dtype, device=y1.device)
    j = c1 * (a * eye - b * jac) + c2 * eye
    return torch.linalg.slogdet(j.double())[1]


def invert_final_map(diffusion: GaussianDiffusion, predict: Predict, x: Tensor, start: Tensor,
                     max_iter: int = 100) -> Tensor:
    """y with g(y) = x by the fixed-point iteration y <- (x + c1 b eps(y, 0)) / (c1 a + c2), from `start`.
    Raises RuntimeError if it does not converge (g would not be known to be invertible there)."""
    M = x.shape[0]
    t0 = torch.zeros(M, dtype=torch.long, device=x.device)
    a = diffusion.table("sqrt_recip_alphas_cumprod", t0[:1], x.dtype)
    b = diffusion.table("sqrt_recipm1_alphas_cumprod", t0[:1], x.dtype)
    c1 = diffusion.table("posterior_mean_coef1", t0[:1], x.dtype)
    c2 = diffusion.table("posterior_mean_coef2", t0[:1], x.dtype)
    tol = 1e-12 if x.dtype == torch.float64 else 2e-6
    y = start
    for _ in range(max_iter):
        eps = diffusion.split_output(predict(y, t0))[0]
        new = (x + c1 * b * eps) / (c1 * a + c2)
        if bool(((new - y).abs() <= tol * (1 + y.abs())).all()):
            return new
        y = new
    err = float((final_map(diffusion, predict, y) - x).abs().max())
    if err > 1e-4 * (1 + float(x.abs().max())):
        raise RuntimeError("the last denoising step could not be inverted (fixed-point iteration did not converge, "
                           f"error {err:.2e}); the trajectory density of a token is undefined there")
    return y
