"""The one error type of the folder-level metrics: bad input from whoever called them.

It is a `UserError`, so a command-line program (`vision.cli.run`) reports it as one line
`error: ...` with exit status 2, and a `ValueError`, so Python callers can catch it as one.
"""
from __future__ import annotations

from vision.errors import UserError


class EvaluationInputError(UserError, ValueError):
    """A folder without images, images that do not pair up, an unusable statistics file or network, ..."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
