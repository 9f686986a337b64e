r"""The Gaussian-expectation engine behind every recursion.

Notation (docs/theory.md): <f>_K is the expectation of f(z) for z ~ N(0, K).

Rules
-----
All expectations are tensor-product trapezoid rules for the standard normal (nodes u_i on
[-9, 9], weights w_i proportional to exp(-u_i^2/2), summing to 1) applied after a pivoted
Cholesky factorisation z = L u of the covariance.  The step shrinks like 1/sqrt(K_max) so that
saturating activations (tanh: poles at distance pi/(2 sqrt K) from the real u axis) keep
exponential convergence; Gauss-Hermite rules were measured here to lose 1e-7 at K = 4 for tanh.

    1-d:  <f>_K               = sum_i w_i f(sqrt(K) u_i)
    2-d:  <f(z1, z2)>_Sigma   with z1 = a u, z2 = b u + c v,  a = sqrt(k11), b = k12/a,
                                   c = sqrt(k22 - b^2)
    k-d:  <f(z)>_Sigma        with z = L u, L the (pivoted, possibly rank-deficient) Cholesky factor

A rank-deficient covariance (identical or collinear inputs, a zero input with C_b = 0) is not an
error: the factor simply has zero columns and the rule integrates over the lower-dimensional
marginal.  No jitter is ever added.

Derivatives by integration by parts
-----------------------------------
For the derivatives the finite-width recursions need, sigma is never differentiated more than
once (a ReLU's sigma'' is a delta).  Stein's lemma in whitened coordinates u = L^{-1} z,

    <d^k f / dz_{g1}..dz_{gk}> = <f(z) He_{g1..gk}(z; Sigma)>,

with He the multivariate Hermite polynomials of docs/theory.md (u_a u_b - Sigma^{-1}_ab, and the
quartic one), is implemented in :mod:`efftheory.gaussian._hermite` (whitened coordinates, pseudo-inverse
for singular covariances).

Accuracy: with the default node counts smooth activations reach 1e-10 relative against adaptive
quadrature for variances from 0.05 to 10 (tests/test_gaussian_rules.py); kinked activations use the
closed forms of :mod:`efftheory.activations`, or converge algebraically (O(h^2)) otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._constants import RESOLVE_TOL, RULE_TAIL, RULE_TOL

__all__ = ["normal_rule", "expect1", "expect2", "expectk", "pair_moments_quadrature", "derivative"]

TAIL = RULE_TAIL    # nodes span |u| <= TAIL (9); the Gaussian mass beyond is 2e-19 (._constants)
TOL = RULE_TOL      # target relative accuracy of the default rules (1e-13)
_BLOCK_NODES = 1 << 23  # pairs per block in the 2-d rule: memory ~ _BLOCK_NODES floats
_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def nodes_for(K_max: float, tol: float = TOL, *, cap: int = 4097) -> int:
    """Number of trapezoid nodes per dimension that reaches ``tol`` for variances up to K_max.

    The trapezoid rule for an integrand analytic in a strip |Im u| < d has error ~ exp(-2 pi d/h).
    Activations such as tanh have poles at distance pi / (2 sqrt(K)) in u = z / sqrt(K), hence
    h = pi^2 / (sqrt(K_max) log(2/tol)), capped at 0.5 (the Gaussian alone needs h < ~0.6).
    The count is rounded up to a ladder of sizes growing by 1.5x, so that layers with nearby
    K_max share one compiled rule (rounding up only ever adds accuracy).
    """
    K_max = float(K_max)
    if not np.isfinite(K_max) or K_max < 0:
        raise ValueError(f"K_max: expected a finite variance >= 0, got {K_max}")
    # +8 in the logarithm: the prefactor of the error bound grows with the pole order (sech^8 in
    # <sigma'^4> for tanh), measured here to cost ~3 digits at the bare estimate.
    h = min(0.5, np.pi**2 / (np.sqrt(max(K_max, 1e-300)) * (np.log(2.0 / tol) + 8.0)))
    n = 2 * int(np.ceil(TAIL / h))
    n = next((m for m in _LADDER if m >= n), n)
    return int(min(n, cap))


class UnresolvedVariance(ValueError):
    """A variance so large that the capped one- and two-input rules cannot resolve sigma there.

    Attributes: ``K`` (the variance asked for), ``limit`` (the largest variance the rules resolve for
    this activation, :func:`resolvable_variance`), ``error`` (the estimated relative error at ``K``).
    """

    def __init__(self, message: str, *, K: float, limit: float, error: float):
        super().__init__(message)
        self.K, self.limit, self.error = K, limit, error


def rule_size(act, K_max: float, *, check: bool = True) -> int:
    """Nodes per dimension for an activation: :func:`nodes_for`, times 8 across a kink.

    A kinked sigma (``act.smooth`` False, and no closed form) converges only like h^2, so the
    step is refined eightfold (error / 64); give user callables with kinks ``smooth=False``.

    Past K_max ~ 3.4e3 the node count stops growing (``cap``: 4097 nodes on |u| <= 9), and the
    features of sigma(sqrt(K) u) of width ~1/sqrt(K) (the peak of sigma') end up between nodes.
    There, with ``check``, the rule's error at K_max is measured (:func:`rule_error`) and a variance
    the rule resolves worse than ``RESOLVE_TOL`` (1e-8, relative) raises :class:`UnresolvedVariance`
    naming the variance and the largest one that is resolved (:func:`resolvable_variance`).
    ``check=False`` is for callers that tolerate the loss (figures over a wide range of K).
    """
    n = nodes_for(K_max)
    if not act.smooth:
        return min(8 * n, 2048)
    if check and nodes_for(K_max, cap=1 << 40) > n:
        err = rule_error(act, float(K_max), n)
        if not err <= RESOLVE_TOL:
            limit = resolvable_variance(act, n)
            raise UnresolvedVariance(
                f"the preactivation variance reaches K = {float(K_max):.4g}, where sigma = {act.name}'s "
                f"Gaussian averages (one- and two-input trapezoid rules, at most {n} nodes) are resolved only "
                f"to {err:.1e} relative, short of {RESOLVE_TOL:.0e}: sigma'(sqrt(K) u) is a peak of width "
                f"~1/sqrt(K) that falls between nodes.  For {act.name} the rules resolve K <= {limit:.3g}; "
                "scale the inputs down (or C_W, C_b), see docs/theory.md, 'Large variances'.  "
                "chi_parallel, chi_perp, fixed_point and the closed-form kernels (relu, abs, erf, ...) "
                "have no such limit.", K=float(K_max), limit=limit, error=err)
    return n


@functools.lru_cache(maxsize=4096)
def _rule_error(fn, K: float, n: int, tail: float) -> float:
    from .._precision import enable_x64

    d = derivative(fn)
    with enable_x64(True):
        h = 2.0 * tail / n
        out = []
        for u in (-tail + (np.arange(n) + 0.5) * h, -tail + np.arange(n + 1) * h):
            w = np.exp(-0.5 * u * u)
            w /= w.sum()
            z = jnp.asarray(np.sqrt(K) * u, jnp.float64)
            out.append([float(np.sum(w * np.asarray(f(z), np.float64) ** 2)) for f in (fn, d)])
    (s_mid, ds_mid), (s_end, ds_end) = out
    rel = [abs(a - b) / max(abs(a), abs(b), 1e-300) for a, b in ((s_mid, s_end), (ds_mid, ds_end))]
    return max(rel) if all(np.isfinite(rel)) else float("inf")


def rule_error(act, K: float, n: int, tail: float = TAIL) -> float:
    """Estimated relative error of the ``n``-node rule on |u| <= ``tail`` at variance ``K`` for sigma.

    The rule is compared with itself shifted by half a step (midpoint nodes against end nodes) on
    <sigma^2>_K and on <sigma'^2>_K, the sharpest average the recursions take: for an integrand analytic
    in a strip the two rules' errors are equal and opposite at leading order, so the difference is
    about twice the error of either.  Returns the larger of the two relative differences.
    """
    return _rule_error(act.fn, float(K), int(n), float(tail))


@functools.lru_cache(maxsize=256)
def _resolvable(fn, n: int) -> float:
    def bad(K):
        return not _rule_error(fn, K, n, TAIL) <= RESOLVE_TOL

    lo = 1.0
    hi = 1e16
    if not bad(hi):
        return float("inf")
    if bad(lo):
        return 0.0
    for _ in range(60):  # bisection in log K to 1%
        mid = math.sqrt(lo * hi)
        if not bad(mid):
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.01:
            break
    return lo


def resolvable_variance(act, n: int | None = None) -> float:
    """The largest variance K at which the ``n``-node rule (default: the capped one of :func:`nodes_for`)
    resolves sigma's averages to ``RESOLVE_TOL`` by :func:`rule_error` (bisection in log K, to 1%).

    With the capped rule: tanh 6.3e3, erf 1.3e4, sigmoid 2.5e4, gelu 3.2e4, silu 4.0e4, softplus 6.5e4;
    sin: no limit (docs/theory.md, 'Large variances').  ``inf`` for activations the rule resolves at every K
    (polynomials), 0 for ones it does not resolve even at K = 1.
    """
    n = nodes_for(1e300) if n is None else int(n)
    return _resolvable(act.fn, n)


@functools.lru_cache(maxsize=None)
def normal_rule(n: int, tail: float = TAIL) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint nodes on [-tail, tail] and weights for N(0, 1): sum_i w_i f(u_i) ~ <f(u)>.

    Exponentially convergent for integrands analytic in a strip (see :func:`nodes_for`); exact to
    rounding for polynomials of moderate degree.  For even n no node sits at u = 0, so a kink or
    step at the origin (relu, sigma' of relu) is split symmetrically.  float64, weights sum to 1.
    """
    if n < 2:
        raise ValueError(f"n: expected at least 2 nodes, got {n}")
    u = -tail + (np.arange(n) + 0.5) * (2 * tail / n)
    w = np.exp(-0.5 * u * u)
    return u, w / w.sum()


@functools.lru_cache(maxsize=256)
def derivative(fn):
    """Elementwise sigma' by a forward-mode JVP (a step function for kinked activations).

    Cached per function, so that jitted code keyed on it compiles once.
    """

    def d(z):
        return jax.jvp(fn, (z,), (jnp.ones_like(z),))[1]

    return d


def _auto_order(order, *Ks, act=None):
    if order is not None:
        return int(order)
    K_max = max(float(jnp.max(jnp.asarray(k))) for k in Ks)
    return nodes_for(K_max) if act is None else rule_size(act, K_max)


def expect1(f, K, *, order: int | None = None):
    """<f(z)> for z ~ N(0, K), broadcasting over an array of variances K (any shape).

    ``order`` (nodes) defaults to :func:`nodes_for` the largest K; pass it explicitly under jit.
    """
    order = _auto_order(order, K)
    u, w = normal_rule(order)
    K = jnp.asarray(K)
    z = jnp.sqrt(jnp.maximum(K, 0.0))[..., None] * u
    return jnp.sum(f(z) * w, axis=-1)


def _cholesky2(k11, k22, k12):
    a = jnp.sqrt(jnp.maximum(k11, 0.0))
    b = jnp.where(a > 0, k12 / jnp.where(a > 0, a, 1.0), 0.0)
    c = jnp.sqrt(jnp.maximum(k22 - b * b, 0.0))
    return a, b, c


def expect2(f, k11, k22, k12, *, order: int | None = None):
    """<f(z1, z2)> over N(0, [[k11, k12], [k12, k22]]), broadcasting over the three arrays.

    ``f`` maps two equally shaped arrays to one.  Evaluated in blocks so memory stays bounded.
    """
    k11, k22, k12 = jnp.broadcast_arrays(jnp.asarray(k11), jnp.asarray(k22), jnp.asarray(k12))
    order = _auto_order(order, k11, k22)
    out = expect2_multi(lambda z1, z2: f(z1, z2)[None], k11.reshape(-1), k22.reshape(-1),
                         k12.reshape(-1), order=order)
    return out[0].reshape(k11.shape)


def range_factor(S, rtol: float = 1e-12):
    """Factors L with S = L L^T for PSD matrices S (..., k, k), from the eigendecomposition.

    Eigenvalues below ``rtol`` times the largest count as zero, so the columns of L outside the
    range of a rank-deficient S vanish (identical or collinear inputs: no jitter).
    """
    lam, Q = np.linalg.eigh(np.asarray(S, dtype=np.float64))
    lam = np.where(lam > rtol * lam[..., -1:], lam, 0.0)
    return Q * np.sqrt(lam)[..., None, :]


def expectk(f, Sigma, *, order: int = 32):
    """<f(z)> for z ~ N(0, Sigma) with Sigma (k, k), k <= 4, f mapping (..., k) -> (...).

    A tensor-product rule of ``order`` nodes in each direction of the range of Sigma; directions
    outside the range (rank-deficient Sigma) cost nothing.
    """
    L = range_factor(Sigma)
    keep = np.any(L != 0, axis=0)
    L = L[:, keep]
    r = L.shape[1]
    u, w = normal_rule(order)
    if r == 0:
        return f(jnp.zeros((1, Sigma.shape[0])))[0]
    grids = np.meshgrid(*([u] * r), indexing="ij")
    U = np.stack([g.reshape(-1) for g in grids], axis=-1)
    Wt = np.prod(np.stack(np.meshgrid(*([w] * r), indexing="ij"), -1).reshape(-1, r), axis=-1)
    Z = jnp.asarray(U @ L.T)
    return jnp.sum(f(Z) * Wt)


def pair_moments_quadrature(act, K, *, order: int | None = None):
    """(S, dS) with S_ab = <sigma(z_a) sigma(z_b)>_K and dS_ab = <sigma'(z_a) sigma'(z_b)>_K.

    K is an (N, N) kernel.  Closed forms are used when the activation has them; otherwise the
    2-d rule runs over the N(N+1)/2 distinct pairs once and the result is symmetrised.
    """
    K = jnp.asarray(K)
    d = jnp.diagonal(K)
    k11, k22 = d[:, None], d[None, :]
    if act.has_closed_form:
        k11, k22 = jnp.broadcast_to(k11, K.shape), jnp.broadcast_to(k22, K.shape)
        return act.nngp(k11, k22, K), act.dnngp(k11, k22, K)
    order = _auto_order(order, d, act=act)
    N = K.shape[0]
    iu, ju = np.triu_indices(N)
    sig, dsig = act.fn, derivative(act.fn)

    def f(z1, z2):
        return jnp.stack([sig(z1) * sig(z2), dsig(z1) * dsig(z2)])

    vals = expect2_multi(f, d[iu], d[ju], K[iu, ju], order=order)
    S = jnp.zeros_like(K).at[iu, ju].set(vals[0]).at[ju, iu].set(vals[0])
    dS = jnp.zeros_like(K).at[iu, ju].set(vals[1]).at[ju, iu].set(vals[1])
    return S, dS


def expect2_multi(f, k11, k22, k12, *, order: int):
    """Like :func:`expect2` for an integrand returning a leading axis of several functions."""
    u, w = normal_rule(order)
    a, b, c = _cholesky2(k11, k22, k12)
    P = a.shape[0]
    U, Vn = u[:, None], u[None, :]
    W = jnp.asarray(np.outer(w, w))

    def one_block(abc):  # (P,) pair parameters -> (m, P): m integrands summed over the n x n nodes
        a_, b_, c_ = abc
        z2 = b_[:, None, None] * U + c_[:, None, None] * Vn
        z1 = jnp.broadcast_to(a_[:, None, None] * U, z2.shape)
        return jnp.sum(f(z1, z2) * W, axis=(-2, -1))

    block = max(1, _BLOCK_NODES // (order * order))
    if P <= block:
        return one_block((a, b, c))
    nb = -(-P // block)
    pad = nb * block - P

    def padded(t):
        return jnp.pad(t, (0, pad)).reshape(nb, block)

    out = jax.lax.map(one_block, (padded(a), padded(b), padded(c)))  # (nb, m, block)
    m = out.shape[1]
    return jnp.moveaxis(out, 1, 0).reshape(m, -1)[:, :P]
