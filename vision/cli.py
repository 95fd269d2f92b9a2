"""Conventions shared by every command-line program in apps/.

- A user error prints one line `error: ...` on stderr and exits 2: no traceback, no output file.
  That covers UserError, a config field out of range (ConfigError), an option out of its declared
  range (`vision.argtypes`, refused while parsing) and any check added with
  `ArgumentParser.add_check` (trainers: an --out that holds a run), and any OSError (a file that
  cannot be read or written): `error: PATH: reason`.
- Outputs are written to a temporary name beside the target and renamed when complete;
  an existing output is kept unless --overwrite. `check_output` refuses, before any work, an
  output that could not be written (a folder in its place, a folder to hold it that is missing
  or not writable).
- --device auto|cpu|cuda|mps, --quiet, --seed.
- Warnings are printed as one line `note: ...`; Ctrl-C exits 130 and says how to continue an
  interrupted training run (--resume).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vision import argtypes
from vision.atomic import atomic_path
from vision.data.images import ImageReadError
from vision.errors import ConfigError, TrainingDiverged, UserError, require_writable
from vision.hub import HubError
from vision.progress import progress
from vision.train.run_folder import interrupt_message, set_active as set_active_run

__all__ = ["UserError", "ConfigError", "run", "ArgumentParser", "add_common_args", "resolve_device",
           "seed_everything", "check_output", "atomic_output", "progress"]

_default_showwarning = warnings.showwarning


def _show_note(message, category, filename, lineno, file=None, line=None) -> None:
    """A UserWarning (from Tessera or a library) as one line `note: ...`; other categories as Python shows them."""
    text = str(message).strip()
    if issubclass(category, UserWarning):
        print(f"note: {text.splitlines()[0] if text else category.__name__}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, *,
        skip_teardown: bool = False) -> None:
    """Run an app's main(argv); map user errors to `error: ...` + exit 2 (a diverged training run: exit 1).

    `skip_teardown` (only for a program's `__main__`, never in-process): once main is done, run the
    atexit handlers, flush and leave without the interpreter's teardown of torch's modules, which
    takes about 0.4 s of a short command's time. Every output is already complete by then
    (atomic_output renames a closed file). A rank of a torchrun group always leaves this way (see
    vision.train.distributed.joined_process_group).
    """
    try:
        _run(main, argv)
    except SystemExit as e:
        if not (skip_teardown or _joined_process_group()):
            raise
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _joined_process_group() -> bool:
    distributed = sys.modules.get("vision.train.distributed")  # imported only by programs that can join one
    return distributed is not None and distributed.joined_process_group()


def _run(main: Callable[[list[str] | None], int | None], argv: list[str] | None) -> None:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_note
            code = main(argv)
    except (UserError, ConfigError, HubError, ImageReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a file that cannot be read or written (missing, permissions, a folder, disk full)
        print(f"error: {_os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:  # not the user's input: exit 1, still one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: {interrupt_message()}", file=sys.stderr)
        sys.exit(130)
    finally:
        set_active_run(None)  # in-process callers (tests) run several programs in one process
    sys.exit(code or 0)


def _os_error_line(e: OSError) -> str:
    """`PATH: reason` (`SRC -> DST: reason` for a rename), or the message alone when no file is named."""
    if e.filename is None:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{where}: {e.strerror or type(e).__name__}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors follow the same one-line `error:` + exit 2 rule, defaults shown in --help.

    `add_check(fn)` registers fn(args), run on the parsed arguments before parse_args returns; it
    raises UserError for a bad combination (run() reports it as one line, exit 2).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._checks: list[Callable[[argparse.Namespace], None]] = []

    def add_check(self, check: Callable[[argparse.Namespace], None]) -> None:
        self._checks.append(check)

    def parse_args(self, args=None, namespace=None):  # noqa: D401 - argparse API
        parsed = super().parse_args(args, namespace)
        for check in self._checks:
            check(parsed)
        return parsed

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_common_args(parser: argparse.ArgumentParser, *, seed: bool = True, overwrite: bool = True) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto picks cuda, then mps, then cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if seed:
        parser.add_argument("--seed", type=argtypes.seed, default=0, help="seed for every random draw (0 to 2**32-1)")
    if overwrite and "--overwrite" not in parser._option_string_actions:  # a trainer's add_train_args has its own
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
    """Refuse early (before any work) an output file that could not be written: one that exists (unless
    `overwrite`), a folder in its place, a folder to hold it that is missing, not a folder or not writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    folder = path.parent
    if not folder.exists():
        raise UserError(f"output folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{path}: {folder} is not a folder")
    require_writable(folder, str(path))  # the file is created there under a temporary name
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = check_output(path, overwrite)
    with atomic_path(path) as tmp:
        yield tmp
        if path.exists() and not overwrite:  # appeared while we worked
            raise UserError(f"{path} exists; pass --overwrite to replace it")

