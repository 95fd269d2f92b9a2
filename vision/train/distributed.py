"""torchrun / DDP set-up: gloo on CPU, nccl on GPU; a plain `python -m ...` is a world of one."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_joined = False  # this process joined a group through setup_distributed


def joined_process_group() -> bool:
    """Whether this process joined a torchrun group. Such a process should leave without the interpreter's
    static teardown (vision.cli.run does): DistributedDataParallel keeps the gloo group alive in C++ even
    after destroy_process_group (its worker threads survive; torch 2.14), and tearing those threads down
    with the interpreter aborted a finished rank now and then ("terminate called without an active
    exception", SIGABRT); torchrun then SIGTERMs the other ranks and reports the run as failed."""
    return _joined


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
            atexit.register(teardown_distributed)
            global _joined
            _joined = True
    return DistInfo(rank, world, local_rank, device)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
