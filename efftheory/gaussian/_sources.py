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
* k <= 2: the exact two-dimensional rules of :mod:`efftheory.gaussian._hermite` (polar for positively
  homogeneous sigma, the accurate trapezoid rule otherwise).
* k = 3, 4, smooth sigma: a tensor rule in the *eigenbasis* of the set's covariance,
  Sigma = Q diag(lam) Q^T, z = Q sqrt(lam) w with w standard normal, and a separate 1-d rule for
  each direction j.  Direction j enters every z_i with a coefficient at most
  s_j = sqrt(lam_j) max_i |Q_ij|, so an integrand analytic in the strip |Im z| < d0 (tanh:
  d0 = pi/2, the nearest singularity among the built-in activations) is analytic in
  |Im w_j| < d0 / s_j.  Two error models, each with the margin e^8 of :func:`gaussian.nodes_for`:

      trapezoid, step h on [-T, T]:  min_d exp(-(2 pi d/h - d^2/2)) (d0 - s_j d)^(-8)
                                     (T from tol and the growth of sigma: :func:`_tail_for`)
                                     (a pole of order 8: four sech^2 factors on one direction)
      Gauss-Hermite, n nodes:        n! (s_j / d_GH)^{2n},   d_GH = 0.75 d0         (Cauchy bound)

  and the cheaper rule reaching ``tol`` is taken.  Correlated inputs (most of a deep network's
  inputs) have one large and several small eigenvalues, so their grids are a few thousand
  nodes instead of the 32^4 = 10^6 of an isotropic rule, at better accuracy.  A zero eigenvalue
  (collinear inputs) gets one node: the integral over the lower-dimensional marginal, no jitter.
* k = 3, 4, smooth sigma, nested (:func:`_smooth_sets`): the members but one in the eigenbasis
  of their block, the last as its regression on them plus a conditional deviation sd x, summed
  over x first.  A set whose outer grid is large against its table (:mod:`efftheory.gaussian._tables`:
  the conditional moments h_e(mu) tabulated on [-R, R], local degree-5 interpolation with an
  error bound inside tol / e) looks them up instead of summing nk nodes at every outer node.
* k = 3, 4, kinked positively homogeneous sigma (relu, leaky_relu, abs, callables with
  :attr:`Activation.homogeneous`, whatever their ``smooth`` flag): exact
  (:func:`_homogeneous_sets`, :mod:`efftheory.gaussian._orthant`): sigma = c+ z / c- z on each sign orthant,
  so every pattern is a sum of orthant moments E[y^m 1{y > 0}], reduced by Gaussian integration by
  parts to orthant probabilities (closed forms up to three inputs, one Plackett integral with an
  error estimate for four).  Sets of rank <= 2 (duplicate or collinear inputs) use the exact polar
  rule; zero-variance and exactly collinear members are merged first, so that repeating an input
  reproduces the smaller computation.  Error estimates above ``tol``: :class:`AccuracyWarning`.
* k = 3, 4, other kinked sigma (user callables with ``smooth=False`` that are not homogeneous, e.g.
  clip): an isotropic tensor trapezoid rule in the same eigenbasis (96^3 and 32^4 nodes), not split
  at the kinks; it converges like h^2 (~1e-5 and 1e-4 relative, worse for nearly collinear inputs).
  Its error is estimated from the same rule with ~2/3 of the nodes and reported by an
  :class:`AccuracyWarning` when it exceeds ``tol``.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import roots_hermitenorm

from .._cancel import check_stop
from .._precision import enable_x64 as _enable_x64
from ._constants import FIXED_TAIL, SOURCE_TAIL, SOURCE_TOL
from ._hermite import polar_monomials_jnp, trapezoid_monomials_jnp, whiten2
from ._rules import derivative, normal_rule
from ._tables import HOST_BUDGET as _HOST_BUDGET
from ._tables import (
    INNER_BLOCK,
    ROW_GRID,
    ROW_NODES,
    _members,
    inner_blocks,
    monomial,
    over_items,
    pattern_sums,
    row_step,
    sd_values,
    sharded,
    table_spacing,
)
from ._tables import TABLE_ROWS as _TABLE_ROWS
from ._tables import host_patterns as _host_patterns
from ._tables import host_tabled as _host_tabled
from ._tables import pair_grid as _pair_grid_np
from ._tables import row_steps as _row_steps
from ._tables import run_tabled as _run_tabled
from ._tables import run_tabled_rows as _run_tabled_rows
from ._tables import settle as _settle
from ._tables import split as _split
from ._tables import split_rows as _split_rows
from ._tables import table_points as _table_points

__all__ = ["source_moments", "SOURCE_KINDS", "rule_for_scale", "AccuracyWarning"]

SOURCE_KINDS = {"ss": (0, 0, 0, 0), "ds": (1, 1, 0, 0), "dd": (1, 1, 1, 1)}
D0 = np.pi / 2          # strip half-width of tanh in z: the nearest singularity of the built-ins
TAIL = SOURCE_TAIL      # 8: widest trapezoid range |w| <= 8 (mass beyond: 1.2e-15); _tail_for may cut it
TOL = SOURCE_TOL        # 1e-9: default target accuracy of the 3- and 4-input rules
_MARGIN = 8.0           # log-margin of the Gauss-Hermite bound (as gaussian.nodes_for)
_POLE_ORDER = 8         # highest pole order of a product of four sigma' = sech^2 factors
_TRAP_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256)
_GH_LADDER = (1, 4, 8)
_KINKED_ORDER = {3: 96, 4: 32}  # isotropic trapezoid for kinked sigma that is not homogeneous
_KINKED_COARSE = {3: 64, 4: 22}  # its error estimate: the same rule with ~2/3 of the nodes
_KINKED_TAIL = FIXED_TAIL  # 7.5: the isotropic kinked rule's range (._constants)
_GRID_BUDGET = 1 << 21  # nodes x sets evaluated at once (memory ~ 20 arrays of this size)
_GRID_CHUNK = 1 << 16   # nodes per loop step of the tensor-grid kernel


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
def _trap_rule(n: int, tail: float = TAIL):
    return normal_rule(n, tail=tail)


def rule_for_scale(s: float, tol: float = TOL, tail: float = TAIL):
    """The cheapest 1-d rule ('gh', n) or ('trap', n) for a direction of scale s (see module
    docstring); s = 0 gives ('gh', 1), a single node at the mean.  One entry of
    :func:`_rules_for_scales`, which states the error models."""
    kind, n = _rules_for_scales(np.array([float(s)]), tol, tail=tail)
    return ("gh", "trap")[int(kind[0])], int(n[0])


def _rule(r):
    """Nodes and weights of a rule ("gh", n), ("trap", n[, tail]) or ("kink", n)."""
    kind, n = r[0], r[1]
    if kind == "kink":
        return normal_rule(n, tail=_KINKED_TAIL)
    return _gh_rule(n) if kind == "gh" else _trap_rule(n, *r[2:])


_TAIL_MIN = 5.0


def _reach(k: int, vmax: float) -> float:
    """2 sqrt(k vmax) TAIL: twice the largest |z| a grid of half-width TAIL reaches for sets of k
    inputs whose largest variance is vmax, the range over which sigma is bounded (:func:`_tail_for`,
    :func:`efftheory.gaussian._tables.table_spacing`)."""
    return 2.0 * TAIL * math.sqrt(k * max(vmax, 0.0))


