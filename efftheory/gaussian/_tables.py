r"""Tabulated conditional integrals: the innermost direction of the nested 3- and 4-input rule of
:mod:`efftheory.gaussian._sources` at O(1) cost per outer node.

In the nested factor of a set only the last member depends on the last direction,
z_last = mu + sd x with mu = c . w (w the outer directions) and x ~ N(0, 1).  Its factor in a
pattern, g_e = sigma^e0 sigma'^e1, enters only through the conditional moment

    h_e(mu) = < g_e(mu + sd x) >_x  ~  sum_j wk_j g_e(mu + sd xk_j)         (the inner 1-d rule)

Evaluated directly that is nk evaluations of sigma at every outer node.  For one set sd is fixed
and mu stays within |mu| <= R = sum_j |c_j| T_j (T_j the widest node of direction j), so h_e is
one function of one variable per set: :func:`build_tables` evaluates h_e on equispaced points
covering [-R, R] (two more below, three above) and stores, per cell, the degree-5 polynomial
through the six points around it (local Lagrange interpolation); the kernel of
:func:`tabled_kernel` looks up the cell of every outer node and evaluates it.

Interpolation error (nodes at t = -2..3 in units of the spacing dx, the cell t in [0, 1]):

    |h_e - p| <= dx^6 / 720 max_t |prod_{j=-2}^{3} (t - j)| max |h_e^(6)|
              =  dx^6 * 3.515625 / 720 * max |h_e^(6)|,  max |h_e^(6)| <= max_{|z| <= R + sd T} |g_e^(6)(z)|

(h_e^(6) = < g_e^(6)(mu + sd x) >).  An outer integral of a product of the other members'
factors multiplies that by at most B = <|prod_i g_i|> <= max(1, max_i <m(z_i)^3>),
m = max(|sigma|, |sigma'|) (Hoelder: at most three slots belong to the other members).
:func:`table_spacing` takes max |g_e^(6)| over a grid of the range (times a safety factor 1.25
for peaks between grid points) and returns the spacing at which the interpolation error of a
moment is at most tol / (e B): the same budget as the quadrature error of each 1-d rule.
For tanh at tol = 1e-9 that is dx = 0.025 (0.019 for three-input sets, whose last member may carry
two factors): tables of 100-1500 points, where the nested rule evaluated nk ~ 15-35 values of sigma
at each of 10^3-10^5 outer nodes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .._cancel import check_stop
from .._sharding import shard_map
from ._rules import derivative, normal_rule

__all__ = ["table_spacing", "build_tables", "tabled_kernel", "pattern_sums", "over_items", "sharded",
           "monomial", "inner_blocks", "reduce_patterns", "table_rows", "tabled_rows_kernel", "row_step",
           "TABLE_CHUNK", "INNER_MAX", "INNER_BLOCK", "TABLE_ROWS", "table_points", "call_tables", "run_tabled",
           "run_tabled_rows", "host_tables", "host_tabled", "host_patterns", "settle", "shares", "split",
           "split_rows", "row_steps", "HOST_BUDGET", "IN_FLIGHT", "pair_grid", "pair_list"]

_SAFETY = 1.25          # max |g^(6)| between grid points of table_spacing's scan
INTERP_ORDER = 6             # points of the local interpolation (degree 5): cell i uses points i-2..i+3
_LAGRANGE = 3.515625 / 720.0  # max_{t in [0, 1]} |prod_{j=-2}^{3} (t - j)| / 6!
_SCAN_POINTS = 4001


_HOST_CHUNK = 1 << 14  # values per call of the one compiled sigma / sigma' evaluator


@functools.lru_cache(maxsize=64)
def _sd_kernel(sig):
    """jitted z (_HOST_CHUNK,) -> (sigma(z), sigma'(z)): one compiled program per sigma, whatever the
    shapes of the host path's arrays."""
    return jax.jit(lambda z: jax.jvp(sig, (z,), (jnp.ones_like(z),)))


def sd_values(sig, z):
    """sigma(z), sigma'(z) as numpy float64 arrays of z's shape, through :func:`_sd_kernel` on
    chunks of _HOST_CHUNK values, the last zero-padded (so that no shape of z costs a compilation).
    Every chunk is dispatched before the first is read: JAX runs them while this thread slices the
    next (measured 14.4 -> 13.6 ns a value, tanh, 2 cores; the kernel alone: 6-8)."""
    z = np.asarray(z, dtype=np.float64)
    flat = z.reshape(-1)
    n = flat.size
    fn = _sd_kernel(sig)
    full = n - n % _HOST_CHUNK
    calls = [fn(flat[lo:lo + _HOST_CHUNK]) for lo in range(0, full, _HOST_CHUNK)]
    if full < n:
        buf = np.zeros(_HOST_CHUNK)
        buf[:n - full] = flat[full:]
        calls.append(fn(buf))
    if not calls:
        return np.zeros(z.shape), np.zeros(z.shape)
    s = np.concatenate([np.asarray(a) for a, _ in calls])[:n]
    d = np.concatenate([np.asarray(b) for _, b in calls])[:n]
    return s.reshape(z.shape), d.reshape(z.shape)


def monomial(s, d, e0: int, e1: int, f=None):
    """f s^e0 d^e1 (f = None: no factor; None back when there is nothing to multiply)."""
    for base, e in ((s, e0), (d, e1)):
        for _ in range(e):
            f = base if f is None else f * base
    return f


def _factor(sig, e0: int, e1: int):
    """g_e(z) = sigma(z)^e0 sigma'(z)^e1 as one elementwise function."""
    def g(z):
        s, d = jax.jvp(sig, (z,), (jnp.ones_like(z),))
        return monomial(s, d, e0, e1, jnp.ones_like(z))
    return g


@functools.lru_cache(maxsize=64)
def _sixth_derivatives(sig, pairs: tuple):
    """jitted z -> max over ``pairs`` of |g_e^(6)(z)| (compiled once per sigma)."""
    fns = []
    for e0, e1 in pairs:
        f = _factor(sig, e0, e1)
        for _ in range(INTERP_ORDER):
            f = derivative(f)
        fns.append(f)
    return jax.jit(lambda z: functools.reduce(jnp.maximum, [jnp.abs(f(z)) for f in fns]))


def _sixth_derivative_max(sig, pairs: tuple, R: float) -> float:
    return float(np.max(np.asarray(_sixth_derivatives(sig, pairs)(np.linspace(-R, R, _SCAN_POINTS)))))


def _outer_bound(sig, variances) -> float:
    """max(1, max_i <m(z_i)^3>), z_i ~ N(0, v_i), m = max(|sigma|, |sigma'|)."""
    u, w = normal_rule(96, tail=8.0)

    z = np.sqrt(np.maximum(np.asarray(variances, dtype=np.float64), 0.0))[:, None] * u[None, :]
    s, d = sd_values(sig, z)  # one compiled evaluator per sigma, whatever the number of variances
    m = np.maximum(np.abs(s), np.abs(d))
    return max(1.0, float(np.max((m**3) @ w)))


def table_spacing(sig, pairs, R: float, variances, tol: float) -> float:
    """Largest table spacing dx for which the local degree-5 interpolation of every h_e, e in
    ``pairs``, changes a moment by at most tol / (e B) (module docstring).  ``R``: the largest
    |z| at which h_e is evaluated (table half-width plus the inner rule's reach);
    ``variances``: the diagonal of the sets' covariances (for B).  inf when sigma's sixth
    derivative vanishes (h_e a polynomial of degree 5: the interpolation is exact); 0 (no
    tables) when it is not finite."""
    d6 = _SAFETY * _sixth_derivative_max(sig, tuple(sorted(pairs)), round(float(R), 1) + 0.1)
    if not math.isfinite(d6):
        return 0.0
    if d6 == 0.0:
        return math.inf
    eps = tol / (math.e * _outer_bound(sig, variances))
    return (eps / (_LAGRANGE * d6)) ** (1.0 / INTERP_ORDER)


TABLE_CHUNK = 4096  # table points per step of build_tables (table sizes are multiples of it)
INNER_MAX = 256     # longest inner rule (products: the trapezoid ladder ends at 256 nodes)
INNER_BLOCK = 8    # inner nodes evaluated at once (the trapezoid ladder's sizes are multiples of 8)


def lagrange_to_monomial() -> np.ndarray:
    """C (6, 6): coefficients in t of the polynomial through values f(-2..3) are C @ f."""
    t = np.arange(-2.0, INTERP_ORDER - 2.0)
    return np.linalg.inv(np.vander(t, INTERP_ORDER, increasing=True))


def table_rows(M: int, least: int = TABLE_CHUNK) -> int:
    """Rows of a table of M points: the next ``least`` * 4^j >= M (few compiled shapes)."""
    rows = least
    while rows < M:
        rows *= 4
    return rows


def build_tables(sig, pairs, mu, sd, xk, wk):
    """Local interpolation coefficients of h_e (e in ``pairs``) for table points mu (M,) (each
    set's points consecutive and equispaced) and their sets' sd (M,), with the inner rule (xk, wk)
    (at most INNER_MAX nodes): (rows, 6 P) with rows = :func:`table_rows` (M).  Row j holds, pair
    by pair, the coefficients a_0..a_5 of p(t) = sum_r a_r t^r, the polynomial through the values
    at points j-2..j+3 (t = 0 at point j, 1 at point j+1): meaningful for 2 <= j <= (set's
    points) - 4, the only rows a lookup reaches; rows past M are meaningless (past the chunks of
    TABLE_CHUNK points in use: zero, their coefficients are not formed).

    The compiled program depends on the number of rows and ``pairs`` only: the points in use and
    the inner nodes are counted at run time.  (The tabulated kernel builds its tables itself, on
    the device that looks them up: :func:`tabled_kernel`.)"""
    M = int(np.size(mu))
    rows = table_rows(M)
    pad = lambda a: np.concatenate([np.asarray(a, np.float64), np.zeros(rows - M)])
    return _build_tables(sig, tuple(pairs), jnp.asarray(pad(mu)), jnp.asarray(pad(sd)),
                         np.int32(-(-M // TABLE_CHUNK)), *(jnp.asarray(a) for a in inner_blocks(xk, wk)))


def inner_blocks(xk, wk):
    """An inner rule (at most INNER_MAX nodes) as the kernels walk it: (xk, wk) zero-weight padded to
    INNER_MAX nodes and the number of blocks of INNER_BLOCK nodes that hold the real ones, counted
    at run time, so that the rule's length costs no compiled shape."""
    nk = int(np.size(xk))
    if nk > INNER_MAX:
        raise ValueError(f"xk: at most {INNER_MAX} inner nodes, got {nk}")
    pad = np.zeros(INNER_MAX - nk)
    return (np.concatenate([np.asarray(xk, np.float64), pad]), np.concatenate([np.asarray(wk, np.float64), pad]),
            np.int32(-(-nk // INNER_BLOCK)))


def _table_coefficients(sig, pairs, mu, sd, nchunks, xk, wk, nblocks):
    """:func:`build_tables` for mu, sd padded to its rows, the first ``nchunks`` chunks of
    TABLE_CHUNK points in use and the inner rule as :func:`inner_blocks` gives it (traced)."""
    rows = mu.shape[0]

    def chunk(c, v):
        m = jax.lax.dynamic_slice_in_dim(mu, c * TABLE_CHUNK, TABLE_CHUNK)
        s = jax.lax.dynamic_slice_in_dim(sd, c * TABLE_CHUNK, TABLE_CHUNK)

        def block(j, acc):  # INNER_BLOCK inner nodes for every point of the chunk: sigma and sigma' once
            x = jax.lax.dynamic_slice_in_dim(xk, j * INNER_BLOCK, INNER_BLOCK)
            w = jax.lax.dynamic_slice_in_dim(wk, j * INNER_BLOCK, INNER_BLOCK)
            z = m[:, None] + s[:, None] * x[None, :]
            sg, dg = jax.jvp(sig, (z,), (jnp.ones_like(z),))
            return acc + jnp.stack([monomial(sg, dg, e0, e1, jnp.ones_like(z)) @ w for e0, e1 in pairs], -1)

        h = jax.lax.fori_loop(0, nblocks, block, jnp.zeros((TABLE_CHUNK, len(pairs)), mu.dtype))
        return jax.lax.dynamic_update_slice_in_dim(v, h, c * TABLE_CHUNK, 0)

    v = jax.lax.fori_loop(0, nchunks, chunk, jnp.zeros((rows, len(pairs)), mu.dtype))
    vp = jnp.pad(v, ((2, INTERP_ORDER - 2), (0, 0)))  # (rows + 6, P): row j + 2 is point j
    C = lagrange_to_monomial()

    def coefficients(c, tab):  # the chunks in use only: the rows past them are never read
        seg = jax.lax.dynamic_slice_in_dim(vp, c * TABLE_CHUNK, TABLE_CHUNK + INTERP_ORDER - 1)
        window = [seg[q:q + TABLE_CHUNK] for q in range(INTERP_ORDER)]  # points j-2..j+3 of every row j
        coef = [sum(float(C[r, q]) * window[q] for q in range(INTERP_ORDER) if C[r, q] != 0.0)
                for r in range(INTERP_ORDER)]  # a sum per coefficient: XLA fuses it
        block = jnp.stack(coef, 2).reshape(TABLE_CHUNK, INTERP_ORDER * len(pairs))
        return jax.lax.dynamic_update_slice_in_dim(tab, block, c * TABLE_CHUNK, 0)

    return jax.lax.fori_loop(0, nchunks, coefficients, jnp.zeros((rows, INTERP_ORDER * len(pairs)), mu.dtype))


_build_tables = jax.jit(_table_coefficients, static_argnums=(0, 1))


def _power(cache, s, d, key):
    """s^e0 d^e1 for key = (position, e0, e1), multiplied once and shared."""
    if key not in cache:
        i, e0, e1 = key
        cache[key] = monomial(s[i], d[i], e0, e1)
    return cache[key]


def _pattern_terms(pattern_key, so, do, h, Wc):
    """Wc h_{e_last} prod_i g_{e_i} (b, m) for every pattern, from the outer members' sigma and
    sigma' ``so``, ``do`` (k-1, b, m) and the last member's conditional moments h {pair: (b, m)}."""
    k = so.shape[0] + 1
    cache = {}
    out = []
    for pat in pattern_key:
        f = h[pat[k - 1]] * Wc
        for i in range(k - 1):
            if pat[i] != (0, 0):
                f = f * _power(cache, so, do, (i,) + tuple(pat[i]))
        out.append(f)
    return out


def pattern_sums(sig, pattern_key, zo, h, Wc):
    """(b, P): sum over the outer nodes of Wc h_{e_last} prod_i g_{e_i}(zo_i) for every pattern,
    zo (k-1, b, m) the outer members, h {exponent pair: (b, m)} the last member's conditional
    moments (the nested kernel's; the tabulated one uses :func:`reduce_patterns`)."""
    so, do = jax.jvp(sig, (zo,), (jnp.ones_like(zo),))
    return jnp.stack([jnp.sum(f, axis=-1) for f in _pattern_terms(pattern_key, so, do, h, Wc)], -1)


def over_items(chunk, n_pat, nchunks, X, W, steps, *items):
    """vals[s] for s < steps (a traced count) of chunk(acc, item slices, Xc, Wc) summed over the
    ``nchunks`` chunks of the outer grid X (k-1, M), W (M); items (cap, b, ...)."""
    km1 = X.shape[0]
    m = X.shape[1] // nchunks
    Xs = X.reshape(km1, nchunks, m).transpose(1, 0, 2)
    Ws = W.reshape(nchunks, m)

    def one_batch(*it):
        acc = jnp.zeros((it[0].shape[0], n_pat), X.dtype)
        if nchunks == 1:
            return acc + chunk(*it, Xs[0], Ws[0])
        return jax.lax.scan(lambda a, xw: (a + chunk(*it, *xw), None), acc, (Xs, Ws))[0]

    out = jnp.zeros(items[0].shape[:2] + (n_pat,), X.dtype)
    return jax.lax.fori_loop(0, steps, lambda s, o: o.at[s].set(one_batch(*(a[s] for a in items))), out)


def reduce_patterns(pattern_key, so, do, h, Wc):
    """(b, P): the sums of :func:`pattern_sums` from the outer members' sigma, sigma' ``so``, ``do``
    (k-1, b, m), as one variadic reduction over the nodes.  XLA:CPU emits it as one loop that forms
    every pattern at a node from values computed once there (separate sums duplicated the
    interpolation into every pattern's pass: measured 2x slower, and memory-bound on two cores)."""
    ops = _pattern_terms(pattern_key, so, do, h, Wc)
    zero = tuple(jnp.zeros((), f.dtype) for f in ops)
    sums = jax.lax.reduce(tuple(ops), zero, lambda a, b: tuple(x + y for x, y in zip(a, b)), (ops[0].ndim - 1,))
    return jnp.stack(sums, -1)


def _members(L, X, rows):
    """sum_j L[:, i, j] X[j] for the members i in ``rows``: (len(rows), b, m), elementwise (fuses
    with its consumer; a (b, k, k) x (k, m) dot came out transposed)."""
    return jnp.stack([functools.reduce(jnp.add, [L[:, i, j, None] * X[j] for j in range(X.shape[0])])
                      for i in rows])


PAIR_NODES = 64    # outer nodes per chunk of the four-input tabulated kernel (its grids' sizes are multiples of 64)
PAIR_STEP = 256    # (item, chunk) pairs per loop step: 16384 outer nodes
PAIR_CHUNKS = 128  # chunks of the outer grid a program takes (zero-weight padded; more for a grid of over 8128 nodes)


def _tabled_pairs(sig, pattern_key, pairs, L, aux, row, pi, pc, mu, sd, tchunks, steps, Xs, Ws, xk, wk, nblocks):
    """vals (I, P) for items L (I, k, k) (outer members in rows 0..k-2, the last member's regression
    coefficients in row k-1), each with ``aux`` (I, 3) = (lo, 1 / dx, last cell) and the first row
    ``row`` (I,) of its table, over the outer grid Xs (C, k-1, m), Ws (C, m) in chunks of m nodes.
    The work is a list of (item, chunk) pairs pi, pc (Q,), PAIR_STEP of them per loop step, the
    first ``steps`` (traced) steps in use; a padding pair names a zero-weight chunk.  The tables are
    built first, from their points mu, sd (rows,) (``tchunks`` (1,) chunks of them in use) and the
    inner rule (xk, wk, nblocks) (:func:`_table_coefficients`).

    The grid size, the items and the chunks each item takes are run-time values: one compiled
    program per table size serves every group of four-input sets (the kernel it replaces, with the
    grid and the batch as shapes, compiled 11-13 programs at N = 16, depth 10, 0.5 s each).  A step's
    pairs may belong to different items and chunks: their grid columns are gathered, once, in a pass
    one step ahead that forms sigma and sigma' of the outer members and the last member's table
    position and carries them into the step that uses them (XLA vectorises that pass; inside the fused
    reduction of :func:`reduce_patterns` sigma was scalar, and a second gather of the columns for the
    position cost 35% more time, tanh, N = 16, depth 10)."""
    k = L.shape[1]
    tab = _table_coefficients(sig, pairs, mu, sd, tchunks[0], xk, wk, nblocks)

    def work(q):  # items and chunks (B,) of step q; past the last: the final ones, never used
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, q * PAIR_STEP, PAIR_STEP)
        return sl(pi), sl(pc)

    def outer(q):  # the members at step q's nodes: sigma, sigma' (k-1, B, m) and the table position u (B, m)
        i, c = work(q)
        ab = aux[i]
        z = _members(L[i], jnp.moveaxis(Xs[c], 1, 0), range(k))
        so, do = jax.jvp(sig, (z[:k - 1],), (jnp.ones_like(z[:k - 1]),))
        return so, do, (z[k - 1] - ab[:, 0, None]) * ab[:, 1, None]

    def step(q, carry):
        out, so, do, u = carry
        i, c = work(q)
        h = _lookup(tab, pairs, u, aux[i][:, 2, None], row[i])  # (B, m) per pair
        vals = reduce_patterns(pattern_key, so, do, h, Ws[c])
        return (out.at[i].add(vals), *outer(q + 1))

    out = jnp.zeros((L.shape[0], len(pattern_key)), Xs.dtype)
    return jax.lax.fori_loop(0, steps, step, (out, *outer(0)))[0]


def _interpolate(tab, pairs, Lb, ab, rb, Xc):
    """The conditional moments of every pair at the items' outer nodes, read off their tables: the last
    member's position u in table cells (aux ``ab`` = (lo, 1 / dx, last cell)), then :func:`_lookup`.
    {pair: (b, m)}."""
    k = Lb.shape[1]
    u = (_members(Lb, Xc, (k - 1,))[0] - ab[:, 0, None]) * ab[:, 1, None]
    return _lookup(tab, pairs, u, ab[:, 2, None], rb)


def _lookup(tab, pairs, u, last, rb):
    """{pair: (b, m)}: the tables at positions u (b, m) in cells (the last cell in use ``last``): the
    table row ``rb`` (b,) + cell, and the INTERP_ORDER coefficients of that cell evaluated by Horner's
    rule."""
    i = jnp.clip(jnp.floor(u), 2.0, last)
    t = u - i
    coef = tab.at[rb[:, None] + i.astype(rb.dtype)].get(mode="clip")  # (b, m, INTERP_ORDER P)
    h = {}
    for j, p in enumerate(pairs):
        a = coef[..., INTERP_ORDER * j:INTERP_ORDER * (j + 1)]
        hp = a[..., INTERP_ORDER - 1]
        for r in range(INTERP_ORDER - 2, -1, -1):
            hp = a[..., r] + t * hp
        h[p] = hp
    return h

# ---------------------------------------------------------------------------------------------
# row kernels (sets of three inputs): the grid size and the batch as run-time values


ROW_NODES = {3: 8}  # nodes per block of the row kernels' outer grid (sets of three inputs)
ROW_GRID = {3: 256}  # outer-grid nodes a program takes (k = 3: one direction of at most 256 nodes),
#                      zero-weight padded to this size


def row_step(q, R: int, nblk, I: int):
    """Step q of a row kernel: its items i0 .. i0 + R - 1 (i0 = (q // nblk) R) and its block of the
    outer grid, q % nblk (nblk: the grid's blocks of ROW_NODES nodes, traced).  A step's items share
    one block (a broadcast, as the former kernels' items shared their grid chunk); an item past the
    real ones (zero factors) gives values that are never read."""
    return jnp.minimum(q // nblk, I // R - 1) * R, q % nblk


def _tabled_rows(sig, pattern_key, pairs, R, L, aux, trow, mu, sd, tchunks, steps, nblk, X, W, xk, wk, nblocks):
    """vals (I, P) of the items L (I, k, k) (outer members in rows 0..k-2, the last member's
    regression coefficients in row k-1), each with ``aux`` (I, 3) = (lo, 1 / dx, last cell) and the
    first row ``trow`` (I,) of its table, over the outer grid X (k-1, B, g), W (B, g) in blocks of g
    nodes, of which the items use the first ``nblk`` (traced); ``steps``: R items times one block
    each (:func:`row_step`).  The tables are built first, from their points mu, sd (rows,)
    (``tchunks`` (1,) chunks of them in use) and the inner rule (xk, wk, nblocks)
    (:func:`_table_coefficients`).

    The grid size, the batch and N are run-time values: one compiled program per set size and table
    size serves every group (the former kernel compiled one per (grid size, batch, table rows)).
    sigma and sigma' of the outer members are computed one step ahead, in a pass of their own that
    XLA vectorises (inside the fused reduction of :func:`reduce_patterns` they were scalar), and
    carried into the step that uses them."""
    k = L.shape[1]
    I = L.shape[0]
    tab = _table_coefficients(sig, pairs, mu, sd, tchunks[0], xk, wk, nblocks)

    def outer(q):
        i0, b = row_step(q, R, nblk, I)
        z = _members(jax.lax.dynamic_slice_in_dim(L, i0, R), X[:, b], range(k - 1))
        return jax.jvp(sig, (z,), (jnp.ones_like(z),))

    def step(q, carry):
        out, so, do = carry
        i0, b = row_step(q, R, nblk, I)
        h = _interpolate(tab, pairs, *(jax.lax.dynamic_slice_in_dim(a, i0, R) for a in (L, aux, trow)), X[:, b])
        vals = reduce_patterns(pattern_key, so, do, h, W[b])
        out = jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(out, i0, R) + vals, i0, 0)
        return (out, *outer(q + 1))

    out = jnp.zeros((I, len(pattern_key)), X.dtype)
    return jax.lax.fori_loop(0, steps, step, (out, *outer(0)))[0]


@functools.lru_cache(maxsize=None)
def tabled_rows_kernel(sig, pattern_key, pairs, R, mesh):
    """The jitted :func:`_tabled_rows`: items (L, aux, trow), table points (mu, sd, tchunks) and
    steps split over the devices of ``mesh`` (each device builds the tables of its own
    items), the block count, the outer grid and the inner rule replicated."""
    return sharded(functools.partial(_tabled_rows, sig, pattern_key, pairs, R), mesh, 6, 6)


def sharded(moments, mesh, n_items: int, n_shared: int):
    """jit(shard_map) of moments(*items, steps, *shared) over the devices of ``mesh``: the
    ``n_items`` item arrays (leading axis D * cap) and steps (D,) split, device d running its
    steps[d] sub-batches, the ``n_shared`` other arguments replicated."""
    spec = jax.sharding.PartitionSpec

    def local(*a):
        return moments(*a[:n_items], a[n_items][0], *a[n_items + 1:])

    local.__name__ = local.__qualname__ = getattr(moments, "func", moments).__name__  # names the compiled program
    return jax.jit(shard_map(local, mesh=mesh, in_specs=(spec("d"),) * (n_items + 1) + (spec(),) * n_shared,
                              out_specs=spec("d"), check=False))


@functools.lru_cache(maxsize=None)
def tabled_kernel(sig, pattern_key, pairs, mesh):
    """The jitted :func:`_tabled_pairs`: items (L, aux, row), pairs (pi, pc), table points
    (mu, sd, tchunks) and steps split over the devices of ``mesh`` (each device builds the tables of
    its own items), the chunked outer grid and the inner rule replicated."""
    return sharded(functools.partial(_tabled_pairs, sig, pattern_key, pairs), mesh, 8, 5)

# ---------------------------------------------------------------------------------------------
# the calls of the tabulated kernels (tables per call, items spread over the devices) and their numpy
# twins for small work


IN_FLIGHT = 2  # kernel calls dispatched ahead of the one being collected


HOST_BUDGET = 1 << 17  # items x nodes (x inner nodes) per numpy step: ~1 MB arrays (tests/test_memory.py)


def host_patterns(pattern_key, so, do, h, W):
    """(n, P): sum over nodes of W h_{e_last} prod_i g_{e_i} for so, do (k-1, n, m), h {pair: (n, m)}."""
    k = so.shape[0] + 1
    cache = {}
    out = []
    for pat in pattern_key:
        f = h[pat[k - 1]] * W
        for i in range(k - 1):
            if pat[i] != (0, 0):
                key = (i,) + tuple(pat[i])
                if key not in cache:
                    cache[key] = monomial(so[i], do[i], pat[i][0], pat[i][1])
                f = f * cache[key]
        out.append(f.sum(axis=-1))
    return np.stack(out, -1)


def host_tables(sig, pairs, mu, sd, xk, wk):
    """Lagrange coefficients (M, 6 P) of h_e at the points mu (M,) (one set's, equispaced) with
    conditional deviation sd: :func:`build_tables` in numpy."""
    M = mu.size
    v = np.empty((M, len(pairs)))
    step = max(1, HOST_BUDGET // xk.size)
    for lo in range(0, M, step):
        z = mu[lo:lo + step, None] + sd * xk[None, :]
        s, d = sd_values(sig, z)
        v[lo:lo + step] = np.stack([monomial(s, d, e0, e1, np.ones_like(z)) @ wk for e0, e1 in pairs], -1)
    vp = np.pad(v, ((2, INTERP_ORDER - 2), (0, 0)))
    window = np.stack([vp[q:q + M] for q in range(INTERP_ORDER)], 0)  # (6, M, P)
    coef = np.einsum("rq,qmp->mpr", lagrange_to_monomial(), window)  # (M, P, 6)
    return coef.reshape(M, INTERP_ORDER * len(pairs))


def host_tabled(sig, pattern_key, pairs, Li, oi, X, W, xk, wk, R, L, ntab):
    """The tabulated kernel (:func:`_tabled_pairs`) in numpy: values (n, P) of the
    items Li (n, k, k) owned by the sets oi, each set's table built once."""
    n, k = Li.shape[0], Li.shape[1]
    out = np.empty((n, len(pattern_key)))
    for s in np.unique(oi):
        rows = np.nonzero(oi == s)[0]
        pts = int(ntab[s])
        dx = 2.0 * R[s] / (pts - 6)
        lo = -R[s] - 2.0 * dx
        tab = host_tables(sig, pairs, lo + dx * np.arange(pts), L[s, k - 1, k - 1], xk, wk)
        step = max(1, HOST_BUDGET // X.shape[1])
        for a in range(0, rows.size, step):
            Lb = Li[rows[a:a + step]]
            zo = np.einsum("cij,jm->icm", Lb[:, :k - 1, :k - 1], X)
            u = (np.einsum("cj,jm->cm", Lb[:, k - 1, :k - 1], X) - lo) * (1.0 / dx)
            i = np.clip(np.floor(u), 2.0, float(pts - 5))
            t = u - i
            coef = tab[np.minimum(i.astype(np.int64), tab.shape[0] - 1)]  # (b, m, 6 P)
            h = {}
            for j, p in enumerate(pairs):
                a_ = coef[..., INTERP_ORDER * j:INTERP_ORDER * (j + 1)]
                hp = a_[..., INTERP_ORDER - 1]
                for r in range(INTERP_ORDER - 2, -1, -1):
                    hp = a_[..., r] + t * hp
                h[p] = hp
            so, do = sd_values(sig, zo)
            out[rows[a:a + step]] = host_patterns(pattern_key, so, do, h, W)
    return out


def settle(results: list, call: tuple) -> None:
    """Append a dispatched call (owners, weights, counts, per-device items, values) to ``results`` and
    wait for all but the last IN_FLIGHT: JAX runs calls asynchronously, and every queued call holds
    its inputs (items, tables: up to ~40 MB each), so an unbounded queue would hold a block's worth."""
    check_stop()
    results.append(call)
    if len(results) > IN_FLIGHT:
        done = results[-IN_FLIGHT - 1]
        results[-IN_FLIGHT - 1] = done[:4] + (np.asarray(done[4]),)


def shares(n: int, D: int) -> list[slice]:
    """The items of a call of n that device d gets, d < D: consecutive runs of ceil(n / D)."""
    share = -(-n // D)
    return [slice(min(d * share, n), min((d + 1) * share, n)) for d in range(D)]


def split(items, D, cap, b, *extra):
    """Items (n, ...) of one call spread evenly over D devices (:func:`shares`): arrays
    (D * cap, b, ...) (zero padded), steps (D,) (sub-batches each device runs) and the item counts
    per device."""
    parts = shares(items.shape[0], D)
    cnts = [sl.stop - sl.start for sl in parts]
    out = []
    for a in (items,) + extra:
        buf = np.zeros((D, cap * b) + a.shape[1:], a.dtype)
        for d, sl in enumerate(parts):
            buf[d, :cnts[d]] = a[sl]
        out.append(buf.reshape((D * cap, b) + a.shape[1:]))
    steps = np.array([-(-c // b) for c in cnts], dtype=np.int32)
    return (*out, steps, cnts)


TABLE_ROWS = 1 << 18  # table points per call of the tabulated kernel (6 P float64 coefficients each)
TABLE_LEAST = 1 << 16  # fewest table rows of a four-input tabulated call: 4096- and 16384-row tables padded to 65536
#                        (tanh, N = 16, depth 10: 76 -> 67 programs, first call 19.9 -> 16.7-17.0 s, warm +3%;
#                        2^18 gave 69 programs but warm +27%: zeroing and padding the unused rows costs per call; the
#                        coefficients are formed for the rows in use only)


PAIR_CALL = 1 << 15   # (item, chunk) pairs per device and call of the four-input tabulated kernel: 2^21 outer nodes
PAIR_ITEMS = 1 << 13  # items per device and call (its item arrays: one size)


def pair_grid(X, W, real: int):
    """The outer grid X (k-1, >= real), W of a group in chunks of PAIR_NODES nodes, zero-weight
    padded to PAIR_CHUNKS chunks (or the next power of two holding one chunk more): Xs (C, k-1, m),
    Ws (C, m), and the chunks that hold the ``real`` nodes.  The chunks past them (the last at least)
    carry zero weight: padding pairs name the last."""
    m = PAIR_NODES
    nch = -(-real // m)
    C = PAIR_CHUNKS
    while C < nch + 1:
        C *= 2
    Xp, Wp = np.zeros((X.shape[0], C * m)), np.zeros(C * m)
    Xp[:, :real], Wp[:real] = X[:, :real], W[:real]
    return Xp.reshape(X.shape[0], C, m).transpose(1, 0, 2).copy(), Wp.reshape(C, m), nch


def pair_list(cnts, nch: int, zero_chunk: int):
    """The (item, chunk) pairs of each device's cnts[d] items, nch chunks each, item by item:
    pi, pc (D * PAIR_CALL,) int32 (padding pairs: item 0, the zero-weight chunk) and the loop steps
    per device (D,)."""
    D = len(cnts)
    pi = np.zeros((D, PAIR_CALL), np.int32)
    pc = np.full((D, PAIR_CALL), zero_chunk, np.int32)
    for d, c in enumerate(cnts):
        pi[d, :c * nch] = np.repeat(np.arange(c, dtype=np.int32), nch)
        pc[d, :c * nch] = np.tile(np.arange(nch, dtype=np.int32), c)
    steps = np.array([-(-c * nch // PAIR_STEP) for c in cnts], dtype=np.int32)
    return pi.reshape(-1), pc.reshape(-1), steps


def run_tabled(results, sig, key, pairs, mesh, Li, wi, oi, grid, xk, wk, R, L, ntab):
    """Calls of the four-input tabulated kernel (:func:`_tabled_pairs`) over the items (Li, wi, oi)
    of one group (owners in increasing order, several items per set), appended to ``results``
    (:func:`settle`); ``grid``: (Xs, Ws, chunks) of :func:`pair_grid`.  Each call covers at most
    PAIR_ITEMS items and PAIR_CALL pairs per device and sets with at most TABLE_ROWS table points in
    all; each device builds the tables of the sets its share of the items belongs to (a set split
    between two devices is built on both) and looks them up."""
    k = Li.shape[1]
    D = mesh.devices.size
    kernel = tabled_kernel(sig, key, pairs, mesh)
    inner = tuple(jnp.asarray(a) for a in inner_blocks(xk, wk))
    Xs, Ws, nch = grid
    per_call = D * min(PAIR_ITEMS, PAIR_CALL // nch)
    start = 0
    while start < Li.shape[0]:
        stop = min(start + per_call, Li.shape[0])
        stop, aux, row, mu, sdv, tchunks = call_tables(oi, start, stop, ntab, R, L, k, D, TABLE_LEAST)
        (Lb, ab, rb), cnts = split_rows(D, PAIR_ITEMS, Li[start:stop], aux, row)
        pi, pc, steps = pair_list(cnts, nch, Xs.shape[0] - 1)
        settle(results, (oi[start:stop], wi[start:stop], cnts, PAIR_ITEMS,
                         kernel(Lb, ab, rb, pi, pc, mu, sdv, tchunks, steps, Xs, Ws, *inner)))
        start = stop


def call_tables(oi, start: int, stop: int, ntab, R, L, k: int, D: int, least: int = TABLE_CHUNK):
    """The tables of one call of a tabulated kernel over the items start..stop (owners ``oi``): the call
    ends before the first set whose table no longer fits in TABLE_ROWS points.  Returns the new stop,
    each item's aux (lo, 1 / dx, last cell) and first table row on its device, the table points mu, sd
    (D * rows,) and the chunks of them each device uses (D,)."""
    sets, first = np.unique(oi[start:stop], return_index=True)
    pts = ntab[sets]
    fit = int(np.searchsorted(np.cumsum(pts), TABLE_ROWS, side="right"))
    if fit < sets.size:  # end the call before the first set whose table does not fit
        stop, sets, pts = start + first[fit], sets[:fit], pts[:fit]
    # points lo + dx j, j < pts: [-R, R] is cells 2..pts-5 (two points below, three above)
    dx = 2.0 * R[sets] / (pts - 6)
    lo, sd = -R[sets] - 2.0 * dx, L[sets, k - 1, k - 1]
    local = np.searchsorted(sets, oi[start:stop])
    aux = np.stack([lo[local], 1.0 / dx[local], (pts[local] - 5).astype(np.float64)], 1)
    row = np.zeros(stop - start, dtype=np.int32)
    points = []
    for mine in shares(stop - start, D):  # each device's items, as split gives them
        ds, inv = np.unique(local[mine], return_inverse=True)
        p = pts[ds]
        offs = np.cumsum(p) - p
        row[mine] = offs[inv]
        j = np.arange(int(p.sum())) - np.repeat(offs, p)
        points.append((np.repeat(lo[ds], p) + np.repeat(dx[ds], p) * j, np.repeat(sd[ds], p)))
    rows = table_rows(max(m.size for m, _ in points), least)
    mu, sdv = np.zeros((D, rows)), np.zeros((D, rows))
    for d, (m, v) in enumerate(points):
        mu[d, :m.size], sdv[d, :m.size] = m, v
    tchunks = np.array([-(-m.size // TABLE_CHUNK) for m, _ in points], dtype=np.int32)
    return stop, aux, row, mu.reshape(-1), sdv.reshape(-1), tchunks


def split_rows(D: int, I: int, *arrays):
    """The items (n, ...) of one call spread evenly over D devices (:func:`shares`): arrays
    (D * I, ...) (zero padded) and the item counts per device (each at most I)."""
    parts = shares(arrays[0].shape[0], D)
    cnts = [sl.stop - sl.start for sl in parts]
    out = []
    for a in arrays:
        buf = np.zeros((D, I) + a.shape[1:], a.dtype)
        for d, sl in enumerate(parts):
            buf[d, :cnts[d]] = a[sl]
        out.append(buf.reshape((D * I,) + a.shape[1:]))
    return out, cnts


def row_steps(cnts, nblk: int, R: int):
    """Loop steps per device for cnts items of nblk blocks, R items a step: (D,) int32."""
    return np.array([-(-c // R) * nblk for c in cnts], dtype=np.int32)


def run_tabled_rows(results, sig, key, pairs, mesh, per_call, items, rows_per_step, Li, wi, oi, grid, xk, wk, R, L,
                    ntab):
    """Calls of the tabulated kernel over the items (Li, wi, oi) of one group (owners in
    increasing order, several items per set), appended to ``results`` (:func:`settle`).  Each call
    covers at most ``per_call`` items and sets with at most TABLE_ROWS table points in all; each
    device builds the tables of the sets its share of the items belongs to (a set split between two
    devices is built on both) and looks them up.  ``items``: the kernel's item arrays per device,
    ``rows_per_step`` its items a loop step; ``grid``: (X, W, nblk) of
    :func:`efftheory.gaussian._sources._row_grid`."""
    k = Li.shape[1]
    D = mesh.devices.size
    kernel = tabled_rows_kernel(sig, key, pairs, rows_per_step, mesh)
    inner = tuple(jnp.asarray(a) for a in inner_blocks(xk, wk))
    X, W, nblk = grid
    start = 0
    while start < Li.shape[0]:
        stop = min(start + per_call, Li.shape[0])
        stop, aux, row, mu, sdv, tchunks = call_tables(oi, start, stop, ntab, R, L, k, D)
        (Lb, ab, rb), cnts = split_rows(D, items, Li[start:stop], aux, row)
        settle(results, (oi[start:stop], wi[start:stop], cnts, items,
                         kernel(Lb, ab, rb, mu, sdv, tchunks,
                                row_steps(cnts, nblk, rows_per_step), np.int32(nblk), X, W, *inner)))
        start = stop


def table_points(R, dx: float):
    """Table points for half-width R at spacing <= dx: two more below -R, three above R (see
    :func:`run_tabled`), at least 16.  Not padded: the kernel counts a table's points at run time."""
    return np.maximum(np.ceil(2.0 * R / dx) + 6, 16.0).astype(np.int64)
