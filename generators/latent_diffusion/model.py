"""Latent diffusion over a continuous first stage, for unconditional generation and super-resolution.

Paper: Kim & Kim, "Arbitrary-Scale Image Generation and Upsampling using Latent Diffusion Model and
Implicit Neural Decoder", CVPR 2024. Official code: github.com/zhenshij/arbitrary-scale-diffusion
(CompVis latent-diffusion + LIIF): `ldm/models/diffusion/ddpm.py` (`SRDiffusion`),
`ldm/models/diffusion/ddpm_finetuning.py` (`FinetuningSRDiffusion`, the alignment stage),
`eval_sr.py`, `inference.py`. The parts are diffusers' (`UNet2DModel`, `DDPMScheduler` and any other
scheduler); nothing of the official code is used.

* What is diffused: z0 = scale_factor * the first stage's latent `tokenizer.encode_latents(images)`, (B, C, h, w);
  batches, conditions and sampled latents are in the first stage's space, the scaling stays inside this class.
* Conditioning (`condition="concat"`, SR): c = Enc(nearest_upsample(LR, x f)), the ENCODING of the nearest-
  upsampled low-resolution image at latent resolution (official `SRDiffusion.get_cond`, not the LR pixels and
  not bicubic); the UNet sees cat([z_t, c]) (2C channels) and predicts the noise (C channels).
* Noise schedule: a diffusers `DDPMScheduler` from the config. `beta_schedule="scaled_linear"` is
  linspace(sqrt(b0), sqrt(b1), T)**2, which is what CompVis calls "linear" (the official schedule,
  b0 = 0.0015, b1 = 0.0155, T = 1000); diffusers' "linear" is plain linspace and would NOT match.
  `clip_sample=False` (the official sampler never clips pred_x0; latents are not in [-1, 1]),
  `steps_offset=1` (CompVis DDIM steps are range(0, T, T / n) + 1).
* Training (`loss`): t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar) z0 + sqrt(1 - abar) eps, the MSE between
  the UNet's eps prediction and eps (per-sample mean over C, h, w, then the batch mean): the official
  `l_simple` with loss_type l2, logvar 0, no ELBO term. t and eps come from `per_sample_rand`, one draw per
  sample from its own seed, so N processes train exactly what one process trains.
* Alignment (`alignment_loss`, the paper's L_align, official `FinetuningSRDiffusion.p_losses`):
  L_dm + SNR(t) ||Dec(x0_hat) - y||^2 with x0_hat = (z_t - sqrt(1 - abar) eps_hat) / sqrt(abar) and
  SNR = abar / (1 - abar). Only the UNet learns; the first stage is frozen (`freeze_first_stage`) but the
  gradient flows through its decoder into x0_hat. Differences from the official code, on purpose:
  - the weight is applied PER SAMPLE. The official `get_fine_loss` multiplies an (B, 1, 1, 1) weight by a
    (B,) per-sample loss, which broadcasts to (B, 1, 1, B) and averages to mean_b(SNR) * mean_b(loss): every
    sample's image loss is weighted by the batch-mean SNR, dominated by the small-t samples. That is a
    broadcasting bug, not the paper's formula, and is not copied.
  - the official latent term is SNR ||x0_hat - z0||^2, algebraically equal to ||eps_hat - eps||^2 (x0_hat - z0
    = -sqrt((1 - abar) / abar) (eps_hat - eps)); it is computed here as the latter (the same number, no
    division by abar near t = T).
  - no clipping of SNR (official neither): the weight runs from ~666 at t = 0 to ~7e-4 at t = T - 1.
  - the pixel target is whatever `batch["images"]` holds, decoded at its size; the official training resizes
    the HR target to the LATENT size (x1), which is the training code's choice (apps), not this loss's.
* Sampling (`sample_latents`): any diffusers scheduler built `from_config` of the training scheduler: the
  short names in SHORT_SCHEDULERS or a diffusers class name ("PNDMScheduler", "UniPCMultistepScheduler", ...).
  The initial noise is scaled by `init_noise_sigma`, every UNet input goes through `scale_model_input`, and
  `eta` / `generator` reach `step` only where it takes them (so `eta` matters for DDIM only). Every random
  draw comes from `generator`. DDIM is built with `set_alpha_to_one=False` (CompVis: the last step goes to
  abar_0, not 1). The official sampler is DDIM, 200 steps, eta 1.0, with the largest timestep (996) dropped
  (199 effective steps); diffusers' DDIM keeps it -- a small difference at the first, pure-noise step.
* Grid: the UNet is convolutional, so `grid` (or the condition's size) may differ from `latent_size`. Its
  sides must be multiples of 2**(levels - 1) (the UNet's down/up-samplings); otherwise the latent is sampled
  on the grid rounded UP to that multiple (the condition padded by edge replication on the bottom/right) and
  the top-left `grid` is returned (cropping). The padded border is extra generated content that is thrown away.
* Super-resolution (`upscale`): cond = Enc(nearest x f of the LR), z sampled at the cond's grid (= the LR's
  size), decoded with `tokenizer.decode(z, size=size)` to any output size, square or not, unclamped. The
  official code always encodes the LR upsampled to 192 and samples a 48x48 latent, so it handles one LR size
  (48, square); here any LR size works because the latent grid follows the LR.

Defaults: `eta` = 1.0 (what the official eval_sr.py and inference.py sample with, and so what the paper's
numbers are measured with; give 0 for deterministic DDIM), `steps` = 50 (official: 200; a trained model may
carry its own in `config.sampling`), `scheduler` = "ddim" (the official sampler).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.base import GeneratorModel, SamplerOption, per_sample_rand, register_preset, register_sampler
from vision.hub import register_model
from vision.tokens import GenerationStats, Tokens, TokenSpec

CONDITIONS = ("none", "concat")
COLOR_FIXES = ("none", "adain", "wavelet")
# short name -> diffusers class name; any other diffusers scheduler class may be given by its class name
SHORT_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
# CompVis conventions where a scheduler has the switch: the last DDIM/PNDM step goes to abar_0 (not 1)
_SCHEDULER_OVERRIDES = {"set_alpha_to_one": False}


@dataclass
class LatentDiffusionConfig:
    tokenizer: str | None = None  # the first stage it speaks (an implicit AE); None when it ships apart
    latent_channels: int = 3
    latent_size: int = 48  # latent grid side at training (official DIV2K: 48)
    downsample: int = 4  # the first stage's f (pixels per latent side), for the spec
    condition: str = "none"  # "none" (generation) | "concat" (SR: cat([z_t, Enc(nearest-up LR)]))
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] | None = None  # per level; None: no attention but diffusers' mid block
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    beta_schedule: str = "scaled_linear"  # = CompVis "linear" (sqrt-linspace squared); see the module docstring
    prediction_type: str = "epsilon"
    sampling: dict | None = None  # this model's own sampling defaults (steps, scheduler, eta)
    # the diffusion runs on scale_factor * (first-stage latent); official `scale_by_std`: 1 / std of training
    # latents, set by apps.train_ldm before the denoiser trains (the official DIV2K run kept 1.0)
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.attention_levels is not None:
            self.attention_levels = tuple(bool(a) for a in self.attention_levels)
            if len(self.attention_levels) != len(self.block_out_channels):
                raise ValueError(f"attention_levels has {len(self.attention_levels)} entries, block_out_channels "
                                 f"{len(self.block_out_channels)}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}; got {self.condition!r}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        if self.latent_channels < 1 or self.latent_size < 1 or self.downsample < 1:
            raise ValueError("latent_channels, latent_size and downsample must be >= 1")
        if not (self.scale_factor > 0 and self.scale_factor < float("inf")):
            raise ValueError(f"scale_factor must be a finite number > 0, got {self.scale_factor}")
        if self.prediction_type != "epsilon":
            raise ValueError(f"only prediction_type='epsilon' is implemented (the official); got {self.prediction_type!r}")


def make_scheduler(name: str, config: Any):
    """A diffusers scheduler built from `config` (a scheduler config): `name` is a short name (SHORT_SCHEDULERS)
    or the class name of any diffusers scheduler."""
    import diffusers

    cls_name = SHORT_SCHEDULERS.get(name, name)
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) and cls_name.endswith("Scheduler") else None
    if not (isinstance(cls, type) and hasattr(cls, "from_config") and hasattr(cls, "step")):
        raise ValueError(f"unknown scheduler {name!r}: give one of {', '.join(SHORT_SCHEDULERS)} or the class name "
                         "of a diffusers scheduler (e.g. PNDMScheduler, UniPCMultistepScheduler)")
    accepted = inspect.signature(cls.__init__).parameters
    overrides = {k: v for k, v in _SCHEDULER_OVERRIDES.items() if k in accepted}
    return cls.from_config(config, **overrides)


def _step_kwargs(scheduler, eta: float, generator: torch.Generator | None) -> dict:
    params = inspect.signature(scheduler.step).parameters
    out = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params and generator is not None:
        out["generator"] = generator
    return out


@register_model("latent-diffusion")
class LatentDiffusion(GeneratorModel):
    """A diffusers UNet2DModel denoising first-stage latents (see the module docstring)."""

    config_class = LatentDiffusionConfig
    needs_tokenizer = True  # SR encodes its condition, and the alignment loss decodes, through self.tokenizer
    sampling_defaults = {"cfg": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "steps": 50,
                         "scheduler": "ddim", "eta": 1.0, "color_fix": "none"}
    # official: AdamW (torch defaults: betas (0.9, 0.999), weight decay 0.01), lr 1e-4, no warm-up, no clipping
    training_defaults = {"lr": 1e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "warmup_steps": 0,
                         "grad_clip": 0.0}

    def __init__(self, config: LatentDiffusionConfig) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DModel

        self.config = c = config
        attn = c.attention_levels or (False,) * len(c.block_out_channels)
        C = c.latent_channels
        self.unet = UNet2DModel(
            sample_size=c.latent_size,
            in_channels=2 * C if c.condition == "concat" else C,
            out_channels=C,
            block_out_channels=c.block_out_channels,
            layers_per_block=c.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=c.attention_head_dim,
            norm_num_groups=c.norm_num_groups,
        )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
            beta_schedule=c.beta_schedule, prediction_type=c.prediction_type, clip_sample=False, steps_offset=1)
        self.sampling_defaults = {**type(self).sampling_defaults, **(c.sampling or {})}

    # ------------------------------------------------------------------ interface

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        return TokenSpec("continuous", grid=(c.latent_size, c.latent_size), downsample=c.downsample,
                         channels=c.latent_channels)

    @property
    def multiple(self) -> int:
        """Latent sides the UNet takes as they are: multiples of 2**(levels - 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def freeze_first_stage(self) -> nn.Module:
        """Freeze the bound first stage (requires_grad off, eval mode) and return it. Gradients still flow
        through its decoder into the latents it decodes (alignment_loss); only the UNet is ever trained."""
        tok = self.tokenizer
        tok.requires_grad_(False)
        tok.eval()
        return tok

    def sampling_options(self, sampler: str, **given):
        options = super().sampling_options(sampler, **given)
        if options["cfg"] != 1.0:
            raise ValueError("latent diffusion here has no classifier-free guidance: leave cfg at 1")
        if options["temperature"] != 1.0 or options["top_k"] != 0 or options["top_p"] != 1.0:
            raise ValueError("latent diffusion samples continuous latents: temperature / top-k / top-p do not apply "
                             "(leave them at 1 / 0 / 1)")
        make_scheduler(options["scheduler"], self.noise_scheduler.config)  # unknown names fail before sampling
        return options

    def denoise(self, z_t: Tensor, t: Tensor | int | float, cond: Tensor | None = None) -> Tensor:
        """The UNet's noise prediction for z_t (B, C, h, w) at timestep(s) t, given the concat condition."""
        if self.config.condition == "concat":
            if cond is None:
                raise ValueError("this model is conditioned by concatenation (SR): give cond")
            z_t = torch.cat([z_t, cond.to(z_t.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("this model is unconditional (condition='none'): give no cond")
        return self.unet(z_t, t).sample

    forward = denoise

    # ------------------------------------------------------------------ training

    def _noised(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """z0, t (B,), eps, z_t, cond: one per_sample_rand draw per sample gives t (through the normal CDF of
        its first number, exactly uniform) and the noise (the rest)."""
        z0 = batch["latents"].to(next(self.unet.parameters()).dtype) * self.config.scale_factor
        B, C, h, w = z0.shape
        if C != self.config.latent_channels:
            raise ValueError(f"latents have {C} channels, the model {self.config.latent_channels}")
        cond = batch.get("cond")
        if self.config.condition == "concat" and cond is None:
            raise ValueError("an SR (concat) model's batch needs 'cond', the encoded nearest-upsampled LR latents")
        if cond is not None:
            cond = cond.to(z0) * self.config.scale_factor
            if cond.shape != z0.shape:
                raise ValueError(f"cond {tuple(cond.shape)} must have the latents' shape {tuple(z0.shape)}")
        draw = per_sample_rand(batch, 1 + C * h * w, normal=True, device=z0.device).to(torch.float64)
        T = self.config.num_train_timesteps
        u = torch.special.ndtr(draw[:, 0])
        t = (u * T).long().clamp(0, T - 1)
        eps = draw[:, 1:].reshape(B, C, h, w).to(z0.dtype)
        z_t = self.noise_scheduler.add_noise(z0, eps, t)
        return z0, t, eps, z_t, cond

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """The eps-MSE (per-sample mean over C, h, w, then the batch mean); batch {"latents", ["cond"], ["seed"]}."""
        z0, t, eps, z_t, cond = self._noised(batch)
        eps_hat = self.denoise(z_t, t, cond)
        per_sample = (eps_hat.float() - eps.float()).pow(2).mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        return loss, {"mse": float(loss.detach()), "t_mean": float(t.float().mean())}

    def snr(self, t: Tensor) -> Tensor:
        """abar_t / (1 - abar_t) per timestep (float32, on t's device)."""
        abar = self.noise_scheduler.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def alignment_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """The paper's L_align = L_dm + SNR(t) ||Dec(x0_hat) - images||^2, SNR weighting PER SAMPLE.

        batch: {"latents" z0 (B, C, h, w), "images" (B, 3, H, W) in [-1, 1] (the pixel targets, decoded at their
        size), ["cond"], ["seed"]}. x0_hat = (z_t - sqrt(1 - abar) eps_hat) / sqrt(abar); Dec is
        `self.tokenizer.decode(x0_hat, size=(H, W))` under autograd: the gradient reaches the UNet through the
        frozen decoder (no first-stage parameter needs requires_grad). Both terms are per-sample means over
        their C/H/W; loss = mean_b(L_dm[b] + SNR[b] L_img[b]). Unlike the official `get_fine_loss`, whose
        (B,1,1,1) x (B,) broadcasting gives mean(SNR) * mean(L_img), each sample is weighted by its own SNR.
        No clipping of SNR (as the official): it reaches ~666 at t = 0 with the default schedule.
        """
        images = batch["images"]
        z0, t, eps, z_t, cond = self._noised(batch)
        eps_hat = self.denoise(z_t, t, cond)
        abar = self.noise_scheduler.alphas_cumprod.to(z0.device)[t].to(z0.dtype).view(-1, 1, 1, 1)
        x0_hat = (z_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        decoded = self.tokenizer.decode(x0_hat / self.config.scale_factor, size=tuple(images.shape[-2:]))
        l_dm = (eps_hat.float() - eps.float()).pow(2).mean(dim=(1, 2, 3))
        l_img = (decoded.float() - images.to(decoded.device).float()).pow(2).mean(dim=(1, 2, 3))
        weight = self.snr(t).float()
        loss = (l_dm + weight * l_img).mean()
        return loss, {"mse": float(l_dm.mean().detach()), "img_mse": float(l_img.mean().detach()),
                      "weighted_img": float((weight * l_img).mean().detach()), "t_mean": float(t.float().mean())}

    # ------------------------------------------------------------------ sampling

    def _default(self, name: str, value: Any) -> Any:
        return self.sampling_defaults[name] if value is None else value

    @torch.no_grad()
    def sample_latents(self, batch_size: int, *, cond: Tensor | None = None, grid: tuple[int, int] | int | None = None,
                       steps: int, scheduler: str | None = None, eta: float | None = None,
                       generator: torch.Generator | None = None, class_labels: Tensor | None = None,
                       stats: GenerationStats | None = None) -> Tensor:
        """(B, C, gh, gw) latents. grid: the latent grid (default: the condition's, else latent_size square);
        sides that are not multiples of `multiple` are sampled rounded up and cropped (module docstring).
        scheduler None / eta None: the model's sampling defaults ("ddim", 1.0)."""
        if class_labels is not None:
            raise ValueError("this latent diffusion model is unconditional in classes; give no class_labels")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sched = make_scheduler(self._default("scheduler", scheduler), self.noise_scheduler.config)
        eta = float(self._default("eta", eta))
        p = next(self.unet.parameters())
        device, dtype = p.device, p.dtype
        c = self.config
        if c.condition == "concat":
            if cond is None:
                raise ValueError("an SR (concat) model samples given cond (see upscale)")
            if cond.shape[0] != batch_size or cond.shape[1] != c.latent_channels:
                raise ValueError(f"cond {tuple(cond.shape)} must be ({batch_size}, {c.latent_channels}, h, w)")
            cond_grid = tuple(cond.shape[-2:])
            if grid is not None and tuple(_pair(grid)) != cond_grid:
                raise ValueError(f"grid {_pair(grid)} differs from the condition's {cond_grid}")
            grid = cond_grid
        elif cond is not None:
            raise ValueError("this model is unconditional (condition='none'): give no cond")
        gh, gw = _pair(grid if grid is not None else c.latent_size)
        m = self.multiple
        ph, pw = -gh % m, -gw % m
        if cond is not None:
            cond = cond.to(device=device, dtype=dtype) * c.scale_factor
            if ph or pw:
                cond = F.pad(cond, (0, pw, 0, ph), mode="replicate")
        sched.set_timesteps(steps, device=device)
        x = torch.randn((batch_size, c.latent_channels, gh + ph, gw + pw), generator=generator, device=device,
                        dtype=dtype) * sched.init_noise_sigma
        kwargs = _step_kwargs(sched, eta, generator)
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            eps = self.denoise(inp, t, cond)
            if stats is not None:
                stats.nfe += 1
            x = sched.step(eps, t, x, **kwargs).prev_sample
        return x[:, :, :gh, :gw] / c.scale_factor

    @torch.no_grad()
    def upscale(self, lr_images: Tensor, size: tuple[int, int] | int, *, steps: int | None = None,
                scheduler: str | None = None, eta: float | None = None, generator: torch.Generator | None = None,
                stats: GenerationStats | None = None, color_fix: str | None = None) -> Tensor:
        """Super-resolve lr_images (B, 3, h, w) in [-1, 1] (any h, w) to (B, 3, *size), unclamped.

        cond = tokenizer.encode_latents(nearest x f of the LR) (grid h x w), z sampled at that grid, then
        tokenizer.decode(z, size=size). steps / scheduler / eta / color_fix None: the model's sampling defaults.
        color_fix "adain" (not in the paper; StableSR's colour correction, Wang et al. 2023) gives each output
        channel the mean and standard deviation of the bicubic-upsampled LR: a small, briefly trained denoiser
        drifts in global colour at the high-noise steps, where it follows its condition least."""
        color_fix = self._default("color_fix", color_fix)
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIXES)}; got {color_fix!r}")
        if self.config.condition != "concat":
            raise ValueError("upscale needs a model trained for SR (condition='concat')")
        H, W = _pair(size)
        if H < 1 or W < 1:
            raise ValueError(f"output size must be positive, got {(H, W)}")
        tok = self.tokenizer
        f = int(tok.downsample)
        device = next(self.unet.parameters()).device
        lr = lr_images.to(device)
        cond = tok.encode_latents(F.interpolate(lr, scale_factor=f, mode="nearest"))
        z = self.sample_latents(lr.shape[0], cond=cond, steps=int(self._default("steps", steps)), scheduler=scheduler,
                                eta=eta, generator=generator, stats=stats)
        out = tok.decode(z, size=(H, W))
        if color_fix != "none":
            fix = adain_color_fix if color_fix == "adain" else wavelet_color_fix
            out = fix(out, F.interpolate(lr, size=(H, W), mode="bicubic", align_corners=False))
        return out


def _wavelet_low(x: Tensor, levels: int) -> Tensor:
    """The low-frequency part left after `levels` a-trous passes of a 3x3 binomial blur (dilation 1, 2, 4, ...)."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2**i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=x.shape[1])
    return x


def wavelet_color_fix(images: Tensor, reference: Tensor, levels: int = 5) -> Tensor:
    """StableSR's wavelet colour correction: the images' high frequencies over the reference's low frequencies,
    so colours follow the reference locally (AdaIN matches only each channel's global statistics)."""
    return images - _wavelet_low(images, levels) + _wavelet_low(reference, levels)


def adain_color_fix(images: Tensor, reference: Tensor, eps: float = 1e-6) -> Tensor:
    """Each image channel shifted and scaled to the mean and standard deviation of the reference's channel."""
    mean, std = images.mean(dim=(-2, -1), keepdim=True), images.std(dim=(-2, -1), keepdim=True)
    ref_mean, ref_std = reference.mean(dim=(-2, -1), keepdim=True), reference.std(dim=(-2, -1), keepdim=True)
    return (images - mean) / (std + eps) * ref_std + ref_mean


def _pair(v: tuple[int, int] | int) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    h, w = v
    return int(h), int(w)


# ---------------------------------------------------------------------- the plain sampler

LDM_OPTIONS = (
    SamplerOption("steps", int, 50, "denoising steps (the official samples with 200)", min=1),
    SamplerOption("scheduler", str, "ddim", "diffusers scheduler: " + ", ".join(SHORT_SCHEDULERS)
                  + " or any diffusers scheduler class name (e.g. PNDMScheduler)"),
    SamplerOption("eta", float, 1.0, "DDIM stochasticity (official 1.0; 0 = deterministic); other schedulers ignore it",
                  min=0.0),
)


@register_sampler(LatentDiffusion, "plain", options=LDM_OPTIONS)
def sample_plain(model: LatentDiffusion, labels: Tensor | None, *, generator: torch.Generator,
                 stats: GenerationStats, batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float,
                 steps: int, scheduler: str, eta: float) -> Tokens:
    """Unconditional latents at the model's latent grid, with any diffusers scheduler."""
    if model.config.condition != "none":
        raise ValueError("this model is an SR model (condition='concat'): use LatentDiffusion.upscale")
    z = model.sample_latents(batch_size, steps=steps, scheduler=scheduler, eta=eta, generator=generator,
                             class_labels=labels, stats=stats)
    return Tokens(model.spec, latents=z)


# ---------------------------------------------------------------------- sizes


def _small(spec: TokenSpec, num_classes: int, tokenizer: str) -> LatentDiffusionConfig:
    if spec.kind != "continuous":
        raise ValueError("latent diffusion needs a continuous token cache (latents)")
    if num_classes:
        raise ValueError("latent diffusion here is unconditional: the token cache must have no classes")
    if spec.grid[0] != spec.grid[1]:
        raise ValueError(f"ldm-small trains on square latent grids; the cache has {spec.grid}")
    return LatentDiffusionConfig(tokenizer=tokenizer, latent_channels=spec.channels, latent_size=spec.grid[0],
                                 downsample=spec.downsample, block_out_channels=(64, 128, 128),
                                 layers_per_block=2, norm_num_groups=32)


register_preset("ldm-small", LatentDiffusion, _small,
                help="unconditional latent diffusion, diffusers UNet (64, 128, 128) x 2 layers, ~6M parameters")
