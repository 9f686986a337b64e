"""Argument checks shared by every public entry point.

Each helper raises ``ValueError`` whose message starts with the argument's name and says what
was expected, so that a user sees at once which argument to fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Return ``value`` as a finite float, optionally requiring > 0 or >= 0."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}: expected a finite real number, got {out}")
    if positive and out <= 0:
        raise ValueError(f"{name}: expected a positive number (> 0), got {out}")
    if nonnegative and out < 0:
        raise ValueError(f"{name}: expected a non-negative number (>= 0), got {out}")
    return out


def per_layer(name: str, value, depth: int, **kw) -> tuple[float, ...]:
    """Broadcast a scalar or a length-``depth`` sequence to a tuple of ``depth`` checked floats."""
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        vals = list(np.asarray(value, dtype=object).reshape(-1))
        if len(vals) != depth:
            raise ValueError(
                f"{name}: expected a scalar or a sequence of {depth} per-layer values, got {len(vals)}"
            )
        return tuple(real(f"{name}[{i}]", v, **kw) for i, v in enumerate(vals))
    return (real(name, value, **kw),) * depth


def inputs(name: str, x, *, ndim: int = 2) -> np.ndarray:
    """Check an input array of shape (N, n_0): rank, non-emptiness and finiteness."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a real array of shape (N, n_0), got {type(x).__name__}") from None
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected an array of rank {ndim} (N inputs, n_0 features), got shape {arr.shape}")
    if arr.size == 0 or arr.shape[0] < 1 or arr.shape[-1] < 1:
        raise ValueError(f"{name}: expected a non-empty array of shape (N, n_0), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite entries")
    return arr


def widths(name: str, value) -> tuple[int, ...]:
    """A width or a non-empty sequence of distinct positive integer widths, as a tuple."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (Sequence, np.ndarray)) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{name}: expected a non-empty sequence of positive integers, got {value!r}")
    ws = tuple(positive_int(f"{name}[{i}]", w) for i, w in enumerate(value))
    if len(set(ws)) != len(ws):
        raise ValueError(f"{name}: expected distinct widths, got {ws}")
    return ws
