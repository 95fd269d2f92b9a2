"""The exceptions that `vision.cli.run` turns into one-line messages.

They live here, below both `vision.cli` and `vision.train`, so that either can raise them
without importing the other.
"""
from __future__ import annotations

import os


class UserError(Exception):
    """Bad input from the user: reported as one line `error: ...`, exit code 2."""


class ConfigError(ValueError):
    """A configuration field out of its range (raised by config dataclasses in `__post_init__`).

    A ValueError, so library callers can catch it as before; `vision.cli.run` reports it like
    a UserError, because in an app it always comes from the user's options.
    """


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the last checkpoint written before it is intact."""


def require_writable(folder: str | os.PathLike, subject: str, why: str = "") -> None:
    """UserError `SUBJECT: no permission to write in FOLDER` unless files can be created in `folder`:
    the check every output makes before any work (a read-only folder otherwise fails after it)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{subject}: no permission to write in {folder}{why}")
