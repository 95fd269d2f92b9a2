"""A training run's folder (--out): never clobbered, replaced only once the new run has a checkpoint.

- A folder *holds a run* when it has any of RUN_MARKERS (what the toolkit and every trainer
  write: a checkpoint, the metrics log, a saved model).
- Such a folder is refused unless --resume (continue it) or --overwrite (replace it) is given.
- --overwrite writes the new run into a staging folder beside OUT (`.NAME.overwrite`). When the
  new run's first checkpoint is complete, OUT is swapped for the staging folder and the old run
  is deleted. Until then OUT is the old run, untouched: interrupt the new run, and the old one
  still resumes. The swap is two renames in the same parent folder.
- A folder without markers (new, empty, or holding other files) is used as it is; --overwrite
  deletes nothing there.

`interrupt_message()` tells `vision.cli.run` how to continue the run a Ctrl-C stopped.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from vision.errors import UserError

RUN_MARKERS = ("checkpoints/latest.pt", "metrics.jsonl", "model")
CHECKPOINT = "checkpoints/latest.pt"


def run_markers(out: str | os.PathLike) -> list[str]:
    """The RUN_MARKERS present in `out`."""
    out = Path(out)
    return [m for m in RUN_MARKERS if (out / m).exists()]


def check_run_folder(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an --out that would clobber a run or cannot be resumed."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass only one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; it must be a run folder")
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise UserError(f"--resume: no checkpoint at {out / CHECKPOINT}")
        return
    found = run_markers(out)
    if found and not overwrite:
        raise UserError(f"--out {out} holds a training run ({', '.join(found)}); pass --resume to continue it "
                        "or --overwrite to replace it")


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.overwrite"


class RunFolder:
    """Where a run writes (`path`): OUT itself, or its staging folder until the first checkpoint of an --overwrite."""

    def __init__(self, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False):
        check_run_folder(out, resume=resume, overwrite=overwrite)
        self.final = Path(out)
        self.resumed = resume
        self.staged = overwrite and bool(run_markers(self.final))
        self.path = staging_path(self.final) if self.staged else self.final
        self.saved_step: int | None = None  # step of the last complete checkpoint in `path`

    def create(self) -> None:
        """Make the folder to write into, or check the one resumed (main process only, before anything is written).

        A staging folder left by an earlier --overwrite interrupted before its first checkpoint is removed."""
        stale = staging_path(self.final)
        if stale.is_dir():
            shutil.rmtree(stale)
        if self.staged:
            self.path.mkdir()
        else:
            self.final.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        """After the staging folder's first checkpoint (main process only): it becomes OUT, the old run goes."""
        if not self.staged:
            return
        aside = self.final.parent / f".{self.final.name}.replaced"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(self.final, aside)
        os.rename(self.path, self.final)
        shutil.rmtree(aside)

    def committed(self) -> None:
        """Every process: from now on the run lives in OUT."""
        self.staged = False
        self.path = self.final

    def interrupt_message(self) -> str:
        if self.saved_step is not None:
            return (f"interrupted; {self.final} holds a checkpoint from step {self.saved_step}: rerun the same "
                    "command with --resume to continue")
        if self.staged:
            return (f"interrupted before the new run's first checkpoint; the previous run in {self.final} is "
                    "untouched (--resume continues it, --overwrite starts again)")
        again = "rerun the same command with --overwrite" if run_markers(self.final) else "rerun the same command"
        return f"interrupted before the first checkpoint; {again} to start again"


_active: RunFolder | None = None


def set_active(run: RunFolder | None) -> None:
    """The run this process is training (the Trainer sets it), for interrupt_message()."""
    global _active
    _active = run


def interrupt_message() -> str:
    """What a Ctrl-C reports: how to continue the run in progress, if there is one."""
    return _active.interrupt_message() if _active is not None else "interrupted"
