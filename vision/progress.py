"""The progress bar every program shows: tqdm on stderr, silent with --quiet or off rank 0."""
from __future__ import annotations

import os
import sys


def progress(iterable=None, *, quiet: bool = False, **kwargs):
    """tqdm on stderr unless --quiet (or not rank 0 in a distributed run)."""
    from tqdm.auto import tqdm

    rank = int(os.environ.get("RANK", "0"))
    return tqdm(iterable, disable=quiet or rank != 0, file=sys.stderr, dynamic_ncols=True, **kwargs)
