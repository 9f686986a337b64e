"""On-disk chunks of per-network statistics, so that a long ensemble run can be resumed.

One file per finished chunk, ``<cache_dir>/<stem>_<start>-<stop>.npz``, holding the per-network arrays
of networks start..stop-1, the run's configuration (JSON) and its SHA-256 hash.  Files are written
atomically (a temporary file in the same folder, fsync, ``os.replace``), so an interrupted run leaves
either a whole chunk or none.  A chunk file whose hash, range, array names or shapes do not match the
run raises :class:`CacheMismatchError` instead of being mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile

import numpy as np

__all__ = ["CacheMismatchError", "config_hash", "chunk_path", "load_chunk", "save_chunk"]

FORMAT_VERSION = 1


class CacheMismatchError(ValueError):
    """A cached chunk was written for another configuration, or is unreadable."""


def config_hash(config: dict) -> str:
    """SHA-256 of the canonical JSON of ``config``."""
    blob = json.dumps({"format": FORMAT_VERSION, **config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def chunk_path(cache_dir: str, stem: str, start: int, stop: int) -> str:
    return os.path.join(cache_dir, f"{stem}_{start:010d}-{stop:010d}.npz")


def save_chunk(path: str, arrays: dict, config: dict, digest: str, start: int, stop: int) -> None:
    """Write one chunk atomically: temporary file, fsync, os.replace."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __config_hash__=np.asarray(digest), __config__=np.asarray(json.dumps(config, sort_keys=True)),
                     __range__=np.asarray([start, stop], dtype=np.int64), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_chunk(path: str, digest: str, start: int, stop: int, expected: dict) -> dict | None:
    """Read a chunk if it exists; None if it does not.

    ``expected`` maps array names to (shape, dtype) of the chunk's arrays.  Anything else raises
    :class:`CacheMismatchError` naming the file.
    """
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CacheMismatchError(f"cache_dir: chunk file {path} is corrupted ({e}); delete it to recompute") from None
    got = str(contents.pop("__config_hash__", ""))
    if got != digest:
        raise CacheMismatchError(
            f"cache_dir: chunk file {path} was written for a different configuration (hash {got[:12] or 'missing'}, "
            f"this run {digest[:12]}); use another cache_dir or delete the file")
    contents.pop("__config__", None)
    rng = contents.pop("__range__", None)
    if rng is None or list(rng) != [start, stop]:
        raise CacheMismatchError(f"cache_dir: chunk file {path} holds networks {rng}, expected [{start}, {stop})")
    if set(contents) != set(expected):
        raise CacheMismatchError(f"cache_dir: chunk file {path} holds arrays {sorted(contents)}, "
                                 f"expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        arr = contents[name]
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise CacheMismatchError(f"cache_dir: chunk file {path}: array {name!r} has shape {arr.shape} and dtype "
                                     f"{arr.dtype}, expected {tuple(shape)} and {np.dtype(dtype)}")
    return contents
