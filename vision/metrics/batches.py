"""Running a function over a dataset in batches, split across torchrun processes, rows gathered in order.

The batches are always those of one process (images [kB, (k+1)B)). Rank r of W runs batches r,
r + W, ... and every rank gets all rows back in dataset order, so each batch holds the same images
whatever W is and the figures are bit for bit those of one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from vision.metrics.errors import EvaluationInputError
from vision.metrics.folders import Unreadable
from vision.progress import progress


@dataclass
class Runner:
    """Where and how to run: device, this process's rank among `world` (1 without torchrun), batching, progress."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    batch_size: int = 64
    workers: int = 0  # DataLoader worker processes
    quiet: bool = True  # no progress bar

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {self.batch_size} and {self.workers}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _runs(items: list) -> Iterator[Any]:
    """Stack consecutive samples of equal shape into batches (folders may mix image sizes)."""
    shape = lambda x: tuple(t.shape for t in x) if isinstance(x, tuple) else x.shape  # noqa: E731
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or shape(items[i]) != shape(items[start]):
            chunk = items[start:i]
            if isinstance(chunk[0], tuple):
                yield tuple(torch.stack(parts) for parts in zip(*chunk))
            else:
                yield torch.stack(chunk)
            start = i


def map_dataset(runner: Runner, dataset, fn: Callable[[Any], dict[str, Tensor]], desc: str) -> dict[str, Tensor]:
    """fn over every sample in batches of runner.batch_size, split across ranks; fn's rows in dataset order.

    fn takes a stacked batch (or a tuple of them for paired samples) and returns named rows; the
    result concatenates each name's rows over the whole dataset, on the CPU, on every rank.
    """
    n, b = len(dataset), runner.batch_size
    batches = [list(range(k, min(k + b, n))) for k in range(0, n, b)]
    mine = batches[runner.rank::runner.world]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=runner.workers, collate_fn=list)
    rows: dict[str, list[Tensor]] = {}
    bar = progress(total=n, quiet=runner.quiet, desc=desc, unit="img")
    try:
        for items in loader:
            for item in items:
                if isinstance(item, Unreadable):
                    raise EvaluationInputError(item.message)
            with torch.no_grad():
                for batch in _runs(items):
                    for k, v in fn(batch).items():
                        rows.setdefault(k, []).append(v.detach().cpu())
            bar.update(min(len(items) * runner.world, n - bar.n))
    except BaseException:
        bar.leave = False  # an error message follows: leave no half-drawn bar above it
        raise
    finally:
        bar.close()
    local = {k: torch.cat(v) for k, v in sorted(rows.items())}
    if runner.world == 1:
        return local
    return _gather_rows(local, runner, batches)


def _gather_rows(local: dict[str, Tensor], runner: Runner, batches: list[list[int]]) -> dict[str, Tensor]:
    """Undo the round-robin batch split: every rank gets all rows in dataset order."""
    import torch.distributed as dist

    meta = [None] * runner.world  # key -> (row shape, dtype) from ranks that had work
    layout = {k: (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in local.items()}
    dist.all_gather_object(meta, layout)
    layout = next(m for m in meta if m)
    n = sum(len(bt) for bt in batches)
    counts = [sum(len(bt) for bt in batches[r::runner.world]) for r in range(runner.world)]
    out = {}
    for k, (shape, dtype) in layout.items():
        dtype = getattr(torch, dtype)
        v = local.get(k, torch.empty((0, *shape), dtype=dtype))
        padded = torch.zeros((max(counts), *shape), dtype=dtype)
        padded[:len(v)] = v
        padded = padded.to(runner.device)
        parts = [torch.empty_like(padded) for _ in range(runner.world)]
        dist.all_gather(parts, padded)
        full = torch.empty((n, *shape), dtype=dtype)
        for r, part in enumerate(parts):
            index = [i for bt in batches[r::runner.world] for i in bt]
            full[index] = part[:len(index)].cpu()
        out[k] = full
    return out
