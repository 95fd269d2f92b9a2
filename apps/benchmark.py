"""python -m apps.benchmark NAME [--quick] [--json PATH] — speed claims as ratios measured in one run.

Each benchmark runs in a fresh Python process, so that what one benchmark allocated or imported
does not show in another's memory figures or timings: `--all` gives the figures each gives alone.
The options and the --json output are checked before the first benchmark starts.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from apps.benchmarks import registry
from vision.cli import ArgumentParser, UserError, atomic_output, check_output, run

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    names = registry()
    p = ArgumentParser(prog="python -m apps.benchmark", description=__doc__.split("\n\n")[0].split(" — ")[1],
                       epilog="benchmarks: " + ", ".join(names))
    p.add_argument("name", nargs="*", help="benchmark(s) to run; see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--all", action="store_true", help="run every benchmark")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--json", metavar="PATH", help="write one flat JSON object of all figures")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p.parse_args(argv), names


def check_json_output(path: str, overwrite: bool) -> Path:
    out = check_output(path, overwrite)
    if out.is_dir():
        raise UserError(f"--json {out} is a folder; give a file name")
    return out


def run_isolated(name: str, quick: bool) -> dict | None:
    """Run one benchmark in a fresh interpreter; its figures, or None when it failed (it said why on stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, "-c", "from apps.benchmark import child; child()", name, str(out), str(int(quick))]
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0 or not out.is_file():
            return None
        return json.loads(out.read_text())


def child() -> None:
    """Entry point of the process that runs one benchmark: argv = NAME OUT_JSON QUICK(0|1)."""
    name, out, quick = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    try:
        figures = registry()[name].run(quick)
    except KeyboardInterrupt:  # the parent reports the interruption
        sys.exit(130)
    except Exception as e:  # not the user's input: say which benchmark and why, in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: benchmark {name} failed: {type(e).__name__}{': ' + reason if reason else ''}", file=sys.stderr)
        sys.exit(1)
    out.write_text(json.dumps(figures))


def print_figures(name: str, figures: dict, quick: bool) -> None:
    print(f"\n{name}{' (quick)' if quick else ''}")
    width = max(map(len, figures))
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


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
    chosen = list(dict.fromkeys(chosen))
    if args.json:
        check_json_output(args.json, args.overwrite)
    figures: dict[str, float] = {}
    failed = []
    for name in chosen:
        result = run_isolated(name, args.quick)
        if result is None:
            failed.append(name)
            continue
        print_figures(name, result, args.quick)
        prefix = "" if len(chosen) == 1 else f"{name}_"
        figures.update({prefix + k: v for k, v in result.items()})
    if args.json and figures:
        meta = {"torch_threads": torch.get_num_threads(), "quick": int(args.quick)}
        with atomic_output(args.json, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps({**figures, **meta}, indent=2) + "\n")
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    if failed:
        kept = f"; the figures of the others are in {args.json}" if args.json and figures else ""
        print(f"error: {len(failed)} benchmark(s) failed: {', '.join(failed)}{kept}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run(main)
