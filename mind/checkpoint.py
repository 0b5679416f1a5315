"""Atomic, validated training checkpoints and the RNG state they carry.

A checkpoint is a dict saved with ``torch.save``; it holds only tensors, numbers,
strings, lists, tuples and dicts so that it loads with ``weights_only=True`` (no
arbitrary unpickling of a file from disk).

Writes are atomic: the dict goes to a temporary file in the destination directory,
is fsync'ed, then ``os.replace``d over the destination, so a crash leaves either
the previous checkpoint or the new one, never half a file.  Loading a missing,
truncated or corrupt file raises :class:`CheckpointError` naming the file; nothing
ever silently starts from scratch.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import random
import tempfile
import warnings
from typing import Iterable

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, truncated or lacks required entries."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> pathlib.Path:
    """Write ``state`` to ``path`` atomically (temp file in the same dir, fsync, os.replace)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # fsync the directory so the rename itself survives a power cut (POSIX only).
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


_ZIP_MAGIC = b"PK\x03\x04"   # torch.save writes a zip archive


def _unreadable(path: pathlib.Path, error: BaseException, writer: str) -> CheckpointError:
    """Our own words for a file torch.load refused: never torch's text (which may suggest
    ``weights_only=False``, unsafe for a file from elsewhere), never cut mid-sentence."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        return CheckpointError(f"checkpoint {path} is truncated or corrupt: the file is empty (0 bytes); "
                               f"delete it to start over, or restore a good copy")
    if head.startswith(_ZIP_MAGIC):
        if isinstance(error, pickle.UnpicklingError):
            reason = ("it holds Python objects other than tensors, numbers, strings and containers, "
                      "which MIND never unpickles")
            return CheckpointError(f"{path} is not a MIND checkpoint (written by {writer}): {reason}")
        return CheckpointError(f"checkpoint {path} is truncated or corrupt: its zip archive is incomplete or "
                               f"damaged ({size} bytes); delete it to start over, or restore a good copy")
    return CheckpointError(f"{path} is not a MIND checkpoint (written by {writer}): not a torch.save archive "
                           f"(it starts with {head[:8]!r})")


def load_checkpoint(path: str | os.PathLike, required: Iterable[str] = (),
                    writer: str = "python -m mind train") -> dict:
    """Load a checkpoint dict; raise CheckpointError naming ``path`` if it cannot be used.

    Always ``weights_only=True``.  ``writer`` names the command that writes such files, for the
    message about a file that is not one of ours.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file (want a file written by "
                              f"{writer}, e.g. best.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # torch's pickle-protocol chatter for foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong format: say which, in our words
        raise _unreadable(path, e, writer) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a MIND checkpoint (written by {writer}): it holds a "
                              f"{type(state).__name__}, not a dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks required entries {missing}; is it a file written by "
                              f"{writer}?")
    return state


def get_rng_state() -> dict:
    """The state of python's, numpy's and torch's global generators, in weights_only-safe types."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
