"""ReCAP against MaskGIT's plain decoding on the shipped `maskgit-mnist`, at the same number of steps.

All samplers run on the same labels and seeds (`apps.benchmarks.sampler_harness`): wall time is the
median over repetitions alternating between them, quality is the Fréchet distance in the MNIST
classifier's features and the class accuracy of 100 samples per digit (--quick: 20, and the
table at 16 steps only).

- `speedup`: plain's wall time over ReCAP's (the headline setting below);
- `flop_ratio`: plain's FLOPs over ReCAP's, counted by `torch.utils.flop_counter` over one batch
  (attention through PyTorch's math kernel, so its matrix products are counted too);
- `fd_plain`, `fd_recap`, `accuracy_plain`, `accuracy_recap`: means over 3 seeds (--quick: 2), each seed's
  FD as `fd_plain_s{k}` / `fd_recap_s{k}`, and `fd_noise` / `fd_recap_noise`: the standard deviation of
  plain's / ReCAP's FD over those seeds, which says how much of a difference is sampling noise (on
  maskgit-mnist about 3 points: a single seed cannot resolve a 10 % difference);
- `fd_plain_recipe`, `accuracy_plain_recipe` (means as above): plain decoding with ReCAP's recipe (below) and no cheap
  steps, which separates what the recipe gives from what the cheap steps cost;
- the trade-off table `s{steps}_c{num_cache_iters}[_confidence|_recap]_{speedup,flop_ratio,fd,accuracy}`:
  ReCAP with that many cheap steps per full step, against plain at the same steps (c0 is plain itself):
  at the model's defaults in ReCAP's fixed order, or `_confidence` (`group_order="confidence"`), or
  `_recap` with ReCAP's recipe (`_c0_recap`: plain with the recipe); quality on seed 0 only, so read it
  with `fd_noise` in mind.

Plain runs at the model's sampling defaults, MaskGIT's rule (cfg 1.5, choice temperature 4.5,
temperature 1, cosine schedule): the best plain setting found on training digits. The headline ReCAP
runs 16 steps, 3 cheap steps per full step, in the fixed order with the recipe of ReCAP's MaskGIT
scripts (`RECIPE`): their token counts (`mask_schedule="recap"`), positions ranked on a draw at
temperature 1 while the kept tokens are drawn again (`draw="recap"`), and the sampling temperature
annealed from 1 to 0.65 (their value at 16 steps).

MAR (`mar_*`, on the shipped `mar-mnist` at its sampling defaults: 16 steps, 25 ddim-spaced diffusion
steps, its cfg): ReCAP (generators/mar/recap.py) against MAR's plain sampling at the same steps, in the
official runs' setting (`MAR_HEADLINE`: the first half of the steps full-only, then one cheap step per full
step, the cheap steps' diffusion head at half its steps; on 16 steps 12 full passes and 4 cheap ones): `mar_speedup` (wall time, plain over ReCAP),
`mar_flop_ratio` (counted as above, the diffusion head included), `mar_fd_plain`, `mar_fd_recap`,
`mar_accuracy_plain`, `mar_accuracy_recap` (100 samples per digit; --quick: 20), and without --quick
`mar_fd_noise` and the table `mar_c{num_cache_iters}_p{pre_full_iters}_r{diff_fast_ratio x 100}_{speedup,
flop_ratio,fd,accuracy}` (`MAR_TABLE`).
"""
from __future__ import annotations

import torch

from apps.benchmarks import benchmark

STEPS = 16  # MaskGIT's class-conditional default
RECIPE = {"mask_schedule": "recap", "draw": "recap", "final_temperature": 0.65}  # ReCAP's scripts, 16 steps
HEADLINE = {"num_cache_iters": 3, "pre_full_iters": 0, "group_order": "fixed", **RECIPE}
RECIPE_CACHE = (0, 1, 3)  # the table's `_recap` rows
TABLE_STEPS = (8, 16)
# (num_cache_iters, group_order); with one cheap step both orders are the same rule
TABLE = ((1, "fixed"), (2, "fixed"), (3, "fixed"), (2, "confidence"), (3, "confidence"))


