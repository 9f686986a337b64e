"""Frozen dataclasses registered as JAX pytrees: the shape of every result in efftheory.

Every result gets the same short ``repr`` (:func:`summary`): the class, the network it describes
(one line), N and the number of layers where the result has a kernel ``K``, the shape and dtype of
each array field (the values of short vectors), and the scalar metadata -- a few hundred characters
however large the tensors, instead of the dataclass default that prints every entry.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

__all__ = ["result", "summary"]

_SHORT = 8  # 1-d arrays up to this length show their values


def result(cls=None, *, meta: tuple[str, ...] = ()):
    """Decorate a class as a frozen dataclass whose array fields are pytree leaves.

    Fields named in ``meta`` are static (hashed, not traced): configuration such as an MLP.
    A class that does not define ``__repr__`` itself gets :func:`summary` as its repr.
    """

    def wrap(c):
        own_repr = "__repr__" in c.__dict__
        c = dataclasses.dataclass(frozen=True, repr=own_repr)(c)
        if not own_repr:
            c.__repr__ = summary
        names = [f.name for f in dataclasses.fields(c)]
        data = [n for n in names if n not in meta]
        return jax.tree_util.register_dataclass(c, data_fields=data, meta_fields=list(meta))

    return wrap if cls is None else wrap(cls)


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not np.isscalar(v)


def _array(v) -> str:
    shape = tuple(int(s) for s in v.shape)
    dtype = str(v.dtype)
    if len(shape) <= 1 and (not shape or shape[0] <= _SHORT) and not isinstance(v, jax.core.Tracer):
        try:
            vals = np.asarray(v)
            fmt = (lambda u: f"{u:.6g}") if vals.dtype.kind in "fc" else str
            if not shape:
                return fmt(vals.item())
            return "[" + ", ".join(fmt(u) for u in vals.tolist()) + f"] {dtype}"
        except Exception:  # noqa: BLE001 - an array that cannot be read on the host shows its shape
            pass
    return f"{shape} {dtype}" if shape else f"() {dtype}"


def _value(v, depth: int = 0) -> str:
    if _is_array(v):
        return _array(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        if type(v).__repr__ is summary:
            return summary(v) if depth == 0 else f"{type(v).__name__}(...)"
        r = repr(v)
        return r if len(r) <= 200 else f"{type(v).__name__}(...)"
    if isinstance(v, float):
        r = repr(v)
        return r if len(r) <= 10 else f"{v:.6g}"
    if isinstance(v, (tuple, list)):
        if len(v) > _SHORT:
            return f"<{type(v).__name__} of {len(v)}>"
        inner = ", ".join(_value(u, depth + 1) for u in v)
        return f"({inner}{',' if len(v) == 1 else ''})" if isinstance(v, tuple) else f"[{inner}]"
    if isinstance(v, dict):
        return f"<dict of {len(v)}>"
    r = repr(v)
    return r if len(r) <= 120 else r[:117] + "..."


def summary(obj) -> str:
    """A short repr of a result: class, network, N and layers, array shapes, scalar metadata."""
    cls = type(obj)
    fields = [f.name for f in dataclasses.fields(obj)]
    parts = []
    net = getattr(obj, "net", None) if "net" in fields else None
    if net is not None:
        parts.append(f"net={net!r}")
    K = getattr(obj, "K", None) if "K" in fields else None
    if net is not None and _is_array(K) and K.ndim >= 2:
        parts.append(f"N={int(K.shape[-1])}")
        if getattr(obj, "layers", None) is None:  # InfiniteWidth.layers: None means all of them
            parts.append(f"layers={int(K.shape[0])}")
    for name in fields:
        if (name == "net" and net is not None) or (name == "layers" and getattr(obj, name) is None):
            continue
        parts.append(f"{name}={_value(getattr(obj, name))}")
    return f"{cls.__name__}({', '.join(parts)})"
