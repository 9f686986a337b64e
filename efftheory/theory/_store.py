"""On-disk layers of :func:`efftheory.finite_width`: the N^4 tensors outside memory, and runs that resume.

Layout of a store directory:

    manifest.json            {"format", "config", "hash", "done", "checksums"}
    G1.npy, H1.npy           (L, N, N) float64
    V.npy, A.npy, B.npy,     (L, N, N, N, N) float64, written layer by layer through memory maps
    D.npy, F.npy

``config`` describes the computation (network, a digest of the inputs and of sigma's values, tol,
efftheory's version) and ``hash`` is its SHA-256.  ``done`` counts the finished layers: a layer's
slices are written and flushed first, then the manifest is replaced atomically (temporary file,
fsync, ``os.replace``), so a run killed at any point leaves every layer below ``done`` whole and
the next run with the same store recomputes from layer ``done`` on.  ``checksums[l]`` is the
SHA-256 of layer l's seven slices; the layer a run resumes from is checked against it, and a
store written for another computation, in another format or with missing or damaged files raises
``ValueError`` naming ``store``.  A directory with no manifest is started afresh only if it holds
nothing but these files (a run killed while creating them); any other content is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

FORMAT = 1
NAMES = ("G1", "V", "H1", "A", "B", "D", "F")  # the order of finite.layer_step's state
_RANK = {"G1": 2, "H1": 2}


def _checksum(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _write_json(path: str, obj) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class LayerStore:
    """The memory-mapped tensors of one finite_width computation in ``path`` (module docstring)."""

    def __init__(self, path: str, config: dict, L: int, N: int):
        self.path = os.fspath(path)
        self.config = dict(config, format=FORMAT, L=L, N=N)
        self.hash = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        self.L, self.N = L, N
        manifest = os.path.join(self.path, "manifest.json")
        if os.path.exists(manifest):
            self._open(manifest)
        else:
            ours = {f"{n}.npy" for n in NAMES}  # a run killed before its first manifest leaves only these
            if os.path.exists(self.path) and (not os.path.isdir(self.path) or any(
                    f not in ours and not f.startswith(".tmp-") for f in os.listdir(self.path))):
                raise ValueError(f"store: {self.path!r} exists and is not an efftheory store (no manifest.json); "
                                 "give a new or empty directory")
            os.makedirs(self.path, exist_ok=True)
            self.maps = {n: np.lib.format.open_memmap(self._file(n), mode="w+", dtype=np.float64,
                                                      shape=self._shape(n)) for n in NAMES}
            self.done, self.checksums = 0, []

    def _file(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.npy")

    def _shape(self, name: str) -> tuple:
        return (self.L,) + (self.N,) * _RANK.get(name, 4)

    def _open(self, manifest: str) -> None:
        try:
            with open(manifest) as f:
                m = json.load(f)
            done, sums, fmt, digest = int(m["done"]), list(m["checksums"]), m["format"], m["hash"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"store: {manifest} cannot be read ({type(e).__name__}: {e}); "
                             "delete the directory to recompute") from None
        if fmt != FORMAT:
            raise ValueError(f"store: {self.path!r} has format {fmt}, this efftheory writes {FORMAT}; "
                             "use another directory")
        if digest != self.hash:
            raise ValueError(f"store: {self.path!r} holds another computation (config hash {str(digest)[:12]}, "
                             f"this call {self.hash[:12]}: network, inputs, sigma, tol or version differ); "
                             "use another directory")
        self.maps = {}
        for n in NAMES:
            try:
                a = np.load(self._file(n), mmap_mode="r+")
            except (OSError, ValueError) as e:
                raise ValueError(f"store: {self._file(n)} cannot be read ({type(e).__name__}: {e}); "
                                 "delete the directory to recompute") from None
            if a.shape != self._shape(n) or a.dtype != np.float64:
                raise ValueError(f"store: {self._file(n)} has shape {a.shape}, expected {self._shape(n)}")
            self.maps[n] = a
        if not 0 <= done <= self.L or len(sums) != done:
            raise ValueError(f"store: {manifest} is inconsistent (done = {done}, {len(sums)} checksums)")
        self.done, self.checksums = done, sums

    def layer(self, l: int) -> tuple:
        """The state (G1, V, H1, A, B, D, F) of finished layer l, in memory, checked against its checksum."""
        state = tuple(np.array(self.maps[n][l]) for n in NAMES)
        if _checksum(state) != self.checksums[l]:
            raise ValueError(f"store: layer {l} in {self.path!r} does not match its checksum (damaged files); "
                             "delete the directory to recompute")
        return state

    def write(self, l: int, state) -> None:
        """Write layer l == done and mark it finished."""
        assert l == self.done
        for n, a in zip(NAMES, state):
            self.maps[n][l] = a
        for n in NAMES:
            self.maps[n].flush()
        self.checksums.append(_checksum(state))
        self.done = l + 1
        _write_json(os.path.join(self.path, "manifest.json"),
                    {"format": FORMAT, "config": self.config, "hash": self.hash, "done": self.done,
                     "checksums": self.checksums})

    def arrays(self) -> dict:
        """Every tensor, read-only memory maps (L, ...): slicing reads only the slice from disk."""
        return {n: np.load(self._file(n), mmap_mode="r") for n in NAMES}