def counted_flops(model, labels: torch.Tensor, sampler: str, options: dict) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        model.generate(labels, sampler=sampler, generator=torch.Generator().manual_seed(0), **options)
    return counter.get_total_flops()


def measure(model, tokenizer, quick: bool) -> dict[str, float]:
    from apps.benchmarks.sampler_harness import SamplerRun, compare_samplers, time_samplers

    per_class, repeats = (20, 3) if quick else (100, 5)
    timing_labels = torch.arange(10).repeat(2 if quick else 5)
    seeds = 2 if quick else 3
    plain = SamplerRun("plain", "plain", {"steps": STEPS})
    recap = SamplerRun("recap", "recap", {"steps": STEPS, **HEADLINE})
    plain_recipe = SamplerRun("plain_recipe", "plain", {"steps": STEPS, **RECIPE})
    f = compare_samplers(model, tokenizer, [plain, recap, plain_recipe], timing_labels=timing_labels,
                         repeats=repeats, per_class=per_class, quality_seeds=seeds)
    figures = {
        "steps": STEPS, "num_cache_iters": HEADLINE["num_cache_iters"], "pre_full_iters": HEADLINE["pre_full_iters"],
        "speedup": f["plain_wall_s"] / f["recap_wall_s"],
        "flop_ratio": counted_flops(model, timing_labels, "plain", plain.options)
        / counted_flops(model, timing_labels, "recap", recap.options),
        "fd_plain": f["plain_fd"], "fd_recap": f["recap_fd"], "fd_noise": f["plain_fd_noise"],
        "fd_recap_noise": f["recap_fd_noise"],
        "accuracy_plain": f["plain_accuracy"], "accuracy_recap": f["recap_accuracy"],
        "fd_plain_recipe": f["plain_recipe_fd"], "accuracy_plain_recipe": f["plain_recipe_accuracy"],
        "plain_wall_s": f["plain_wall_s"], "recap_wall_s": f["recap_wall_s"],
        **{f"fd_{name}_s{k}": f[f"{name}_fd_s{k}"] for name in ("plain", "recap") for k in range(seeds)},
    }
    known = {f"s{STEPS}_c0": (f["plain_fd_s0"], f["plain_accuracy_s0"]),  # the table is seed 0 throughout
             f"s{STEPS}_c{HEADLINE['num_cache_iters']}_recap": (f["recap_fd_s0"], f["recap_accuracy_s0"]),
             f"s{STEPS}_c0_recap": (f["plain_recipe_fd_s0"], f["plain_recipe_accuracy_s0"])}
    for steps in (STEPS,) if quick else TABLE_STEPS:
        runs = {f"s{steps}_c0": SamplerRun("plain", "plain", {"steps": steps})}
        for cache, order in TABLE:
            key = f"s{steps}_c{cache}" + ("_confidence" if order == "confidence" else "")
            runs[key] = SamplerRun(key, "recap", {"steps": steps, "num_cache_iters": cache, "pre_full_iters": 0,
                                                  "group_order": order})
        for cache in RECIPE_CACHE:
            key = f"s{steps}_c{cache}_recap"
            runs[key] = SamplerRun(key, "recap", {"steps": steps, "num_cache_iters": cache, "pre_full_iters": 0,
                                                  "group_order": "fixed", **RECIPE})
        walls = time_samplers(model, list(runs.values()), timing_labels, repeats=repeats)
        plain_flops = counted_flops(model, timing_labels, "plain", runs[f"s{steps}_c0"].options)
        for key, run in runs.items():
            fd, accuracy = known.get(key) or _quality(model, tokenizer, run, per_class)
            figures[f"{key}_speedup"] = walls["plain"]["wall_s"] / walls[run.name]["wall_s"]
            figures[f"{key}_flop_ratio"] = plain_flops / counted_flops(model, timing_labels, run.sampler, run.options)
            figures[f"{key}_fd"], figures[f"{key}_accuracy"] = fd, accuracy
    return figures


