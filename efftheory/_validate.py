"""Argument checks shared by every public entry point.

Each helper raises ``ValueError`` whose message starts with the argument's name and says what
was expected, so that a user sees at once which argument to fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

#: Largest depth an MLP may have (a per-layer tuple of this length is still cheap).
MAX_DEPTH = 100_000
#: Largest width of one layer or input dimension (beyond int32 no array axis of a sampled network fits).
MAX_WIDTH = 2**31 - 1
#: Networks of one run are indexed by uint32 (``fold_in(key, m)``).
MAX_NETWORKS = 2**32


def positive_int(name: str, value, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise if it is not an integer in [``minimum``, ``maximum``]."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value.item()
    want = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected {want}, got {short_repr(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: expected {want}, got {value}")
    return int(value)


def _tracer(value) -> bool:
    """True for a JAX tracer (a value inside jax.jit/vmap/grad): only its shape can be checked."""
    jax = __import__("sys").modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def _concrete_jax(value):
    """A concrete (non-traced) jax.Array as a numpy array, anything else unchanged."""
    jax = __import__("sys").modules.get("jax")
    if jax is not None and isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        return np.asarray(value)
    return value


def real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Return ``value`` as a finite float, optionally requiring > 0 or >= 0.

    A JAX tracer (under jax.jit, vmap or grad) is returned as it is after a shape check (a scalar):
    its value is not known while tracing, so the value checks apply to concrete inputs only.
    """
    if _tracer(value):
        if getattr(value, "ndim", None) != 0:
            raise ValueError(f"{name}: expected a real scalar, got a traced array of shape {value.shape}")
        if not np.issubdtype(value.dtype, np.floating) and not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{name}: expected a real scalar, got a traced value of dtype {value.dtype}")
        return value
    value = _concrete_jax(value)
    if isinstance(value, (bool, str, bytes, complex)) or (isinstance(value, np.ndarray) and value.ndim != 0):
        raise ValueError(f"{name}: expected a finite real number, got {short_repr(value)}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected a finite real number, got {short_repr(value)}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}: expected a finite real number, got {out}")
    if positive and out <= 0:
        raise ValueError(f"{name}: expected a positive number (> 0), got {out}")
    if nonnegative and out < 0:
        raise ValueError(f"{name}: expected a non-negative number (>= 0), got {out}")
    return out


def per_layer(name: str, value, depth: int, **kw) -> tuple[float, ...]:
    """Broadcast a scalar or a length-``depth`` sequence to a tuple of ``depth`` checked floats.

    Traced values (jax.jit/vmap/grad) are kept as they are: a traced scalar, or a traced array of
    shape (depth,) split into its entries (shape checks only)."""
    if _tracer(value) and getattr(value, "ndim", 0) == 1:
        if value.shape[0] != depth:
            raise ValueError(f"{name}: expected a scalar or a sequence of {depth} per-layer values, "
                             f"got a traced array of shape {value.shape}")
        return tuple(real(f"{name}[{i}]", value[i], **kw) for i in range(depth))
    value = _concrete_jax(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        try:
            if isinstance(value, (list, tuple)) and any(_tracer(v) for v in value):
                vals = list(value)  # per-layer values some of which are traced (checked one by one below)
            else:
                vals = list(np.asarray(value, dtype=object).reshape(-1))
        except ValueError:
            raise ValueError(f"{name}: expected a scalar or a sequence of {depth} per-layer values, "
                             f"got {short_repr(value)}") from None
        if len(vals) != depth:
            raise ValueError(
                f"{name}: expected a scalar or a sequence of {depth} per-layer values, got {len(vals)}"
            )
        return tuple(real(f"{name}[{i}]", v, **kw) for i, v in enumerate(vals))
    return (real(name, value, **kw),) * depth


def real_array(name: str, value, *, what: str = "a real array", finite: bool = True) -> np.ndarray:
    """``value`` as a float64 array: real numbers only (no strings, complex, ragged lists), finite."""
    if isinstance(value, (str, bytes)) or value is None:
        raise ValueError(f"{name}: expected {what}, got {short_repr(value)}")
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {what}, got {short_repr(value)}") from None
    if raw.dtype.kind not in "biufO":
        raise ValueError(f"{name}: expected {what} of real numbers, got dtype {raw.dtype}")
    try:
        arr = raw.astype(np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected {what} of real numbers, got {short_repr(value)}") from None
    if raw.dtype.kind == "O" and any(isinstance(v, (str, bytes, complex, bool)) for v in raw.reshape(-1)):
        raise ValueError(f"{name}: expected {what} of real numbers, got {short_repr(value)}")
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite entries")
    return arr


def inputs(name: str, x, *, ndim: int = 2) -> np.ndarray:
    """Check an input array of shape (N, n_0): real, rank, non-emptiness and finiteness."""
    arr = real_array(name, x, what="a real array of shape (N, n_0)", finite=False)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected an array of rank {ndim} (N inputs, n_0 features), got shape {arr.shape}")
    if arr.size == 0 or arr.shape[0] < 1 or arr.shape[-1] < 1:
        raise ValueError(f"{name}: expected a non-empty array of shape (N, n_0), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite entries")
    return arr


def widths(name: str, value, *, maximum: int = MAX_WIDTH) -> tuple[int, ...]:
    """A width or a non-empty sequence of distinct positive integer widths, as a tuple."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (Sequence, np.ndarray)) or isinstance(value, (str, bytes)) or len(value) == 0:
        raise ValueError(f"{name}: expected a non-empty sequence of positive integers, got {short_repr(value)}")
    ws = tuple(positive_int(f"{name}[{i}]", w, maximum=maximum) for i, w in enumerate(value))
    if len(set(ws)) != len(ws):
        raise ValueError(f"{name}: expected distinct widths, got {ws}")
    return ws


def flag(name: str, value) -> bool:
    """A boolean switch: True/False (numpy booleans and the integers 0/1 too)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}: expected True or False, got {short_repr(value)}")


def choice(name: str, value, options: Sequence[str]) -> str:
    """One of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {short_repr(value)}")
    return value


def optional_path(name: str, value) -> str | None:
    """None or a file-system path (str or os.PathLike), returned as a str."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name}: expected a path or None, got {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise ValueError(f"{name}: expected a non-empty path, got {short_repr(value)}")
    return path


def optional_callable(name: str, value):
    """None or a callable."""
    if value is not None and not callable(value):
        raise ValueError(f"{name}: expected a callable or None, got {type(value).__name__}")
    return value


def seed(name: str, value) -> int:
    """A non-negative integer seed below 2**63."""
    return positive_int(name, value, minimum=0, maximum=2**63 - 1)


def memory(name: str, nbytes: float, what: str) -> None:
    """Refuse a request whose arrays alone (``nbytes``) exceed this machine's physical memory."""
    total = _physical_memory()
    if total is not None and nbytes > total:
        raise ValueError(f"{name}: {what} needs at least {format_bytes(nbytes)}, more than this machine's "
                         f"{format_bytes(total)} of memory")


def available_memory() -> int | None:
    """Bytes of memory the machine can give now without swapping (Linux: MemAvailable), else its
    physical memory; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _physical_memory()


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} EiB"  # pragma: no cover


def short_repr(value, limit: int = 60) -> str:
    """A repr of ``value`` cut to ``limit`` characters (arrays: their shape and dtype)."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    try:
        r = repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the real error
        r = f"<{type(value).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."
