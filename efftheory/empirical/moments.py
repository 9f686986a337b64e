r"""Per-network sufficient statistics: averages over the neurons of ONE network (docs/theory.md, first order).

Distinct neurons of one network are correlated at O(1/n), so every statistic is first averaged over
neurons inside a network, giving one array per network; :mod:`.statistics` then averages over
networks and takes standard errors across them.  Everything here is linear in products of the
network's own preactivations, so chunks of networks can be stored and concatenated freely.

Layer moments (index 0 = layer 1; z^(l) has shape (N, n_l), neuron index i):

    zz[l]_{a b}              = (1/n_l) sum_i z_{i;a} z_{i;b}                                  (L, N, N)
    zzzz[l]_{a1 a2 a3 a4}    = (1/n_l) sum_i z_{i;a1} z_{i;a2} z_{i;a3} z_{i;a4}              (L, N, N, N, N)
    zz_zz[l]_{a1 a2 a3 a4}   = 1/(n_l(n_l-1)) sum_{i != j} z_{i;a1} z_{i;a2} z_{j;a3} z_{j;a4}  (L, N, N, N, N)
                             = (n_l zz (x) zz - zzzz) / (n_l - 1)      (NaN when n_l = 1)

Output-layer NTK moments (H_{ij;a1a2} = H^(L), k = n_L output neurons, z = z^(L)):

    H        = (1/k) sum_i H_{ii}                                     (N, N)
    HH       = (1/k) sum_i H_{ii} (x) H_{ii}                          (N, N, N, N)
    H_H      = 1/(k(k-1)) sum_{i != j} H_{ii;a1a2} H_{jj;a3a4}
    HoffHoff = 1/(k(k-1)) sum_{i != j} H_{ij;a1a2} H_{ij;a3a4}
    Hzz      = (1/k) sum_i H_{ii;a1a2} z_{i;a3} z_{i;a4}
    H_zz     = 1/(k(k-1)) sum_{i != j} H_{ii;a1a2} z_{j;a3} z_{j;a4}
    Hoff_zz  = 1/(k(k-1)) sum_{i != j} H_{ij;a1a2} z_{i;a3} z_{j;a4}

(the cross-neuron ones are NaN when k = 1).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence

import jax
import jax.numpy as jnp

__all__ = ["STATISTICS", "FORWARD_ONLY", "resolve", "layer_moments", "ntk_moments", "arrays_for"]

#: Statistic groups that :func:`efftheory.empirical.sample` can collect.
STATISTICS = ("metric", "four_point", "ntk", "ntk_variance", "ntk_preactivation")
#: Groups that need only the forward pass (they allow ``method="conditional"``).
FORWARD_ONLY = frozenset({"metric", "four_point"})

_REQUIRES = {"four_point": ("metric",), "ntk_variance": ("ntk",), "ntk_preactivation": ("ntk", "metric")}
_ARRAYS = {
    "metric": ("zz",),
    "four_point": ("zzzz", "zz_zz"),
    "ntk": ("H",),
    "ntk_variance": ("HH", "H_H", "HoffHoff"),
    "ntk_preactivation": ("Hzz", "H_zz", "Hoff_zz"),
}


def resolve(statistics: str | Iterable[str], name: str = "statistics") -> tuple[str, ...]:
    """Canonical, dependency-closed tuple of statistic groups (in the order of :data:`STATISTICS`)."""
    if isinstance(statistics, str):
        statistics = (statistics,)
    try:
        req = set(statistics)
    except TypeError:
        raise ValueError(f"{name}: expected a sequence of names from {STATISTICS}, got {statistics!r}") from None
    bad = [s for s in req if s not in STATISTICS]
    if bad or not req:
        raise ValueError(f"{name}: expected a non-empty sequence of names from {STATISTICS}, got {statistics!r}")
    for s in list(req):
        req.update(_REQUIRES.get(s, ()))
    return tuple(s for s in STATISTICS if s in req)


def arrays_for(statistics: tuple[str, ...]) -> tuple[str, ...]:
    """Names of the per-network arrays that the statistic groups produce."""
    return tuple(a for s in statistics for a in _ARRAYS[s])


def _cross(n, prod_of_means, same):
    """1/(n(n-1)) sum_{i != j} from the full double sum's mean-product and the i = j mean."""
    if n < 2:
        return jnp.full_like(same, jnp.nan)
    return (n * prod_of_means - same) / (n - 1)


def layer_moments(zs: Sequence[jax.Array], statistics: Container[str]) -> dict[str, jax.Array]:
    """Layer moments (module docstring) of one network from its preactivations z^(l) (N, n_l)."""
    out = {}
    zz = [jnp.einsum("ai,bi->ab", z, z) / z.shape[1] for z in zs]
    if "metric" in statistics:
        out["zz"] = jnp.stack(zz)
    if "four_point" in statistics:
        q = [jnp.einsum("ai,bi,ci,di->abcd", z, z, z, z) / z.shape[1] for z in zs]
        out["zzzz"] = jnp.stack(q)
        out["zz_zz"] = jnp.stack([_cross(z.shape[1], jnp.einsum("ab,cd->abcd", m, m), qq)
                                  for z, m, qq in zip(zs, zz, q)])
    return out


def ntk_moments(H: jax.Array, z: jax.Array, statistics: Container[str]) -> dict[str, jax.Array]:
    """Output-layer NTK moments (module docstring) from H (k, k, N, N) and z^(L) (N, k)."""
    k = H.shape[0]
    Hd = jnp.einsum("iiab->iab", H)
    Hm = Hd.mean(0)
    out = {"H": Hm}
    if "ntk_variance" in statistics:
        HH = jnp.einsum("iab,icd->abcd", Hd, Hd) / k
        out["HH"] = HH
        out["H_H"] = _cross(k, jnp.einsum("ab,cd->abcd", Hm, Hm), HH)
        all_pairs = jnp.einsum("ijab,ijcd->abcd", H, H) / k
        out["HoffHoff"] = jnp.full_like(HH, jnp.nan) if k < 2 else (all_pairs - HH) / (k - 1)
    if "ntk_preactivation" in statistics:
        Hzz = jnp.einsum("iab,ci,di->abcd", Hd, z, z) / k
        zzL = jnp.einsum("ci,di->cd", z, z) / k
        out["Hzz"] = Hzz
        out["H_zz"] = _cross(k, jnp.einsum("ab,cd->abcd", Hm, zzL), Hzz)
        all_pairs = jnp.einsum("ijab,ci,dj->abcd", H, z, z) / k
        out["Hoff_zz"] = jnp.full_like(Hzz, jnp.nan) if k < 2 else (all_pairs - Hzz) / (k - 1)
    return out
