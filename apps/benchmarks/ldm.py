"""Arbitrary-scale latent diffusion SR (shipped ldm-sr) against pixel-space diffusion SR as the output grows.

The paper's claim (Kim & Kim, CVPR 2024): diffusion runs on a latent the size of the LR input, and
only the implicit decoder's cheap per-pixel MLP grows with the output, so the cost stays nearly
flat with the scale, where pixel-space diffusion SR (IDM, SR3) runs its UNet at the output size
and runs out of memory. The baseline here is that pixel-space model at comparable size: the same
diffusers UNet2DModel family and widths, conditioned on the bicubic-upsampled LR concatenated to the
noisy image (SR3's conditioning), the same scheduler (DDIM, eta 1) and number of steps. Its weights
are random: time and memory do not depend on them. Each (method, scale) runs in a fresh process
after the same tiny warm-up, so that its peak resident memory is its own (floored at 1 MB for the
ratio: below that the figure is allocator noise).
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from apps.benchmarks import benchmark

MODEL = "ldm-sr"
SCALES = (2, 4, 8, 16)

_RUN = r"""
import json, sys, time, torch, torch.nn.functional as F
from apps.benchmarks import peak_rss_mb
from generators.pipeline import load_generator, load_tokenizer_for
method, scale, side, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = load_generator(sys.argv[5])
load_tokenizer_for(model)
lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
size = (side * scale, side * scale)
if method == "ldm":
    run = lambda size, steps: model.upscale(lr, size, steps=steps, generator=torch.Generator().manual_seed(0))
else:
    from diffusers import UNet2DModel
    from generators.latent_diffusion.model import make_scheduler
    c = model.config
    torch.manual_seed(0)
    unet = UNet2DModel(in_channels=6, out_channels=3, block_out_channels=tuple(c.block_out_channels),
                       layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups,
                       down_block_types=tuple(type(b).__name__ for b in model.unet.down_blocks),
                       up_block_types=tuple(type(b).__name__ for b in model.unet.up_blocks)).eval()
    def run(size, steps):  # the LDM's sampler settings: DDIM, eta 1 (stochastic), the same number of steps
        sched = make_scheduler("ddim", model.noise_scheduler.config)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        cond = F.interpolate(lr, size=size, mode="bicubic", align_corners=False)
        x = torch.randn(1, 3, *size, generator=g)
        for t in sched.timesteps:
            eps = unet(torch.cat([x, cond], 1), t).sample
            x = sched.step(eps, t, x, eta=1.0, generator=g).prev_sample
        return x
with torch.no_grad():
    lr_full = lr
    lr = lr_full[..., :8, :8]
    run((16, 16), 1)  # warm-up on a tiny input, the same for both: the measured peak includes the whole run
    lr = lr_full
    base = peak_rss_mb()
    t0 = time.perf_counter()
    out = run(size, steps)
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb() - base, "shape": list(out.shape)}))
"""


def _measure(method: str, scale: int, side: int, steps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RUN, method, str(scale), str(side), str(steps), MODEL],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ldm benchmark ({method} x{scale}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@benchmark("ldm", "latent diffusion SR (ldm-sr) vs pixel-space diffusion SR: time and memory as the output grows; "
           "PSNR/LPIPS x4 vs bicubic and LIIF on the held-out photos; scale consistency")
def run(quick: bool) -> dict[str, float]:
    from generators.latent_diffusion.evaluate import sr_figures, sr_pairs, try_lpips
    from generators.pipeline import load_generator, load_tokenizer_for
    from vision.hub import from_pretrained
    from vision.metrics.image_quality import psnr

    side, steps = (16, 5) if quick else (32, 20)
    figures: dict[str, float] = {"threads": torch.get_num_threads(), "lr_side": side, "steps": steps}
    for s in SCALES:
        ldm, pixel = _measure("ldm", s, side, steps), _measure("pixel", s, side, steps)
        figures[f"seconds_ldm_x{s}"] = round(ldm["seconds"], 3)
        figures[f"seconds_pixel_x{s}"] = round(pixel["seconds"], 3)
        figures[f"speedup_x{s}"] = round(pixel["seconds"] / ldm["seconds"], 3)
        figures[f"peak_mb_ldm_x{s}"] = round(ldm["peak_mb"], 1)
        figures[f"peak_mb_pixel_x{s}"] = round(pixel["peak_mb"], 1)
        if s == 8:
            figures["memory_ratio_x8"] = round(max(pixel["peak_mb"], 1.0) / max(ldm["peak_mb"], 1.0), 3)

    model = load_generator(MODEL)
    load_tokenizer_for(model)
    quality = sr_figures(model, 4.0, "cpu", seed=0, steps=10 if quick else 50, crop=64 if quick else 96,
                         liif=from_pretrained("liif-lite"), lpips_model=try_lpips("cpu"))
    figures.update(quality)  # psnr_ldm_x4, psnr_bicubic_x4, psnr_liif_x4 (and lpips_* with LPIPS weights on disk)
    if model.sampling_defaults["color_fix"] != "none":  # the same samples without the model's colour correction
        raw = sr_figures(model, 4.0, "cpu", seed=0, steps=10 if quick else 50, crop=64 if quick else 96,
                         color_fix="none")
        figures["psnr_ldm_no_color_fix_x4"] = raw["psnr_ldm_x4"]
    if "lpips_ldm_x4" not in quality:
        figures["lpips_available"] = 0  # torchvision's AlexNet weights are not on this machine

    # an x8 output brought down to x4 against the x4 output, same seed: the same latent, decoded twice
    lr, _ = sr_pairs(8.0, 64 if quick else 128)[0]
    lr = lr[None]
    h, w = lr.shape[-2:]
    with torch.no_grad():
        x8 = model.upscale(lr, (8 * h, 8 * w), steps=10, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
        x4 = model.upscale(lr, (4 * h, 4 * w), steps=10, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    down = F.interpolate(x8, size=(4 * h, 4 * w), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    figures["scale_consistency_db"] = round(psnr((down + 1) / 2, (x4 + 1) / 2).item(), 3)
    return figures
