r"""Gaussian integration by parts in whitened coordinates: the derivative expectations of the
finite-width recursions, without differentiating sigma more than once.

For a pair of preactivations (z_1, z_2) ~ N(0, Sigma) write z = L w with Sigma = L L^T and
w = (u, v) standard normal (L from the eigendecomposition, so rank-deficient Sigma is fine).
Derivatives transform as d/dz = L^{+T} d/dw, and for standard normals Stein's lemma is exact:

    <d^m/du^m d^n/dv^n F(w)> = <F(w) He_m(u) He_n(v)>                           (IBP)

with He_m the probabilists' Hermite polynomials.  Hence every derivative expectation the
recursions need,

    <sum_ab M_ab d_a d_b f>  and  <sum_abcd V_abcd d_a d_b d_c d_d f>,   f = g1(z_1) g2(z_2),

is the contraction of the *Hermite moments* H_mn = <g1(z_1) g2(z_2) He_m(u) He_n(v)> with
M or V transformed by L^+ (THEORY.md: "use Gaussian integration by parts on the 2x2 marginal").
When Sigma is singular (identical or collinear inputs, a zero input) the pseudo-inverse drops
the missing direction, along which F does not vary, so the moments there vanish: this is the
integration by parts on the lower-dimensional marginal, with no jitter.

Two rules compute H_mn:

* smooth g: the tensor trapezoid rule of :mod:`efftheory.gaussian` in (u, v);
* positively homogeneous g (g(lam z) = lam^p g(z) for lam > 0: relu and its step derivative,
  leaky_relu, abs, linear): polar coordinates (u, v) = r (cos phi, sin phi).  The radial
  integral is the closed moment  int_0^inf r^q e^{-r^2/2} dr = 2^{(q-1)/2} Gamma((q+1)/2)  and the
  angular integrand is smooth between the (at most four) angles where z_1 or z_2 vanishes, where
  Gauss-Legendre on each arc is exact to rounding.

:func:`product_moments` evaluates <prod_s sigma^(d_s)(z_{a_s})> over up to four inputs (the
sources of V, A, B, D, F): over two distinct inputs with the exact rules above, over three or
four with the tensor trapezoid rule.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .gaussian import derivative, nodes_for, normal_rule, range_factor, rule_size

__all__ = ["whiten2", "hermite_moments2", "product_moments", "HERMITE"]

# Coefficients of He_0..He_4 in powers x^0..x^4.
HERMITE = np.array(
    [
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [-1, 0, 1, 0, 0],
        [0, -3, 0, 1, 0],
        [3, 0, -6, 0, 1],
    ],
    dtype=np.float64,
)
_MAXDEG = 4
_ARC_ORDER = 24
_TAIL_K = 7.5  # 3-d and 4-d rules stop at 7.5 sigma (mass beyond: 6e-14 per direction)  # Gauss-Legendre points per arc: exact for the trigonometric polynomials here


@functools.partial(jax.jit, static_argnames=("rtol",))
def whiten2(k11, k22, k12, *, rtol: float = 1e-12):
    """Factor 2x2 covariances: (L, L_pinv), each (..., 2, 2), with Sigma = L L^T.

    Eigenvalues below ``rtol`` times the largest are treated as exactly zero (rank-deficient
    Sigma); the corresponding column of L and row of L_pinv vanish.
    """
    k11, k22, k12 = jnp.broadcast_arrays(jnp.asarray(k11), jnp.asarray(k22), jnp.asarray(k12))
    S = jnp.stack([jnp.stack([k11, k12], -1), jnp.stack([k12, k22], -1)], -2)
    lam, Q = jnp.linalg.eigh(S)
    top = jnp.max(lam, axis=-1, keepdims=True)
    keep = lam > rtol * jnp.maximum(top, 0.0)
    root = jnp.where(keep, jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, root, 1.0), 0.0)
    L = Q * root[..., None, :]
    L_pinv = inv[..., :, None] * jnp.swapaxes(Q, -1, -2)
    return L, L_pinv


def _hermite_from_monomials(Mono):
    """(..., 5, 5) monomial moments <F u^i v^j> -> Hermite moments <F He_m(u) He_n(v)>."""
    C = jnp.asarray(HERMITE)
    return jnp.einsum("mi,nj,...ij->...mn", C, C, Mono)


@functools.lru_cache(maxsize=None)
def _radial(q: int) -> float:
    return 2.0 ** ((q - 1) / 2) * math.gamma((q + 1) / 2)


def _polar_monomials(g1, g2, L, p: int, maxdeg: int = _MAXDEG):
    """<g1(z1) g2(z2) u^i v^j> for i, j <= maxdeg with g1 g2 homogeneous of total degree p."""
    x, wq = np.polynomial.legendre.leggauss(_ARC_ORDER)
    # break points: angles where a row of L w(phi) vanishes
    br = [jnp.arctan2(-L[..., 0, 0], L[..., 0, 1]), jnp.arctan2(-L[..., 1, 0], L[..., 1, 1])]
    br = br + [b + jnp.pi for b in br]
    br = jnp.mod(jnp.stack(br, -1), 2 * jnp.pi)
    zeros = jnp.zeros(br.shape[:-1] + (1,))
    edges = jnp.sort(jnp.concatenate([zeros, br, zeros + 2 * jnp.pi], -1), axis=-1)  # (..., 6)
    lo, hi = edges[..., :-1], edges[..., 1:]
    half = (hi - lo) / 2
    phi = (lo + hi)[..., None] / 2 + half[..., None] * x  # (..., 5, q)
    wphi = half[..., None] * wq
    c, s = jnp.cos(phi), jnp.sin(phi)
    z1 = L[..., 0, 0, None, None] * c + L[..., 0, 1, None, None] * s
    z2 = L[..., 1, 0, None, None] * c + L[..., 1, 1, None, None] * s
    G = g1(z1) * g2(z2) * wphi
    pw = jnp.arange(maxdeg + 1)
    cpow = c[..., None] ** pw  # (..., 5, q, maxdeg+1)
    spow = s[..., None] ** pw
    ang = jnp.einsum("...aq,...aqi,...aqj->...ij", G, cpow, spow)
    rad = jnp.asarray([[_radial(p + i + j + 1) for j in range(maxdeg + 1)] for i in range(maxdeg + 1)])
    return ang * rad / (2 * jnp.pi)


def _trapezoid_monomials(g1, g2, L, order: int, maxdeg: int = _MAXDEG):
    u, w = normal_rule(order)
    U, V = u[:, None], u[None, :]
    W = jnp.asarray(np.outer(w, w))
    z1 = L[..., 0, 0, None, None] * U + L[..., 0, 1, None, None] * V
    z2 = L[..., 1, 0, None, None] * U + L[..., 1, 1, None, None] * V
    F = g1(z1) * g2(z2) * W
    pw = np.arange(maxdeg + 1)
    up = jnp.asarray(u[:, None] ** pw)  # (n, 5)
    return jnp.einsum("...ab,ai,bj->...ij", F, up, up)


def hermite_moments2(g1, g2, L, *, degree: int | None = None, order: int | None = None):
    """H[..., m, n] = <g1(z1) g2(z2) He_m(u) He_n(v)>, m, n <= 4, for z = L (u, v).

    Args:
      g1, g2: elementwise functions.
      L: (..., 2, 2) factors from :func:`whiten2`.
      degree: total homogeneity degree p of g1 g2 when both are positively homogeneous (exact
        polar rule), or None for the trapezoid rule with ``order`` nodes per direction.
    """
    if degree is not None:
        mono = _polar_monomials(g1, g2, L, degree)
    else:
        if order is None:
            order = nodes_for(float(jnp.max(jnp.sum(L * L, axis=-1))))
        mono = _trapezoid_monomials(g1, g2, L, order)
    return _hermite_from_monomials(mono)


# ---------------------------------------------------------------------------------------------
# products of sigma and sigma' over up to four inputs


def _pattern_entries(N: int, kinds: tuple[int, ...]):
    """Distinct index tuples of an N^4 moment tensor up to the symmetry of equal kinds.

    Returns (reps, groups): reps (E, 4) representative index tuples, and for each the list of
    all index tuples that share its value (filled into the full tensor afterwards).
    """
    import itertools

    seen = {}
    for idx in itertools.product(range(N), repeat=4):
        key = tuple(sorted(zip(kinds, idx)))
        seen.setdefault(key, []).append(idx)
    reps = np.array([v[0] for v in seen.values()], dtype=np.int64)
    return reps, list(seen.values())


def _entry_exponents(reps, kinds):
    """Per entry: distinct inputs (E, 4) padded with -1, and exponents (E, 4, 2) of (sigma, sigma')."""
    E = reps.shape[0]
    inputs = -np.ones((E, 4), dtype=np.int64)
    expo = np.zeros((E, 4, 2), dtype=np.int64)
    ndist = np.zeros(E, dtype=np.int64)
    for e, idx in enumerate(reps):
        uniq = sorted(set(int(i) for i in idx))
        ndist[e] = len(uniq)
        inputs[e, : len(uniq)] = uniq
        for slot, i in enumerate(idx):
            expo[e, uniq.index(int(i)), kinds[slot]] += 1
    return inputs, expo, ndist


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _product_moment2(sig, dsig, degree, order, L, e1, e2):
    """<sigma^e1[0] sigma'^e1[1] (z1) * sigma^e2[0] sigma'^e2[1] (z2)> for a batch: L (P,2,2), e (P,2)."""

    def factor(e):
        def g(z):
            ee = _bcast(e, z)
            return _int_power(sig(z), ee[..., 0]) * _int_power(dsig(z), ee[..., 1])
        return g

    if degree is not None:
        return _polar_monomials(factor(e1), factor(e2), L, degree, maxdeg=0)[..., 0, 0]
    return _trapezoid_monomials(factor(e1), factor(e2), L, order, maxdeg=0)[..., 0, 0]


def product_moments(act, K, kinds: tuple[int, ...]):
    """M[a, b, c, d] = < prod_s sigma^(kinds[s])(z_{idx_s}) >_K  for all index tuples, (N,)*4.

    ``kinds`` holds 0 (sigma) or 1 (sigma') for each of the four slots, e.g. (1, 1, 0, 0) for
    <sigma'_a sigma'_b sigma_c sigma_d>.  Each distinct value is computed once: over one or two
    distinct inputs with the exact 2-d rules of :func:`hermite_moments2`, over three or four with
    a capped tensor trapezoid rule (see :func:`_order_for`; O(h^2) across kinks).
    """
    K = np.asarray(K, dtype=np.float64)
    N = K.shape[0]
    reps, groups = _pattern_entries(N, tuple(kinds))
    inputs, expo, ndist = _entry_exponents(reps, kinds)
    sig, dsig = act.fn, derivative(act.fn)
    vals = np.zeros(len(reps))
    hom = act.homogeneous
    Kmax = float(np.max(np.diag(K)))

    # one or two distinct inputs: exact 2-d rules (homogeneous) or the accurate trapezoid rule
    sel = np.nonzero(ndist <= 2)[0]
    if len(sel):
        i1 = inputs[sel, 0]
        i2 = np.where(inputs[sel, 1] >= 0, inputs[sel, 1], inputs[sel, 0])
        e1 = jnp.asarray(expo[sel, 0])
        e2 = jnp.asarray(np.where((ndist[sel] == 2)[:, None], expo[sel, 1], 0))
        L, _ = whiten2(K[i1, i1], K[i2, i2], K[i1, i2])
        if hom:
            # each sigma factor has degree 1, each sigma' degree 0; one polar call per total degree
            deg = expo[sel, :, 0].sum(axis=1)
            out = np.zeros(len(sel))
            for p in np.unique(deg):
                m = np.nonzero(deg == p)[0]
                out[m] = _bucketed(_product_moment2, (sig, dsig, int(p), None), L[m], e1[m], e2[m])
            vals[sel] = out
        else:
            vals[sel] = _bucketed(_product_moment2, (sig, dsig, None, _order_for(act, Kmax)), L, e1, e2)

    # three or four distinct inputs: tensor trapezoid rule in the range of the covariance
    for k in (3, 4):
        sel = np.nonzero(ndist == k)[0]
        if not len(sel):
            continue
        idx = inputs[sel, :k]
        S = K[idx[:, :, None], idx[:, None, :]]  # (E, k, k)
        Lk = range_factor(S)
        n = _order_for(act, Kmax, k=k)
        vals[sel] = _bucketed(lambda s_, d_, L_, e_: _trapezoid_k(s_, d_, L_, e_, n, k), (sig, dsig), Lk,
                              expo[sel, :k])

    M = np.empty((N,) * 4)
    for v, grp in zip(vals, groups):
        g = np.array(grp)
        M[g[:, 0], g[:, 1], g[:, 2], g[:, 3]] = v
    return M


def _bucketed(fn, static, *arrays):
    """fn(*static, *arrays) with the batch padded to a power of two (zeros), so that the few
    compiled shapes are reused across moment kinds and layers; returns the unpadded numpy result."""
    P = arrays[0].shape[0]
    size = max(8, 1 << (P - 1).bit_length())
    padded = [jnp.asarray(np.concatenate([np.asarray(a), np.zeros((size - P,) + np.shape(a)[1:], np.asarray(a).dtype)]))
              for a in arrays]
    return np.asarray(fn(*static, *padded))[:P]


def _bcast(e, z):
    """Exponents e (P, 2) reshaped to broadcast against values z (P, ...): (P, 1, ..., 1, 2)."""
    return e.reshape(e.shape[:1] + (1,) * (z.ndim - 1) + (2,))


def _order_for(act, Kmax, k=2):
    """Nodes per direction: the accurate 2-d rule, and capped tensor rules in 3 and 4 dimensions
    (96^3 and 32^4 nodes per entry; with the tail cut at 7.5 sigma the 4-d rule keeps ~1e-6
    relative accuracy for tanh up to K ~ 4, the 3-d rule ~1e-9)."""
    if k == 2:
        return rule_size(act, Kmax)
    return 96 if k == 3 else 32


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def _trapezoid_k(sig, dsig, Lk, expo, n, k):
    """Tensor trapezoid rule in k dims for a batch of entries: Lk (E, k, k), expo (E, k, 2) ints.

    The grid is built by broadcasting one axis per direction (never an (n^k, k) constant), and the
    entries run sequentially (lax.map) so memory stays at a few n^k arrays.
    """
    u, w = normal_rule(n, tail=_TAIL_K)
    u, w = jnp.asarray(u), jnp.asarray(w)
    shape = [(1,) * j + (n,) + (1,) * (k - 1 - j) for j in range(k)]
    axes = [u.reshape(sh) for sh in shape]  # direction j varies along array axis j
    Wt = functools.reduce(lambda acc, j: acc * w.reshape(shape[j]), range(1, k), w.reshape(shape[0]))

    def one(args):
        L, e = args
        f = 1.0
        for i in range(k):
            z = functools.reduce(lambda acc, j: acc + L[i, j] * axes[j], range(1, k), L[i, 0] * axes[0])
            f = f * _int_power(sig(z), e[i, 0]) * _int_power(dsig(z), e[i, 1])
        return jnp.sum(f * Wt)

    return jax.lax.map(one, (Lk, expo))


def _int_power(x, e):
    """x**e for a traced integer 0 <= e <= 4 without exp/log (safe for negative x)."""
    x2 = x * x
    return jnp.select([e == 0, e == 1, e == 2, e == 3], [jnp.ones_like(x), x, x2, x2 * x], x2 * x2)
