"""Run a function in a 2-process gloo world (CPU) and collect what each rank returns."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # The work is done and saved: leave without the interpreter's teardown, where a torch thread (autograd's
    # all_reduce) still alive at static destruction aborted the process now and then ("terminate called
    # without an active exception", SIGABRT), which mp.spawn reports as a failure.
    os._exit(0)


def run_two_processes(tmp_path: Path, fn, *args) -> list:
    """`fn(rank, world_size, *args)` in each of two processes (fn must be importable: module level)."""
    mp.spawn(_worker, args=(2, str(tmp_path / "dist_init"), str(tmp_path), fn, args), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
