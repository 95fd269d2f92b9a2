"""Atomic file replacement: write beside the target under a temporary name, then os.replace.

A reader (or a crash) sees either the old file or the complete new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it replaces `path` (mode 0666 & ~umask, as
    open() would create it, not mkstemp's 0600); on any exception it is removed. A folder at `path` is
    refused (IsADirectoryError) before the block runs; an OSError about the temporary file names `path`."""
    path = Path(path)
    if path.is_dir():  # os.replace would refuse only after the caller's work
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        temporary = e.filename is not None and (tmp is None or str(e.filename) == str(tmp))
        if temporary and e.errno is not None:  # the user knows the target, not its temporary name
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