def _tail_for(sig, k: int, R: float, tol: float) -> float:
    """Half-width T <= TAIL of the trapezoid directions for sets of k inputs whose grids reach
    |z| <= R (:func:`_reach`).

    Cutting each of the k directions at |w| = T drops Gaussian mass at most 2 phi(T) / T per
    direction (Mills' ratio), times the largest |integrand|, a product of four sigma or sigma'.
    That is bounded by g^4, g = max(|sigma|, |sigma'|) over |z| <= R (sigma evaluated there).  T is the
    smallest multiple of 0.05 in [5, TAIL] with 2 k phi(T) / T g^4 <= tol / e; bounded sigma
    (tanh: g = 1) at tol = 1e-9 gets T = 6.55, a growing one (gelu at K ~ 1) about TAIL."""
    s, d = sd_values(sig, np.linspace(-R, R, 4001))  # numpy in, numpy out: one compiled evaluator per sigma
    g = float(np.max(np.maximum(np.abs(s), np.abs(d))))
    if not math.isfinite(g):
        return TAIL
    logg = 4.0 * math.log(max(g, 1e-300))
    for T in np.arange(_TAIL_MIN, TAIL + 1e-9, 0.05):
        T = float(T)
        if math.log(2 * k) - T * T / 2 - 0.5 * math.log(2 * math.pi) - math.log(T) + logg <= math.log(tol) - 1.0:
            return round(T, 2)
    return TAIL


# ---------------------------------------------------------------------------------------------
# the grid kernel


@functools.lru_cache(maxsize=None)
def _device_mesh():
    """A 1-d mesh ("d",) over the local devices of JAX's default backend: the nested kernel runs
    one shard of every call on each (on a CPU the devices are the cores :mod:`efftheory` asks JAX
    for at import, ``jax_num_cpu_devices``).  One compiled program serves all devices, and every
    item is computed by the same code whichever device holds it, so results do not depend on the
    device count."""
    return jax.sharding.Mesh(np.array(jax.local_devices()), ("d",))


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _grid_moments(sig, pattern_key, nchunks, L, X, W):
    """vals[c, p] = sum_g W_g prod_i sigma(z_cig)^e_pi0 sigma'(z_cig)^e_pi1,  z_c = L_c X.

    L (b, k, k) per-set factors, X (k, G) and W (G,) one grid shared by the batch (an argument,
    so every grid of the same padded size shares one compiled kernel); ``pattern_key`` the static
    pattern table (P, k, 2) as nested tuples.
    """
    k = L.shape[1]
    m = X.shape[1] // nchunks
    Xs = X.reshape(k, nchunks, m).transpose(1, 0, 2)
    Ws = W.reshape(nchunks, m)

    def chunk(acc, xw):  # the nodes chunk by chunk: the working set stays in cache
        return acc + _grid_chunk(sig, pattern_key, L, *xw), None

    acc = jnp.zeros((L.shape[0], len(pattern_key)), X.dtype)
    return jax.lax.scan(chunk, acc, (Xs, Ws))[0]


