"""On-disk layers of :func:`efftheory.finite_width`: the N^4 tensors outside memory, and runs that resume.

Layout of a store directory:

    manifest.json            {"format", "config", "hash", "done", "checksums"}
    G1.npy, H1.npy           (L, N, N) float64
    V.npy, A.npy, B.npy,     (L, N, N, N, N) float64, written layer by layer through memory maps
    D.npy, F.npy
    .lock                    held by the one process that writes (filelock)

``config`` describes the computation (network, a digest of the inputs and of sigma's values, tol,
efftheory's version) and ``hash`` is its SHA-256.  ``done`` counts the finished layers: a layer's
slices are written and flushed first, then the manifest is replaced atomically (temporary file,
fsync, ``os.replace``), so a run killed at any point leaves every layer below ``done`` whole and
the next run with the same store recomputes from layer ``done`` on.  ``checksums[l]`` is the
SHA-256 of layer l's seven slices.

What is guaranteed on every open:

* **Every finished layer of every tensor is verified** against its checksum before anything is
  returned or resumed: the whole store is read once (SHA-256 at ~1.5 GB/s on one core: 0.3 s for
  N = 32, depth 10, whose tensors take 420 MB).  A mismatch raises ``ValueError`` naming the layer.
* **Sizes before mapping.** Each ``.npy`` header is parsed and the file's size compared with what
  the header promises before it is memory-mapped, so a truncated file is reported, never
  zero-filled back to size.  A finished store is opened read-only (it may sit on read-only media);
  only a store that still has layers to compute is opened for writing.
* **One writer.** A store being computed is locked (``.lock``); a second process asking for it
  gets ``ValueError`` at once instead of mixing its layers in.
* **Space before writing.** The files are allocated on disk when created (``posix_fallocate``),
  so a full disk raises ``OSError`` naming the file up front instead of killing the process with
  SIGBUS on a write through a memory map; finished layers stay intact.  (On file systems that
  cannot allocate ahead, zeros are written instead; copy-on-write file systems may still run out of
  space later, which then raises from the write.)
* Damaged, truncated or foreign files are reported; the message never advises deleting data.

A store written for another computation, in another format or with missing or damaged files
raises ``ValueError`` naming ``store``.  A directory with no manifest is started afresh only if it
holds nothing but these files (a run killed while creating them); any other content is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import filelock
import numpy as np

from .._io import atomic_write, text_sha256

FORMAT = 1
NAMES = ("G1", "V", "H1", "A", "B", "D", "F")  # the order of finite.layer_step's state
_RANK = {"G1": 2, "H1": 2, "P": 3, "Oa": 3, "Ob": 3}  # P, Oa, Ob: residual MLPs only (finite.residual_step)
_LOCK = ".lock"
_ASIDE = "move the directory aside (or give another store) to recompute"


def _checksum(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _no_space(path: str, e: OSError) -> OSError:
    """``e`` again, its message naming ``path`` (a full disk says which file it could not write)."""
    return OSError(e.errno, f"store: cannot write {path}: {os.strerror(e.errno) if e.errno else e}", path)


def _write_json(path: str, obj) -> None:
    """Replace ``path`` atomically, with the permissions the user's umask gives a new file."""
    try:
        atomic_write(path, json.dumps(obj, sort_keys=True), suffix=".json")
    except OSError as e:
        raise _no_space(path, e) from None


def _allocate(path: str, nbytes: int) -> None:
    """Give ``path`` its ``nbytes`` of disk now, so that writes through a memory map cannot hit a full
    disk (SIGBUS) later; raises OSError naming the file when the space is not there."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise _no_space(path, e) from None
        block = b"\0" * (1 << 20)  # a file system that cannot allocate ahead: write the zeros
        try:
            for start in range(0, nbytes, len(block)):
                os.pwrite(fd, block[: min(len(block), nbytes - start)], start)
            os.fsync(fd)
        except OSError as e:
            raise _no_space(path, e) from None
    finally:
        os.close(fd)


def _header(path: str):
    """(shape, dtype, data offset) of a .npy file, checked against the file's size."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
    if fortran:
        raise ValueError("stored in Fortran order")
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != want:
        raise ValueError(f"{size} bytes on disk, its header promises {want} (truncated or extended)")
    return shape, dtype, offset


