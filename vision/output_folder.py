"""Output folders written as a whole (apps.generate --out-dir, apps.extract_tokens --out, --make-shapes DIR).

A folder is built in a hidden sibling `.NAME.partial` and published by renames: `NAME` -> `.NAME.old`,
`.NAME.partial` -> `NAME`, then `.NAME.old` is deleted. `--overwrite` replaces only a folder the same
program wrote, which a `FolderKind` recognises; anything else is refused before any work, naming the
first entry the program did not write. A `.NAME.old` without `NAME` (a replacement interrupted between
its two renames) holds the only copy of the previous output: it is refused, never deleted. Missing folders
above NAME are made (after every check passed), as a training run's `--out` is.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vision.errors import UserError, require_writable

__all__ = ["FolderKind", "check_folder_output", "first_foreign", "publish_folder", "staging_for", "previous_for",
           "remove_staging"]


def first_foreign(folder: Path, files: str, dirs: dict[str, str] | None = None) -> Path | None:
    """The first entry (in name order) of `folder` that is neither a file whose name matches the regex
    `files` nor a folder whose name matches a key of `dirs` holding only files matching its value
    (links count as foreign); None when every entry matches."""
    def foreign_in(where: Path, file_pattern: str, sub: dict[str, str]) -> Path | None:
        for entry in sorted(where.iterdir()):
            if entry.is_symlink():
                return entry
            if entry.is_file() and re.fullmatch(file_pattern, entry.name):
                continue
            pattern = next((v for k, v in sub.items() if re.fullmatch(k, entry.name)), None)
            if entry.is_dir() and pattern is not None:
                inner = foreign_in(entry, pattern, {})
                if inner is None:
                    continue
                return inner
            return entry
        return None

    return foreign_in(Path(folder), files, dirs or {})


@dataclass(frozen=True)
class FolderKind:
    """What a program writes: `what` describes it in messages, `foreign(folder)` names the first entry of an
    existing folder the program did not write (None when the folder is its own)."""
    what: str
    foreign: Callable[[Path], Path | None] = field(repr=False)


def staging_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def previous_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _refuse_foreign(path: Path, kind: FolderKind) -> None:
    entry = kind.foreign(path) if path.is_dir() and not path.is_symlink() else path
    if entry is not None:
        raise UserError(f"{path} holds {entry}, which is not part of {kind.what}; --overwrite replaces only "
                        "such a folder: move that away or choose another folder")


def check_folder_output(path: str | Path, overwrite: bool, kind: FolderKind) -> Path:
    """Refuse, before any work, what publishing `path` could not do without losing something."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise UserError(f"{path}: name the output folder itself (not . or ..)")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{path} exists and is not a folder; {kind.what} is written as a folder")
    old = previous_for(path)
    if not path.exists() and (old.exists() or old.is_symlink()):
        raise UserError(f"{path} is missing and {old} holds its previous contents (a replacement was "
                        f"interrupted): move {old} back to {path}, or delete it, and run again")
    if path.exists():
        if not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it")
        _refuse_foreign(path, kind)
        if old.exists() or old.is_symlink():  # left by a finished replacement that was stopped while deleting it
            _refuse_foreign(old, kind)
    if path.parent.is_dir():
        require_writable(path.parent, str(path))  # the folder is staged beside it, then renamed
        return path
    # missing folders above it are made, as a training run's --out is (tokens/NAME on a fresh clone)
    where = next(p for p in path.absolute().parents if p.exists() or p.is_symlink())  # "/" exists
    if not where.is_dir():
        raise UserError(f"{path}: {where} is not a folder")
    require_writable(where, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def remove_staging(path: Path) -> None:
    """Remove a stale `.NAME.partial` (an earlier run's unfinished folder)."""
    staging = staging_for(path)
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging)
    elif staging.exists() or staging.is_symlink():
        staging.unlink()


def publish_folder(staging: Path, path: Path, overwrite: bool, kind: FolderKind) -> None:
    """Rename the finished `staging` to `path`; an old `path` is set aside first and deleted only after
    (it is checked again: it may have changed while the program worked)."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it")
        check_folder_output(path, overwrite, kind)
        old = previous_for(path)
        if old.exists():
            shutil.rmtree(old)  # checked above: a leftover of this program's own output
        path.rename(old)
        try:
            staging.rename(path)
        except BaseException:
            old.rename(path)
            raise
        shutil.rmtree(old)
    else:
        staging.rename(path)