def _grid_chunk(sig, pattern_key, L, X, W):
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
    pending = []
    for c, row in enumerate(rules):
        groups.setdefault(tuple(row), []).append(c)
    for row, members in groups.items():
        members = np.asarray(members)
        X, W = _grid(row)
        Xj, Wj = jnp.asarray(X), jnp.asarray(W)
        batch = 1 << max(0, min(8, (_GRID_BUDGET // W.size).bit_length() - 1))
        batch = min(batch, 1 << max(0, (len(members) - 1).bit_length()))  # no all-padding batches
        nchunks = 1
        while batch * W.size // nchunks > _GRID_CHUNK and (W.size // nchunks) % 2 == 0:
            nchunks *= 2
        Lm = Ls[members]
        for start in range(0, len(members), batch):
            Lb = Lm[start:start + batch]
            n = Lb.shape[0]
            if n < batch:
                Lb = np.concatenate([Lb, np.zeros((batch - n, k, k))])
            pending.append((members[start:start + n], _grid_moments(sig, key, nchunks, jnp.asarray(Lb), Xj, Wj)))
    for rows, res in pending:
        out[rows] = np.asarray(res)[:len(rows)]
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


def _moments_kd(act, sig, dsig, K, sets, patterns, tol, setup, host: bool = False):
    """(C, P) pattern moments over sets of k >= 3 distinct inputs (``setup``: :func:`_smooth_setup`
    of all the sets of this size, for smooth sigma).  Kinked sigma: every set whose error estimate
    exceeds ``tol`` is reported by an :class:`AccuracyWarning` (:func:`_check_tol`)."""
    C, k = sets.shape
    S = K[sets[:, :, None], sets[:, None, :]]
    if _exact_kinked(act):
        L, scale = _eigen_factor(S)
        vals = np.empty((C, len(patterns)))
        err = np.zeros((C, len(patterns)))
        # rank <= 2 (duplicate or collinear inputs in the set): the exact polar rule
        low = np.count_nonzero(scale > 0, axis=1) <= 2
        if np.any(low):
            vals[low] = _polar_sets(sig, dsig, L[low, :, :2], patterns)
        if not np.all(low):
            vals[~low], err[~low] = _homogeneous_sets(sig, dsig, S[~low], patterns)
        _check_tol(act, sets, err, tol, "exact orthant reduction (Plackett quadrature for P4)")
        return vals
    if act.smooth:
        return _smooth_sets(sig, S, patterns, tol, half=act.symmetric, setup=setup, host=host)
    L, _ = _eigen_factor(S)
    vals = _eval_sets(sig, patterns, L, [(("kink", _KINKED_ORDER[k]),) * k] * C)
    # kinks off the coordinate planes of the rule: it converges like h^2, so the difference from the
    # rule with 2/3 of the nodes, times h^2 / (h_coarse^2 - h^2) = 0.8, estimates its error
    coarse = _eval_sets(sig, patterns, L, [(("kink", _KINKED_COARSE[k]),) * k] * C)
    _check_tol(act, sets, 0.8 * np.abs(vals - coarse), tol, f"isotropic trapezoid {_KINKED_ORDER[k]}^{k} "
               "(not split at the kinks; error estimated from a coarser rule)")
    return vals


class AccuracyWarning(UserWarning):
    """Some Gaussian integrals of :func:`source_moments` could not be computed to the requested tol."""


def _check_tol(act, sets, err, tol, route: str) -> None:
    """Warn (:class:`AccuracyWarning`) naming the sets of inputs whose estimated error exceeds tol."""
    bad = np.max(err, axis=1) > tol
    if not np.any(bad):
        return
    import warnings

    worst = int(np.argmax(np.max(err, axis=1)))
    warnings.warn(
        f"tol: {int(bad.sum())} of {len(sets)} sets of {sets.shape[1]} inputs of {act.name} miss tol = {tol:.1e} "
        f"({route}): estimated error up to {float(np.max(err)):.2e}, "
        f"worst at inputs {tuple(int(i) for i in sets[worst])}",
        AccuracyWarning, stacklevel=4)


def _exact_kinked(act) -> bool:
    """sigma is positively homogeneous of degree one with a kink (c+ != c-): the exact route."""
    if not act.homogeneous:
        return False
    cp, cm = _slopes(act.fn)
    return cp != cm


@functools.lru_cache(maxsize=256)
def _slopes(fn):
    """c+ = sigma(1) and c- = -sigma(-1) of a positively homogeneous sigma (sigma = c+ z / c- z)."""
    with _enable_x64(True):  # whatever the caller's mode: c- = 0.2 must not be float32's 0.2000000030
        v = np.asarray(fn(jnp.asarray([1.0, -1.0], dtype=jnp.float64)), dtype=np.float64)
    return float(v[0]), float(-v[1])


_ORTHANT_ROWS = 1 << 13  # (set, orthant) rows reduced at once: ~20 MB of conditional covariances
_COLLINEAR = 1e-13  # 1 - |rho| below this: z_j = alpha z_i exactly (rounding-level, as _eigen_factor)


def _homogeneous_sets(sig, dsig, S, patterns):
    """Pattern moments (C, P) and their error estimates for degree-1 positively homogeneous sigma over
    sets of rank >= 3 with covariances S (C, k, k): the sign-orthant expansion of :mod:`efftheory.gaussian._orthant`.

    Members of zero variance contribute sigma(0)^e0 sigma'(0)^e1 (sigma(0) = 0), and exactly collinear
    members z_j = alpha z_i are merged into z_i (sigma(alpha z) = c_{sign(alpha z)} alpha z on each
    orthant), so the orthant moments see only distinct, non-collinear inputs."""
    from ._orthant import truncated_moments

    C, k, _ = S.shape
    cp, cm = _slopes(sig)
    with _enable_x64(True):
        d0 = float(np.asarray(dsig(jnp.asarray(0.0, dtype=jnp.float64))))
    var = np.diagonal(S, axis1=1, axis2=2)
    zero = var <= 1e-13 * np.max(var, axis=1, keepdims=True)
    sd = np.sqrt(np.where(zero, 1.0, var))
    rho = S / sd[:, :, None] / sd[:, None, :]
    rep = np.tile(np.arange(k), (C, 1))
    alpha = np.ones((C, k))
    for j in range(k):
        for i in range(j - 1, -1, -1):  # the first (lowest) collinear member represents j
            hit = ~zero[:, j] & ~zero[:, i] & (rep[:, i] == i) & (1.0 - np.abs(rho[:, i, j]) <= _COLLINEAR)
            rep[:, j] = np.where(hit, i, rep[:, j])
            alpha[:, j] = np.where(hit, S[:, i, j] / np.where(zero[:, i], 1.0, var[:, i]), alpha[:, j])
    rep = np.where(zero, -1, rep)
    key = np.concatenate([rep, np.sign(alpha).astype(np.int64)], 1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    vals = np.zeros((C, len(patterns)))
    errs = np.zeros((C, len(patterns)))
    for g, row in enumerate(uniq):
        rows = np.nonzero(inv == g)[0]
        reps = [j for j in range(k) if row[j] == j]
        kk = len(reps)
        Sg = S[rows][:, reps][:, :, reps]
        al = alpha[rows]
        orthants = [s for s in itertools.product((1, -1), repeat=kk) if s[0] == 1]  # M(s) = M(-s)
        terms = []  # (pattern, orthant id, multi-index, coefficient (rows,))
        for p, pat in enumerate(patterns):
            if any(row[j] == -1 and pat[j][0] > 0 for j in range(k)):
                continue  # sigma(0) = 0
            base = np.full(rows.size, d0 ** sum(int(pat[j][1]) for j in range(k) if row[j] == -1))
            m = tuple(int(sum(pat[j][0] for j in range(k) if row[j] == reps[i])) for i in range(kk))
            for o, s in enumerate(orthants):
                coef = np.zeros(rows.size)
                for sgn in (1, -1):
                    c = base.copy()
                    for i, r in enumerate(reps):
                        si = sgn * s[i]
                        c = c * si ** m[i]
                        for j in range(k):
                            if row[j] != r:
                                continue
                            e0, e1 = int(pat[j][0]), int(pat[j][1])
                            slope = cp if si * np.sign(al[:, j][0]) > 0 else cm
                            c = c * slope ** (e0 + e1) * al[:, j] ** e0
                    coef = coef + c
                if np.any(coef != 0.0):
                    terms.append((p, o, m, coef))
        if not terms:
            continue
        used = sorted({o for _, o, _, _ in terms})
        ms = sorted({m for _, _, m, _ in terms})
        D = np.array([orthants[o] for o in used], dtype=np.float64)  # (U, kk)
        Sf = (Sg[None] * D[:, None, :, None] * D[:, None, None, :]).reshape(-1, kk, kk)
        parts = [truncated_moments(Sf[i:i + _ORTHANT_ROWS], ms) for i in range(0, Sf.shape[0], _ORTHANT_ROWS)]
        mv, me = np.concatenate([v for v, _ in parts]), np.concatenate([e for _, e in parts])
        mv, me = mv.reshape(len(used), rows.size, -1), me.reshape(len(used), rows.size, -1)
        for p, o, m, coef in terms:
            u, c = used.index(o), ms.index(m)
            vals[rows, p] += coef * mv[u, :, c]
            errs[rows, p] += np.abs(coef) * me[u, :, c]
    return vals, errs


# ---------------------------------------------------------------------------------------------
# smooth sigma: "eigen block + conditional last member" factors and the nested kernel


def _rules_for_scales(s, tol: float = TOL, fine: bool = False, tail: float = TAIL):
    """The cheapest 1-d rule per direction scale s (any shape): (kind, n) arrays, kind 0 =
    Gauss-Hermite, 1 = trapezoid; s <= 0 gives one Gauss-Hermite node at the mean.

    Gauss-Hermite with n nodes: n! (s / d_GH)^{2n} <= tol e^-8 (Cauchy bound, d_GH = 0.75 d0).
    Trapezoid with step h: the integrand f(w) exp(-w^2/2) is analytic in |Im w| < d0/s, the
    Gaussian grows like exp(d^2/2) on |Im w| = d and f like (d0 - s d)^(-p) near a pole of order
    p (p = 8: four sigma' = sech^2 factors sharing a direction), so the error is at most
    min_d exp(-(2 pi d/h - d^2/2)) (d0 - s d)^(-p) <= e tol.  The cheaper rule wins (ties: GH).

    ``tail``: the half-width T of the trapezoid rules (nodes on [-T, T]; :func:`_tail_for`).
    ``fine``: any n up to 8 Gauss-Hermite nodes and any even number of trapezoid nodes from 16
    to 256 (the smallest that meets the same error model), instead of the ladders.  Used for
    the widest direction of a set, whose node count costs no compiled shape."""
    s = np.asarray(s, dtype=np.float64)
    shape = s.shape
    s = s.reshape(-1)
    kind = np.zeros(s.size, dtype=np.int64)
    n = np.ones(s.size, dtype=np.int64)
    pos = s > 0.0
    if not np.any(pos):
        return kind.reshape(shape), n.reshape(shape)
    u, inv = np.unique(s[pos], return_inverse=True)
    logtol = math.log(tol) - _MARGIN
    dgh = 0.75 * D0
    gh = np.zeros(u.size, dtype=np.int64)
    for m in reversed(range(1, _GH_LADDER[-1] + 1) if fine else _GH_LADDER):  # the smallest n wins
        gh = np.where(math.lgamma(m + 1) + 2 * m * np.log(u / dgh) <= logtol, m, gh)
    need = _trap_need(u, tail, tol)
    if fine:
        m = 2 * np.ceil(np.maximum(need, _TRAP_LADDER[0]) / 2).astype(np.int64)
    else:
        ladder = np.array(_TRAP_LADDER)
        m = ladder[np.minimum(np.searchsorted(ladder, need, side="left"), ladder.size - 1)]
        m = np.where(need <= ladder[-1], m, ladder[-1] + 1)
    trap = np.where(m <= _TRAP_LADDER[-1], m, 0)
    use_gh = (gh > 0) & ((trap == 0) | (gh <= trap))
    trap = np.where(trap == 0, _TRAP_LADDER[-1], trap)
    kind[pos] = np.where(use_gh, 0, 1)[inv]
    n[pos] = np.where(use_gh, gh, trap)[inv]
    return kind.reshape(shape), n.reshape(shape)


def _trap_need(u, tail: float, tol: float) -> np.ndarray:
    """Trapezoid nodes the error model needs for direction scales u > 0 (:func:`_rules_for_scales`).

    m nodes (h = 2T/m) meet the model iff -(2 pi d m / (2T) - d^2/2) - pole(d) <= log(tol) + 1 for
    some d of a grid of 199 points in (0, min(d0/u, 40)), i.e. iff m >= need =
    min_d T (d^2/2 - pole(d) - log(tol) - 1) / (pi d), pole(d) = p log(d0 - u d).  Jitted (one fused
    pass; numpy spent ~2 s per layer on its u.size x 199 temporaries at N = 32), on chunks of
    _NEED_CHUNK scales (padded with ones): one compiled program whatever u.size."""
    n = u.size
    size = -(-n // _NEED_CHUNK) * _NEED_CHUNK
    up = np.concatenate([u, np.ones(size - n)])
    parts = [_trap_need_kernel(up[i:i + _NEED_CHUNK], float(tail), math.log(tol)) for i in range(0, size, _NEED_CHUNK)]
    return np.concatenate([np.asarray(p) for p in parts])[:n]


_NEED_CHUNK = 1024


@jax.jit
def _trap_need_kernel(u, tail, logtol):
    dgrid = jnp.asarray(np.linspace(0.0, 1.0, 201)[1:-1])[None, :] * jnp.minimum(D0 / u, 40.0)[:, None]
    pole = _POLE_ORDER * jnp.log(jnp.maximum(D0 - u[:, None] * dgrid, 1e-300))
    return jnp.min(tail * (dgrid**2 / 2 - pole - logtol - 1.0) / (np.pi * dgrid), axis=1)


def _conditional_factor(S, tol, tail: float = TAIL, dx: float = 0.0):
    """Factors z = L w of the covariances S (C, k, k) in which only the last member depends on the
    last direction: members other than ``last`` in the eigenbasis of their block (widest direction
    first), the member ``last`` as their linear regression plus its conditional deviation.

    The last member is chosen per set to minimise the work of the nested rule (tanh evaluations:
    the full grid for the last member, the outer grid for the others), and with ``dx`` > 0 (the
    table spacing of :func:`efftheory.gaussian._tables.table_spacing`) whether its conditional moments are
    tabulated (ntab table points of nk inner nodes each, then one cell lookup per outer node)
    instead.  Returns perm (C, k): set positions in kernel order (``last`` at the end); L (C, k, k)
    in that order; kind, n (C, k): the 1-d rule of each direction (the outer ones sorted widest
    first, the last one the conditional direction); ntab (C,): table points (0: not tabulated);
    R (C,): the half-width of the table, sum_j |c_j| T_j over the outer directions (at least 1e-3).
    """
    C, k, _ = S.shape
    best = None
    for j in range(k):
        rest = [i for i in range(k) if i != j]
        A = S[:, rest][:, :, rest]
        b = S[:, rest, j]
        lam, Q = np.linalg.eigh(A)
        lam, Q = lam[:, ::-1], Q[:, :, ::-1]
        top = np.maximum(lam[:, :1], 0.0)
        keep = lam > 1e-13 * top
        lam = np.where(keep, lam, 0.0)
        root = np.sqrt(lam)
        La = Q * root[:, None, :]
        qb = np.einsum("cij,ci->cj", Q, b)
        cvec = np.where(keep, qb / np.where(keep, root, 1.0), 0.0)
        var = S[:, j, j] - np.sum(cvec**2, axis=1)
        sig2 = np.where(var > 1e-13 * np.maximum(S[:, j, j], top[:, 0]), var, 0.0)
        scale = np.maximum(np.max(np.abs(La), axis=1), np.abs(cvec))
        order = np.argsort(-scale, axis=1, kind="stable")  # widest direction first
        La = np.take_along_axis(La, order[:, None, :], axis=2)
        cvec = np.take_along_axis(cvec, order, axis=1)
        scale = np.take_along_axis(scale, order, axis=1)
        kind, n = _rules_for_scales(np.concatenate([scale, np.sqrt(sig2)[:, None]], 1), tol, tail=tail)
        kind[:, 0], n[:, 0] = _rules_for_scales(scale[:, 0], tol, fine=True, tail=tail)
        outer = np.prod(n[:, :-1].astype(np.float64), axis=1)
        nk = n[:, -1].astype(np.float64)
        cost = outer * (nk + k - 1)
        R = np.maximum(np.sum(np.abs(cvec) * _rule_extent(kind[:, :-1], n[:, :-1], tail), axis=1), 1e-3)
        ntab = np.zeros(C, dtype=np.int64)
        if dx > 0:
            ntab = _table_points(R, dx)
            tab_cost = ntab * nk * _TABLE_COST + outer * (k - 1 + _LOOKUP_COST)
            use = (nk > 1) & (tab_cost < cost) & (ntab <= _TABLE_ROWS)
            ntab = np.where(use, ntab, 0)
            cost = np.where(use, tab_cost, cost)
        L = np.zeros((C, k, k))
        L[:, :k - 1, :k - 1] = La
        L[:, k - 1, :k - 1] = cvec
        L[:, k - 1, k - 1] = np.sqrt(sig2)
        perm = np.broadcast_to(np.array(rest + [j]), (C, k))
        cand = (cost, perm, L, kind, n, ntab, R)
        if best is None:
            best = [np.array(x) for x in cand]
        else:
            better = cost < best[0]
            for x, y in zip(best, cand):
                x[better] = y[better]
    return best[1:]


_TABLE_COST = 1.5   # one table point of nk inner nodes: ~1.5 nk direct nodes
_LOOKUP_COST = 10.0  # one cell lookup and polynomial per outer node, in sigma evaluations


def _rule_extent(kind, n, tail: float):
    """Largest |node| of each 1-d rule (kind, n) (0 = Gauss-Hermite, 1 = trapezoid)."""
    gh = np.array([0.0] + [float(np.max(np.abs(_gh_rule(m)[0]))) for m in range(1, _GH_LADDER[-1] + 1)])
    return np.where(kind == 1, tail, gh[np.minimum(n, _GH_LADDER[-1])])


@functools.lru_cache(maxsize=None)
def _perm_maps(k: int):
    """maps[j][p]: the kernel-order pattern that equals pattern p of the set when member j is
    moved to the end (the pattern table is closed under permutations of the members)."""
    patterns, _ = _pattern_table(k)
    ids = {tuple(p.reshape(-1)): i for i, p in enumerate(patterns)}
    maps = []
    for j in range(k):
        perm = [i for i in range(k) if i != j] + [j]
        maps.append(np.array([ids[tuple(p[perm].reshape(-1))] for p in patterns]))
    return np.stack(maps)


@functools.lru_cache(maxsize=None)
def _nested_kernel(sig, pattern_key, nchunks, mesh):
    """The jitted :func:`_nested_moments`: L (D * cap, b, k, k) and steps (D,) split over the D
    devices of ``mesh`` (device d computes its ``steps[d]`` sub-batches of its cap), the grids
    replicated."""
    return sharded(functools.partial(_nested_moments, sig, pattern_key, nchunks), mesh, 1, 5)


def _inner_rule(xk, wk):
    """The last direction's rule as the nested kernel takes it: (xk, wk, blocks), unchanged when it
    has at most INNER_BLOCK nodes (Gauss-Hermite: 1, 4 or 8), else padded and walked in blocks
    (:func:`efftheory.gaussian._tables.inner_blocks`)."""
    if xk.size <= INNER_BLOCK:
        return xk, wk, np.int32(1)
    return inner_blocks(xk, wk)


def _nested_moments(sig, pattern_key, nchunks, L, steps, X, W, xk, wk, nblocks):
    """vals[s, c, p] for factors L (cap, b, k, k) in which only member k-1 sees direction k-1,
    for the first ``steps`` (a traced count: one compiled kernel serves every call) sub-batches.

    X (k-1, M), W (M): the outer grid (M divisible by ``nchunks``); xk, wk: the rule of the
    last direction, in ``nblocks`` (traced) blocks of INNER_BLOCK nodes (zero-weight padded) when
    it is longer than that, else whole (:func:`_inner_rule`), so that the compiled kernel does not
    depend on its length.  The last member's factors are summed over xk first (conditional
    moments, one per exponent pair it carries), then every pattern over the outer grid
    (:func:`_nested_chunk`).  Sub-batches (leading axis of L) and outer-grid chunks are visited in
    loops so that the working set of one step (b * M / nchunks * block nodes) stays in cache.
    """
    k = L.shape[2]
    last = sorted({pat[k - 1] for pat in pattern_key})

    def chunk(Lb, Xc, Wc):
        return _nested_chunk(sig, pattern_key, last, Lb, Xc, Wc, xk, wk, nblocks)

    return over_items(chunk, len(pattern_key), nchunks, X, W, steps, L)


def _nested_chunk(sig, pattern_key, last, Lb, Xc, Wc, xk, wk, nblocks):
    """(b, P): the nested rule's pattern sums of the items Lb (b, k, k) over the outer nodes Xc
    (k-1, m), Wc (m): the last member's conditional moments (exponent pairs ``last``) summed over
    the inner rule xk, wk (whole when it has at most INNER_BLOCK nodes, else ``nblocks`` traced
    blocks of them), then every pattern over the nodes."""
    k = Lb.shape[1]
    nb = min(xk.shape[0], INNER_BLOCK)
    c, sd = Lb[:, k - 1, :k - 1], Lb[:, k - 1, k - 1]
    zo = jnp.einsum("cij,jm->icm", Lb[:, :k - 1, :k - 1], Xc)  # (k-1, b, m)
    mu = jnp.einsum("cj,jm->cm", c, Xc)

    def block(j, h):
        x = jax.lax.dynamic_slice_in_dim(xk, j * nb, nb)
        w = jax.lax.dynamic_slice_in_dim(wk, j * nb, nb)
        zl = mu[None] + sd[None, :, None] * x[:, None, None]  # (nb, b, m)
        sl, dl = jax.jvp(sig, (zl,), (jnp.ones_like(zl),))
        wb = jnp.broadcast_to(w[:, None, None], zl.shape)
        return tuple(a + jnp.sum(monomial(sl, dl, e0, e1, wb), axis=0) for a, (e0, e1) in zip(h, last))

    zero = tuple(jnp.zeros_like(mu) for _ in last)
    h = block(0, zero) if xk.shape[0] <= INNER_BLOCK else jax.lax.fori_loop(0, nblocks, block, zero)
    return pattern_sums(sig, pattern_key, zo, dict(zip(last, h)), Wc)


# ---------------------------------------------------------------------------------------------
# block kernel: the small four-input nested groups, one compiled program whatever their grids


BLOCK_WORK = 1 << 62  # four-input nested groups with at most this many node evaluations run the block kernel: all
#                       (the limit was 2^24; lifted, tanh depth 10, fresh process: N = 32: 50 -> 38 programs, first
#                       call 61.7 -> 58.8 s, warm 54.6 -> 54.9-55.5 s; N = 24, depth 6: 47 -> 39, warm +3-5%)
BLOCK_NODES = 64      # outer-grid nodes per block of the block kernel
BLOCK_GRID = 1 << 13  # outer-grid nodes it takes (zero-weight padded): larger grids run the per-shape kernel
BLOCK_ITEMS = 1 << 12  # items per device and call of the block kernel (its item array: one size)


def _block_rows(nk: int) -> int:
    """Items a step of the block kernel takes, each at one block of BLOCK_NODES outer nodes, for an
    inner rule of nk nodes (whole up to INNER_BLOCK, else in blocks of INNER_BLOCK): _CHUNK
    evaluations a step, as the per-shape kernel's sub-batches."""
    return max(1, _CHUNK // (BLOCK_NODES * min(nk, INNER_BLOCK)))


@functools.lru_cache(maxsize=None)
def _nested_blocks_kernel(sig, pattern_key, mesh):
    """The jitted :func:`_nested_blocks`: items L and steps (D,) split over the D devices of
    ``mesh``, the block count, the outer grid and the inner rule replicated."""
    return sharded(functools.partial(_nested_blocks, sig, pattern_key), mesh, 1, 6)


def _nested_blocks(sig, pattern_key, L, steps, nblk, X, W, xk, wk, nblocks):
    """vals (I, P) of the items L (I, k, k), in which only member k-1 sees direction k-1, over the
    outer grid X (k-1, B, BLOCK_NODES), W (B, BLOCK_NODES), of which the items use the first
    ``nblk`` blocks (traced); ``steps`` (traced): :func:`_block_rows` items times one block each
    (:func:`efftheory.gaussian._tables.row_step`).  Each step is :func:`_nested_chunk` of its items
    and block, so the compiled program depends on sigma, the patterns and the inner rule's shape
    (1, 4 or 8 Gauss-Hermite nodes, or the padded trapezoid) only, not on the grid, batch or N."""
    k = L.shape[1]
    I = L.shape[0]
    R = _block_rows(xk.shape[0])
    last = sorted({pat[k - 1] for pat in pattern_key})

    def step(q, out):
        i0, b = row_step(q, R, nblk, I)
        vals = _nested_chunk(sig, pattern_key, last, jax.lax.dynamic_slice_in_dim(L, i0, R), X[:, b], W[b],
                             xk, wk, nblocks)
        return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(out, i0, R) + vals, i0, 0)

    return jax.lax.fori_loop(0, steps, step, jnp.zeros((I, len(pattern_key)), X.dtype))


@functools.lru_cache(maxsize=16)
def _block_grid(rules: tuple):
    """The outer grid of :func:`_rest_grid` in blocks of BLOCK_NODES nodes, zero-weight padded to
    BLOCK_GRID nodes (one compiled shape): X (k-1, B, g), W (B, g) and nblk, the blocks that hold
    its nodes; None when the grid is larger than BLOCK_GRID."""
    X, W = _rest_grid(rules)
    real = math.prod(_rule(r)[0].size for r in rules)
    if real > BLOCK_GRID:
        return None
    Xb, Wb = np.zeros((X.shape[0], BLOCK_GRID)), np.zeros(BLOCK_GRID)
    Xb[:, :real], Wb[:real] = X[:, :real], W[:real]
    g = BLOCK_NODES
    return Xb.reshape(X.shape[0], BLOCK_GRID // g, g), Wb.reshape(BLOCK_GRID // g, g), -(-real // g)


def _run_blocks(results, sig, key, mesh, grid, Li, wi, oi, xk, wk):
    """The items (Li, wi, oi) of one small four-input nested group through the block kernel
    (:func:`_nested_blocks`), appended to ``results`` (:func:`_settle`); ``grid``: (X, W, nblk) of
    :func:`_block_grid`.  The per-shape kernel (:func:`_nested_moments`) compiles one program per
    (grid size, batch, inner rule): about 16 at N = 16, depth 10, for groups whose integrals take
    less time than their compilation.  Large groups run it too: a few percent slower warm there
    (N = 24 and 32, tanh, depth 6 and 10) for a program count that no longer grows with N."""
    D = mesh.devices.size
    X, W, nblk = grid
    inner = tuple(jnp.asarray(a) for a in _inner_rule(xk, wk))
    R = _block_rows(xk.size)
    kernel = _nested_blocks_kernel(sig, key, mesh)
    X, W = jnp.asarray(X), jnp.asarray(W)
    per_call = D * BLOCK_ITEMS
    for start in range(0, Li.shape[0], per_call):
        stop = min(start + per_call, Li.shape[0])
        (Lb,), cnts = _split_rows(D, BLOCK_ITEMS, Li[start:stop])
        _settle(results, (oi[start:stop], wi[start:stop], cnts, BLOCK_ITEMS,
                          kernel(Lb, _row_steps(cnts, nblk, R), np.int32(nblk), X, W, *inner)))


@functools.lru_cache(maxsize=None)
def _nested_rows_kernel(sig, pattern_key, R, mesh):
    """The jitted :func:`_nested_rows`: items L and steps (D,) split over the D devices of
    ``mesh``, the block count, the outer grid and the inner rule replicated."""
    return sharded(functools.partial(_nested_rows, sig, pattern_key, R), mesh, 1, 6)


def _nested_rows(sig, pattern_key, R, L, steps, nblk, X, W, xk, wk, nblocks):
    """vals (I, P) of the items L (I, k, k), in which only member k-1 sees direction k-1, over the
    outer grid X (k-1, B, g), W (B, g) in blocks of g nodes (the items use the first ``nblk``,
    traced); ``steps``: R items times one block each (:func:`efftheory.gaussian._tables.row_step`).
    xk, wk: the rule of the last direction in ``nblocks`` (traced) blocks of INNER_BLOCK nodes,
    zero-weight padded (:func:`efftheory.gaussian._tables.inner_blocks`).  The last member's factors
    are summed over xk first (conditional moments, one per exponent pair it carries), then every
    pattern over the block's nodes.  One compiled program per set size and sigma, whatever the
    grids, batches and N."""
    k = L.shape[1]
    I = L.shape[0]
    last = sorted({pat[k - 1] for pat in pattern_key})

    def step(q, out):
        i0, b = row_step(q, R, nblk, I)
        Lb, Xb = jax.lax.dynamic_slice_in_dim(L, i0, R), X[:, b]
        zo = _members(Lb, Xb, range(k - 1))  # (k-1, R, g)
        mu = _members(Lb, Xb, (k - 1,))[0]
        sd = Lb[:, k - 1, k - 1]

        def block(j, h):
            x = jax.lax.dynamic_slice_in_dim(xk, j * INNER_BLOCK, INNER_BLOCK)
            w = jax.lax.dynamic_slice_in_dim(wk, j * INNER_BLOCK, INNER_BLOCK)
            zl = mu[None] + sd[None, :, None] * x[:, None, None]  # (nb, R, g)
            sl, dl = jax.jvp(sig, (zl,), (jnp.ones_like(zl),))
            wb = jnp.broadcast_to(w[:, None, None], zl.shape)
            return tuple(a + jnp.sum(monomial(sl, dl, e0, e1, wb), axis=0) for a, (e0, e1) in zip(h, last))

        h = jax.lax.fori_loop(0, nblocks, block, tuple(jnp.zeros_like(mu) for _ in last))
        vals = pattern_sums(sig, pattern_key, zo, dict(zip(last, h)), W[b])
        return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(out, i0, R) + vals, i0, 0)

    return jax.lax.fori_loop(0, steps, step, jnp.zeros((I, len(pattern_key)), X.dtype))


@functools.lru_cache(maxsize=256)
def _first_rule(rule: tuple, half: bool):
    """The 1-d rule of the widest direction; ``half``: only its nodes x >= 0, those at x > 0 at
    twice their weight (exact for integrands invariant under w -> -w: the rules are symmetric)."""
    x, w = _rule(rule)
    if half and x.size > 1:
        keep = x >= 0
        x, w = x[keep], np.where(x[keep] > 0, 2.0, 1.0) * w[keep]
    return x, w


@functools.lru_cache(maxsize=256)
def _rest_grid(rules: tuple):
    """[1; tensor grid of the directions after the first] (k-1, Mp), W (Mp), padded with zero
    weights: the leading row of ones carries each item's first-direction node (see
    :func:`_smooth_sets`)."""
    if rules:
        X, W = _grid(rules)
    else:
        X, W = np.zeros((0, 1)), np.ones(1)
    return np.concatenate([np.ones((1, W.size)), X], 0), W


@functools.lru_cache(maxsize=16)
def _row_grid(rules: tuple):
    """The outer grid of :func:`_rest_grid` in blocks of g = ROW_NODES[k] nodes, zero-weight padded
    to ROW_GRID[k] nodes whatever its size (one compiled shape per set size): X (k-1, B, g),
    W (B, g), and nblk, the blocks that hold its nodes."""
    k = len(rules) + 2
    X, W = _rest_grid(rules)
    real = math.prod(_rule(r)[0].size for r in rules)
    g, cap = ROW_NODES[k], ROW_GRID[k]
    if real > cap:
        raise ValueError(f"outer grid of {real} nodes: at most {cap} for sets of {k} inputs")
    Xb, Wb = np.zeros((k - 1, cap)), np.zeros(cap)
    Xb[:, :real], Wb[:real] = X[:, :real], W[:real]
    return Xb.reshape(k - 1, cap // g, g), Wb.reshape(cap // g, g), -(-real // g)


@functools.lru_cache(maxsize=16)
def _pair_grid(rules: tuple):
    """The outer grid of :func:`_rest_grid` in chunks for the four-input tabulated kernel
    (:func:`efftheory.gaussian._tables.pair_grid`), as device arrays: (Xs, Ws, chunks in use)."""
    X, W = _rest_grid(rules)
    Xs, Ws, nch = _pair_grid_np(X, W, math.prod(_rule(r)[0].size for r in rules))
    return jnp.asarray(Xs), jnp.asarray(Ws), nch


_ROW_ITEMS = 1 << 13  # items per device and call of the row kernels (their item arrays: one size)
_CHUNK = 1 << 12         # nodes (times inner nodes) per loop step of the nested kernel
_CHUNK_TABLED = 1 << 14  # nodes per loop step of the tabulated kernel
_CALL = 1 << 22     # nodes per call of the nested kernel
_ITEMS = 1 << 14    # items per call


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _smooth_setup(sig, k: int, variances, patterns, tol):
    """(tail, pairs, dx) shared by every set of k inputs whose variances are among ``variances``:
    the trapezoid half-width (:func:`_tail_for`), the exponent pairs (e0, e1) != (0, 0) the last
    member carries in ``patterns``, and the table spacing (:func:`efftheory.gaussian._tables.table_spacing`).
    Computed once per kernel K, so that processing the sets in blocks changes no rule."""
    variances = np.unique(np.asarray(variances, dtype=np.float64))
    R = _reach(k, float(np.max(variances)))
    tail = _tail_for(sig, k, R, tol)
    pairs = tuple(sorted({tuple(int(v) for v in pat[i]) for pat in patterns for i in range(k)} - {(0, 0)}))
    return tail, pairs, table_spacing(sig, pairs, R, variances, tol)


def _smooth_sets(sig, S, patterns, tol, half: bool, setup, host: bool = False):
    """(C, P) pattern moments of smooth sigma over sets with covariances S (C, k, k).

    Work items: one set at one node x1 of its widest direction, z = L'[:, 0] + L'[:, 1:] w' with
    L'[:, 0] = L[:, 0] x1.  Sets that share the rules of the other directions share a kernel,
    whatever their widest direction, and the compiled shapes depend on those rules only.
    ``half``: sigma is odd or even (:attr:`efftheory.Activation.symmetric`), so the widest
    direction needs only its nodes x >= 0 (:func:`_first_rule`).  Sets whose last member is
    cheaper tabulated (:mod:`efftheory.gaussian._tables`) run the tabulated kernel, the others the nested
    one.  ``host``: numpy instead (small work, :data:`HOST_SETS`), to rounding the same values.
    """
    C, k, _ = S.shape
    tail, pairs, dx = setup
    key = tuple(tuple(tuple(int(v) for v in row) for row in pat) for pat in patterns)
    perm, L, kind, n, ntab, R = _conditional_factor(S, tol, tail, dx)
    P = len(patterns)
    names = np.where(kind == 0, 0, 1) * 1000 + n  # (C, k) rule codes
    decode = lambda c: ("gh", int(c)) if c < 1000 else ("trap", int(c % 1000), tail)
    mesh = _device_mesh()
    D = mesh.devices.size
    results = []  # (owners (items,), weights (items,), values (items, P)) per kernel call
    keys = np.concatenate([names[:, 1:], (ntab > 0)[:, None]], 1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    for g, row in enumerate(uniq):
        members = np.nonzero(inv == g)[0]
        rules = tuple(decode(c) for c in row[:-1])
        tabled = bool(row[-1])
        X, W = _rest_grid(rules[:-1])
        xk, wk = _rule(rules[-1])
        per_item = W.size * (1 if tabled else min(xk.size, INNER_BLOCK))
        chunk = _CHUNK_TABLED if tabled else _CHUNK
        if per_item > chunk:
            b, nchunks = 1, 1
            while per_item // nchunks > chunk and (W.size // nchunks) % 2 == 0:
                nchunks *= 2
        else:
            b, nchunks = min(_pow2_floor(chunk // per_item), 1024), 1
        cap = max(1, min(_pow2_floor(max(1, _CALL // (b * per_item))), _ITEMS // b))
        # items of the group: every member at every node of its widest direction, set by set
        Ls, ws, own = [], [], []
        first = names[members, 0]
        for c1 in np.unique(first):
            sub = members[first == c1]
            x1, w1 = _first_rule(decode(c1), half)
            Li = np.repeat(L[sub], x1.size, axis=0)
            Li[:, :, 0] *= np.tile(x1, sub.size)[:, None]
            Ls.append(Li)
            ws.append(np.tile(w1, sub.size))
            own.append(np.repeat(sub, x1.size))
        Li, wi, oi = np.concatenate(Ls), np.concatenate(ws), np.concatenate(own)
        per_dev = cap * b
        work = Li.shape[0] * W.size * ((k + 10) if tabled else (xk.size + k))
        if host or work <= HOST_WORK:  # small work: numpy, no compiled kernel (the same sums, to rounding)
            vals = (_host_tabled(sig, key, pairs, Li, oi, X, W, xk, wk, R, L, ntab) if tabled
                    else _host_nested(sig, key, Li, X, W, xk, wk))
            n = vals.shape[0]
            res = np.zeros((D, n, P))
            res[0] = vals
            results.append((oi, wi, [n] + [0] * (D - 1), n, res))
            continue
        if k == 3:  # the row kernels: one program per table size, whatever the grid and batch
            _run_rows(results, sig, key, pairs, mesh, tabled, rules, Li, wi, oi, xk, wk, R, L, ntab)
            continue
        if tabled:  # set by set: each call builds the tables of a run of sets
            o = np.argsort(oi, kind="stable")
            Li, wi, oi = Li[o], wi[o], oi[o]
            _run_tabled(results, sig, key, pairs, mesh, Li, wi, oi, _pair_grid(rules[:-1]), xk, wk, R, L, ntab)
            continue
        grid = _block_grid(rules[:-1]) if work <= BLOCK_WORK else None
        if grid is not None:  # small four-input nested group: the block kernel, one program per inner rule shape
            _run_blocks(results, sig, key, mesh, grid, Li, wi, oi, xk, wk)
            continue
        kernel = _nested_kernel(sig, key, nchunks, mesh)
        inner = tuple(jnp.asarray(a) for a in _inner_rule(xk, wk))
        for start in range(0, Li.shape[0], D * per_dev):
            stop = min(start + D * per_dev, Li.shape[0])
            Lb, steps, cnts = _split(Li[start:stop], D, cap, b)
            _settle(results, (oi[start:stop], wi[start:stop], cnts, per_dev, kernel(Lb, steps, X, W, *inner)))
    own = np.concatenate([r[0] for r in results])
    w = np.concatenate([r[1] for r in results])
    vals = np.concatenate([np.asarray(res).reshape(D, per_dev, P)[d, :c]
                           for _, _, cnts, per_dev, res in results for d, c in enumerate(cnts)])
    order = np.argsort(own, kind="stable")
    own, vals = own[order], vals[order] * w[order, None]
    starts = np.nonzero(np.r_[True, own[1:] != own[:-1]])[0]
    raw = np.add.reduceat(vals, starts, axis=0)  # every set owns at least one item
    maps = _perm_maps(k)[perm[:, -1]]  # (C, P)
    return np.take_along_axis(raw, maps, axis=1)


def _run_rows(results, sig, key, pairs, mesh, tabled, rules, Li, wi, oi, xk, wk, R, L, ntab):
    """The items of one group of sets of three inputs through the row kernels
    (:func:`_nested_rows`, :func:`efftheory.gaussian._tables._tabled_rows`): the grid size, the batch
    and N are run-time values there, so sets of three compile one nested program and one tabulated
    program per table size whatever the geometry (the per-shape kernels compiled about a dozen at
    N = 16, depth 10).  Measured no slower than the per-shape kernels for three inputs (for four, whose
    outer grids are 10-100x larger, they ran 1.5-2x slower: not used there)."""
    k = Li.shape[1]
    D = mesh.devices.size
    rows_per_step = _rows_per_step(k, tabled)
    Xb, Wb, nblk = _row_grid(rules[:-1])
    grid = (jnp.asarray(Xb), jnp.asarray(Wb), nblk)
    per_item = nblk * ROW_NODES[k] * (1 if tabled else INNER_BLOCK)
    per_call = D * max(1, min(_ROW_ITEMS, _CALL // per_item))
    if tabled:
        o = np.argsort(oi, kind="stable")
        _run_tabled_rows(results, sig, key, pairs, mesh, per_call, _ROW_ITEMS, rows_per_step, Li[o], wi[o], oi[o], grid,
                         xk, wk, R, L, ntab)
        return
    kernel = _nested_rows_kernel(sig, key, rows_per_step, mesh)
    inner = tuple(jnp.asarray(a) for a in inner_blocks(xk, wk))
    for start in range(0, Li.shape[0], per_call):
        stop = min(start + per_call, Li.shape[0])
        (Lb,), cnts = _split_rows(D, _ROW_ITEMS, Li[start:stop])
        _settle(results, (oi[start:stop], wi[start:stop], cnts, _ROW_ITEMS,
                          kernel(Lb, _row_steps(cnts, nblk, rows_per_step), np.int32(nblk), grid[0], grid[1], *inner)))


# ---------------------------------------------------------------------------------------------
# small work on the host: numpy, no compiled kernel per shape


HOST_SETS = 70  # set sizes with at most this many sets (every size at N <= 8: C(8, 4) = 70) run in numpy
HOST_WORK = 1 << 17  # and groups of items with at most this many node evaluations (a kernel shape's compilation costs more)


def _host_nested(sig, pattern_key, Li, X, W, xk, wk):
    """The nested kernel (:func:`_nested_moments`) in numpy: values (n, P) of the items Li (n, k, k)."""
    n, k = Li.shape[0], Li.shape[1]
    last = sorted({pat[k - 1] for pat in pattern_key})
    step = max(1, _HOST_BUDGET // (X.shape[1] * xk.size))
    out = np.empty((n, len(pattern_key)))
    for lo in range(0, n, step):
        Lb = Li[lo:lo + step]
        zo = np.einsum("cij,jm->icm", Lb[:, :k - 1, :k - 1], X)  # (k-1, b, m)
        mu = np.einsum("cj,jm->cm", Lb[:, k - 1, :k - 1], X)
        zl = mu[None] + Lb[:, k - 1, k - 1][None, :, None] * xk[:, None, None]  # (nk, b, m)
        sl, dl = sd_values(sig, zl)
        h = {e: np.tensordot(wk, monomial(sl, dl, e[0], e[1], np.ones_like(zl)), axes=(0, 0)) for e in last}
        so, do = sd_values(sig, zo)
        out[lo:lo + step] = _host_patterns(pattern_key, so, do, h, W)
    return out


def _rows_per_step(k: int, tabled: bool) -> int:
    """Items a step of the row kernels takes (each at one block of ROW_NODES[k] nodes): _CHUNK_TABLED
    nodes a step for the tabulated kernel, _CHUNK nodes times inner nodes for the nested one."""
    if tabled:
        return _CHUNK_TABLED // ROW_NODES[k]
    return max(1, _CHUNK // (ROW_NODES[k] * INNER_BLOCK))


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
    sv, dv = sd_values(sig, z)  # one compiled evaluator per sigma, whatever the shapes
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
        return polar_monomials_jnp(factor(e1), factor(e2), L, degree, maxdeg=0)[..., 0, 0]
    return trapezoid_monomials_jnp(factor(e1), factor(e2), L, order, maxdeg=0)[..., 0, 0]


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
    if C <= HOST_SETS:
        return _moments_low_host(act, sig, K, sets, patterns, order)
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


def _moments_low_host(act, sig, K, sets, patterns, order):
    """:func:`_moments_low` in numpy for few sets: the same exact 2-d rules, sigma and sigma'
    evaluated once per set (:func:`sd_values`) and every pattern formed from them."""
    from ._hermite import ARC_ORDER, radial, whiten2_np

    C, k = sets.shape
    if C > 1 and C * (order or 1) ** 2 > _HOST_BUDGET:  # sets in chunks: ~1 MB arrays
        step = max(1, _HOST_BUDGET // max(1, (order or 1) ** 2))
        return np.concatenate([_moments_low_host(act, sig, K, sets[i:i + step], patterns, order)
                               for i in range(0, C, step)])
    a, b = sets[:, 0], sets[:, -1]
    L = whiten2_np(K[a, a], K[b, b], K[a, b])[0]  # (C, 2, 2)
    if act.homogeneous:  # polar: Gauss-Legendre on the arcs between the zeros of z1, z2
        x, wq = np.polynomial.legendre.leggauss(ARC_ORDER)
        br = [np.arctan2(-L[:, 0, 0], L[:, 0, 1]), np.arctan2(-L[:, 1, 0], L[:, 1, 1])]
        br = np.mod(np.stack(br + [v + np.pi for v in br], -1), 2 * np.pi)
        zeros = np.zeros((C, 1))
        edges = np.sort(np.concatenate([zeros, br, zeros + 2 * np.pi], -1), axis=-1)
        lo, hi = edges[:, :-1], edges[:, 1:]
        half = (hi - lo) / 2
        phi = (lo + hi)[..., None] / 2 + half[..., None] * x
        W = (half[..., None] * wq).reshape(C, -1)
        c, s_ = np.cos(phi).reshape(C, -1), np.sin(phi).reshape(C, -1)
    else:
        u, w = normal_rule(order)
        c, s_ = np.repeat(u, u.size)[None], np.tile(u, u.size)[None]
        W = np.outer(w, w).reshape(1, -1)
    z1 = L[:, 0, 0, None] * c + L[:, 0, 1, None] * s_
    z2 = L[:, 1, 0, None] * c + L[:, 1, 1, None] * s_
    s1, d1 = sd_values(sig, z1)
    s2, d2 = sd_values(sig, z2)
    out = np.empty((C, len(patterns)))
    for p, pat in enumerate(patterns):
        e1 = pat[0]
        e2 = pat[1] if k == 2 else np.zeros(2, np.int64)
        f = W * s1 ** int(e1[0]) * d1 ** int(e1[1]) * s2 ** int(e2[0]) * d2 ** int(e2[1])
        out[:, p] = f.sum(axis=-1)
        if act.homogeneous:
            out[:, p] *= radial(int(e1[0] + e2[0]) + 1) / (2 * np.pi)
    return out


def _padded(fn, *arrays):
    n = arrays[0].shape[0]
    size = max(8, 1 << (n - 1).bit_length())
    pad = [np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)]) for a in arrays]
    return np.asarray(fn(*(jnp.asarray(a) for a in pad)))[:n]


# ---------------------------------------------------------------------------------------------
# public


SET_BLOCK = 1 << 14  # sets of three or four inputs processed at once
SET_BYTES = 24 << 10  # memory of the work items of one set (measured: ~15 KiB, tanh, N = 16-24)


def source_moments(act, K, *, tol: float = TOL, order2: int | None = None, block: int = SET_BLOCK, part=None):
    """Mss, Mds, Mdd (each (N,)*4, float64) at kernel K (N, N): see the module docstring.

    Args:
      act: an :class:`efftheory.activations.Activation`.
      K: (N, N) covariance of the preactivations.
      tol: target accuracy of the 3- and 4-input rules.  Smooth sigma: the rules are chosen for it;
        kinked sigma: the exact route meets it unless rounding cannot, other kinked sigma rarely; sets
        whose error estimate exceeds it are named in an :class:`AccuracyWarning`.
      order2: nodes per direction of the 2-input trapezoid rule (smooth, non-homogeneous sigma);
        default :func:`efftheory.gaussian.rule_size` at max diag K.
      block: sets of three or four inputs processed at once.  Memory beyond the three outputs grows
        with it (the work items of a block: about ``SET_BYTES`` per set), not with N; the values do
        not depend on it (every rule is chosen per set, the shared ranges per K).
      part: several processes (:class:`efftheory.distributed.Part`): this process computes the sets of
        three and four inputs ``part.select(n_sets)`` and ``part.gather`` exchanges the values, so
        that every process returns the whole result.
    """
    from ._rules import rule_size

    K = np.asarray(K, dtype=np.float64)
    N = K.shape[0]
    block = max(1, int(block))
    sig, dsig = act.fn, derivative(act.fn)
    if order2 is None and not act.homogeneous:
        order2 = rule_size(act, float(np.max(np.diag(K))))
    out = {name: np.empty((N,) * 4) for name in SOURCE_KINDS}
    for k in range(1, min(N, 4) + 1):
        sets = _sets(N, k)
        patterns, plan = _pattern_table(k)
        setup = (_smooth_setup(sig, k, np.diag(K), patterns, tol)
                 if k >= 3 and act.smooth and not _exact_kinked(act) else None)
        step = block if k >= 3 else len(sets)  # one- and two-input sets: N^2 at most, in one go
        mine = part.select(len(sets)) if part is not None and k >= 3 else None
        todo = sets if mine is None else sets[mine]
        got = []
        for lo in range(0, len(todo), step):
            check_stop()
            sub = todo[lo:lo + step]
            if k <= 2:
                vals = _moments_low(act, sig, dsig, K, sub, patterns, order2)
            else:
                vals = _moments_kd(act, sig, dsig, K, sub, patterns, tol, setup, host=len(sets) <= HOST_SETS)
            if mine is None:
                _fill(out, plan, sub, vals)
            else:
                got.append(vals)
        if mine is not None:
            empty = np.empty((0, len(patterns)))
            idx, vals = part.gather(mine, np.concatenate(got) if got else empty, key=f"k{k}")
            _fill(out, plan, sets[idx], vals)
    return out["ss"], out["ds"], out["dd"]


def _fill(out, plan, sub, vals):
    for name, m, pid in plan:
        idx = sub[:, m]
        out[name][idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = vals[:, pid]
