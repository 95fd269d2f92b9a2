"""python -m apps.generate — sample images from a generator with any of its samplers.

    python -m apps.generate --model ar-mnist --labels 0-9 --per-label 8 -o grid.png
    python -m apps.generate --model ar-mnist --sampler sjd --window 16 --labels 3,5,7 --out-dir samples/
    python -m apps.generate --model ldm-mnist --n 16 --size 48x48 -o grid.png   # an implicit decoder: any size
    python -m apps.generate --model c2i_B_256.pt --tokenizer vq_ds16_c2i.pt --labels 207,360 --cfg 4 --top-k 1000 -o out.png
    torchrun --nproc_per_node 4 -m apps.generate --model ar-mnist --labels 0-9 --per-label 5000 --out-dir fid/

Samples are made in batches of --batch-size over the list (label, index), and batch b draws from its
own generator seeded by (--seed, b). So the files do not depend on how many processes share the
work: torchrun writes the same files as one process.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vision.cli import ArgumentParser, UserError, add_common_args, atomic_output, check_output, progress, resolve_device, run
from vision.output_folder import FolderKind, check_folder_output, first_foreign, publish_folder, remove_staging, staging_for

# what --out-dir writes, and so all that --overwrite may replace: DIR/<label>/NNNNN.png (unconditional: DIR/NNNNN.png)
SAMPLES = FolderKind("a folder of generated samples (DIR/<label>/NNNNN.png)",
                     lambda folder: first_foreign(folder, r"\d{5,}\.png", {r"\d+": r"\d{5,}\.png"}))


def parse_labels(text: str | None) -> list[int] | None:
    """'0-9' or '3,5,7' or '0-4,7' -> a list of ints (None stays None)."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        except ValueError:
            raise UserError(f"--labels: expected numbers like 0-9 or 3,5,7, got {text!r}") from None
        if last < first:
            raise UserError(f"--labels: empty range {part.strip()!r}")
        out.extend(range(first, last + 1))
    if not out:
        raise UserError("--labels is empty")
    return out


def sampler_option_args(parser: ArgumentParser) -> dict[str, list[str]]:
    """Add every registered sampler's own options (one group per sampler). Returns sampler -> option names."""
    from generators.base import registered_samplers

    seen: dict[str, object] = {}
    names: dict[str, list[str]] = {}
    for sampler_name, entries in sorted(registered_samplers().items()):
        group = None
        for family, sampler in entries:
            names.setdefault(sampler_name, [])
            for opt in sampler.options:
                names[sampler_name].append(opt.name)
                if opt.name in seen:
                    continue
                seen[opt.name] = opt
                if group is None:
                    group = parser.add_argument_group(f"--sampler {sampler_name}")
                kind = str if opt.type == "model" else opt.type
                extra = f" (default {opt.default})" if opt.default is not None else ""
                choices = f"; one of {', '.join(map(str, opt.choices))}" if opt.choices else ""
                group.add_argument(opt.flag, dest=opt.name, type=kind, default=None,
                                   help=f"{opt.help}{choices}{extra}" + (f" [{family.architecture}]" if len(entries) > 1 else ""))
    return names


