"""Checkpoint files: atomic writes, readable errors, and finding the newest one in a tree."""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


def save_checkpoint(path, state: dict) -> None:
    """Write `state` to `path` so that a crash at any moment leaves either the old or the new file.

    The data goes to a hidden temporary file in the same directory (same file system, so the rename is
    atomic), is flushed to disk, then replaces `path`; the directory is synced so the rename survives a
    power loss. A process killed mid-write can leave a `.<name>.<pid>.tmp` file, which nothing reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a checkpoint written by `save_checkpoint` (a full pickle: RNG states, config, sampler)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path (a run keeps them in "
                                "<output_dir>/checkpoints/)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated?): {type(e).__name__}: {e}; "
            "use an older file (to train on, resume=<that file>; or resume='' to start fresh)"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict: "
                              "use a file written by training")
    return state


def unwrap_state_dict(sd) -> dict:
    """Strip the leading "module." that nn.DataParallel adds, when every key has it."""
    if not sd or not all(k.startswith("module.") for k in sd):
        return sd
    out = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None)  # per-module versions that load_state_dict consults
    if meta is not None:
        out._metadata = OrderedDict((k[len("module."):], v) for k, v in meta.items() if k.startswith("module"))
    return out


def find_latest_checkpoint(root, name: str = "last.pt") -> Path | None:
    """The `name` file under `root` (any depth) with the highest stored epoch; mtime breaks ties.

    Mounts such as Kaggle's input tree have varying layouts, so we search rather than guess a path.
    Symlinked directories are followed once (no loops); unreadable candidates are skipped with a warning.
    """
    best, best_key, seen = None, None, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if name not in filenames:
            continue
        path = Path(dirpath) / name
        try:
            # mmap: the tensors are not read, so looking at a multi-GB checkpoint is cheap
            epoch = int(load_checkpoint(path, mmap=True).get("epoch", -1))
        except Exception as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
            continue
        key = (epoch, path.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best
