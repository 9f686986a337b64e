"""Frozen dataclasses registered as JAX pytrees: the shape of every result in efftheory."""

from __future__ import annotations

import dataclasses

import jax


def result(cls=None, *, meta: tuple[str, ...] = ()):
    """Decorate a class as a frozen dataclass whose array fields are pytree leaves.

    Fields named in ``meta`` are static (hashed, not traced): configuration such as an MLP.
    """

    def wrap(c):
        c = dataclasses.dataclass(frozen=True)(c)
        names = [f.name for f in dataclasses.fields(c)]
        data = [n for n in names if n not in meta]
        return jax.tree_util.register_dataclass(c, data_fields=data, meta_fields=list(meta))

    return wrap if cls is None else wrap(cls)
