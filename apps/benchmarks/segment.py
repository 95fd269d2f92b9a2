"""Sliding-window inference: Tessera's slab-streamed `sliding_window_inference` vs MONAI's, same everything.

Both run the same small 3-D conv model (14 classes), window, overlap (MONAI's default 0.25),
Gaussian blending (sigma 0.125 x window) and windows per batch, on the same synthetic volume
(512 x 512 x 200 voxels; --quick: 160 x 160 x 64) and produce a label map: Tessera reduces
to labels slab by slab (``output="labels"``), MONAI returns the blended logits of the whole
volume, which are then reduced with argmax. Each runs in its own child process, so that its
peak resident memory (``apps.benchmarks.peak_rss_mb``: the child's own high-water mark, which
includes the interpreter, torch, the library's own imports and the input volume:
``baseline_rss_mb``, measured before inference) is its own.
Figures: wall time of each (inference + reduction to labels only), ``speedup_vs_monai`` (MONAI's
time / Tessera's), peak RSS of each, the fraction of voxels whose labels agree, and
``max_abs_diff_vs_monai``: the largest difference of the blended logits (Tessera with
``output="logits"``) on a 192 x 192 x 128 volume (--quick: the quick volume) in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from apps.benchmarks import benchmark, peak_rss_mb

CLASSES = 14
OVERLAP = 0.25
SW_BATCH = 4


def sizes(quick: bool) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """(volume, window, logits-comparison volume)."""
    if quick:
        return (160, 160, 64), (64, 64, 32), (160, 160, 64)
    return (512, 512, 200), (96, 96, 96), (192, 192, 128)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, CLASSES, 1)).eval()


def make_volume(shape) -> torch.Tensor:
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def _tessera(x, model, window, output="labels"):
    from segmentation.inference import sliding_window_inference

    return sliding_window_inference(x, model, window, overlap=OVERLAP, mode="gaussian", sigma_scale=0.125,
                                    sw_batch_size=SW_BATCH, output=output)


def _monai_logits(x, model, window):
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(x[None], window, SW_BATCH, model, overlap=OVERLAP, mode="gaussian",
                                        sigma_scale=0.125)[0]


def child(which: str, shape, window, out: str, threads: int) -> None:
    """Run one implementation; print its timing and peak RSS as JSON, save its labels to `out`."""
    torch.set_num_threads(threads)
    # imports and a warm-up call outside the timed region; each child imports only its own library
    if which == "tessera":
        import segmentation.inference  # noqa: F401
    else:
        import monai.inferers  # noqa: F401

    model, x = make_model(), make_volume(shape)
    with torch.no_grad():
        model(x[None, :, :16, :16, :16])
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    if which == "tessera":
        labels = _tessera(x, model, window)
    else:
        logits = _monai_logits(x, model, window)
        labels = logits.argmax(0).to(torch.uint8)
        del logits
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    np.save(out, labels.numpy())
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline}))


def _run_child(which: str, shape, window, out: Path) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "apps.benchmarks.segment", which, ",".join(map(str, shape)),
           ",".join(map(str, window)), str(out), str(torch.get_num_threads())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{which} child failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def windows_count(shape, window) -> int:
    from segmentation.inference import scan_intervals, window_starts

    starts = window_starts(shape, window, scan_intervals(shape, window, (OVERLAP,) * 3))
    return int(np.prod([len(s) for s in starts]))


@benchmark("segment", "sliding-window inference vs MONAI sliding_window_inference: speed, agreement, peak RSS")
def run(quick: bool) -> dict[str, float]:
    shape, window, small = sizes(quick)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for which in ("monai", "tessera"):
            results[which] = _run_child(which, shape, window, Path(tmp) / f"{which}.npy")
        a, b = np.load(Path(tmp) / "tessera.npy"), np.load(Path(tmp) / "monai.npy")
        agreement = float((a == b).mean())
    # logits parity in this process, on a volume where MONAI's full logits are affordable
    model, x = make_model(), make_volume(small)
    diff = float((_tessera(x, model, window, output="logits") - _monai_logits(x, model, window)).abs().max())
    t, m = results["tessera"], results["monai"]
    figures.update({
        "volume_voxels": float(np.prod(shape)),
        "classes": CLASSES,
        "windows": windows_count(shape, window),
        "tessera_s": t["seconds"],
        "monai_s": m["seconds"],
        "speedup_vs_monai": m["seconds"] / t["seconds"],
        "peak_rss_mb": t["peak_rss_mb"],
        "peak_rss_mb_monai": m["peak_rss_mb"],
        "baseline_rss_mb": t["baseline_rss_mb"],
        "baseline_rss_mb_monai": m["baseline_rss_mb"],
        "label_agreement_vs_monai": agreement,
        "max_abs_diff_vs_monai": diff,
    })
    return figures


if __name__ == "__main__":  # the child processes
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["tessera", "monai"])
    p.add_argument("shape")
    p.add_argument("window")
    p.add_argument("out")
    p.add_argument("threads", type=int)
    a = p.parse_args()
    child(a.which, tuple(int(v) for v in a.shape.split(",")), tuple(int(v) for v in a.window.split(",")), a.out,
          a.threads)
