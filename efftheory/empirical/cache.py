"""On-disk chunks of per-network statistics, so that a long ensemble run can be resumed.

One file per finished chunk, ``<cache_dir>/<stem>_<start>-<stop>.npz``, holding the per-network arrays
of networks start..stop-1 and a manifest: the cache format version, the run's configuration (JSON), its
SHA-256 hash, the network range and a SHA-256 checksum of the arrays (names, dtypes, shapes and bytes).

Writing is atomic: a temporary file ``.tmp-*`` in the same folder, flushed and fsync'ed, then
``os.replace`` onto the final name and the folder fsync'ed, so that an interrupted run (Ctrl-C, SIGKILL,
a crash) leaves either a whole chunk or none under the final name.  Reading never trusts a file: one
that cannot be read (truncated, garbled), whose checksum does not match its arrays, that was written
for another configuration or another format version, or whose range, array names or shapes differ from
the run's raises :class:`CacheMismatchError` naming the file; nothing is ever silently mixed in.
Temporary files left behind by a killed run are ignored (and may be deleted at any time).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zipfile
import zlib

import numpy as np

from .. import _io

__all__ = ["CacheMismatchError", "config_hash", "chunk_path", "load_chunk", "save_chunk", "arrays_checksum"]

FORMAT_VERSION = 2
_META = ("__format__", "__config_hash__", "__config__", "__range__", "__checksum__")


class CacheMismatchError(ValueError):
    """A cached chunk was written for another configuration, or is unreadable."""


def config_hash(config: dict) -> str:
    """SHA-256 of the canonical JSON of ``config``."""
    blob = json.dumps({"format": FORMAT_VERSION, **config}, sort_keys=True, separators=(",", ":"))
    return _io.text_sha256(blob)


def chunk_path(cache_dir: str, stem: str, start: int, stop: int) -> str:
    return os.path.join(cache_dir, f"{stem}_{start:010d}-{stop:010d}.npz")


def arrays_checksum(arrays: dict) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_chunk(path: str, arrays: dict, config: dict, digest: str, start: int, stop: int) -> None:
    """Write one chunk atomically (:func:`efftheory._io.atomic_write`: temporary file, fsync, os.replace,
    fsync of the folder)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    host = {k: np.asarray(v) for k, v in arrays.items()}

    def write(f) -> None:
        np.savez(f, __format__=np.asarray(FORMAT_VERSION, dtype=np.int64), __config_hash__=np.asarray(digest),
                 __config__=np.asarray(json.dumps(config, sort_keys=True)),
                 __range__=np.asarray([start, stop], dtype=np.int64),
                 __checksum__=np.asarray(arrays_checksum(host)), **host)

    _io.atomic_write(path, write, suffix=".npz", sync_folder=True)


_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, NotImplementedError, RuntimeError,
                MemoryError, OverflowError, zipfile.BadZipFile, zlib.error, struct.error)


def load_chunk(path: str, digest: str, start: int, stop: int, expected: dict) -> dict | None:
    """Read a chunk if it exists; None if it does not.

    ``expected`` maps array names to (shape, dtype) of the chunk's arrays.  Anything else raises
    :class:`CacheMismatchError` naming the file.
    """
    if not os.path.lexists(path):
        return None
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or stream forever
        raise CacheMismatchError(f"cache_dir: {path} is not a regular file (a chunk's name is taken by something "
                                 "else); move it away")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            contents = {k: data[k] for k in data.files}
        raw = sorted(k for k, v in contents.items() if not isinstance(v, np.ndarray))
        if raw:  # np.load hands back the bytes of a member whose .npy magic is damaged
            raise ValueError(f"member(s) {raw} are not .npy arrays")
    except _READ_ERRORS as e:
        raise CacheMismatchError(f"cache_dir: chunk file {path} is corrupted ({type(e).__name__}: {e}); delete it "
                                 "to recompute") from None
    fmt = contents.pop("__format__", None)
    if fmt is None or fmt.shape != () or fmt.dtype.kind not in "iu" or int(fmt) != FORMAT_VERSION:
        what = "an unknown format" if fmt is None or fmt.shape != () or fmt.dtype.kind not in "iu" \
            else f"cache format {int(fmt)}"
        raise CacheMismatchError(f"cache_dir: chunk file {path} has {what}, this efftheory writes format "
                                 f"{FORMAT_VERSION}; use another cache_dir or delete the file")
    got = _text(contents.pop("__config_hash__", None))
    if got != digest:
        raise CacheMismatchError(
            f"cache_dir: chunk file {path} was written for a different configuration (hash {got[:12] or 'missing'}, "
            f"this run {digest[:12]}); use another cache_dir or delete the file")
    contents.pop("__config__", None)
    rng = contents.pop("__range__", None)
    if rng is None or rng.shape != (2,) or list(rng) != [start, stop]:
        raise CacheMismatchError(f"cache_dir: chunk file {path} holds networks {rng}, expected [{start}, {stop})")
    checksum = _text(contents.pop("__checksum__", None))
    if set(contents) != set(expected):
        raise CacheMismatchError(f"cache_dir: chunk file {path} holds arrays {sorted(contents)}, "
                                 f"expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        arr = contents[name]
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise CacheMismatchError(f"cache_dir: chunk file {path}: array {name!r} has shape {arr.shape} and dtype "
                                     f"{arr.dtype}, expected {tuple(shape)} and {np.dtype(dtype)}")
    if checksum != arrays_checksum(contents):
        raise CacheMismatchError(f"cache_dir: chunk file {path} is corrupted (its arrays do not match their "
                                 "checksum); delete it to recompute")
    return contents


def _text(arr) -> str:
    """A 0-d string array as str ('' for anything else)."""
    if arr is None or arr.shape != () or arr.dtype.kind != "U":
        return ""
    return str(arr)
