"""The training loop every trainer in apps/ shares.

A trainer builds its models, optimizers and one or more `Phase`s (a loss, the optimizer it
drives, and when it is active: a GAN has a generator phase and a discriminator phase), then
calls `Trainer.fit`. The toolkit owns everything else: process group, data order, gradient
accumulation (with DDP's no_sync), AMP, gradient clipping, schedulers, EMA, checkpoints that
resume bit for bit, metrics (JSONL + PNG), progress, a clean stop on a non-finite loss, and
the run folder's safety (`vision.train.run_folder`: an existing run is never clobbered).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from vision import argtypes
from vision.atomic import atomic_path
from vision.errors import ConfigError, TrainingDiverged, UserError
from vision.nn import convert_sync_batchnorm
from vision.progress import progress
from vision.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vision.train.distributed import DistInfo, all_reduce_mean, barrier, setup_distributed
from vision.train import fsdp
from vision.train.ema import EMA
from vision.train.run_folder import RunFolder, check_run_folder, set_active
from vision.train.sampler import ResumableSampler, SeededDataset

LossFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]
__all__ = ["Phase", "TrainConfig", "Trainer", "TrainingDiverged", "add_ship_args", "add_train_args",
           "read_metrics", "train_config_from_args"]


@dataclass
class TrainConfig:
    out_dir: str
    max_steps: int
    batch_size: int  # global: samples per optimizer step over all processes and accumulation steps
    grad_accum: int = 1
    seed: int = 0
    amp: str = "none"  # none | bf16 | fp16
    ema_decay: float | None = None
    ema_warmup: bool = False  # LitEma's min(decay, (1 + n) / (10 + n)); see vision.train.ema.EMA
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False  # replace a run already in out_dir (once this run's first checkpoint is written)
    fsdp: bool = False  # shard trainable models over the processes (torch FSDP2) instead of DDP
    quiet: bool = False
    device: str = "cpu"
    command: str | None = None  # the command line, recorded in the run folder's sessions.jsonl (provenance)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclass
class Phase:
    """One optimizer update per step: loss(batch, step) -> (loss, metrics), summed over micro-batches."""

    name: str
    optimizer: str
    loss: LossFn
    models: tuple[str, ...] = ()  # models whose DDP gradient sync this phase drives
    clip_grad_norm: float | None = None
    active: Callable[[int], bool] = field(default=lambda step: True)


def add_train_args(parser: argparse.ArgumentParser, *, batch_size: int, max_steps: int,
                   checkpoint_every: int = 500, log_every: int = 10) -> None:
    """The toolkit's options (--out, --steps, ..., --resume, --overwrite). With `vision.cli.ArgumentParser`,
    an --out that holds a run is refused as soon as the command line is parsed, before any work."""
    g = parser.add_argument_group("training")
    g.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, curves.png, final model")
    g.add_argument("--steps", type=argtypes.positive_int, default=max_steps, help="optimizer steps in total")
    g.add_argument("--batch-size", type=argtypes.positive_int, default=batch_size,
                   help="global batch per optimizer step")
    g.add_argument("--grad-accum", type=argtypes.positive_int, default=1, help="micro-batches accumulated per step")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision")
    g.add_argument("--ema", type=argtypes.decay, default=None, metavar="DECAY",
                   help="keep an EMA of the weights (0 < DECAY < 1)")
    g.add_argument("--checkpoint-every", type=argtypes.positive_int, default=checkpoint_every,
                   help="steps between checkpoints")
    g.add_argument("--log-every", type=argtypes.positive_int, default=log_every, help="steps between metric lines")
    g.add_argument("--workers", type=argtypes.non_negative_int, default=0, help="data-loading worker processes")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoints/latest.pt")
    overwrite_help = ("replace the run already in OUT (the whole folder); the old run stays intact until the new "
                      "run's first checkpoint is written")
    existing = parser._option_string_actions.get("--overwrite")
    if existing is None:
        g.add_argument("--overwrite", action="store_true", help=overwrite_help)
    else:  # added earlier by vision.cli.add_common_args
        existing.help = overwrite_help
    add_check = getattr(parser, "add_check", None)  # vision.cli.ArgumentParser: checks run after parsing
    if add_check is not None:
        add_check(_check_out)


def _check_out(args: argparse.Namespace) -> None:
    if getattr(args, "out", None):  # an app may make --out optional for its non-training modes
        check_run_folder(args.out, resume=args.resume, overwrite=getattr(args, "overwrite", False))


def add_ship_args(parser: argparse.ArgumentParser, help: str, group=None) -> None:
    """--ship NAME (`help`: what the trainer records) and --replace-shipped, added to `group` (default: the
    parser). With `vision.cli.ArgumentParser`, a NAME that is not a plain name, or that is already shipped
    without --replace-shipped, is refused as soon as the command line is parsed, before any work."""
    g = group or parser
    g.add_argument("--ship", metavar="NAME", help=f"{help}; a NAME already shipped needs --replace-shipped")
    g.add_argument("--replace-shipped", action="store_true",
                   help="let --ship NAME replace the model already shipped under NAME (entries that name it as "
                        "their tokenizer then decode with the new weights)")
    add_check = getattr(parser, "add_check", None)
    if add_check is not None:
        add_check(_check_ship)


def _check_ship(args: argparse.Namespace) -> None:
    from vision.hub import check_ship_name

    if args.ship is None:
        if args.replace_shipped:
            raise UserError("--replace-shipped only applies with --ship NAME")
        return
    dependents = check_ship_name(args.ship, replace=args.replace_shipped)
    if dependents:
        warnings.warn(f"--replace-shipped: {args.ship} is the tokenizer of {', '.join(dependents)}; they will "
                      "decode with the new weights")


def train_config_from_args(args: argparse.Namespace, device: str, command: str | None = None) -> TrainConfig:
    return TrainConfig(out_dir=args.out, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       seed=args.seed, amp=args.amp, ema_decay=args.ema, checkpoint_every=args.checkpoint_every,
                       log_every=args.log_every, num_workers=args.workers, resume=args.resume,
                       overwrite=getattr(args, "overwrite", False), quiet=args.quiet, device=device,
                       command=command)


class Trainer:
    def __init__(self, config: TrainConfig, dataset, *, collate_fn=None):
        c = self.config = config
        # before the process group forms: every process sees the folder as it was before any of them wrote
        self.run = RunFolder(c.out_dir, resume=c.resume, overwrite=c.overwrite)
        self.dist: DistInfo = setup_distributed(torch.device(c.device))
        self.device = self.dist.device
        per_rank = c.batch_size // self.dist.world_size
        if c.batch_size % (self.dist.world_size * c.grad_accum):
            raise ConfigError(f"batch size {c.batch_size} must divide into {self.dist.world_size} processes x "
                              f"{c.grad_accum} accumulation steps")
        self.micro_batch = per_rank // c.grad_accum
        self.sampler = ResumableSampler(len(dataset), c.batch_size, rank=self.dist.rank,
                                        world_size=self.dist.world_size, seed=c.seed)
        self.loader = DataLoader(SeededDataset(dataset, c.seed), batch_size=self.micro_batch, sampler=self.sampler,
                                 num_workers=c.num_workers, collate_fn=collate_fn, drop_last=False,
                                 persistent_workers=False, pin_memory=self.device.type == "cuda",
                                 # its own generator: creating an iterator must not consume the global RNG
                                 generator=torch.Generator().manual_seed(c.seed))
        self.models: dict[str, nn.Module] = {}
        self.raw: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.ema: EMA | None = None
        self.ema_of: str | None = None
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.train_seconds = 0.0  # wall time spent in fit() over the whole run, resumed sessions included
        self._session: dict[str, Any] | None = None  # this process's line of sessions.jsonl, once it is written
        self._session_start = (0, 0.0)  # (step, train_seconds) when this process's session began
        self.scaler = torch.amp.GradScaler("cuda", enabled=c.amp == "fp16" and self.device.type == "cuda")

    @property
    def out(self) -> Path:
        """The folder this run writes into: --out, or its staging folder until an --overwrite's first checkpoint.
        Files a trainer writes during training (callbacks) go here; after fit() it is always --out."""
        return self.run.path

    @property
    def sharded(self) -> bool:
        """FSDP is on: asked for, and more than one process."""
        return self.config.fsdp and self.dist.distributed

    def full_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """Collective under FSDP: model `name`'s whole state dict on CPU (complete on rank 0). The EMA copy when
        there is one, as final_model."""
        model = self.final_model(name)
        if self.sharded:
            return fsdp.full_state_dict(model)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "latest.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def sessions_path(self) -> Path:
        """One line per command that trained this run (its command, first step, time before it, where it ran):
        what `provenance` reports for a run that was resumed, possibly with other options or threads."""
        return self.out / "sessions.jsonl"

    # ------------------------------------------------------------------ set-up

    def prepare(self, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                schedulers: dict[str, Any] | None = None, extra_state: dict[str, Any] | None = None,
                ema_of: str | None = None) -> dict[str, nn.Module]:
        """Move models to the device, wrap trainable ones in DDP, attach EMA. Returns the models to call.

        Under DDP, BatchNorm layers of trainable models are synchronised (`vision.nn.convert_sync_batchnorm`)
        so that N processes train the same network as one process on the whole batch.
        """
        for name, model in models.items():
            model.to(self.device)
            trainable = any(p.requires_grad for p in model.parameters())
            if self.dist.distributed and trainable:
                model = convert_sync_batchnorm(model)
            self.raw[name] = model
            if self.sharded and trainable:
                self.models[name] = fsdp.shard(model, self.device, optimizers=optimizers.values())
            elif self.dist.distributed and trainable:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.models[name] = DDP(model, device_ids=ids)
            else:
                self.models[name] = model
        self.optimizers = optimizers
        self.schedulers = schedulers or {}
        self.extra = extra_state or {}
        if self.config.ema_decay is not None:
            if self.sharded:
                raise ConfigError("--ema is not available with --fsdp yet (the EMA copy would need sharding too)")
            self.ema_of = ema_of or next(iter(models))
            self.ema = EMA(self.raw[self.ema_of], self.config.ema_decay, warmup=self.config.ema_warmup)
        if self.dist.is_main:
            self.run.create()
        if self.config.resume:
            self._resume()
        self._session_start = (self.step, self.train_seconds)
        set_active(self.run)
        barrier(self.dist)
        return self.models

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        rngs = [None] * self.dist.world_size
        if self.dist.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "train_seconds": self.train_seconds, "world_size": self.dist.world_size,
            "config": asdict(self.config),
            # sharded runs keep models and optimizers in a torch.distributed.checkpoint folder beside this file
            "models": None if self.sharded else {k: m.state_dict() for k, m in self.raw.items()},
            "optimizers": None if self.sharded else {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "extra": {k: s.state_dict() for k, s in self.extra.items()},
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
        }

    def save(self) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.sharded:  # shards first, then latest.pt naming them: a kill in between keeps the old pair
            shards = f"step_{self.step:07d}.dcp"
            fsdp.save_sharded(fsdp.sharded_state(self.raw, self.optimizers), self.ckpt_path.parent / shards)
            state["sharded"] = shards
        if self.dist.is_main:
            self._record_session()
            save_checkpoint(state, self.ckpt_path)
            if self.sharded:
                fsdp.remove_stale(self.ckpt_path.parent, keep=state["sharded"])
            self.run.commit()  # an --overwrite's staging folder replaces the old run now, not earlier
        barrier(self.dist)
        self.run.committed()
        self.run.saved_step = self.step

    def _record_session(self) -> None:
        """Write this command's line into sessions.jsonl before its first checkpoint (then the checkpoint is
        never ahead of the record)."""
        if self._session is not None or self.config.command is None:
            return
        self._session = {"command": self.config.command, "from_step": self._session_start[0],
                         "seconds_before": round(self._session_start[1], 3), "where": describe_device(self)}
        old = self.sessions_path.read_text() if self.sessions_path.is_file() else ""
        with atomic_path(self.sessions_path) as tmp:
            tmp.write_text(old + json.dumps(self._session) + "\n")

    def sessions(self) -> list[dict[str, Any]]:
        """The commands that trained the model as it is now, oldest first, each with `from_step`, `to_step`
        and `seconds`: recorded sessions cut where a later one resumed (a session interrupted after its last
        checkpoint trained nothing that survived). Empty for a run from before sessions were recorded."""
        try:
            lines = [json.loads(ln) for ln in self.sessions_path.read_text().splitlines() if ln.strip()]
        except (OSError, ValueError):
            return []
        kept: list[dict[str, Any]] = []
        for line in lines:
            while kept and kept[-1]["from_step"] >= line["from_step"]:
                kept.pop()
            kept.append(dict(line))
        kept = [s for s in kept if s["from_step"] < self.step]
        for i, s in enumerate(kept):
            later = kept[i + 1] if i + 1 < len(kept) else None
            s["to_step"] = later["from_step"] if later else self.step
            s["seconds"] = (later["seconds_before"] if later else self.train_seconds) - s["seconds_before"]
        return kept

    def provenance(self, command: str) -> tuple[str, str]:
        """(trained_with, train_time) of the model as it is now: `command` and this process's device when the
        run was trained by one command; else every command with its steps, and the time of each."""
        sessions = self.sessions()
        total = f"{self.train_seconds / 60:.1f} min"
        if len(sessions) <= 1:
            where = sessions[0]["where"] if sessions else describe_device(self)
            return (sessions[0]["command"] if sessions else command), f"{total} on {where}"
        trained_with = ", then ".join(f"{s['command']} (steps {s['from_step'] + 1}-{s['to_step']})" for s in sessions)
        parts = ", then ".join(f"{s['seconds'] / 60:.1f} min on {s['where']}" for s in sessions)
        return trained_with, f"{total} ({parts})"

    def _resume(self) -> None:
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
        state = load_checkpoint(self.ckpt_path)
        if state["world_size"] != self.dist.world_size:
            raise UserError(f"checkpoint was written by {state['world_size']} processes, resuming with "
                            f"{self.dist.world_size}; RNG streams would differ")
        if bool(state.get("sharded")) != self.sharded:
            raise UserError("the checkpoint was written " + ("with" if state.get("sharded") else "without")
                            + " --fsdp; resume it the same way")
        if self.sharded:
            fsdp.load_sharded(self.ckpt_path.parent / state["sharded"], self.raw, self.optimizers)
        else:
            for k, m in self.raw.items():
                m.load_state_dict(state["models"][k])
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            _resume_schedule(s, state["schedulers"][k])
        for k, s in self.extra.items():
            s.load_state_dict(state["extra"][k])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.train_seconds = float(state.get("train_seconds", self._logged_seconds()))
        self.run.saved_step = self.step
        set_rng_state(state["rng"][self.dist.rank])
        if self.dist.is_main and self.metrics_path.exists():  # drop lines logged after the checkpoint (and a torn one)
            kept = [ln for ln, row in _metric_lines(self.metrics_path) if row.get("step", 0) <= self.step]
            with atomic_path(self.metrics_path) as tmp:  # a kill while trimming must not lose the log
                tmp.write_text("".join(ln + "\n" for ln in kept))

    # ------------------------------------------------------------------ loop

    def _batches(self) -> Iterator[Any]:
        while True:
            self.sampler.set_position(self.epoch, self.step_in_epoch)
            yield from self.loader  # fit() moves to the next epoch when the last step of this one is done

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _no_sync(self, names: tuple[str, ...], sync: bool):
        stack = contextlib.ExitStack()
        if not sync:
            for n in names:
                m = self.models.get(n)
                if isinstance(m, DDP):
                    stack.enter_context(m.no_sync())
        return stack

    def fit(self, phases: list[Phase], on_checkpoint: Callable[["Trainer"], None] | None = None) -> dict[str, float]:
        """Run until config.max_steps; returns the last logged metrics."""
        c = self.config
        batches = self._batches()
        bar = progress(total=c.max_steps, initial=self.step, quiet=c.quiet, desc="train")
        last: dict[str, float] = {}
        window: dict[str, list[float]] = {}
        t0, before = time.perf_counter(), self.train_seconds
        try:
            while self.step < c.max_steps:
                micro = [_to_device(next(batches), self.device) for _ in range(c.grad_accum)]
                metrics = self._train_step(phases, micro)
                self.step += 1
                self.step_in_epoch += 1
                if self.step_in_epoch == self.sampler.steps_per_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
                bar.update(1)
                self.train_seconds = before + time.perf_counter() - t0
                if self.step % c.log_every == 0 or self.step == c.max_steps:
                    last = {k: sum(v) / len(v) for k, v in window.items()}
                    window = {}
                    self.log(last, self.train_seconds)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:4]})
                if self.step % c.checkpoint_every == 0 or self.step == c.max_steps:
                    self.save()
                    if on_checkpoint is not None:
                        on_checkpoint(self)
        finally:
            bar.close()
        if self.dist.is_main:
            self.plot()
        return last

    def _train_step(self, phases: list[Phase], micro: list[Any]) -> dict[str, float]:
        c = self.config
        totals: dict[str, torch.Tensor] = {}
        for phase in phases:
            if not phase.active(self.step):
                continue
            opt = self.optimizers[phase.optimizer]
            opt.zero_grad(set_to_none=True)
            for i, batch in enumerate(micro):
                with self._no_sync(phase.models, sync=i == len(micro) - 1), self._autocast():
                    loss, parts = phase.loss(batch, self.step)
                self.scaler.scale(loss / c.grad_accum).backward()
                for k, v in {f"{phase.name}_loss": loss, **parts}.items():
                    v = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
                    totals[k] = totals.get(k, 0.0) + v / len(micro)
            names = list(totals)
            vec = all_reduce_mean(torch.stack([totals[k] for k in names]), self.dist)
            if not torch.isfinite(vec).all():
                bad = [k for k, v in zip(names, vec.tolist()) if not math.isfinite(v)]
                if self.run.saved_step is None:
                    kept = "no checkpoint was written" + (f"; the previous run in {self.run.final} is untouched"
                                                          if self.run.staged else "")
                else:
                    kept = f"the last checkpoint ({self.ckpt_path}, step {self.run.saved_step}) is intact"
                raise TrainingDiverged(f"{', '.join(bad)} became non-finite at step {self.step + 1}; {kept}")
            totals = dict(zip(names, vec))
            if phase.clip_grad_norm is not None:
                self.scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                totals[f"{phase.name}_grad_norm"] = torch.nn.utils.clip_grad_norm_(params, phase.clip_grad_norm).double().cpu()
            self.scaler.step(opt)
            self.scaler.update()
        for s in self.schedulers.values():
            s.step()
        if self.ema is not None:
            self.ema.update(self.raw[self.ema_of])
        for k, opt in self.optimizers.items():
            totals[f"lr_{k}"] = torch.tensor(opt.param_groups[0]["lr"], dtype=torch.float64)
        return {k: float(v) for k, v in totals.items()}

    # ------------------------------------------------------------------ logging

    def _logged_seconds(self) -> float:
        """A checkpoint from before `train_seconds` was stored: the last time logged at or before its step."""
        seconds = 0.0
        if self.metrics_path.exists():
            for row in read_metrics(self.metrics_path):
                if row.get("step", self.step + 1) <= self.step and "time_s" in row:
                    seconds = float(row["time_s"])
        return seconds

    def log(self, metrics: dict[str, float], elapsed: float | None = None) -> None:
        """Append one JSONL line for the current step (rank 0 only); trainers log validation figures here."""
        if not self.dist.is_main:
            return
        row = {"step": self.step, "epoch": self.epoch}
        if elapsed is not None:
            row["time_s"] = round(elapsed, 3)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({**row, **metrics}) + "\n")

    def plot(self) -> Path | None:
        return plot_metrics(self.metrics_path, self.out / "curves.png")

    def final_model(self, name: str | None = None) -> nn.Module:
        """The weights to ship: the EMA copy when there is one, else the raw model."""
        name = name or next(iter(self.raw))
        if self.ema is not None and name == self.ema_of:
            return self.ema.model
        return self.raw[name]


def _metric_lines(jsonl: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) for each line of a metrics.jsonl. A last line that does not parse is dropped: an append cut
    by a kill or a full disk (the trim on --resume rewrites the file without it). A bad line before the last
    one is a UserError naming the file and line."""
    lines = [(n, ln) for n, ln in enumerate(jsonl.read_text(errors="replace").splitlines(), 1) if ln.strip()]
    parsed = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise UserError(f"{jsonl}: line {number} is not a metrics record ({e}); the log is damaged (delete "
                            "that line to continue)") from None
        parsed.append((line, row))
    return parsed


