"""LIIF upscaling: fast grid path vs the official-style query, quality vs bicubic, memory, throughput,
the whole `apps.upscale` process, and the half-precision MLP against float32."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apps.benchmarks import benchmark

MODEL = "liif-lite"
WHOLE_PROCESS_PHOTO = "astronaut"  # 512x512, shipped inside scikit-image

_PEAK_RSS = r"""
import json, resource, sys, time, torch
from vision.hub import from_pretrained
side, scale = int(sys.argv[1]), float(sys.argv[2])
model = from_pretrained(sys.argv[3])
x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
y = model.upscale(x, (round(side * scale), round(side * scale)), tile=256)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "baseline_rss_mb": base / 1024, "out_side": y.shape[-1]}))
"""


def _reference_upscale(model, x: torch.Tensor, size: tuple[int, int], chunk: int) -> torch.Tensor:
    """The official test path: gen_feat once, then query_rgb per chunk (each re-unfolds the whole feature map)."""
    from vision.decoders.liif import make_cell, make_coord

    h, w = size
    coord = make_coord(size).unsqueeze(0)
    cell = make_cell(1, h * w, size)
    feat = model.encode(x)

    def query(c: torch.Tensor, cl: torch.Tensor) -> torch.Tensor:
        out = model.query_reference(feat, c, cl)
        # the shipped model adds a bicubic skip (not in LIIF); the fast path adds the same
        return out + model.skip_rgb(x, c) if model.config.skip == "bicubic" else out

    preds = [query(coord[:, i:i + chunk], cell[:, i:i + chunk]) for i in range(0, h * w, chunk)]
    return torch.cat(preds, dim=1).view(1, h, w, -1).permute(0, 3, 1, 2).clamp(-1, 1)


def _whole_process_seconds(photo: Path, runs: int = 3) -> float:
    """Median wall time of `python -m apps.upscale --scale 3.7` on `photo`, each run a fresh process."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "apps.upscale", "--scale", "3.7", str(photo), "-o",
                            str(Path(tmp) / "out.png"), "--overwrite", "--quiet"], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _grey_levels(image: torch.Tensor) -> torch.Tensor:
    return ((image + 1) * 127.5).round()


@benchmark("upscale", "LIIF (shipped liif-lite): fast grid path vs official-style query; PSNR vs bicubic; "
           "peak RSS at 1024x1024 x3.7; output Mpix/s at 512x512 x3.7; whole apps.upscale process; half MLP")
def run(quick: bool) -> dict[str, float]:
    from vision.data.images import read_image
    from vision.data.samples import sample_photo, split_photos
    from vision.decoders.evaluate import evaluate_upscaler
    from vision.hub import WEIGHTS_DIR, from_pretrained, read_index

    from apps.upscale import cpu_has_native_bf16

    model = from_pretrained(MODEL)
    figures: dict[str, float] = {"threads": torch.get_num_threads()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        side = 48 if quick else 96
        x = torch.rand(1, 3, side, side, generator=g) * 2 - 1
        size = (round(side * 3.7), round(side * 3.7))
        t0 = time.perf_counter()
        ref = _reference_upscale(model, x, size, chunk=30000)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = model.upscale(x, size)
        t_fast = time.perf_counter() - t0
        figures["speedup_vs_reference"] = t_ref / t_fast
        figures["max_abs_diff"] = (ref - fast).abs().max().item()

        _, held_out = split_photos()
        if quick:
            held_out = held_out[:2]
        figures.update(evaluate_upscaler(model, held_out, [2.0, 3.7, 4.0]))

        side = 256 if quick else 512
        x = torch.rand(1, 3, side, side, generator=g) * 2 - 1
        out = round(side * 3.7)
        model.upscale(x[..., :64, :64], (237, 237))  # warm-up
        t0 = time.perf_counter()
        model.upscale(x, (out, out), tile=256)
        seconds = time.perf_counter() - t0
        figures["mpix_per_s"] = out * out / 1e6 / seconds
        figures[f"seconds_{side}_x3.7"] = seconds

        # the half-precision MLP (--half) against float32 on a real photo, in 8-bit grey levels
        photo = read_image(sample_photo(WHOLE_PROCESS_PHOTO))[None]
        if quick:
            photo = photo[..., 128:384, 128:384]
        size = (round(photo.shape[-2] * 3.7), round(photo.shape[-1] * 3.7))
        t0 = time.perf_counter()
        full = model.upscale(photo, size, tile=256)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        half = model.upscale(photo, size, tile=256, dtype=torch.bfloat16)
        t_half = time.perf_counter() - t0
        figures["max_grey_level_diff_vs_float32"] = (_grey_levels(full) - _grey_levels(half)).abs().max().item()
        figures["grey_levels_changed_frac"] = (_grey_levels(full) != _grey_levels(half)).float().mean().item()
        if cpu_has_native_bf16():  # elsewhere bfloat16 is emulated and --half refuses to run
            figures["half_speedup_vs_float32"] = t_full / t_half

    figures["whole_process_s_512_x3.7"] = _whole_process_seconds(sample_photo(WHOLE_PROCESS_PHOTO))

    big = 512 if quick else 1024
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(big), "3.7", MODEL], capture_output=True, text=True,
                          check=True)
    rss = json.loads(proc.stdout)
    figures["peak_rss_mb"] = rss["peak_rss_mb"]
    figures[f"seconds_{big}_x3.7"] = rss["seconds"]
    figures["weights_kb"] = (WEIGHTS_DIR / read_index()[MODEL]["file"]).stat().st_size / 1024
    return figures
