"""Training checkpoints: everything `fit` needs to go on exactly where it stopped, written atomically and read
without unpickling code.

A checkpoint is a dict of tensors, numbers, strings and lists (no classes), saved with `torch.save` to a temporary
file beside its target and moved over the target with `os.replace`: a kill of the process at any moment leaves
either the previous checkpoint or the new one, never a torn file. It is read with `torch.load(weights_only=True)`,
which refuses any pickle that would build an object other than those, so a planted file cannot run code."""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
from pathlib import Path

import torch

from aetrack.config import UserError

FORMAT = "aetrack-checkpoint"
VERSION = 1
FILE = "last.pt"


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, foreign or refused."""


def path_for(checkpoint_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoint_dir) / run_id / FILE


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically for the process (temporary file, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # SIGINT and SIGTERM wait until the file is written: a handler that raises inside torch.save leaves its zip writer
    # failing a second time, and the run would end in a traceback instead of stopping with this epoch's checkpoint.
    stops = {signal.SIGINT, signal.SIGTERM}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        with os.fdopen(handle, "wb") as file:
            # No fsync: a killed process cannot tear a file that os.replace moves whole (the page cache keeps what was
            # written); fsync would guard against a crash of the machine itself, at several milliseconds an epoch.
            torch.save({"format": FORMAT, "version": VERSION, **state}, file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile is handled now


def load(path: Path, run_id: str | None = None) -> dict:
    """A checkpoint written by `save`, checked to be aetrack's (and `run_id`'s, when given); CheckpointError
    otherwise, with one line that names the file."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(f"{path} was refused: it holds more than tensors and plain values ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else 'empty'})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an aetrack checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is a version {state.get('version')} checkpoint; this aetrack reads version {VERSION}")
    if run_id is not None and state.get("run_id") != run_id:
        raise CheckpointError(f"{path} belongs to run {state.get('run_id')}, not {run_id}")
    return state
