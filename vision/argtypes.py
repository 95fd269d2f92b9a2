"""Option types with a declared range, for argparse's `type=`.

A value out of range (or not a number, or NaN/inf) is refused while the command line is
parsed, before any work, as one line: `error: argument --lr: must be a number > 0, got -1`.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def number(kind: type = float, *, min: float | None = None, max: float | None = None, min_open: bool = False,
           max_open: bool = False) -> Callable[[str], float | int]:
    """A parser of `kind` (int or float) values in [min, max]; min_open / max_open exclude the bound."""
    what = "an integer" if kind is int else "a number"
    bounds = []
    if min is not None:
        bounds.append(f"{'>' if min_open else '>='} {min:g}")
    if max is not None:
        bounds.append(f"{'<' if max_open else '<='} {max:g}")
    rule = f"{what} {' and '.join(bounds)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        low = min is not None and (value < min or (min_open and value == min))
        high = max is not None and (value > max or (max_open and value == max))
        if low or high:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = rule  # argparse names the type in some of its own messages
    return parse


positive_int = number(int, min=1)
non_negative_int = number(int, min=0)
positive_float = number(float, min=0, min_open=True)
non_negative_float = number(float, min=0)
fraction = number(float, min=0, max=1)
# the samplers derive per-epoch seeds as seed * 100003 + epoch, which must stay below 2**64
seed = number(int, min=0, max=2**32 - 1)
decay = number(float, min=0, max=1, min_open=True, max_open=True)  # an EMA decay
