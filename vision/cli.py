"""Conventions shared by every command-line program in apps/.

- A user error prints one line `error: ...` on stderr and exits 2: no traceback, no output file.
- Outputs are written to a temporary name beside the target and renamed when complete;
  an existing output is kept unless --overwrite.
- --device auto|cpu|cuda|mps, --quiet, --seed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vision.atomic import atomic_path


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an app's main(argv); map user errors to `error: ...` + exit 2 (a diverged training run: exit 1)."""
    from vision.data.images import ImageReadError
    from vision.hub import HubError
    from vision.train.trainer import TrainingDiverged

    try:
        code = main(argv)
    except (UserError, HubError, ImageReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e.strerror or e}: {e.filename}" if e.filename else f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:  # not the user's input: exit 1, still one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors follow the same one-line `error:` + exit 2 rule, defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_common_args(parser: argparse.ArgumentParser, *, seed: bool = True, overwrite: bool = True) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto picks cuda, then mps, then cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed for every random draw")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse early (before any work) to clobber an existing output or write into a missing folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise UserError(f"output folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = check_output(path, overwrite)
    with atomic_path(path) as tmp:
        yield tmp
        if path.exists() and not overwrite:  # appeared while we worked
            raise UserError(f"{path} exists; pass --overwrite to replace it")


def progress(iterable=None, *, quiet: bool = False, **kwargs):
    """tqdm on stderr unless --quiet (or not rank 0 in a distributed run)."""
    from tqdm.auto import tqdm

    rank = int(os.environ.get("RANK", "0"))
    return tqdm(iterable, disable=quiet or rank != 0, file=sys.stderr, dynamic_ncols=True, **kwargs)
