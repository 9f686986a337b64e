r"""Gaussian expectations of products of sigma and sigma' over up to four inputs: the sources of
the first-order tensors V, A, B, D, F (:mod:`efftheory.theory.finite`).

For a kernel K (N, N) the recursions need, for every index tuple (a1, a2, a3, a4),

    Mss = <s_a1 s_a2 s_a3 s_a4>,   Mds = <s'_a1 s'_a2 s_a3 s_a4>,   Mdd = <s'_a1 s'_a2 s'_a3 s'_a4>

with s = sigma(z), s' = sigma'(z), z ~ N(0, K).  Each value depends only on the *set* S of
distinct inputs in the tuple and on the exponents of sigma and sigma' carried by each member
of S (its "pattern").  :func:`source_moments` therefore loops over sets, not tuples: for every
set S of k distinct inputs it evaluates sigma and sigma' once on one quadrature grid and forms
every pattern that any of the three tensors needs from it (k = 4: the 8 patterns of 72
index tuples from one grid), then scatters the values into the three (N,)*4 tensors.

Rules
-----
* k <= 2: the exact two-dimensional rules of :mod:`efftheory.hermite` (polar for positively
  homogeneous sigma, the accurate trapezoid rule otherwise).
* k = 3, 4, smooth sigma: a tensor rule in the *eigenbasis* of the set's covariance,
  Sigma = Q diag(lam) Q^T, z = Q sqrt(lam) w with w standard normal, and a separate 1-d rule for
  each direction j.  Direction j enters every z_i with a coefficient at most
  s_j = sqrt(lam_j) max_i |Q_ij|, so an integrand analytic in the strip |Im z| < d0 (tanh:
  d0 = pi/2, the nearest singularity among the built-in activations) is analytic in
  |Im w_j| < d0 / s_j.  Two error models, each with the margin e^8 of :func:`gaussian.nodes_for`:

      trapezoid, step h on [-T, T]:  min_d exp(-(2 pi d/h - d^2/2)) (d0 - s_j d)^(-8)
                                     (a pole of order 8: four sech^2 factors on one direction)
      Gauss-Hermite, n nodes:        n! (s_j / d_GH)^{2n},   d_GH = 0.75 d0         (Cauchy bound)

  and the cheaper rule reaching ``tol`` is taken.  Correlated inputs (most of a deep network's
  inputs) have one large and several small eigenvalues, so their grids are a few thousand
  nodes instead of the 32^4 = 10^6 of an isotropic rule, at better accuracy.  A zero eigenvalue
  (collinear inputs) gets one node: the integral over the lower-dimensional marginal, no jitter.
* k = 3, 4, kinked sigma (relu and its step derivative, abs, user callables with
  ``smooth=False``): an isotropic tensor trapezoid rule in the same eigenbasis (96^3 and 32^4
  nodes); it converges like h^2 across the kinks (~1e-5 and 1e-4 relative).  Sets of rank <= 2
  (duplicate or collinear inputs) with positively homogeneous sigma use the exact polar rule,
  so that repeating an input reproduces the smaller computation to rounding.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import roots_hermitenorm

from .gaussian import derivative, normal_rule
from .hermite import _polar_monomials, _trapezoid_monomials, whiten2

__all__ = ["source_moments", "SOURCE_KINDS", "rule_for_scale"]

SOURCE_KINDS = {"ss": (0, 0, 0, 0), "ds": (1, 1, 0, 0), "dd": (1, 1, 1, 1)}
D0 = np.pi / 2          # strip half-width of tanh in z: the nearest singularity of the built-ins
TAIL = 8.0              # trapezoid directions span |w| <= 8 (mass beyond: 1.2e-15)
TOL = 1e-9              # default target accuracy of the 3- and 4-input rules
_MARGIN = 8.0           # log-margin of the Gauss-Hermite bound (as gaussian.nodes_for)
_POLE_ORDER = 8         # highest pole order of a product of four sigma' = sech^2 factors
_TRAP_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256)
_GH_LADDER = (1, 4, 8)
_KINKED_ORDER = {3: 96, 4: 32}  # isotropic trapezoid for kinked sigma
_KINKED_TAIL = 7.5
_GRID_BUDGET = 1 << 21  # nodes x sets evaluated at once (memory ~ 20 arrays of this size)


# ---------------------------------------------------------------------------------------------
# sets, patterns and the scatter into (N,)*4 tensors


def _surjections(k: int):
    """All maps of the four slots onto {0..k-1}."""
    return [m for m in itertools.product(range(k), repeat=4) if len(set(m)) == k]


@functools.lru_cache(maxsize=None)
def _pattern_table(k: int):
    """Patterns over k distinct inputs and, per kind and surjection, which pattern it uses.

    Returns (patterns (P, k, 2) ints: exponents of (sigma, sigma') per member,
             plan: list of (kind name, surjection m (4,), pattern id)).
    """
    pats, plan = {}, []
    for name, kinds in SOURCE_KINDS.items():
        for m in _surjections(k):
            e = np.zeros((k, 2), dtype=np.int64)
            for slot, i in enumerate(m):
                e[i, kinds[slot]] += 1
            key = tuple(e.reshape(-1))
            pid = pats.setdefault(key, len(pats))
            plan.append((name, np.array(m), pid))
    patterns = np.array(list(pats.keys()), dtype=np.int64).reshape(-1, k, 2)
    return patterns, plan


@functools.lru_cache(maxsize=16)
def _sets(N: int, k: int) -> np.ndarray:
    """All sorted k-subsets of range(N), (C(N, k), k)."""
    if k > N:
        return np.zeros((0, k), dtype=np.int64)
    return np.array(list(itertools.combinations(range(N), k)), dtype=np.int64).reshape(-1, k)


# ---------------------------------------------------------------------------------------------
# one-dimensional rules per direction


@functools.lru_cache(maxsize=None)
def _gh_rule(n: int):
    if n == 1:
        return np.zeros(1), np.ones(1)
    x, w = roots_hermitenorm(n)
    return x, w / w.sum()


@functools.lru_cache(maxsize=None)
def _trap_rule(n: int):
    return normal_rule(n, tail=TAIL)


def rule_for_scale(s: float, tol: float = TOL):
    """The cheapest 1-d rule ('gh', n) or ('trap', n) for a direction of scale s (see module
    docstring); s = 0 gives ('gh', 1), a single node at the mean."""
    s = float(s)
    if s <= 0.0:
        return ("gh", 1)
    logtol = math.log(tol) - _MARGIN
    gh = None
    dgh = 0.75 * D0
    for n in _GH_LADDER:
        if math.lgamma(n + 1) + 2 * n * math.log(s / dgh) <= logtol:
            gh = n
            break
    # trapezoid with step h: the integrand f(w) exp(-w^2/2) is analytic in |Im w| < d0/s, the
    # Gaussian grows like exp(d^2/2) on |Im w| = d and f like (d0 - s d)^(-p) near a pole of
    # order p (p = 8: four sigma' = sech^2 factors sharing a direction), so the error is at most
    # min_d exp(-(2 pi d/h - d^2/2)) (d0 - s d)^(-p).
    trap = None
    dgrid = np.linspace(0.0, 1.0, 201)[1:-1] * min(D0 / s, 40.0)
    for m in _TRAP_LADDER:
        h = 2 * TAIL / m
        log_err = -(2 * np.pi * dgrid / h - dgrid**2 / 2) - _POLE_ORDER * np.log(np.maximum(D0 - s * dgrid, 1e-300))
        if np.min(log_err) <= math.log(tol) + 1.0:
            trap = m
            break
    if gh is not None and (trap is None or gh <= trap):
        return ("gh", gh)
    if trap is None:
        trap = _TRAP_LADDER[-1]
    return ("trap", trap)


def _rule(r):
    kind, n = r
    if kind == "kink":
        return normal_rule(n, tail=_KINKED_TAIL)
    return _gh_rule(n) if kind == "gh" else _trap_rule(n)


# ---------------------------------------------------------------------------------------------
# the grid kernel


def _pad_size(n: int) -> int:
    """Next size in 2^m, 1.5 * 2^m: few compiled shapes, at most 33% padding."""
    p = 1 << max(0, (n - 1).bit_length())
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p


@functools.lru_cache(maxsize=256)
def _grid(rules: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Tensor grid of 1-d rules, padded to :func:`_pad_size` nodes: X (k, Gp), W (Gp,)."""
    xs, ws = zip(*(_rule(r) for r in rules))
    X = np.stack(np.meshgrid(*xs, indexing="ij"), 0).reshape(len(rules), -1)
    W = functools.reduce(np.multiply.outer, ws).reshape(-1)
    Gp = _pad_size(W.size)
    X = np.concatenate([X, np.zeros((len(rules), Gp - W.size))], 1)
    return X, np.concatenate([W, np.zeros(Gp - W.size)])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _grid_moments(sig, pattern_key, L, X, W):
    """vals[c, p] = sum_g W_g prod_i sigma(z_cig)^e_pi0 sigma'(z_cig)^e_pi1,  z_c = L_c X.

    L (b, k, k) per-set factors, X (k, G) and W (G,) one grid shared by the batch (an argument,
    so every grid of the same padded size shares one compiled kernel); ``pattern_key`` the static
    pattern table (P, k, 2) as nested tuples.
    """
    k = L.shape[1]
    z = jnp.einsum("cij,jg->cig", L, X)  # (b, k, G)
    s, d = jax.jvp(sig, (z,), (jnp.ones_like(z),))  # sigma and sigma' in one pass
    pw = {}

    def power(i, e0, e1):
        key = (i, e0, e1)
        if key not in pw:
            f = None
            for base, e in ((s[:, i], e0), (d[:, i], e1)):
                for _ in range(e):
                    f = base if f is None else f * base
            pw[key] = f
        return pw[key]

    out = []
    for pat in pattern_key:
        f = W
        for i in range(k):
            f = f * power(i, pat[i][0], pat[i][1])
        out.append(jnp.sum(f, axis=-1))
    return jnp.stack(out, -1)  # (b, P)


def _eval_sets(sig, patterns, Ls, rules):
    """Pattern moments (C, P) of sets with factors Ls (C, k, k) and per-direction 1-d rules
    ``rules`` (C rows of k rules).  Sets sharing rules share a grid; the batch size depends only
    on the padded grid size, so layers and calls share compiled kernels."""
    C, k = Ls.shape[0], Ls.shape[1]
    key = tuple(tuple(tuple(int(v) for v in row) for row in pat) for pat in patterns)
    out = np.empty((C, len(patterns)))
    groups: dict = {}
    for c, row in enumerate(rules):
        groups.setdefault(tuple(row), []).append(c)
    for row, members in groups.items():
        members = np.asarray(members)
        X, W = _grid(row)
        Xj, Wj = jnp.asarray(X), jnp.asarray(W)
        batch = 1 << max(0, min(8, (_GRID_BUDGET // W.size).bit_length() - 1))
        Lm = Ls[members]
        for start in range(0, len(members), batch):
            Lb = Lm[start:start + batch]
            n = Lb.shape[0]
            if n < batch:
                Lb = np.concatenate([Lb, np.zeros((batch - n, k, k))])
            out[members[start:start + n]] = np.asarray(_grid_moments(sig, key, jnp.asarray(Lb), Xj, Wj))[:n]
    return out


# ---------------------------------------------------------------------------------------------
# per set size


def _eigen_factor(S):
    """z = L w for covariances S (C, k, k): L = Q sqrt(lam) with the largest direction first,
    and the per-direction scales s_j = sqrt(lam_j) max_i |Q_ij|."""
    lam, Q = np.linalg.eigh(S)
    lam = lam[:, ::-1]
    Q = Q[:, :, ::-1]
    top = np.maximum(lam[:, :1], 0.0)
    lam = np.where(lam > 1e-13 * top, lam, 0.0)
    L = Q * np.sqrt(lam)[:, None, :]
    scale = np.sqrt(lam) * np.max(np.abs(Q), axis=1)
    return L, scale


def _moments_kd(act, sig, dsig, K, sets, patterns, tol):
    """(C, P) pattern moments over sets of k >= 3 distinct inputs."""
    C, k = sets.shape
    S = K[sets[:, :, None], sets[:, None, :]]
    L, scale = _eigen_factor(S)
    if not act.smooth:
        n = _KINKED_ORDER[k]
        rules = [(("kink", n),) * k] * C
        if act.homogeneous:
            # rank <= 2 (duplicate or collinear inputs in the set): the exact polar rule
            low = np.nonzero(np.count_nonzero(scale > 0, axis=1) <= 2)[0]
            if len(low):
                high = np.setdiff1d(np.arange(C), low)
                vals = np.empty((C, len(patterns)))
                vals[low] = _polar_sets(sig, dsig, L[low, :, :2], patterns)
                if len(high):
                    vals[high] = _eval_sets(sig, patterns, L[high], [rules[0]] * len(high))
                return vals
    else:
        order = np.argsort(-scale, axis=1)  # widest direction first: fewer distinct size classes
        L = np.take_along_axis(L, order[:, None, :], axis=2)
        scale = np.take_along_axis(scale, order, axis=1)
        rules = [tuple(rule_for_scale(s, tol) for s in row) for row in scale]
    return _eval_sets(sig, patterns, L, rules)


def _polar_sets(sig, dsig, L2, patterns):
    """Pattern moments (C, P) over sets whose covariance has rank <= 2, z_i = L2_i . (u, v), for
    positively homogeneous sigma (sigma of degree 1, sigma' of degree 0): the radial integral
    is closed, the angular one Gauss-Legendre on each arc between the angles where some z_i
    vanishes (exact to rounding: the integrand is a trigonometric polynomial there)."""
    C, k, _ = L2.shape
    x, wq = np.polynomial.legendre.leggauss(24)
    br = np.concatenate([np.arctan2(-L2[:, :, 0], L2[:, :, 1]), np.arctan2(-L2[:, :, 0], L2[:, :, 1]) + np.pi], 1)
    br = np.mod(br, 2 * np.pi)
    edges = np.sort(np.concatenate([np.zeros((C, 1)), br, np.full((C, 1), 2 * np.pi)], 1), 1)
    lo, hi = edges[:, :-1], edges[:, 1:]
    phi = (lo + hi)[..., None] / 2 + (hi - lo)[..., None] / 2 * x  # (C, arcs, q)
    wphi = (hi - lo)[..., None] / 2 * wq
    c, s_ = np.cos(phi), np.sin(phi)
    z = L2[:, :, 0, None, None] * c[:, None] + L2[:, :, 1, None, None] * s_[:, None]  # (C, k, arcs, q)
    sv, dv = np.asarray(sig(jnp.asarray(z))), np.asarray(dsig(jnp.asarray(z)))
    out = np.empty((C, len(patterns)))
    for pi, pat in enumerate(patterns):
        f = wphi.copy()
        for i in range(k):
            f = f * sv[:, i] ** pat[i][0] * dv[:, i] ** pat[i][1]
        p = int(pat[:, 0].sum())
        out[:, pi] = f.sum(axis=(1, 2)) * 2.0 ** (p / 2) * math.gamma(p / 2 + 1) / (2 * np.pi)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _pair_pattern(sig, dsig, degree, order, L, e1, e2):
    """<g_e1(z1) g_e2(z2)>, g_e = sigma^e0 sigma'^e1, for a batch of pairs (exact 2-d rules)."""

    def factor(e):
        def g(z):
            ee = e.reshape(e.shape[:1] + (1,) * (z.ndim - 1) + (2,))
            return _ipow(sig(z), ee[..., 0]) * _ipow(dsig(z), ee[..., 1])
        return g

    if degree is not None:
        return _polar_monomials(factor(e1), factor(e2), L, degree, maxdeg=0)[..., 0, 0]
    return _trapezoid_monomials(factor(e1), factor(e2), L, order, maxdeg=0)[..., 0, 0]


def _ipow(x, e):
    x2 = x * x
    return jnp.select([e == 0, e == 1, e == 2, e == 3], [jnp.ones_like(x), x, x2, x2 * x], x2 * x2)


def _moments_low(act, sig, dsig, K, sets, patterns, order):
    """(C, P) pattern moments over sets of one or two inputs (exact 2-d rules)."""
    C, k = sets.shape
    P = len(patterns)
    i1 = np.repeat(sets[:, 0], P)
    i2 = np.repeat(sets[:, -1], P)
    e1 = np.tile(patterns[:, 0], (C, 1))
    e2 = np.tile(patterns[:, 1] if k == 2 else np.zeros_like(patterns[:, 0]), (C, 1))
    L = np.asarray(whiten2(K[i1, i1], K[i2, i2], K[i1, i2])[0])
    out = np.zeros(C * P)
    if act.homogeneous:
        deg = (e1[:, 0] + e2[:, 0])
        for p in np.unique(deg):
            m = np.nonzero(deg == p)[0]
            out[m] = _padded(lambda *a: _pair_pattern(sig, dsig, int(p), None, *a), L[m], e1[m], e2[m])
    else:
        out[:] = _padded(lambda *a: _pair_pattern(sig, dsig, None, order, *a), L, e1, e2)
    return out.reshape(C, P)


def _padded(fn, *arrays):
    n = arrays[0].shape[0]
    size = max(8, 1 << (n - 1).bit_length())
    pad = [np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)]) for a in arrays]
    return np.asarray(fn(*(jnp.asarray(a) for a in pad)))[:n]


# ---------------------------------------------------------------------------------------------
# public


def source_moments(act, K, *, tol: float = TOL, order2: int | None = None):
    """Mss, Mds, Mdd (each (N,)*4, float64) at kernel K (N, N): see the module docstring.

    Args:
      act: an :class:`efftheory.activations.Activation`.
      K: (N, N) covariance of the preactivations.
      tol: target accuracy of the 3- and 4-input rules for smooth sigma.
      order2: nodes per direction of the 2-input trapezoid rule (smooth, non-homogeneous sigma);
        default :func:`efftheory.gaussian.rule_size` at max diag K.
    """
    from .gaussian import rule_size

    K = np.asarray(K, dtype=np.float64)
    N = K.shape[0]
    sig, dsig = act.fn, derivative(act.fn)
    if order2 is None and not act.homogeneous:
        order2 = rule_size(act, float(np.max(np.diag(K))))
    out = {name: np.empty((N,) * 4) for name in SOURCE_KINDS}
    for k in range(1, min(N, 4) + 1):
        sets = _sets(N, k)
        patterns, plan = _pattern_table(k)
        if k <= 2:
            vals = _moments_low(act, sig, dsig, K, sets, patterns, order2)
        else:
            vals = _moments_kd(act, sig, dsig, K, sets, patterns, tol)
        for name, m, pid in plan:
            idx = sets[:, m]
            out[name][idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = vals[:, pid]
    return out["ss"], out["ds"], out["dd"]