def _quality(model, tokenizer, run, per_class: int) -> tuple[float, float]:
    from apps.benchmarks.sampler_harness import digit_quality

    q = digit_quality(model, tokenizer, run, per_class=per_class)
    return q["fd"], q["accuracy"]


MAR_MODEL = "mar-mnist"
HALF = "half"  # pre_full_iters = steps // 2, as ReCAP's MAR scripts run
MAR_HEADLINE = {"num_cache_iters": 1, "pre_full_iters": HALF, "diff_fast_ratio": 0.5}
# (num_cache_iters, pre_full_iters, diff_fast_ratio), without --quick
MAR_TABLE = ((1, 0, 0.5), (3, 0, 0.5), (1, HALF, 1.0), (3, HALF, 0.5))


def measure_mar(model, tokenizer, quick: bool, quality=None) -> dict[str, float]:
    """The `mar_*` figures of `model` (its own sampling defaults: steps, diffusion steps, cfg). `quality(model,
    tokenizer, run, per_class=) -> {"fd", "accuracy"}` replaces the digit classifier (tests)."""
    from apps.benchmarks.sampler_harness import SamplerRun, digit_quality, time_samplers

    quality = quality or (lambda m, t, run, per_class, seed=0: digit_quality(m, t, run, per_class=per_class, seed=seed))
    per_class, repeats = (20, 3) if quick else (100, 5)
    timing_labels = torch.arange(10).repeat(2 if quick else 5)
    steps = model.sampling_options("plain")["steps"]
    headline = {**MAR_HEADLINE, "pre_full_iters": steps // 2}
    plain = SamplerRun("plain", "plain", {})
    runs = [plain, SamplerRun("recap", "recap", headline)]
    for c, p, r in () if quick else MAR_TABLE:
        p = steps // 2 if p == HALF else p
        runs.append(SamplerRun(f"mar_c{c}_p{p}_r{round(r * 100)}", "recap",
                               {"num_cache_iters": c, "pre_full_iters": p, "diff_fast_ratio": r}))
    walls = time_samplers(model, runs, timing_labels, repeats=repeats)
    flops = {run.name: counted_flops(model, timing_labels, run.sampler, run.options) for run in runs}
    scores = {run.name: quality(model, tokenizer, run, per_class=per_class) for run in runs}
    figures = {"mar_steps": steps, **{f"mar_{k}": v for k, v in headline.items()},
               "mar_speedup": walls["plain"]["wall_s"] / walls["recap"]["wall_s"],
               "mar_flop_ratio": flops["plain"] / flops["recap"],
               "mar_plain_wall_s": walls["plain"]["wall_s"], "mar_recap_wall_s": walls["recap"]["wall_s"]}
    for name in ("plain", "recap"):
        figures[f"mar_fd_{name}"], figures[f"mar_accuracy_{name}"] = scores[name]["fd"], scores[name]["accuracy"]
    if not quick:
        import statistics

        noise = [scores["plain"]["fd"]] + [quality(model, tokenizer, plain, per_class=per_class, seed=1000 + s)["fd"]
                                           for s in range(2)]
        figures["mar_fd_noise"] = statistics.stdev(noise)
        for run in runs[2:]:
            figures[f"{run.name}_speedup"] = walls["plain"]["wall_s"] / walls[run.name]["wall_s"]
            figures[f"{run.name}_flop_ratio"] = flops["plain"] / flops[run.name]
            figures[f"{run.name}_fd"], figures[f"{run.name}_accuracy"] = scores[run.name]["fd"], scores[run.name]["accuracy"]
    return {k: float(v) for k, v in figures.items()}


@benchmark("recap", "ReCAP vs plain decoding on maskgit-mnist and mar-mnist: wall time, counted FLOPs, FD, accuracy")
def run(quick: bool) -> dict[str, float]:
    from generators.pipeline import GenerationPipeline

    pipe = GenerationPipeline.load("maskgit-mnist")
    figures = measure(pipe.generator, pipe.tokenizer, quick)
    mar = GenerationPipeline.load(MAR_MODEL)
    return {**figures, **measure_mar(mar.generator, mar.tokenizer, quick)}