class LayerStore:
    """The memory-mapped tensors of one finite_width computation in ``path`` (module docstring)."""

    def __init__(self, path: str, config: dict, L: int, N: int, names: tuple[str, ...] = NAMES):
        self.names = tuple(names)  # NAMES, and P for residual MLPs
        self.path = os.fspath(path)
        self.config = dict(config, format=FORMAT, L=L, N=N)
        self.hash = text_sha256(json.dumps(self.config, sort_keys=True))
        self.L, self.N = L, N
        self.lock = None
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"store: {self.path!r} exists and is not a directory; give a new or empty directory")
        manifest = os.path.join(self.path, "manifest.json")
        if os.path.exists(manifest) and self._read(manifest)["done"] == L:
            self._open(manifest, writable=False)  # finished: read-only, no lock needed
            return
        if not os.path.exists(manifest) and os.path.isdir(self.path):
            self._check_foreign()  # before the lock file is made in someone else's directory
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock = filelock.FileLock(os.path.join(self.path, _LOCK))
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            raise ValueError(f"store: {self.path!r} is being computed by another process (it holds "
                             f"{os.path.join(self.path, _LOCK)}); wait for it, or give another store") from None
        except OSError as e:
            raise ValueError(f"store: {self.path!r} cannot be written ({e.strerror or e}), and its layers are not "
                             "all computed yet; give a writable directory") from None
        try:
            if os.path.exists(manifest):  # read again under the lock: another process may have moved on
                self._open(manifest, writable=self._read(manifest)["done"] < L)
            else:
                self._create()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the write lock (the memory maps stay valid)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _file(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.npy")

    def _shape(self, name: str) -> tuple:
        return (self.L,) + (self.N,) * _RANK.get(name, 4)

    def _check_foreign(self) -> None:
        ours = {f"{n}.npy" for n in self.names} | {_LOCK}  # a run killed before its first manifest leaves only these
        if any(f not in ours and not f.startswith(".tmp-") for f in os.listdir(self.path)):
            raise ValueError(f"store: {self.path!r} exists and is not an efftheory store (no manifest.json); "
                             "give a new or empty directory")

    def _create(self) -> None:
        self._check_foreign()
        self.maps = {}
        for n in self.names:
            try:
                self.maps[n] = np.lib.format.open_memmap(self._file(n), mode="w+", dtype=np.float64,
                                                         shape=self._shape(n))
            except OSError as e:
                raise _no_space(self._file(n), e) from None
            _allocate(self._file(n), self.maps[n].offset + self.maps[n].nbytes)
        self.done, self.checksums = 0, []

    def _read(self, manifest: str) -> dict:
        try:
            with open(manifest) as f:
                m = json.load(f)
            out = {"done": int(m["done"]), "checksums": list(m["checksums"]), "format": m["format"],
                   "hash": m["hash"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"store: {manifest} cannot be read ({type(e).__name__}: {e}), so the layers beside it "
                             f"cannot be verified; {_ASIDE}") from None
        if out["format"] != FORMAT:
            raise ValueError(f"store: {self.path!r} has format {out['format']}, this efftheory writes {FORMAT}; "
                             "use another directory")
        if out["hash"] != self.hash:
            raise ValueError(f"store: {self.path!r} holds another computation (config hash {str(out['hash'])[:12]}, "
                             f"this call {self.hash[:12]}: network, inputs, sigma, tol or version differ); "
                             "use another directory")
        if not 0 <= out["done"] <= self.L or len(out["checksums"]) != out["done"]:
            raise ValueError(f"store: {manifest} is inconsistent (done = {out['done']}, "
                             f"{len(out['checksums'])} checksums); {_ASIDE}")
        return out

    def _open(self, manifest: str, writable: bool) -> None:
        m = self._read(manifest)
        self.maps = {}
        for n in self.names:
            path = self._file(n)
            try:
                shape, dtype, offset = _header(path)
            except (OSError, ValueError) as e:
                raise ValueError(f"store: {path} cannot be used ({e}); {_ASIDE}") from None
            if dtype != np.float64:
                raise ValueError(f"store: {path} has dtype {dtype}, expected float64; {_ASIDE}")
            if shape != self._shape(n):
                raise ValueError(f"store: {path} has shape {shape}, expected {self._shape(n)}; {_ASIDE}")
            if writable:
                _allocate(path, offset + int(np.prod(shape)) * 8)
            self.maps[n] = np.memmap(path, dtype=np.float64, mode="r+" if writable else "r", offset=offset,
                                     shape=shape)
        self.done, self.checksums = m["done"], m["checksums"]
        for l in range(self.done):  # every finished layer of every tensor, on every open
            self.layer(l)

    def layer(self, l: int) -> tuple:
        """The state (G1, V, H1, A, B, D, F) of finished layer l, in memory, checked against its checksum."""
        state = tuple(np.array(self.maps[n][l]) for n in self.names)
        if _checksum(state) != self.checksums[l]:
            raise ValueError(f"store: layer {l} in {self.path!r} does not match its checksum (damaged files); "
                             f"{_ASIDE}")
        return state

    def write(self, l: int, state) -> None:
        """Write layer l == done and mark it finished."""
        assert l == self.done and self.lock is not None
        for n, a in zip(self.names, state):
            self.maps[n][l] = a
        for n in self.names:
            self.maps[n].flush()
        self.checksums.append(_checksum(state))
        self.done = l + 1
        _write_json(os.path.join(self.path, "manifest.json"),
                    {"format": FORMAT, "config": self.config, "hash": self.hash, "done": self.done,
                     "checksums": self.checksums})

    def arrays(self) -> dict:
        """Every tensor, read-only memory maps (L, ...): slicing reads only the slice from disk."""
        out = {}
        for n in self.names:
            m = self.maps[n]
            out[n] = m if m.mode == "r" else np.memmap(self._file(n), dtype=np.float64, mode="r",
                                                       offset=m.offset, shape=m.shape)
        return out
