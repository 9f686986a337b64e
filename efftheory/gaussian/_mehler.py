r"""Pairwise Gaussian expectations by the Mehler (Hermite) expansion: N one-dimensional rules and a
power series in the correlation, instead of N^2 two-dimensional rules.

Notation as in docs/theory.md: for two inputs a, b and z ~ N(0, K) write

    rho_ab = K_ab / sqrt(K_aa K_bb),        h_k(x) = He_k(x) / sqrt(k!)

(h_k are the probabilists' Hermite polynomials normalised to be orthonormal under x ~ N(0, 1)).

Mehler's formula
----------------
For z_a = sqrt(K_aa) x and z_b = sqrt(K_bb) y with (x, y) standard normals of correlation rho,

    <f(z_a) g(z_b)>_K = sum_{k>=0} rho_ab^k  f_k(K_aa) g_k(K_bb),                        (M)
    f_k(K) = <f(sqrt(K) x) h_k(x)>_{x ~ N(0,1)} = E[f(sqrt(K) x) He_k(x)] / sqrt(k!).

(The bivariate normal density has the expansion phi_rho(x, y) = phi(x) phi(y) sum_k rho^k
h_k(x) h_k(y).)  The coefficients f_k depend on the input only through its variance K_aa, so a layer
costs N one-dimensional integrals (one per distinct diagonal entry; one in all when every input has
the same norm), and the N^2 part is the polynomial (M) evaluated elementwise by Horner's rule in rho.

With f = g = sigma this gives S_ab = <sigma_a sigma_b>_K, and with f = g = sigma' the NTK's
dS_ab = <sigma'_a sigma'_b>_K (docs/theory.md, "Infinite width").

Truncation error
----------------
Parseval: sum_k f_k(K)^2 = <f(z)^2>_K, so the tail T_n^f(K) = <f^2>_K - sum_{k<=n} f_k(K)^2 is known
exactly from the same one-dimensional rule, and by Cauchy-Schwarz the series truncated after k = n
errs by at most

    |sum_{k>n} rho^k f_k(K_aa) f_k(K_bb)| <= |rho|^{n+1} sqrt(T_n^f(K_aa) T_n^f(K_bb)).           (B)

The coefficients of smooth activations decay like exp(-c sqrt(k)) (the rate set by the distance
of sigma's complex singularities, pi/(2 sqrt K) for tanh), those of kinked ones only algebraically,
so the series converges fast for |rho| well below 1 and slowly as |rho| -> 1.  Each layer picks the
number of terms n from a ladder (a cost model: n N^2 series operations against the two-dimensional
rule on the pairs that (B) rejects at that n) and sends the pairs whose bound (B) exceeds
``tol * sqrt(<f^2>_aa <f^2>_bb)`` -- those with |rho| near 1, identical and collinear inputs among
them -- to the tensor trapezoid rule of :mod:`efftheory.gaussian`.  The diagonal S_aa = <sigma^2>,
dS_aa = <sigma'^2> is the one-dimensional rule itself.

One-dimensional rule: the midpoint rule of :func:`efftheory.gaussian.normal_rule` on [-13, 13]
(by Cramer's inequality |h_k(x)| <= 1.09 exp(x^2/4), so the integrand f h_k phi decays like
|f| exp(-x^2/4), below 5e-19 |f| beyond the cut), with a step that resolves both sigma (singularities at distance
pi/(2 sqrt(K)), as in
:func:`efftheory.gaussian.nodes_for`) and h_k (which grows like exp(sqrt(2k)|Im x|) off the real
axis).  Kinked activations (``smooth=False``) get eight times the nodes, as in
:func:`efftheory.gaussian.rule_size`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._constants import MEHLER_TAIL, MEHLER_TOL
from ._rules import derivative, expect2_multi, normal_rule, rule_size
from ._tables import HOST_BUDGET, sd_values

__all__ = ["hermite_functions", "coefficients", "series", "pair_moments_mehler", "expect_pairs", "MehlerInfo",
           "TOL", "MAX_TERMS", "HOST_N", "expect_pairs_host"]

TAIL = MEHLER_TAIL   # 13: the 1-d rule spans |x| <= 13: the integrand h_k^2 phi is below exp(-x^2/4) ~ 5e-19 there
TOL = MEHLER_TOL     # 1e-11: default bound (B), relative to sqrt(<f_a^2> <f_b^2>)
MAX_TERMS = 256      # longest series; pairs that need more go to the 2-d rule
_ROUND_N = 256       # up to this many inputs, series lengths (16 x 2^k) and node counts (2^k) are rounded up
_CHUNK = 16          # Horner terms per fused elementwise pass (longer fusions were measured to slow down)
TERM_LADDER = tuple(range(_CHUNK, MAX_TERMS + 1, _CHUNK))  # series lengths n (terms k < n)
_NODE_LADDER = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
# Cost model (seconds are machine-specific, only the ratio matters): one 2-d rule evaluation of the
# pair (sigma_a sigma_b, sigma'_a sigma'_b) at one node ~ _NODE_COST series operations (one term of
# both series at one entry).  Measured ~10 on a 2-core Xeon (jax 0.10).
_NODE_COST = 10.0
_SAMPLE_PAIRS = 16384  # pairs sampled to estimate how many the bound (B) rejects at each n


@functools.lru_cache(maxsize=64)
def hermite_functions(n_nodes: int, n_terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, w, Hw): the 1-d rule (nodes u, weights w for N(0,1)) and Hw[k, i] = h_k(u_i) w_i, k <= n_terms.

    h_k by the three-term recurrence h_{k+1} = (x h_k - sqrt(k) h_{k-1}) / sqrt(k+1), stable for the
    orthonormal functions (no factorials are formed).
    """
    u, w = normal_rule(n_nodes, TAIL)
    H = np.empty((n_terms + 1, u.size))
    H[0] = 1.0
    if n_terms >= 1:
        H[1] = u
    for k in range(1, n_terms):
        H[k + 1] = (u * H[k] - math.sqrt(k) * H[k - 1]) / math.sqrt(k + 1)
    return u, w, H * w


