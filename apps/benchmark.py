"""python -m apps.benchmark NAME [--quick] [--json PATH] — speed claims as ratios measured in one run."""
from __future__ import annotations

import json
import platform
import sys

import torch

from apps.benchmarks import registry
from vision.cli import ArgumentParser, UserError, atomic_output, run


def parse(argv):
    names = registry()
    p = ArgumentParser(prog="python -m apps.benchmark", description=__doc__.split(" — ")[1],
                       epilog="benchmarks: " + ", ".join(names))
    p.add_argument("name", nargs="*", help="benchmark(s) to run; see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--all", action="store_true", help="run every benchmark")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--json", metavar="PATH", help="write one flat JSON object of all figures")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p.parse_args(argv), names


def main(argv=None) -> int:
    args, names = parse(argv)
    if args.list:
        for b in names.values():
            print(f"{b.name:12s} {b.description}")
        return 0
    chosen = list(names) if args.all else args.name
    if not chosen:
        raise UserError("name a benchmark (or --all); --list shows them")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise UserError(f"unknown benchmark {unknown[0]!r}; known: {', '.join(names)}")
    figures: dict[str, float] = {}
    for name in chosen:
        result = names[name].run(args.quick)
        print(f"\n{name}{' (quick)' if args.quick else ''}")
        width = max(map(len, result))
        for k, v in result.items():
            print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
        prefix = "" if len(chosen) == 1 else f"{name}_"
        figures.update({prefix + k: v for k, v in result.items()})
    if args.json:
        meta = {"torch_threads": torch.get_num_threads(), "quick": int(args.quick)}
        with atomic_output(args.json, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps({**figures, **meta}, indent=2) + "\n")
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