def parse(argv):
    p = ArgumentParser(prog="python -m apps.generate", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("--model", required=True, help="shipped generator name, a save_pretrained folder, or a released checkpoint")
    p.add_argument("--tokenizer", "--vae", dest="tokenizer", default=None,
                   help="tokenizer to decode with (default: the one the generator names); a name, folder or released file")
    p.add_argument("--sampler", default="plain", help="sampler name; every family has plain")
    p.add_argument("--labels", default=None, help="class labels, e.g. 0-9 or 3,5,7 (omit for an unconditional model)")
    p.add_argument("--per-label", type=int, default=4, help="samples per label")
    p.add_argument("--n", type=int, default=None, help="number of samples of an unconditional model")
    p.add_argument("--batch-size", type=int, default=16, help="samples generated together")
    p.add_argument("--size", help="output size WxH (e.g. 48x48), for a generator whose tokenizer has an implicit "
                   "decoder (latent diffusion); default: the tokenizer's native size")
    g = p.add_argument_group("sampling (defaults: the model family's)")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (1 = off; VAR: the ratio its ramp reaches at the last scale, 0 = off)")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass (1 = all)")
    own = sampler_option_args(p)
    o = p.add_argument_group("outputs")
    o.add_argument("-o", "--output", help="a grid image, one row per label")
    o.add_argument("--out-dir", help="one PNG per sample, in DIR/<label>/ (the layout evaluate --labels-from-folders "
                   "reads); --overwrite replaces only a folder of this layout")
    o.add_argument("--json", help="write images, wall_time_s, images_per_s, nfe, draft_nfe, mean_accepted, peak_memory_mb")
    add_common_args(p)
    return p.parse_args(argv), own


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'48x32' (W x H) -> (H, W)."""
    if text is None:
        return None
    w, sep, h = text.strip().lower().partition("x")
    try:
        size = (int(h), int(w)) if sep else None
    except ValueError:
        size = None
    if size is None or min(size) < 1:
        raise UserError(f"--size must be WxH with positive integers, e.g. 48x48; got {text!r}")
    return size


def sample_plan(labels: list[int] | None, per_label: int, n: int | None) -> list[tuple[int | None, int]]:
    """The global list of (label, index-within-label) every process agrees on."""
    if labels is None:
        return [(None, i) for i in range(n)]
    return [(lab, i) for lab in labels for i in range(per_label)]


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def main(argv=None) -> int:
    args, own = parse(argv)
    from generators.pipeline import GenerationPipeline
    from vision.train.distributed import barrier, setup_distributed, teardown_distributed

    if args.per_label < 1:
        raise UserError(f"--per-label must be >= 1, got {args.per_label}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if not (args.output or args.out_dir or args.json):
        raise UserError("nothing to write: give -o GRID.png, --out-dir DIR and/or --json PATH")
    labels = parse_labels(args.labels)
    args.size = parse_size(args.size)
    if labels is not None and args.n is not None:
        raise UserError("--n is for unconditional models; with --labels use --per-label")
    outputs = [Path(x) for x in (args.output, args.json) if x]
    for path in outputs:
        check_output(path, args.overwrite)
    if args.output:
        from vision.data.images import format_for_path

        format_for_path(args.output)
    out_dir = check_folder_output(args.out_dir, args.overwrite, SAMPLES) if args.out_dir else None
    for path in outputs:
        if out_dir is not None and out_dir.resolve() in path.resolve().parents:
            raise UserError(f"{path} is inside --out-dir {out_dir}, which is written (and replaced) as a whole; "
                            "write it elsewhere")

    device = resolve_device(args.device)
    info = setup_distributed(device)
    device = info.device
    if info.distributed and args.output:
        raise UserError("-o GRID is for one process; under torchrun write --out-dir DIR")
    pipe = GenerationPipeline.load(args.model, args.tokenizer, device)
    if args.size is not None and not pipe.renders_any_size:
        raise UserError(f"--size needs a tokenizer with an implicit decoder; {type(pipe.tokenizer).__name__} "
                        "renders only its native size")
    gen = pipe.generator
    options = {k: getattr(args, k) for k in ("cfg", "temperature", "top_k", "top_p")}
    try:
        sampler = gen.sampler(args.sampler)
    except ValueError as e:
        raise UserError(str(e)) from None
    given_own = {name: getattr(args, name) for name in own.get(args.sampler, [])}
    for opt in sampler.options:
        value = given_own.get(opt.name)
        if opt.type == "model" and value is not None:
            given_own[opt.name] = _load_second_model(value, device, pipe)
    options.update({k: v for k, v in given_own.items() if k in {o.name for o in sampler.options}})
    stray = [n for names in own.values() for n in names if getattr(args, n, None) is not None
             and n not in {o.name for o in sampler.options}]
    if stray:
        raise UserError(f"--{stray[0].replace('_', '-')} is not an option of --sampler {args.sampler}")
    try:
        gen.sampling_options(args.sampler, **{k: v for k, v in options.items() if v is not None and not isinstance(v, torch.nn.Module)})
        if labels is not None:
            gen.check_labels(torch.tensor(labels))
        elif gen.num_classes and args.n is None:
            raise ValueError(f"this generator is class-conditional (0..{gen.num_classes - 1}); pass --labels")
    except ValueError as e:
        raise UserError(str(e)) from None
    if labels is None and args.n is None:
        raise UserError("pass --n N for an unconditional generator")

    plan = sample_plan(labels, args.per_label, args.n)
    batches = [plan[i:i + args.batch_size] for i in range(0, len(plan), args.batch_size)]
    mine = [b for b in range(len(batches)) if b % info.world_size == info.rank]
    staging = None
    if out_dir is not None:
        staging = staging_for(out_dir)
        if info.is_main:
            remove_staging(out_dir)
        barrier(info)
    try:
        _generate(args, pipe, labels, plan, batches, mine, options, staging, out_dir, info, device)
    except BaseException:
        if staging is not None and info.is_main:  # never leave a half-written folder behind
            remove_staging(out_dir)
        raise
    teardown_distributed()
    return 0


def _generate(args, pipe, labels, plan, batches, mine, options, staging, out_dir, info, device) -> None:
    from vision.data.images import save_image
    from vision.train.distributed import barrier

    images: dict[tuple, torch.Tensor] = {}
    totals = {"nfe": 0, "draft_nfe": 0, "accepted": 0, "iters": 0, "peak_memory_mb": 0.0}
    t0 = time.perf_counter()
    for b in progress(mine, quiet=args.quiet, desc="generate", unit="batch"):
        batch = batches[b]
        g = torch.Generator(device).manual_seed(batch_seed(args.seed, b))
        lab = None if labels is None else torch.tensor([lab for lab, _ in batch], device=device)
        try:
            out, _, stats = pipe(lab, sampler=args.sampler, generator=g, batch_size=len(batch), size=args.size,
                                 **options)
        except ValueError as e:
            raise UserError(str(e)) from None
        totals["nfe"] += stats.nfe
        totals["draft_nfe"] += stats.draft_nfe
        totals["accepted"] += sum(stats.accepted_per_iter)
        totals["iters"] += len(stats.accepted_per_iter)
        totals["peak_memory_mb"] = max(totals["peak_memory_mb"], stats.peak_memory_mb)
        for (lab_i, idx), img in zip(batch, out.cpu()):
            if staging is not None:
                folder = staging if lab_i is None else staging / str(lab_i)
                folder.mkdir(parents=True, exist_ok=True)
                save_image(img, folder / f"{idx:05d}.png")
            if args.output:
                images[(lab_i, idx)] = img
    wall = time.perf_counter() - t0
    if device.type != "cuda":
        totals["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    totals = _reduce(totals, wall, info)
    barrier(info)
    if info.is_main:
        if args.output:
            with atomic_output(args.output, args.overwrite) as tmp:
                save_image(_grid(plan, images, labels), tmp, format=_fmt(args.output))
        if staging is not None:
            publish_folder(staging, out_dir, args.overwrite, SAMPLES)
        n = len(plan)
        figures = {"images": n, "wall_time_s": round(totals["wall"], 4),
                   "images_per_s": n / totals["wall"] if totals["wall"] > 0 else 0.0,
                   "nfe": int(totals["nfe"]), "draft_nfe": int(totals["draft_nfe"]),
                   "mean_accepted": totals["accepted"] / totals["iters"] if totals["iters"] else 0.0,
                   "peak_memory_mb": round(totals["peak_memory_mb"], 1)}
        if args.json:
            with atomic_output(args.json, args.overwrite) as tmp:
                tmp.write_text(json.dumps(figures, indent=2) + "\n")
        if not args.quiet:
            where = " and ".join(str(x) for x in (args.output, out_dir) if x)
            print(f"{n} images in {figures['wall_time_s']:.2f} s ({figures['nfe']} forward passes)"
                  + (f" -> {where}" if where else ""), file=sys.stderr)
    barrier(info)


def _load_second_model(name: str, device, pipe):
    """A draft or refiner model for a two-model sampler: it must speak the same tokens as the main one."""
    from generators.pipeline import check_pair, load_generator

    other = load_generator(name, device)
    check_pair(other, pipe.tokenizer, "(the main model's, which a draft or refiner must share)", name)
    other.bind_tokenizer(pipe.tokenizer)
    return other


def _reduce(totals: dict, wall: float, info) -> dict:
    out = dict(totals, wall=wall)
    if info.distributed:
        import torch.distributed as dist

        vec = torch.tensor([totals["nfe"], totals["draft_nfe"], totals["accepted"], totals["iters"]], dtype=torch.float64)
        dist.all_reduce(vec)
        mx = torch.tensor([wall, totals["peak_memory_mb"]], dtype=torch.float64)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        out.update(nfe=vec[0].item(), draft_nfe=vec[1].item(), accepted=vec[2].item(), iters=vec[3].item(),
                   wall=mx[0].item(), peak_memory_mb=mx[1].item())
    return out


def _grid(plan, images: dict, labels) -> torch.Tensor:
    """One row per label (unconditional: a square-ish grid), 2-pixel white gutters."""
    first = next(iter(images.values()))
    c, h, w = first.shape
    if labels is not None:
        rows = [[images[(lab, i)] for (l2, i) in plan if l2 == lab] for lab in dict.fromkeys(labels)]
    else:
        items = [images[k] for k in plan]
        cols = math.ceil(math.sqrt(len(items)))
        rows = [items[i:i + cols] for i in range(0, len(items), cols)]
    ncols = max(len(r) for r in rows)
    pad = 2
    grid = torch.ones(c, len(rows) * (h + pad) + pad, ncols * (w + pad) + pad)
    for r, row in enumerate(rows):
        for k, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + k * (w + pad)
            grid[:, y:y + h, x:x + w] = img
    return grid


def _fmt(path: str) -> str:
    from vision.data.images import format_for_path

    return format_for_path(path)


if __name__ == "__main__":
    run(main)
