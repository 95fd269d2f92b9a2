"""Collaborative decoding (CoDe) against the large VAR alone, on the shipped MNIST models.

The drafter `var-mnist` (6 blocks) samples alone with the plain sampler, and CoDe lets it draft the first N of
the 6 scales (1, 2, 3, 4, 6, 8) before the refiner `var-mnist-refiner` (2 blocks) generates the rest. The
refiner is CoDe's specialised one: `var-mnist-small` fine-tuned on scales 3..5, then 4..5 only, with
distillation from `var-mnist` (`--train-scales 3:6`, then `4:6`, `--teacher var-mnist`; its index entry has the
commands), so N = 4 is its setting. Same labels, seeds and sampling settings (the
drafter's own defaults) for every run (apps/benchmarks/sampler_harness.py). For each N in DRAFT_STEPS:

- `speedup_n{N}`: the large model's wall time over CoDe's for a batch of 100 digits (10 of each), the median of
  repetitions alternating between the runs (--quick: 20 digits, 2 repetitions). Token generation only, as
  CoDe measures it (the VQVAE decoder is not timed);
- `memory_ratio_n{N}`: CoDe's peak memory over the large model's, each measured in its own child process
  generating that batch: on CUDA the allocator's peak (weights of every loaded model included, as CoDe's
  `measure_peak_memory`); on a CPU the same quantity, the weights of every loaded model plus the peak of the
  tensors the generation allocates (the profiler's allocation events: `sampler_harness.tensor_peak_mb`). Both
  include the VQVAE's weights;
- `fd_large`, `fd_code_n{N}`, `accuracy_large`, `accuracy_code_n{N}`: Fréchet distance in the MNIST
  classifier's features and class accuracy of 100 samples per digit (--quick: 20); `fd_small` /
  `accuracy_small`: the refiner alone, and `fd_noise`: the spread of the large model's FD over three other
  seeds, the yardstick for "within sampling noise";
- counted passes: `nfe_large` (6) and `drafter_nfe_n{N}`, `refiner_nfe_n{N}` (N and 6 - N), and the wall
  times `large_wall_s`, `code_wall_s_n{N}`.

CoDe's paper: 1.7x at FID 1.95 -> 1.98 and about half the memory with VAR-d30 / d16 at N = 8 of 10 scales.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from apps.benchmarks import benchmark

DRAFTER, REFINER = "var-mnist", "var-mnist-refiner"
DRAFT_STEPS = (3, 4, 5)


def load_pair(drafter: str, refiner: str, device="cpu"):
    """(drafter, refiner, tokenizer): the drafter's pipeline and the refiner bound to the same VQVAE."""
    from generators.pipeline import GenerationPipeline, check_pair, load_generator

    pipe = GenerationPipeline.load(drafter, device=device)
    small = load_generator(refiner, device)
    check_pair(small, pipe.tokenizer, f"(the tokenizer of {refiner})")
    small.bind_tokenizer(pipe.tokenizer)
    return pipe.generator, small, pipe.tokenizer


def memory_child(drafter: str, refiner: str, draft_steps: int, images: int, threads: int, device: str) -> dict:
    """Runs in a fresh process: load the drafter (and the refiner when draft_steps > 0), generate `images`
    digits once to warm up and once measured; the peak memory of the measured run (see the module docstring)."""
    from apps.benchmarks.sampler_harness import tensor_mb, tensor_peak_mb

    torch.set_num_threads(threads)
    dev = torch.device(device)
    if draft_steps > 0:
        model, small, tokenizer = load_pair(drafter, refiner, dev)
        options, sampler, weights = {"refiner": small, "draft_steps": draft_steps}, "code", tensor_mb(small)
    else:
        from generators.pipeline import GenerationPipeline

        pipe = GenerationPipeline.load(drafter, device=dev)
        model, tokenizer, sampler, options, weights = pipe.generator, pipe.tokenizer, "plain", {}, 0.0
    weights += tensor_mb(model, tokenizer)
    labels = torch.arange(images, device=dev) % 10

    def generate():
        model.generate(labels, sampler=sampler, generator=torch.Generator(dev).manual_seed(0), **options)

    model.generate(labels[:2], sampler=sampler, generator=torch.Generator(dev).manual_seed(0), **options)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    peak = tensor_peak_mb(generate, dev)
    return {"peak_memory_mb": peak if dev.type == "cuda" else weights + peak}