def _n_nodes(K_max: float, n_terms: int, smooth: bool) -> int:
    """Nodes of the 1-d rule for variances up to K_max and Hermite degree n_terms (module docstring).

    Trapezoid error ~ exp(y^2/2 + sqrt(2 n) y - 2 pi y / h) for a strip half-width y inside
    sigma's analyticity strip (y = 0.9 pi / (2 sqrt K_max), at most 2); the step makes it 1e-17.
    """
    y = min(2.0, 0.9 * math.pi / (2.0 * math.sqrt(max(K_max, 1e-300))))
    h = 2.0 * math.pi * y / (math.log(1e17) + math.sqrt(2.0 * n_terms) * y + 0.5 * y * y)
    n = 2 * math.ceil(TAIL / h)
    if not smooth:
        n *= 8
    return next((m for m in _NODE_LADDER if m >= n), _NODE_LADDER[-1])


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _coefficients(fn, sd, inv, n_nodes: int, n_terms: int):
    u, w, Hw = hermite_functions(n_nodes, n_terms)
    Z = sd[:, None] * jnp.asarray(u)[None, :]
    F, dF = fn(Z), derivative(fn)(Z)
    HwT, wj = jnp.asarray(Hw.T), jnp.asarray(w)
    return tuple(v[inv] for v in (F @ HwT, dF @ HwT, (F * F) @ wj, (dF * dF) @ wj))


def coefficients(fn, K_diag, n_terms: int = MAX_TERMS, *, smooth: bool = True, n_nodes: int | None = None):
    """Mehler coefficients of sigma and sigma' at the variances K_diag (N,).

    Returns (C, D, m2, dm2), all float64: C[a, k] = sigma_k(K_aa) and D[a, k] = sigma'_k(K_aa) of (M),
    shape (N, n_terms + 1); m2 = <sigma^2>, dm2 = <sigma'^2> at each K_aa (N,).  One 1-d rule per
    distinct variance.
    """
    d = np.maximum(np.asarray(K_diag, dtype=np.float64).reshape(-1), 0.0)
    uniq, inv = np.unique(d, return_inverse=True)
    if n_nodes is None:
        n_nodes = _n_nodes(float(uniq[-1]) if uniq.size else 0.0, n_terms, smooth)
    return _coefficients(fn, jnp.sqrt(jnp.asarray(uniq)), jnp.asarray(inv.reshape(-1)), int(n_nodes), int(n_terms))


