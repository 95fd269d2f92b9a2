"""Atomic training checkpoints and RNG capture.

A checkpoint is written to a temporary file in the same folder and `os.replace`d onto its
name, so a kill at any moment leaves either the old or the new file, never a torn one. Only
tensors and plain containers are stored, so it loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from vision.atomic import atomic_path
from vision.errors import UserError


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at `path`; one UserError naming it when it is empty, truncated or damaged."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises EOFError, RuntimeError, UnpicklingError... for bad bytes
        if path.is_file() and path.stat().st_size == 0:
            problem = "is empty"
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problem = f"is not a readable checkpoint ({first}): truncated or damaged"
        raise UserError(f"{path} {problem}; restore it, or start the run again with --overwrite") from None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
