"""Saving results without pickle: arrays in an ``.npz`` (read with ``allow_pickle=False``), everything
else -- the network's configuration, tolerances, metadata, the efftheory version -- as JSON text
stored in the same file under the key ``__meta__.json``.

One file per object.  The JSON describes the object as a tree: dataclasses of efftheory (results,
rows, fits) by class and fields, an :class:`~efftheory.MLP` by :meth:`~efftheory.MLP.to_dict`,
tuples, dicts, and non-finite floats are tagged (``{"$tuple": [...]}``, ``{"$float": "nan"}``), and
each array is a reference ``{"$array": key, "jax": bool}`` to an entry of the npz.  Floats go through
``repr`` and arrays keep their dtype, so a round trip is bitwise.  Loading builds classes of the
efftheory package only, and only dataclasses among them.

    np.load(path)["__meta__.json"].item()   # the JSON, readable without efftheory
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from typing import IO

import numpy as np

__all__ = ["save", "load", "atomic_write", "array_sha256", "text_sha256"]

FORMAT = "efftheory"
FORMAT_VERSION = 1
_META = "__meta__.json"


# ------------------------------------------------------------------------------------------ packing
def _pack(obj, arrays: dict, key: str):
    from .network import MLP

    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(obj, MLP):
        return {"$mlp": obj.to_dict()}
    if isinstance(obj, np.ndarray) or _is_jax_array(obj):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", key.lstrip(".")) or "array"
        if name in arrays or name == _META:
            i = 1
            while f"{name}~{i}" in arrays:
                i += 1
            name = f"{name}~{i}"
        arr = np.asarray(obj)
        if arr.dtype.kind == "O":
            raise TypeError(f"{key}: object arrays cannot be saved without pickle")
        arrays[name] = arr
        return {"$array": name, "jax": not isinstance(obj, np.ndarray)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith("efftheory"):
            raise TypeError(f"{key}: {cls.__qualname__} is not an efftheory class")
        return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _pack(getattr(obj, f.name), arrays, f"{key}.{f.name}")
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, (tuple, list)):
        items = [_pack(v, arrays, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"$tuple": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{key}: only dicts with string keys can be saved")
        out = {k: _pack(v, arrays, f"{key}.{k}") for k, v in obj.items()}
        return {"$dict": out} if any(k.startswith("$") for k in obj) else out
    raise TypeError(f"{key}: cannot save a {type(obj).__name__} without pickle")


def _is_jax_array(obj) -> bool:
    import jax

    return isinstance(obj, jax.Array)


def _unpack(node, arrays):
    if isinstance(node, list):
        return [_unpack(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (tag, val), = node.items()
        if tag == "$float":
            return float(val)
        if tag == "$tuple":
            return tuple(_unpack(v, arrays) for v in val)
        if tag == "$dict":
            return {k: _unpack(v, arrays) for k, v in val.items()}
        if tag == "$mlp":
            from .network import MLP

            return MLP.from_dict(val)
    if set(node) == {"$array", "jax"}:
        arr = arrays[node["$array"]]
        if node["jax"]:
            import jax.numpy as jnp

            return jnp.asarray(arr)
        return arr
    if set(node) == {"$dataclass", "fields"}:
        cls = _class(node["$dataclass"])
        fields = {k: _unpack(v, arrays) for k, v in node["fields"].items()}
        return cls(**fields)
    return {k: _unpack(v, arrays) for k, v in node.items()}


def _class(name: str):
    module, _, qual = name.partition(":")
    if not (module == "efftheory" or module.startswith("efftheory.")):
        raise ValueError(f"file: refusing to build {name!r}, not a class of efftheory")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(f"file: {name!r} is not an efftheory dataclass")
    return obj


# ------------------------------------------------------------------------------------------ files
def save(obj, path, *, extra: dict | None = None) -> str:
    """Write ``obj`` (an efftheory dataclass) to ``path`` (an .npz, written atomically); returns the path."""
    from . import __version__

    path = os.fspath(path)
    arrays: dict = {}
    tree = _pack(obj, arrays, "")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": type(obj).__qualname__,
            "efftheory": __version__, **(extra or {}), "object": tree}
    text = json.dumps(meta, allow_nan=False, indent=1)
    buf = io.BytesIO()
    np.savez(buf, **{_META: np.array(text)}, **arrays)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def read_meta(path) -> dict:
    """The JSON metadata of a saved file."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        if _META not in z.files:
            raise ValueError(f"path: {os.fspath(path)!r} is not an efftheory file (no {_META} entry)")
        return json.loads(z[_META].item())


def load(path, cls):
    """Read an object of class ``cls`` written by :func:`save`."""
    path = os.fspath(path)
    with np.load(path, allow_pickle=False) as z:
        if _META not in z.files:
            raise ValueError(f"path: {path!r} is not an efftheory file (no {_META} entry)")
        meta = json.loads(z[_META].item())
        if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
            raise ValueError(f"path: {path!r} is not an efftheory file")
        if meta["format_version"] > FORMAT_VERSION:
            raise ValueError(f"path: {path!r} has format version {meta['format_version']}, newer than this "
                             f"efftheory reads ({FORMAT_VERSION}); upgrade efftheory")
        if meta.get("kind") != cls.__qualname__:
            raise ValueError(f"path: {path!r} holds a {meta.get('kind')}, not a {cls.__qualname__}; "
                             f"load it with {meta.get('kind')}.load")
        arrays = {k: z[k] for k in z.files if k != _META}
    raw = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if raw:  # np.load hands back the bytes of a member whose .npy header or zip entry is damaged
        raise ValueError(f"path: {path!r} is damaged: member(s) {raw} are not .npy arrays")
    obj = _unpack(meta["object"], arrays)
    if not isinstance(obj, cls):
        raise ValueError(f"path: {path!r} holds a {type(obj).__name__}, not a {cls.__qualname__}")
    return obj


# ------------------------------------------------------------------------------------------ files
def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status): other
    threads may be creating files meanwhile."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: str | bytes | Callable[[IO], None], *, suffix: str | None = None,
                 sync_folder: bool = False) -> None:
    """Write ``path`` whole or not at all: ``data`` (text, bytes, or a function that writes to the open
    binary file) goes to a unique temporary file ``.tmp-*`` in the same folder, is flushed and fsync'ed,
    gets the permissions the user's umask gives a new file (mkstemp's 0600 would hide it from the
    user's group), and replaces ``path`` (``os.replace``); ``sync_folder`` also fsyncs the folder so
    that the rename survives a crash.  On any error the temporary file is removed and the error raised.
    ``suffix``: of the temporary name (default: the file's name)."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path) if suffix is None else suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if sync_folder:
        fsync_folder(folder)


# ------------------------------------------------------------------------------------------ checksums
def array_sha256(a) -> str:
    """SHA-256 hex digest of an array's bytes in C order (its dtype and shape are not hashed)."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def text_sha256(text: str) -> str:
    """SHA-256 hex digest of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()
