r"""Exact Gaussian moments of kinked, positively homogeneous activations over three and four inputs.

A degree-1 positively homogeneous sigma is sigma(z) = c+ z (z > 0), c- z (z < 0), with
c+ = sigma(1), c- = -sigma(-1) (relu: 1, 0; leaky_relu(a): 1, a; abs: 1, -1), and sigma' is the
step c+ / c-.  On the sign orthant {s_i z_i > 0} every product of sigma and sigma' is therefore a
monomial, and each source pattern is a finite sum of *orthant moments*

    M(Sigma, m) = E[ y^m 1{y > 0} ],   y ~ N(0, Sigma),   y = s * z,  Sigma = D_s K D_s,

of total degree |m| <= 4 over k <= 4 variables.  They are reduced exactly by Gaussian integration by
parts (Stein's lemma, with the distributional derivative of the indicator):

    E[y_i g 1{y > 0}] = sum_j Sigma_ij ( E[d_j g 1{y > 0}]
                                         + [g free of y_j] phi_j(0) E[g 1{y_-j > 0} | y_j = 0] ),

phi_j(0) = (2 pi Sigma_jj)^(-1/2), the conditional law N(0, Schur complement) again centred, down to
orthant probabilities (Sheppard, Plackett):

    P1 = 1/2,   P2 = 1/4 + asin(rho)/(2 pi),   P3 = 1/8 + (asin r12 + asin r13 + asin r23)/(4 pi),
    P4 = 1/16 + sum_{i<j} asin(r_ij)/(8 pi) + (1/(4 pi^2)) sum_{i<j} I_ij,
    I_ij = int_0^{asin r_ij} asin( r_{kl.ij}(sin(theta)/r_ij) ) d theta,

the last from Plackett's identity dP4/dr_ij = phi2(0, 0; r_ij) P2(r_{kl.ij}) integrated along the
straight path R(t) = I + t (R - I): r_{kl.ij}(t) is the partial correlation of the complementary pair
given (i, j) at R(t), and the substitution t = sin(theta)/r_ij absorbs the 1/sqrt(1 - t^2 r_ij^2) of
phi2.  I_ij is the only quadrature: adaptive Gauss-Legendre (10- and 20-point rules on each panel, the
panel accepted when they agree to its share of P4_TARGET, or to the rounding noise of the integrand,
estimated node by node; theta = theta_max (1 - (1 - u)^2) removes the square-root end point of a
(nearly) singular R), with the 20-point value kept and |Q20 - Q10| plus that noise summed as its
error estimate.  Errors propagate through the (linear) reduction with the absolute
values of its coefficients; rounding is estimated as 32 eps times the sum of the absolute terms.

Degenerate conditional laws (a member whose conditional variance vanishes: possible for a rank-3
set of four inputs after conditioning on three of them) are taken in their limit: the centred
indicator 1{y_j > 0} of a vanishing y_j counts 1/2 and y_j^m (m > 0) zero.  Exactly collinear members
and members of zero variance never reach this module (:func:`efftheory.gaussian._sources` merges them first).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["orthant_probability", "truncated_moments", "P4_TARGET"]

P4_TARGET = 1e-15        # absolute target of each Plackett integral I_ij
_DEGENERATE = 1e-12      # conditional variance below this fraction of the variance: a vanishing member
_P4_ROWS = 4096          # correlation matrices integrated at once (memory: ~30 arrays of 40 x this)
_MAX_LEVELS = 30         # panel bisections of the adaptive rule
_ROUND = 32 * np.finfo(np.float64).eps
_PAIRS4 = ((0, 1, 2, 3), (0, 2, 1, 3), (0, 3, 1, 2), (1, 2, 0, 3), (1, 3, 0, 2), (2, 3, 0, 1))


@functools.lru_cache(maxsize=None)
def _gl(n: int):
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2  # on [0, 1]


def _asin(r):
    return np.arcsin(np.clip(r, -1.0, 1.0))


def _plackett_integrand(R, pair, u):
    """asin(r_{kl.ij}(t)) dtheta/du at u (items, q) for correlations R (items, 4, 4), and a bound on
    its rounding error.

    With a = t r_ij = sin(theta), p, q = A_xi, A_xj and u, v = A_yi, A_yj, the Schur complement of the
    (i, j) block times 1 - a^2 is N_xy = (1 - a^2) A_xy - (p u + q v) + a (p v + q u)
    = (1 - a) [(1 + a) A_xy - (p v + q u)] - (p - q)(u - v)   (r_ij >= 0)
    = (1 + a) [(1 - a) A_xy + (p v + q u)] - (p + q)(u + v)   (r_ij < 0),
    the form free of cancellation when i and j are nearly (anti-)collinear; 1 -+ a = 2 sin^2(pi/4 -+ theta/2)."""
    i, j, k, l = pair
    rho = R[:, i, j][:, None]
    tmax = _asin(rho)
    theta = tmax * (1.0 - (1.0 - u) ** 2)
    jac = 2.0 * tmax * (1.0 - u)
    safe = np.where(rho == 0.0, 1.0, rho)
    t = np.where(rho == 0.0, 0.0, np.sin(theta) / safe)
    sg = np.where(rho >= 0.0, 1.0, -1.0)  # the near factor is 1 - sg a
    near = 2.0 * np.sin(np.pi / 4 - sg * theta / 2) ** 2
    far = 2.0 - near
    A = {(x, y): t * (sg if y == j else 1.0) * R[:, x, y][:, None] for x in (k, l) for y in (i, j)}
    Akl = t * R[:, k, l][:, None]

    def n(x, y, Axy):
        p, q, uu, v = A[x, i], A[x, j], A[y, i], A[y, j]
        cross = p * v + q * uu
        val = near * (far * Axy - cross) - (p - q) * (uu - v)
        mag = near * (np.abs(far * Axy) + np.abs(p * v) + np.abs(q * uu)) + np.abs(p - q) * np.abs(uu - v)
        return val, mag

    Nkk, mk = n(k, k, 1.0)
    Nll, ml = n(l, l, 1.0)
    Nkl, terms = n(k, l, Akl)
    den = np.sqrt(np.maximum(Nkk, 0.0) * np.maximum(Nll, 0.0))
    pos = den > 0.0
    r = np.where(pos, Nkl / np.where(pos, den, 1.0), 0.0)
    # rounding of r: the terms of N_kl (and of N_kk, N_ll) over den, amplified by asin' = 1/sqrt(1 - r^2)
    rel = np.where(pos, (terms + 0.5 * np.abs(r) * (mk * np.sqrt(np.maximum(Nll, 0.0) / np.maximum(Nkk, 1e-300))
                                                     + ml * np.sqrt(np.maximum(Nkk, 0.0) / np.maximum(Nll, 1e-300))))
                   / np.where(pos, den, 1.0), 1.0)
    dr = _ROUND * (rel + 1.0)
    noise = np.abs(jac) * dr / np.sqrt(np.maximum(1.0 - r * r, dr))
    return _asin(r) * jac, noise


def _plackett_integrals(R, target: float = P4_TARGET):
    """I_ij (items, 6) and their error estimates for correlations R (items, 4, 4)."""
    n = R.shape[0]
    x10, w10 = _gl(10)
    x20, w20 = _gl(20)
    val = np.zeros((n, 6))
    err = np.zeros((n, 6))
    for p, pair in enumerate(_PAIRS4):
        item = np.repeat(np.arange(n), 2)
        lo = np.tile([0.0, 0.5], n)
        hi = lo + 0.5
        for level in range(_MAX_LEVELS + 1):
            if item.size == 0:
                break
            h = (hi - lo)[:, None]
            Rp = R[item]
            f20, noise = _plackett_integrand(Rp, pair, lo[:, None] + h * x20)
            q10 = np.sum(_plackett_integrand(Rp, pair, lo[:, None] + h * x10)[0] * w10, axis=1) * h[:, 0]
            q20 = np.sum(f20 * w20, axis=1) * h[:, 0]
            floor = np.sum(noise * w20, axis=1) * h[:, 0]  # rounding of the integrand: no bisection below it
            e = np.abs(q20 - q10) + floor
            done = (e <= np.maximum(target * (hi - lo), 4.0 * floor)) | (level == _MAX_LEVELS)
            np.add.at(val[:, p], item[done], q20[done])
            np.add.at(err[:, p], item[done], e[done])
            keep = ~done
            item, lo, hi = item[keep], lo[keep], hi[keep]
            mid = (lo + hi) / 2
            item, lo, hi = np.repeat(item, 2), np.stack([lo, mid], 1).reshape(-1), np.stack([mid, hi], 1).reshape(-1)
    return val, err


def orthant_probability(R, target: float = P4_TARGET):
    """P(y > 0) for y ~ N(0, R), R (items, k, k) correlation matrices, k <= 4: (value, error estimate).

    k <= 3 in closed form (error 0 beyond rounding); k = 4 by the Plackett integrals of the module
    docstring."""
    R = np.asarray(R, dtype=np.float64)
    n, k = R.shape[0], R.shape[1]
    if k == 0:
        return np.ones(n), np.zeros(n)
    if k == 1:
        return np.full(n, 0.5), np.zeros(n)
    if k == 2:
        return 0.25 + _asin(R[:, 0, 1]) / (2 * np.pi), np.zeros(n)
    if k == 3:
        return 0.125 + (_asin(R[:, 0, 1]) + _asin(R[:, 0, 2]) + _asin(R[:, 1, 2])) / (4 * np.pi), np.zeros(n)
    if k != 4:
        raise ValueError(f"R: expected at most four variables, got {k}")
    iu = np.triu_indices(4, 1)
    first = 1.0 / 16 + np.sum(_asin(R[:, iu[0], iu[1]]), axis=1) / (8 * np.pi)
    parts = [_plackett_integrals(R[i:i + _P4_ROWS], target) for i in range(0, n, _P4_ROWS)]
    I = np.concatenate([v for v, _ in parts]) if parts else np.zeros((0, 6))
    e = np.concatenate([x for _, x in parts]) if parts else np.zeros((0, 6))
    return first + np.sum(I, axis=1) / (4 * np.pi**2), np.sum(e, axis=1) / (4 * np.pi**2)


def truncated_moments(S, ms, target: float = P4_TARGET):
    """E[y^m 1{y > 0}] for y ~ N(0, S), S (items, k, k) covariances (k <= 4, no zero variance),
    for each multi-index m in ``ms``: (values (items, M), error estimates (items, M)).

    The error estimate is the propagated quadrature estimate of P4 plus 32 eps times the sum of the
    absolute values of the terms of the reduction (module docstring)."""
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 3 or S.shape[1] != S.shape[2] or S.shape[1] > 4:
        raise ValueError(f"S: expected covariances of shape (items, k, k) with k <= 4, got {S.shape}")
    n, k = S.shape[0], S.shape[1]
    var0 = np.diagonal(S, axis1=1, axis2=2).copy()
    cond = {0: S}
    memo: dict = {}
    prob: dict = {}

    def conditional(J: int):
        if J not in cond:
            j = J.bit_length() - 1
            A = conditional(J & ~(1 << j))
            v = A[:, j, j]
            ok = v > _DEGENERATE * var0[:, j]
            inv = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
            B = A - A[:, :, j, None] * A[:, None, j, :] * inv[:, None, None]
            B[:, j, :] = 0.0
            B[:, :, j] = 0.0
            cond[J] = B
        return cond[J]

    def probability(J: int):
        if J not in prob:
            act = [a for a in range(k) if not J >> a & 1]
            A = conditional(J)[:, act][:, :, act]
            v = np.diagonal(A, axis1=1, axis2=2)
            live = v > _DEGENERATE * var0[:, act]
            sd = np.where(live, np.sqrt(np.where(live, v, 1.0)), 0.0)
            inv = np.where(live, 1.0 / np.where(live, sd, 1.0), 0.0)
            R = A * inv[:, :, None] * inv[:, None, :]
            idx = np.arange(len(act))
            R[:, idx, idx] = 1.0  # a vanishing member: uncorrelated, its indicator counts 1/2
            prob[J] = orthant_probability(R, target)
        return prob[J]

    def moment(J: int, m: tuple):
        key = (J, m)
        if key in memo:
            return memo[key]
        if not any(m):
            p, e = probability(J)
            out = (p, e, np.abs(p))
        else:
            A = conditional(J)
            i = next(a for a in range(k) if m[a] > 0)
            g = list(m)
            g[i] -= 1
            val = np.zeros(n)
            err = np.zeros(n)
            mag = np.zeros(n)
            for j in range(k):
                if J >> j & 1:
                    continue
                Sij = A[:, i, j]
                if g[j] > 0:
                    h = list(g)
                    h[j] -= 1
                    c = g[j] * Sij
                    v, e, a = moment(J, tuple(h))
                else:
                    vj = A[:, j, j]
                    live = vj > _DEGENERATE * var0[:, j]
                    c = np.where(live, Sij / np.sqrt(2 * np.pi * np.where(live, vj, 1.0)), 0.0)
                    v, e, a = moment(J | 1 << j, tuple(g))
                val = val + c * v
                err = err + np.abs(c) * e
                mag = mag + np.abs(c) * a
            out = (val, err, mag)
        memo[key] = out
        return out

    vals = np.empty((n, len(ms)))
    errs = np.empty((n, len(ms)))
    for c, m in enumerate(ms):
        m = tuple(int(x) for x in m)
        if len(m) != k or min(m) < 0:
            raise ValueError(f"ms: expected multi-indices of {k} non-negative entries, got {m}")
        v, e, a = moment(0, m)
        vals[:, c] = v
        errs[:, c] = e + _ROUND * a
    return vals, errs