def _chunk(R, CT):
    """sum_{k<_CHUNK} CT[k]_a CT[k]_b R_ab^k elementwise, CT (_CHUNK, N): one fused pass by Horner's rule."""
    acc = CT[-1][:, None] * CT[-1][None, :]
    for k in range(CT.shape[0] - 2, -1, -1):
        acc = CT[k][:, None] * CT[k][None, :] + R * acc
    return acc


def _series_impl(R, CT, n_chunks):
    """sum_{k < _CHUNK n_chunks} CT[k]_a CT[k]_b R^k, CT (terms, N) with terms a multiple of _CHUNK.

    Horner in R^_CHUNK over chunks (a loop, so one compilation serves every number of terms) and
    Horner in R within a chunk (unrolled into one fused elementwise pass).
    """
    Rc = R ** _CHUNK

    def body(i, acc):
        j = n_chunks - 1 - i
        block = jax.lax.dynamic_slice_in_dim(CT, j * _CHUNK, _CHUNK, axis=0)
        return _chunk(R, block) + Rc * acc

    return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros_like(R))


def _padded_T(C):
    """C (N, m) -> (m', N) with m' the next multiple of _CHUNK (zero coefficients appended)."""
    pad = -C.shape[1] % _CHUNK
    return jnp.pad(C, ((0, 0), (0, pad))).T


