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


def registry() -> dict[str, Benchmark]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))