def read_metrics(jsonl: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, without a torn last line (see `_metric_lines`)."""
    return [row for _, row in _metric_lines(Path(jsonl))]


def plot_metrics(jsonl: Path, png: Path) -> Path | None:
    if not jsonl.is_file():
        return None
    rows = [r for r in read_metrics(jsonl) if "step" in r]
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("step", "epoch", "time_s")))
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if k.endswith("loss") and pts and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return png


def describe_device(trainer: Trainer) -> str:
    """Where a run trains, for provenance: "2 CPU threads", "cuda:0", "4 processes x cuda"."""
    d = trainer.device
    one = f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() != 1 else ''}" if d.type == "cpu" \
        else str(d)
    n = trainer.dist.world_size
    return one if n == 1 else f"{n} processes x " + (one if d.type == "cpu" else d.type)


_SCHEDULE_POSITION = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step")


def _resume_schedule(scheduler: Any, saved: dict[str, Any]) -> None:
    """Continue a learning-rate schedule at the checkpoint's step, with the schedule this command built.

    A schedule's shape (milestones, total steps, lambdas) comes from the command line, e.g. `--steps`; a
    run resumed with another `--steps` must follow the new one from its first step on, not keep the old
    milestones (MultiStepLR and OneCycleLR store them) or the old learning rate for a step (the optimizer's
    stored lr). Only the position is taken from the checkpoint; the learning rate is then the closed form
    at that position. When nothing but the position differs, the stored rates stay untouched, so a plain
    resume is bit for bit the uninterrupted run (LambdaLR's closed form is what its step computed anyway).
    """
    fresh = scheduler.state_dict()
    if not hasattr(scheduler, "optimizer") or "last_epoch" not in saved:
        scheduler.load_state_dict(saved)
        return
    shape_changed = any(k not in saved or saved[k] != v for k, v in fresh.items()
                        if k not in _SCHEDULE_POSITION and not k.startswith("lr_lambda"))
    position = {k: saved[k] for k in _SCHEDULE_POSITION if k in saved}
    if not shape_changed and not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.load_state_dict(saved)
        return
    scheduler.__dict__.update(position)
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    if closed_form is not None:
        lrs = closed_form()
    else:  # get_lr is the closed form for LambdaLR and OneCycleLR
        scheduler._get_lr_called_within_step = True
        try:
            lrs = scheduler.get_lr()
        except ValueError as e:  # OneCycleLR past its total steps
            raise UserError(f"--resume: the learning-rate schedule cannot continue at step "
                            f"{scheduler.last_epoch}: {e}") from None
        finally:
            scheduler._get_lr_called_within_step = False
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
