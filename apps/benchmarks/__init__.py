"""Named benchmarks for `python -m apps.benchmark`. One module per benchmark registers itself with @benchmark."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

Figures = dict[str, float]


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[[bool], Figures]  # run(quick) -> flat {snake_case_name: number}


_REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, description: str):
    def wrap(fn: Callable[[bool], Figures]):
        _REGISTRY[name] = Benchmark(name, description, fn)
        return fn

    return wrap


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB, its own only.

    On Linux it is VmHWM from /proc/self/status, the high-water mark of this process's memory map.
    getrusage's ru_maxrss is not used there: a child started by subprocess inherits its parent's
    peak in it (Linux keeps it across fork and exec), so every child of a big process would report
    the parent's figure. Elsewhere ru_maxrss is the only measure (bytes on macOS, KB on Linux/BSD).
    """
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def registry() -> dict[str, Benchmark]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))
