"""A training run's folder (--out): never clobbered, replaced only once the new run has a checkpoint.

- A folder *holds a run* when it has any of RUN_MARKERS (what the toolkit and every trainer
  write: a checkpoint, the metrics log, a saved model).
- Such a folder is refused unless --resume (continue it) or --overwrite (replace it) is given.
- --overwrite writes the new run into a staging folder beside OUT (`.NAME.overwrite`). When the
  new run's first checkpoint is complete, OUT is swapped for the staging folder and the old run
  is deleted. Until then OUT is the old run, untouched: interrupt the new run, and the old one
  still resumes. The swap is two renames in the same parent folder (OUT -> `.NAME.replaced`, staging -> OUT).
  A kill between them leaves no OUT: the next command on OUT first puts back the new run (its checkpoint is
  complete) or, failing that, the old one, with a `note:` line (`recover_interrupted_swap`).
- A folder without markers (new, empty, or holding other files) is used as it is; --overwrite
  deletes nothing there.

`interrupt_message()` tells `vision.cli.run` how to continue the run a Ctrl-C stopped.
"""
from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from pathlib import Path

from vision.errors import UserError, require_writable

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
    recover_interrupted_swap(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; it must be a run folder")
    _check_writable(out, staged=overwrite and out.is_dir())
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise UserError(f"--resume: no checkpoint at {out / CHECKPOINT}")
        return
    found = run_markers(out)
    if found and not overwrite:
        raise UserError(f"--out {out} holds a training run ({', '.join(found)}); pass --resume to continue it "
                        "or --overwrite to replace it")


def _check_writable(out: Path, staged: bool) -> None:
    """Refuse an --out that could not be written, before any work: the run folder itself when it exists
    (the folder made for it otherwise), and the folder holding it when an --overwrite stages beside it."""
    where = out if out.is_dir() else next(p for p in out.absolute().parents if p.exists())  # "/" exists
    if not where.is_dir():
        raise UserError(f"--out {out}: {where} is not a folder")
    require_writable(where, f"--out {out}")
    if staged:
        require_writable(out.absolute().parent, f"--out {out}", " (--overwrite stages the new run beside the old one)")


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.overwrite"


def replaced_path(out: Path) -> Path:
    return out.parent / f".{out.name}.replaced"


def recover_interrupted_swap(out: Path) -> None:
    """OUT is missing after a kill between the two renames of `RunFolder.commit`: move the new run (staging
    folder with a complete checkpoint) into OUT, and delete the old one, as the commit would have; without a
    complete new checkpoint, move the old run back. Nothing to do when OUT exists or neither folder does.
    Several processes (torchrun) may call this at once: only the one whose rename succeeds finishes the job."""
    staging, aside = staging_path(out), replaced_path(out)
    if out.exists():
        return
    ckpt = staging / CHECKPOINT
    new_run = ckpt.is_file() and zipfile.is_zipfile(ckpt)  # torch.save's zip archive, complete to its end
    source = staging if new_run else aside if aside.is_dir() else None
    if source is None:
        return
    try:
        os.rename(source, out)
    except OSError:
        if out.exists():  # another process of this command recovered it
            return
        raise
    if source == staging and aside.exists():
        shutil.rmtree(aside)
    which = "the new run (from its checkpoint)" if source == staging else "the previous run"
    warnings.warn(f"an --overwrite of {out} was interrupted while swapping the runs; recovered {which}")


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

        A staging folder left by an earlier --overwrite interrupted before its first checkpoint is removed, as is
        an old run a commit was interrupted while deleting."""
        stale = staging_path(self.final)
        if stale.is_dir():
            shutil.rmtree(stale)
        if self.final.is_dir() and replaced_path(self.final).is_dir():
            shutil.rmtree(replaced_path(self.final))
        if self.staged:
            self.path.mkdir()
        else:
            self.final.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        """After the staging folder's first checkpoint (main process only): it becomes OUT, the old run goes."""
        if not self.staged:
            return
        aside = replaced_path(self.final)
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
