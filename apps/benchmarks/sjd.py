"""Speculative Jacobi decoding against plain autoregressive sampling on the shipped `ar-mnist`.

Both samplers run the same model, labels and seeds with the same processing (CFG, temperature,
top-k, top-p), repetitions alternating (apps/benchmarks/sampler_harness.py):

- step_compression: plain forward passes / SJD forward passes for the same images (one image at
  a time, one of each digit, so no sample waits for another);
- latency_speedup_b1, latency_speedup_b8: wall-time ratios, one image and eight at a time. On a
  CPU a forward pass over a window of 16 tokens costs about twice one over a single token (even for
  this small model), where a GPU decoding one token at a time is bound by memory and processes 16
  nearly for free; so the wall-time gain here is smaller than the step compression;
- acceptance_random / _horizontal / _vertical: mean tokens decided per SJD iteration with each
  draft initialisation;
- fd_plain, fd_sjd, accuracy_plain, accuracy_sjd: Fréchet distance in the MNIST classifier's
  features and class accuracy of 100 samples per digit (30 in quick mode) from each sampler;
  fd_noise / accuracy_noise: the spread (standard deviation) of the plain sampler over seeds, the
  yardstick for "within sampling noise" (SJD is lossless, so any difference is noise).
"""
from __future__ import annotations

import torch

from apps.benchmarks import benchmark

MODEL = "ar-mnist"
# the sampling settings ar-mnist is measured with (its index.json entry records the same)
SETTINGS = {"cfg": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
WINDOW = 16


@benchmark("sjd", "speculative Jacobi decoding vs plain AR sampling on ar-mnist: steps, latency, acceptance, FD")
def run(quick: bool) -> dict[str, float]:
    from apps.benchmarks.sampler_harness import SamplerRun, digit_quality, time_samplers
    from generators.pipeline import GenerationPipeline

    torch.manual_seed(0)
    pipe = GenerationPipeline.load(MODEL)
    model, tokenizer = pipe.generator, pipe.tokenizer
    repeats = 2 if quick else 5
    per_class = 30 if quick else 100
    plain = SamplerRun("plain", "plain", dict(SETTINGS))
    sjd = {init: SamplerRun(f"sjd_{init}", "sjd", dict(SETTINGS, window=WINDOW, init=init))
           for init in ("random", "horizontal", "vertical")}
    best = sjd["vertical"]

    figures: dict[str, float] = {}
    b1 = {"plain": {"nfe": 0.0, "wall_s": 0.0}, best.name: {"nfe": 0.0, "wall_s": 0.0}}
    for label in range(10):  # one image at a time, one of each digit: medians summed
        rows = time_samplers(model, [plain, best], torch.tensor([label]), repeats=repeats, seed=label)
        for name, row in rows.items():
            b1[name]["nfe"] += row["nfe"]
            b1[name]["wall_s"] += row["wall_s"]
    figures["step_compression"] = b1["plain"]["nfe"] / b1[best.name]["nfe"]
    figures["latency_speedup_b1"] = b1["plain"]["wall_s"] / b1[best.name]["wall_s"]
    b8 = time_samplers(model, [plain, best], torch.arange(8), repeats=repeats)
    figures["latency_speedup_b8"] = b8["plain"]["wall_s"] / b8[best.name]["wall_s"]
    figures["step_compression_b8"] = b8["plain"]["nfe"] / b8[best.name]["nfe"]
    acc = time_samplers(model, list(sjd.values()), torch.arange(10), repeats=1, warmup=False)
    for init, r in sjd.items():
        figures[f"acceptance_{init}"] = acc[r.name]["mean_accepted"]

    q_plain = digit_quality(model, tokenizer, plain, per_class=per_class, seed=0)
    q_sjd = digit_quality(model, tokenizer, best, per_class=per_class, seed=0)
    figures.update(fd_plain=q_plain["fd"], fd_sjd=q_sjd["fd"], accuracy_plain=q_plain["accuracy"],
                   accuracy_sjd=q_sjd["accuracy"])
    noise = [digit_quality(model, tokenizer, plain, per_class=per_class, seed=1 + s) for s in range(2 if quick else 3)]
    noise.append(q_plain)
    fds = torch.tensor([q["fd"] for q in noise], dtype=torch.float64)
    accs = torch.tensor([q["accuracy"] for q in noise], dtype=torch.float64)
    figures["fd_noise"] = float(fds.std())
    figures["accuracy_noise"] = float(accs.std())
    figures["plain_s_per_image_b1"] = b1["plain"]["wall_s"] / 10
    figures["sjd_s_per_image_b1"] = b1[best.name]["wall_s"] / 10
    return figures
