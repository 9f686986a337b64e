"""One spelling of ``shard_map`` for every supported JAX (used by the finite-width sources and
the empirical ensembles)."""

from __future__ import annotations

import jax


def shard_map(f, *, mesh, in_specs, out_specs, check: bool = True):
    """jax.shard_map (jax >= 0.6) or jax.experimental.shard_map.shard_map (older jax).

    ``check=False`` turns off the replication / varying-axes type check (``check_vma``, formerly
    ``check_rep``): needed when a loop carry starts as a constant and becomes per-device data."""
    if hasattr(jax, "shard_map"):
        extra = {} if check else {"check_vma": False}
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **extra)
    from jax.experimental.shard_map import shard_map as _old

    extra = {} if check else {"check_rep": False}
    return _old(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **extra)