def _run_memory_child(drafter: str, refiner: str, draft_steps: int, images: int, device: str) -> float:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "apps.benchmarks.code", str(drafter), str(refiner), str(draft_steps), str(images),
           str(torch.get_num_threads()), device]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise RuntimeError(f"memory child (draft_steps {draft_steps}) failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_memory_mb"]


def measure(drafter: str = DRAFTER, refiner: str = REFINER, quick: bool = False, *,
            draft_steps: tuple[int, ...] = DRAFT_STEPS, per_class: int | None = None, device: str = "cpu",
            noise_seeds: int = 3) -> dict[str, float]:
    from apps.benchmarks.sampler_harness import SamplerRun, digit_quality, time_samplers

    torch.manual_seed(0)
    large, small, tokenizer = load_pair(drafter, refiner, device)
    per_class = per_class or (20 if quick else 100)
    images, repeats = (20, 2) if quick else (100, 3)
    runs = [SamplerRun("large", "plain", {})]
    runs += [SamplerRun(f"code_n{n}", "code", {"refiner": small, "draft_steps": n}) for n in draft_steps]
    labels = torch.arange(images) % 10
    rows = time_samplers(large, runs, labels, repeats=repeats)
    figures: dict[str, float] = {"images": images, "nfe_large": rows["large"]["nfe"],
                                 "large_wall_s": rows["large"]["wall_s"]}
    memory = {0: _run_memory_child(drafter, refiner, 0, images, device)}
    figures["large_peak_memory_mb"] = memory[0]
    q = digit_quality(large, tokenizer, runs[0], per_class=per_class, seed=0)
    figures["fd_large"], figures["accuracy_large"] = q["fd"], q["accuracy"]
    q = digit_quality(small, tokenizer, SamplerRun("small", "plain", {}), per_class=per_class, seed=0)
    figures["fd_small"], figures["accuracy_small"] = q["fd"], q["accuracy"]
    for n, run in zip(draft_steps, runs[1:]):
        row = rows[run.name]
        _, stats = large.generate(labels[:2], sampler="code", generator=torch.Generator().manual_seed(0), **run.options)
        memory[n] = _run_memory_child(drafter, refiner, n, images, device)
        q = digit_quality(large, tokenizer, run, per_class=per_class, seed=0)
        figures.update({
            f"speedup_n{n}": rows["large"]["wall_s"] / row["wall_s"],
            f"memory_ratio_n{n}": memory[n] / memory[0],
            f"fd_code_n{n}": q["fd"], f"accuracy_code_n{n}": q["accuracy"],
            f"drafter_nfe_n{n}": stats.nfe, f"refiner_nfe_n{n}": stats.refiner_nfe,
            f"code_wall_s_n{n}": row["wall_s"], f"code_peak_memory_mb_n{n}": memory[n],
        })
    if noise_seeds > 1:
        fds = [digit_quality(large, tokenizer, runs[0], per_class=per_class, seed=1000 + s)["fd"]
               for s in range(noise_seeds)]
        figures["fd_noise"] = statistics.stdev(fds)
    return figures


@benchmark("code", "CoDe (var-mnist drafts N scales, var-mnist-refiner refines) vs var-mnist alone: speed, memory, FD")
def run(quick: bool) -> dict[str, float]:
    return measure(DRAFTER, REFINER, quick, device="cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":  # the memory child processes
    p = argparse.ArgumentParser()
    p.add_argument("drafter")
    p.add_argument("refiner")
    p.add_argument("draft_steps", type=int)
    p.add_argument("images", type=int)
    p.add_argument("threads", type=int)
    p.add_argument("device")
    a = p.parse_args()
    print(json.dumps(memory_child(a.drafter, a.refiner, a.draft_steps, a.images, a.threads, a.device)))
