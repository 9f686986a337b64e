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
M or V transformed by L^+ (docs/theory.md, "Gaussian integration by parts").
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

The products of sigma and sigma' over three or four inputs (the sources of V, A, B, D, F) are
in :mod:`efftheory.gaussian._sources`, which uses the two-input rules here for its one- and two-input
entries.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._rules import nodes_for, normal_rule

__all__ = ["whiten2", "hermite_moments2", "HERMITE"]

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
ARC_ORDER = 24  # Gauss-Legendre points per arc: exact for the trigonometric polynomials here


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
def radial(q: int) -> float:
    return 2.0 ** ((q - 1) / 2) * math.gamma((q + 1) / 2)


def polar_monomials_jnp(g1, g2, L, p: int, maxdeg: int = _MAXDEG):
    """<g1(z1) g2(z2) u^i v^j> for i, j <= maxdeg with g1 g2 homogeneous of total degree p."""
    x, wq = np.polynomial.legendre.leggauss(ARC_ORDER)
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
    rad = jnp.asarray([[radial(p + i + j + 1) for j in range(maxdeg + 1)] for i in range(maxdeg + 1)])
    return ang * rad / (2 * jnp.pi)


def trapezoid_monomials_jnp(g1, g2, L, order: int, maxdeg: int = _MAXDEG):
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
        mono = polar_monomials_jnp(g1, g2, L, degree)
    else:
        if order is None:
            order = nodes_for(float(jnp.max(jnp.sum(L * L, axis=-1))))
        mono = trapezoid_monomials_jnp(g1, g2, L, order)
    return _hermite_from_monomials(mono)


# ---------------------------------------------------------------------------------------------
# numpy twins for small work (no compiled program per shape; sigma is evaluated by the caller)


def whiten2_np(k11, k22, k12, rtol: float = 1e-12):
    """:func:`whiten2` in numpy."""
    k11, k22, k12 = np.broadcast_arrays(np.asarray(k11, np.float64), np.asarray(k22, np.float64),
                                        np.asarray(k12, np.float64))
    S = np.stack([np.stack([k11, k12], -1), np.stack([k12, k22], -1)], -2)
    lam, Q = np.linalg.eigh(S)
    top = np.max(lam, axis=-1, keepdims=True)
    keep = lam > rtol * np.maximum(top, 0.0)
    root = np.where(keep, np.sqrt(np.where(keep, lam, 1.0)), 0.0)
    inv = np.where(keep, 1.0 / np.where(keep, root, 1.0), 0.0)
    return Q * root[..., None, :], inv[..., :, None] * np.swapaxes(Q, -1, -2)


def polar_monomials_np(f, L, p: int, maxdeg: int = _MAXDEG):
    """:func:`polar_monomials_jnp` in numpy, f(z1, z2) = g1(z1) g2(z2) evaluated on whole arrays."""
    x, wq = np.polynomial.legendre.leggauss(ARC_ORDER)
    br = [np.arctan2(-L[..., 0, 0], L[..., 0, 1]), np.arctan2(-L[..., 1, 0], L[..., 1, 1])]
    br = br + [b + np.pi for b in br]
    br = np.mod(np.stack(br, -1), 2 * np.pi)
    zeros = np.zeros(br.shape[:-1] + (1,))
    edges = np.sort(np.concatenate([zeros, br, zeros + 2 * np.pi], -1), axis=-1)
    lo, hi = edges[..., :-1], edges[..., 1:]
    half = (hi - lo) / 2
    phi = (lo + hi)[..., None] / 2 + half[..., None] * x
    wphi = half[..., None] * wq
    c, s = np.cos(phi), np.sin(phi)
    z1 = L[..., 0, 0, None, None] * c + L[..., 0, 1, None, None] * s
    z2 = L[..., 1, 0, None, None] * c + L[..., 1, 1, None, None] * s
    G = f(z1, z2) * wphi
    pw = np.arange(maxdeg + 1)
    ang = np.einsum("...aq,...aqi,...aqj->...ij", G, c[..., None] ** pw, s[..., None] ** pw)
    rad = np.asarray([[radial(p + i + j + 1) for j in range(maxdeg + 1)] for i in range(maxdeg + 1)])
    return ang * rad / (2 * np.pi)


def trapezoid_monomials_np(f, L, order: int, maxdeg: int = _MAXDEG):
    """:func:`trapezoid_monomials_jnp` in numpy."""
    u, w = normal_rule(order)
    U, V = u[:, None], u[None, :]
    z1 = L[..., 0, 0, None, None] * U + L[..., 0, 1, None, None] * V
    z2 = L[..., 1, 0, None, None] * U + L[..., 1, 1, None, None] * V
    F = f(z1, z2) * np.outer(w, w)
    up = u[:, None] ** np.arange(maxdeg + 1)
    return np.einsum("...ab,ai,bj->...ij", F, up, up)


def hermite_from_monomials_np(Mono):
    return np.einsum("mi,nj,...ij->...mn", HERMITE, HERMITE, Mono)