def _parity_series(R, C, n, parity: int):
    """sum_{k<n} C[a,k] C[b,k] R^k; for parity p in (0, 1) only the k = p mod 2 terms, as R^p times a
    series in R^2 (half the work for odd or even functions).  ``n`` may be traced: the coefficients
    from k = n on are zeroed and the loop runs over the chunks that hold the others, so that one
    compiled program serves every series length (the terms summed, and their order, are those of
    the slice C[:, :n])."""
    if parity < 0:
        CT = _padded_T(C)
        CT = jnp.where((jnp.arange(CT.shape[0]) < n)[:, None], CT, 0.0)
        return _series_impl(R, CT, (n + _CHUNK - 1) // _CHUNK)
    CT = _padded_T(C[:, parity::2])
    CT = jnp.where((parity + 2 * jnp.arange(CT.shape[0]) < n)[:, None], CT, 0.0)
    terms = (n - parity + 1) // 2  # k = parity + 2 i < n
    out = _series_impl(R * R, CT, (terms + _CHUNK - 1) // _CHUNK)
    return R * out if parity == 1 else out


def _correlations(K):
    """rho = K_ab / sqrt(K_aa K_bb) (exactly +-1 for identical or opposite inputs, symmetric in a <-> b);
    0 against a zero-variance input, whose coefficients vanish beyond k = 0 anyway."""
    d = jnp.diagonal(K)
    s = jnp.sqrt(d[:, None] * d[None, :])
    return jnp.where(s > 0, jnp.clip(K / jnp.where(s > 0, s, 1.0), -1.0, 1.0), 0.0)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _series_pair(K, C, D, m2, dm2, n, parities: tuple[int, int], check: bool, limits):
    """(S, dS, count): the series (M) with the terms k < n (traced: one program for every n) for sigma and
    sigma', exact diagonals, and
    the number of pairs a < b where the bound (B) fails (|rho| above a product of limits)."""
    R = _correlations(K)
    eye = jnp.eye(K.shape[0], dtype=bool)
    S = jnp.where(eye, m2[:, None], _parity_series(R, C, n, parities[0]))
    dS = jnp.where(eye, dm2[:, None], _parity_series(R, D, n, parities[1]))
    if not check:
        return S, dS, jnp.int32(0)
    return S, dS, jnp.sum(_outside(R, limits), dtype=jnp.int32)


def _outside(R, limits):
    """Pairs a < b with |rho_ab| above t_a t_b for any of the limit vectors t in ``limits`` (m, N)."""
    rho = jnp.abs(R)
    N = R.shape[0]
    ok = jnp.ones(R.shape, dtype=bool)
    for t in limits:
        ok = ok & (rho <= t[:, None] * t[None, :])
    return (jnp.arange(N)[:, None] < jnp.arange(N)[None, :]) & ~ok


@jax.jit
def _outside_mask(K, limits):
    return _outside(_correlations(K), limits)


def series(R, C, n: int | None = None):
    """sum_{k<n} C[a, k] C[b, k] R_ab^k for a correlation matrix R (N, N) and coefficients C (N, >= n)."""
    C = jnp.asarray(C)
    n = C.shape[1] if n is None else int(n)
    return jax.jit(_parity_series, static_argnums=(2, 3))(jnp.asarray(R), C, n, -1)


@functools.lru_cache(maxsize=64)
def _fallback_fn(fn, order: int):
    dfn = derivative(fn)

    def f(z1, z2):
        return jnp.stack([fn(z1) * fn(z2), dfn(z1) * dfn(z2)])

    return jax.jit(lambda k11, k22, k12: expect2_multi(f, k11, k22, k12, order=order))


def expect_pairs(act, k11, k22, k12, *, order: int | None = None):
    """(<sigma sigma>, <sigma' sigma'>) for a list of pairs by the 2-d rule of :mod:`efftheory.gaussian`.

    Pairs are padded to a power of two (at least 16) so that few shapes compile.
    """
    k11, k22, k12 = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (k11, k22, k12))
    P = k11.size
    if P == 0:
        return np.zeros(0), np.zeros(0)
    if order is None:
        order = rule_size(act, float(max(k11.max(), k22.max())))
    size = max(16, 1 << (P - 1).bit_length())
    pad = size - P
    args = [np.concatenate([v, np.full(pad, fill)]) for v, fill in ((k11, 1.0), (k22, 1.0), (k12, 0.0))]
    out = _fallback_fn(act.fn, int(order))(*(jnp.asarray(a) for a in args))
    return out[0, :P], out[1, :P]


# ---------------------------------------------------------------------------------------------
# numpy twins for few inputs (HOST_N): the same sums without a compiled program per series length,
# node count and N; sigma and sigma' through the one compiled evaluator of sd_values


HOST_N = 64  # up to this many inputs pair_moments_mehler runs in numpy (and infinite_width's Mehler layers)


def _coefficients_host(fn, d, n_nodes: int, n_terms: int):
    """:func:`coefficients` in numpy: (C, D, m2, dm2) at the variances d (N,)."""
    uniq, inv = np.unique(d, return_inverse=True)
    u, w, Hw = hermite_functions(n_nodes, n_terms)
    F, dF = sd_values(fn, np.sqrt(uniq)[:, None] * u[None, :])
    return tuple(v[inv] for v in (F @ Hw.T, dF @ Hw.T, (F * F) @ w, (dF * dF) @ w))


def _correlations_host(K):
    d = np.diagonal(K)
    s = np.sqrt(d[:, None] * d[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, np.clip(K / np.where(s > 0, s, 1.0), -1.0, 1.0), 0.0)


def _parity_series_host(R, C, n: int, parity: int):
    """:func:`_parity_series` in numpy: sum_{k<n} C[a,k] C[b,k] R^k by Horner's rule (for parity
    p in (0, 1) the k = p mod 2 terms, as R^p times a series in R^2)."""
    CT, X = (C[:, :n].T, R) if parity < 0 else (C[:, parity:n:2].T, R * R)
    acc = np.zeros_like(R)
    for c in CT[::-1]:
        acc = np.multiply.outer(c, c) + X * acc
    return R * acc if parity == 1 else acc


def _outside_host(R, limits):
    rho = np.abs(R)
    ok = np.ones(R.shape, dtype=bool)
    for t in limits:
        ok &= rho <= np.multiply.outer(t, t)
    return np.triu(~ok, 1)


def _rejected_fraction_host(K, ia, ib, tc, td):
    """:func:`_rejected_fraction` in numpy (no pairs, a single input: none rejected)."""
    if np.size(ia) == 0:
        return np.zeros(tc.shape[0] - 1)
    d = np.diagonal(K)
    s = np.sqrt(np.maximum(d[ia] * d[ib], 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.abs(np.where(s > 0, K[ia, ib] / np.where(s > 0, s, 1.0), 0.0))
    far = (rho > tc[-1, ia] * tc[-1, ib]) | (rho > td[-1, ia] * td[-1, ib])
    bad = far[None, :] | (rho > tc[:-1, ia] * tc[:-1, ib]) | (rho > td[:-1, ia] * td[:-1, ib])
    return np.mean(bad, axis=1)


def expect_pairs_host(act, k11, k22, k12, *, order: int):
    """:func:`expect_pairs` in numpy (the same tensor rule, pair by pair in blocks): z1 = a u,
    z2 = b u + c v with a, b, c the Cholesky factor of each pair's covariance."""
    u, w = normal_rule(order)
    a = np.sqrt(np.maximum(k11, 0.0))
    b = np.where(a > 0, k12 / np.where(a > 0, a, 1.0), 0.0)
    c = np.sqrt(np.maximum(k22 - b * b, 0.0))
    s1, d1 = sd_values(act.fn, a[:, None] * u[None, :])  # (P, n): z1 at node i
    out_s, out_d = np.empty(a.size), np.empty(a.size)
    step = max(1, HOST_BUDGET // (order * order))
    for lo in range(0, a.size, step):
        sl = slice(lo, lo + step)
        z2 = b[sl, None, None] * u[None, :, None] + c[sl, None, None] * u[None, None, :]
        s2, d2 = sd_values(act.fn, z2)
        out_s[sl] = np.einsum("pi,pij,i,j->p", s1[sl], s2, w, w)
        out_d[sl] = np.einsum("pi,pij,i,j->p", d1[sl], d2, w, w)
    return out_s, out_d


@dataclasses.dataclass(frozen=True)
class MehlerInfo:
    """How one layer was evaluated: series terms n (k < n), parities of sigma and sigma' (-1: none,
    0: even, 1: odd), 1-d nodes, pairs a < b sent to the 2-d rule, of all pairs."""

    terms: int
    parities: tuple
    nodes: int
    fallback_pairs: int
    pairs: int


def _thresholds(coef, m2, tol, ns):
    """theta (len(ns) + 1, N): the bound (B) is below tol sqrt(m2_a m2_b) for every pair with
    |rho_ab| <= theta[j, a] theta[j, b] and |rho_ab| <= theta[-1, a] theta[-1, b], using the terms k < ns[j].

    The tail is split at the last computed coefficient k = m (= coef.shape[1] - 1):
    T = sum_{n<=k<=m} c_k^2 (exact from the coefficients) + R, R = <f^2> - sum_{k<=m} c_k^2 (Parseval; its
    rounding error ~1e-16 <f^2> is harmless because R enters multiplied by |rho|^(m+1)).  Each part
    gets half the tolerance: |rho|^n sqrt(T_a T_b) <= tol/2 and |rho|^(m+1) sqrt(R_a R_b) <= tol/2.
    """
    sq = coef * coef
    m = coef.shape[1] - 1
    mid = np.cumsum(sq[:, ::-1], axis=1)[:, ::-1]          # mid[:, n] = sum_{n<=k<=m} c_k^2
    far = np.maximum(m2 - np.sum(sq, axis=1), 0.0)           # R(a)
    scale = np.sqrt(0.5 * tol * np.maximum(m2, 1e-300))  # per input: the product of two gives (tol/2) sqrt(m2_a m2_b)
    out = []
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for n in ns:
            out.append(np.minimum(1.0, (scale / np.sqrt(mid[:, n])) ** (1.0 / n)))
        out.append(np.minimum(1.0, (scale / np.sqrt(far)) ** (1.0 / (m + 1))))
    return np.nan_to_num(np.stack(out), nan=1.0)


def _parity(coef, m2) -> int:
    """0 if the odd coefficients vanish (an even function), 1 if the even ones do (odd), else -1."""
    eps = 1e-14 * math.sqrt(max(float(np.max(m2)), 1e-300))
    if np.all(np.abs(coef[:, 1::2]) <= eps):
        return 0
    if np.all(np.abs(coef[:, 0::2]) <= eps):
        return 1
    return -1


@functools.lru_cache(maxsize=16)
def _sample_pairs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """Off-diagonal pairs (a, b), all of them or _SAMPLE_PAIRS drawn with a fixed seed."""
    if N * (N - 1) // 2 <= _SAMPLE_PAIRS:
        return np.triu_indices(N, 1)
    rng = np.random.default_rng(0)
    ia = rng.integers(0, N, _SAMPLE_PAIRS)
    return ia, (ia + rng.integers(1, N, _SAMPLE_PAIRS)) % N


def _ladder_rows(theta):
    """theta (len(ns) + 1, N) padded to len(TERM_LADDER) + 1 rows (the last row kept last; the padding
    repeats it), so that :func:`_rejected_fraction` compiles once whatever the candidate lengths."""
    pad = len(TERM_LADDER) + 1 - theta.shape[0]
    return np.concatenate([theta[:-1], np.repeat(theta[-1:], pad + 1, axis=0)]) if pad > 0 else theta


@jax.jit
def _rejected_fraction(K, ia, ib, tc, td):
    """Fraction of the sampled pairs outside the limits, for every candidate n (tc, td: (J + 1, N))."""
    d = jnp.diagonal(K)
    s = jnp.sqrt(jnp.maximum(d[ia] * d[ib], 0.0))
    rho = jnp.abs(jnp.where(s > 0, K[ia, ib] / jnp.where(s > 0, s, 1.0), 0.0))
    far = (rho > tc[-1, ia] * tc[-1, ib]) | (rho > td[-1, ia] * td[-1, ib])
    bad = far[None, :] | (rho > tc[:-1, ia] * tc[:-1, ib]) | (rho > td[:-1, ia] * td[:-1, ib])
    return jnp.mean(bad, axis=1)


def pair_moments_mehler(act, K, *, tol: float = TOL, max_terms: int = MAX_TERMS, return_info: bool = False,
                        host: bool = False):
    """(S, dS) with S_ab = <sigma(z_a) sigma(z_b)>_K and dS_ab = <sigma'(z_a) sigma'(z_b)>_K, K (N, N).

    Mehler series (M) wherever the bound (B) is below ``tol`` times sqrt(<sigma_a^2><sigma_b^2>)
    (and the same for sigma'), the 2-d rule of :mod:`efftheory.gaussian` elsewhere; diagonals by the
    1-d rule.  The number of terms n minimises a cost model (n N^2 series operations against the
    2-d rule on the pairs the bound rejects, estimated on a sample of pairs); coefficients are first
    computed up to k = 64 and up to ``max_terms`` only when fewer do not suffice.
    Not jittable (n and the rejected pairs are chosen on the host).  With ``return_info`` also a
    :class:`MehlerInfo`.

    ``host``: the same sums in numpy, returned as numpy arrays, with sigma evaluated by the one
    compiled program of :func:`efftheory.gaussian._tables.sd_values` (infinite_width takes it for
    N <= HOST_N: for few inputs the compiled programs, one per series length, node count and N, cost
    more to compile than the whole recursion).
    """
    K = np.asarray(K, dtype=np.float64) if host else jnp.asarray(K, dtype=jnp.float64)
    N = K.shape[0]
    d = np.maximum(np.asarray(np.diagonal(K) if host else jnp.diagonal(K)), 0.0)
    d_max = float(d.max()) if N else 0.0
    max_terms = max(_CHUNK, int(max_terms))
    order = rule_size(act, d_max)
    ia_s, ib_s = _sample_pairs(N)
    if not host:
        ia_s, ib_s = jnp.asarray(ia_s), jnp.asarray(ib_s)
    for n_max in sorted({min(64, max_terms), max_terms}):
        ns = [n for n in TERM_LADDER if n <= n_max] or [_CHUNK]
        n_nodes = _n_nodes(d_max, n_max, act.smooth)
        if N <= _ROUND_N:  # powers of two only: layers whose variances differ a little share a program
            n_nodes = min(_NODE_LADDER[-1], 1 << (n_nodes - 1).bit_length())
        if host:
            C, D, m2, dm2 = _coefficients_host(act.fn, d, n_nodes, n_max)
        else:
            C, D, m2, dm2 = coefficients(act.fn, d, n_max, smooth=act.smooth, n_nodes=n_nodes)
        Ch, Dh, m2h, dm2h = (np.asarray(v) for v in (C, D, m2, dm2))
        theta_c, theta_d = _thresholds(Ch, m2h, tol, ns), _thresholds(Dh, dm2h, tol, ns)
        if host:
            frac = _rejected_fraction_host(K, ia_s, ib_s, theta_c, theta_d)
        else:
            frac = np.asarray(_rejected_fraction(K, ia_s, ib_s, *(jnp.asarray(_ladder_rows(t))
                                                                  for t in (theta_c, theta_d))))
        frac = frac[:len(ns)]
        P = N * (N - 1) // 2
        cost = np.array(ns, dtype=float) * N * N + frac * P * _NODE_COST * order * order
        j = int(np.argmin(cost))
        if frac[j] == 0.0:
            break
    if N <= _ROUND_N:  # few inputs: compiling a new series length costs more than the extra terms (and
        #                the numpy twin sums the same terms, so that its values are the compiled ones to rounding)
        target = _CHUNK << (ns[j] // _CHUNK - 1).bit_length()
        j = next((i for i, m in enumerate(ns) if m >= target), len(ns) - 1)
    n = ns[j]
    parities = (_parity(Ch, m2h), _parity(Dh, dm2h))
    limits = np.stack([theta_c[j], theta_d[j], theta_c[-1], theta_d[-1]])
    if host:
        S, dS, ia, ib = _series_pair_host(K, C, D, m2, dm2, n, parities, limits)
        if ia.size:
            s, ds = expect_pairs_host(act, d[ia], d[ib], K[ia, ib], order=order)
            S[ia, ib], S[ib, ia], dS[ia, ib], dS[ib, ia] = s, s, ds, ds
    else:
        limits = jnp.asarray(limits)
        S, dS, count = _series_pair(K, C, D, m2, dm2, np.int32(n), parities, N > 1, limits)
        ia = ib = np.zeros(0, dtype=np.int64)
        if int(count):
            ia, ib = np.nonzero(np.asarray(_outside_mask(K, limits)))
            s, ds = expect_pairs(act, d[ia], d[ib], np.asarray(K)[ia, ib], order=order)
            S, dS = _scatter_sym(S, dS, jnp.asarray(ia), jnp.asarray(ib), s, ds)
    if return_info:
        return S, dS, MehlerInfo(terms=n, parities=parities, nodes=n_nodes, fallback_pairs=int(ia.size),
                                 pairs=N * (N - 1) // 2)
    return S, dS


def _series_pair_host(K, C, D, m2, dm2, n: int, parities, limits):
    """:func:`_series_pair` in numpy: (S, dS, ia, ib), the pairs a < b (ia, ib) where the bound fails."""
    R = _correlations_host(K)
    S, dS = _parity_series_host(R, C, n, parities[0]), _parity_series_host(R, D, n, parities[1])
    np.fill_diagonal(S, m2)
    np.fill_diagonal(dS, dm2)
    ia, ib = np.nonzero(_outside_host(R, limits)) if K.shape[0] > 1 else (np.zeros(0, int),) * 2
    return S, dS, ia, ib


@functools.partial(jax.jit, donate_argnums=(0, 1))  # in place: a fresh copy of S and dS cost ~10 ms a layer
def _scatter_sym(S, dS, ia, ib, s, ds):
    S = S.at[ia, ib].set(s).at[ib, ia].set(s)
    dS = dS.at[ia, ib].set(ds).at[ib, ia].set(ds)
    return S, dS
