"""The one table formatter and JSON helpers of the reports (:mod:`.compare`, :mod:`.compare_train`).

Numbers as text: ``pm`` (a measurement with its standard error, to the error's digits), ``num`` (a
prediction printed to the digits of the error it is compared with), ``g`` (a hyperparameter);
``render``: a plain-text table of left/right-aligned columns, ``None`` rows as blank separators.
JSON: ``clean`` (arrays to nested lists, NaN and inf to null), ``finite_or_none``; ``net_config``:
an MLP as its :meth:`~efftheory.MLP.to_dict` less the width (a report sweeps widths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..network import MLP

DASH = "—"  # a value that is not a finite number


def _unsigned_zero(text: str) -> str:
    """A rounded -1e-13 prints as 0, not -0."""
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def pm(v: float, e: float) -> str:
    """``v ± e`` with e to two significant digits and v to the same decimals."""
    v, e = float(v), float(e)
    if not math.isfinite(v):
        return DASH
    if not math.isfinite(e) or e <= 0:
        return f"{v:.5g}"
    digits = max(0, 1 - int(math.floor(math.log10(e))))
    if abs(v) >= 1e6 or digits > 8:
        return f"{v:.3e} ± {e:.1e}"
    return f"{_unsigned_zero(f'{v:.{digits}f}')} ± {e:.{digits}f}"


def num(v: float | None, ref_err: float | None = None) -> str:
    """``v`` to the decimals of ``ref_err`` (the error it is compared with), else 5 significant digits."""
    if v is None:
        return DASH
    v = float(v)
    if not math.isfinite(v):
        return DASH
    out = f"{v:.5g}"
    if ref_err is not None and math.isfinite(ref_err) and ref_err > 0:
        digits = max(0, 1 - int(math.floor(math.log10(ref_err))))
        if abs(v) < 1e6 and digits <= 8:
            out = f"{v:.{digits}f}"
    return _unsigned_zero(out)


def g(v) -> str:
    """A hyperparameter (or a list of per-layer values) to 6 significant digits."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(g(u) for u in v) + "]"
    return f"{float(v):.6g}"


def render(head: Sequence[str], body: Sequence[Sequence[str] | None], right: Sequence[int] = ()) -> str:
    """A plain-text table: the header, a rule, the rows (``None``: a blank line); columns in ``right``
    are right-aligned, the others left-aligned."""
    right = set(right)
    wid = [len(h) for h in head]
    for r in body:
        if r is not None:
            wid = [max(w, len(c)) for w, c in zip(wid, r)]

    def line(cells) -> str:
        return "  ".join(c.rjust(wid[i]) if i in right else c.ljust(wid[i]) for i, c in enumerate(cells)).rstrip()

    lines = [line(head), "  ".join("-" * w for w in wid)]
    lines += ["" if r is None else line(r) for r in body]
    return "\n".join(lines)


def clean(a):
    """numpy -> nested lists with NaN/inf -> None (strict JSON)."""
    arr = np.asarray(a)
    if arr.ndim == 0:
        v = arr.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    return [clean(u) for u in arr]


def finite_or_none(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def net_config(net: MLP) -> dict:
    """The network of a report: :meth:`MLP.to_dict` without the width (the report's widths are its own)."""
    d = net.to_dict(named_only=False)
    d.pop("width")
    return d
