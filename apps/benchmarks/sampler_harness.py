"""Two (or more) samplers on the same model, labels and seeds: what every family's sampler benchmark uses.

Repetitions alternate between the samplers (A B A B ...), so a slow moment of the machine does not
fall on one side only, and medians are reported: wall time, counted forward passes
(`GenerationStats.nfe`, `draft_nfe`), tokens accepted per iteration, and peak memory of the run
(on CUDA the allocator's peak; on Linux CPU the resident high-water mark, reset before each run).
Quality is measured once per sampler on its own, larger set of samples: Fréchet distance in the
MNIST classifier's feature space and class accuracy (`vision.metrics.digits`), and the spread of the
reference sampler over seeds says how much of a difference is sampling noise.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplerRun:
    """One side of a comparison: a report name, the sampler, its options, and optionally another model
    (e.g. the same family at a different size)."""

    name: str
    sampler: str = "plain"
    options: dict[str, Any] = field(default_factory=dict)
    model: Any = None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets this process's VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from apps.benchmarks import peak_rss_mb

    return peak_rss_mb()


def tensor_peak_mb(fn, device: torch.device) -> float:
    """Run `fn()` and return the peak memory of the tensors on `device` during it, in MB: on CUDA the
    allocator's peak (everything allocated, weights included); on a CPU the high-water mark of the tensors
    `fn` allocated above those live when it started, from the profiler's allocation and free events in time
    order (memory that torch's CPU allocator hands out; the process's resident size would count freed
    memory the C library keeps, and libraries loaded on first use)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        reset_peak_memory(device)
        fn()
        torch.cuda.synchronize(device)
        return peak_memory_mb(device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def tensor_mb(*modules) -> float:
    """The parameters and buffers of the given modules, in MB."""
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]) / 2**20


def time_samplers(model, runs: list[SamplerRun], labels: torch.Tensor, *, repeats: int = 3, seed: int = 0,
                  warmup: bool = True) -> dict[str, dict[str, float]]:
    """Median wall time, forward passes, accepted tokens per iteration and peak memory of each run, on the
    same labels and seed, repetitions alternating between the runs."""
    device = next(model.parameters()).device
    labels = labels.to(device)
    samples: dict[str, list[dict[str, float]]] = {r.name: [] for r in runs}
    order = ([None] if warmup else []) + list(range(repeats))
    for rep in order:
        for run in runs:
            gen = run.model or model
            g = torch.Generator(device).manual_seed(seed)
            reset_peak_memory(device)
            t0 = time.perf_counter()
            _, stats = gen.generate(labels, sampler=run.sampler, generator=g, **run.options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
            if rep is None:
                continue
            samples[run.name].append({"wall_s": wall, "nfe": stats.nfe, "draft_nfe": stats.draft_nfe,
                                      "mean_accepted": stats.mean_accepted, "peak_memory_mb": peak_memory_mb(device)})
    return {name: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for name, rows in samples.items()}


@torch.no_grad()
def digit_quality(model, tokenizer, run: SamplerRun, *, per_class: int = 100, seed: int = 0,
                  batch_size: int = 100) -> dict[str, float]:
    """FD and class accuracy of `per_class` samples of each digit drawn with `run`."""
    from vision.metrics.digits import score_digits

    gen = run.model or model
    device = next(gen.parameters()).device
    labels = torch.arange(10).repeat_interleave(per_class)
    g = torch.Generator(device).manual_seed(seed)
    images = []
    for chunk in labels.split(batch_size):
        tokens, _ = gen.generate(chunk.to(device), sampler=run.sampler, generator=g, **run.options)
        images.append(tokenizer.decode(tokens).clamp(-1, 1).float().cpu())
    return score_digits(torch.cat(images), labels)


def compare_samplers(model, tokenizer, runs: list[SamplerRun], *, timing_labels: torch.Tensor, repeats: int = 3,
                     per_class: int = 100, quality_seeds: int = 3, seed: int = 0) -> dict[str, float]:
    """Flat figures: `{name}_wall_s`, `{name}_nfe`, `{name}_draft_nfe`, `{name}_mean_accepted`,
    `{name}_peak_memory_mb` for each run, and its quality on `quality_seeds` seeds (seed, seed + 1, ...):
    `{name}_fd` and `{name}_accuracy`, the means, `{name}_fd_s{k}` / `{name}_accuracy_s{k}` each seed's
    and, with more than one seed, `{name}_fd_noise` / `{name}_accuracy_noise`, their standard deviations. On a small model the FD of 1000
    samples moves by several points between seeds, more than the differences a sampler comparison asks
    about; the mean over seeds is the figure to compare."""
    figures: dict[str, float] = {}
    for name, row in time_samplers(model, runs, timing_labels, repeats=repeats, seed=seed).items():
        figures.update({f"{name}_{k}": float(v) for k, v in row.items()})
    for run in runs:
        qs = [digit_quality(model, tokenizer, run, per_class=per_class, seed=seed + k) for k in range(quality_seeds)]
        for key in ("fd", "accuracy"):
            values = [q[key] for q in qs]
            figures[f"{run.name}_{key}"] = statistics.mean(values)
            if len(values) > 1:
                figures[f"{run.name}_{key}_noise"] = statistics.stdev(values)
        for k, q in enumerate(qs):
            figures[f"{run.name}_fd_s{k}"], figures[f"{run.name}_accuracy_s{k}"] = q["fd"], q["accuracy"]
    return figures
