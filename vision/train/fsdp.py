"""Fully sharded data parallel (torch FSDP2, `fully_shard`) for models that outgrow one device.

Parameters, gradients and optimizer state are split over the processes; each `unit` (a transformer
block, by default every module inside an `nn.ModuleList`) gathers its parameters only while it runs.
The arithmetic is DDP's: gradients are averaged over the global batch (reduce-scatter instead of
all-reduce), so N sharded processes train the same weights as one process.

Checkpoints are sharded too (torch.distributed.checkpoint): each process writes its own part into
`checkpoints/step_XXXXXXX.dcp/`, and `latest.pt` (written last, atomically) names the folder it goes
with, so a kill at any moment leaves a `latest.pt` whose shards are complete. Older shard folders are
deleted only after the new `latest.pt` is in place.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def default_units(model: nn.Module) -> list[nn.Module]:
    """Every module held in an nn.ModuleList (transformer blocks, in practice)."""
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def shard(model: nn.Module, device: torch.device, units: Iterable[nn.Module] | None = None,
          optimizers: Iterable[torch.optim.Optimizer] = ()) -> nn.Module:
    """Apply fully_shard to each unit, then to the whole model (in place; returns the model).

    fully_shard replaces every parameter by a sharded one; `optimizers` built on the old parameters (and
    not yet stepped) are pointed at the new ones, matched by name.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in (default_units(model) if units is None else units):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    new = dict(model.named_parameters())
    for opt in optimizers:
        if opt.state:
            raise ValueError("shard the model before the optimizer takes its first step")
        for group in opt.param_groups:
            group["params"] = [new[names[id(p)]] if id(p) in names else p for p in group["params"]]
    return model


def sharded_state(models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Models' and optimizers' sharded state dicts (DTensors), the form torch.distributed.checkpoint saves."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    owner = _optimizer_owners(models, optimizers)
    return {"models": {k: get_model_state_dict(m) for k, m in models.items()},
            "optimizers": {k: get_optimizer_state_dict(models[owner[k]], o) for k, o in optimizers.items()}}


def save_sharded(state: dict, folder: Path) -> None:
    """Collective: every process writes its shards of `state` into `folder` (made fresh)."""
    import torch.distributed.checkpoint as dcp

    if dist.get_rank() == 0:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(folder))
    dist.barrier()


def load_sharded(folder: Path, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Collective: read `folder` back into the (already sharded) models and optimizers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not folder.is_dir():
        raise FileNotFoundError(f"sharded checkpoint {folder} is missing")
    state = sharded_state(models, optimizers)
    dcp.load(state, checkpoint_id=str(folder))
    owner = _optimizer_owners(models, optimizers)
    for k, m in models.items():
        set_model_state_dict(m, state["models"][k])
    for k, o in optimizers.items():
        set_optimizer_state_dict(models[owner[k]], o, state["optimizers"][k])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole (unsharded) state dict on CPU, on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def remove_stale(checkpoints: Path, keep: str) -> None:
    for old in checkpoints.glob("step_*.dcp"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _optimizer_owners(models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, str]:
    """Which model's parameters each optimizer steps (an optimizer over several models is not supported)."""
    owners = {}
    for name, opt in optimizers.items():
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        found = [k for k, m in models.items() if params & {id(p) for p in m.parameters()}]
        if len(found) != 1:
            raise ValueError(f"with FSDP each optimizer must step exactly one model; {name!r} steps {found or 'none'}")
        owners[name] = found[0]
    return owners
