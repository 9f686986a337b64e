"""Tabulated conditional integrals (efftheory._tables) inside the three- and four-input sources:
the interpolation meets its error bound against direct evaluation, and source moments computed
with tables everywhere agree with the nested rule, the closed form for sin and a plain Cholesky
tensor rule."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from test_gaussian_sources import _cholesky_rule, _kernel, _sin_moment

import efftheory as et
from efftheory.gaussian import _sources as sources
from efftheory.gaussian import _tables, normal_rule

PAIRS = ((0, 1), (1, 0))


def _direct(fn, pair, mu, sd, xk, wk):
    """h_e(mu) = sum_j wk_j g_e(mu + sd xk_j), evaluated directly."""
    g = _tables._factor(fn, *pair)
    return np.asarray(g(jnp.asarray(mu[:, None] + sd * xk[None, :]))) @ wk


def _lookup(tab, pts, lo, dx, mu, j):
    """The kernel's cell lookup, in numpy: the degree-5 polynomial of pair j at mu."""
    u = (mu - lo) / dx
    i = np.clip(np.floor(u), 2, pts - 5)
    t = u - i
    a = tab[i.astype(int), 6 * j:6 * j + 6]
    return sum(a[:, r] * t**r for r in range(6))


def _max_error(fn, sd, R, dx, mu, xk, wk):
    pts = int(math.ceil(2 * R / dx)) + 6
    dx = 2 * R / (pts - 6)
    lo = -R - 2 * dx
    grid = lo + dx * np.arange(pts)
    tab = np.asarray(_tables.build_tables(fn, PAIRS, grid, np.full(pts, sd), xk, wk))
    return max(float(np.max(np.abs(_lookup(tab, pts, lo, dx, mu, j) - _direct(fn, p, mu, sd, xk, wk))))
               for j, p in enumerate(PAIRS))


@pytest.mark.parametrize("name", ["tanh", "gelu", "sin", "silu"])
def test_interpolation_meets_its_bound(name):
    """At the spacing of table_spacing the interpolation error of h_e stays below tol / (e B) at
    2000 random points; at four times that spacing it is > 100x larger (it is the
    interpolation's error that is measured, not a rounding floor), as a degree-5 rule predicts
    (4^6 = 4096)."""
    fn = et.get_activation(name).fn
    tol, sd, R = 1e-9, 0.4, 5.0
    xk, wk = normal_rule(48, tail=6.5)
    dx = _tables.table_spacing(fn, PAIRS, R + 6.5 * sd, [1.0], tol)
    assert 0.005 < dx < 0.2
    eps = tol / (math.e * _tables._outer_bound(fn, [1.0]))
    mu = np.random.default_rng(0).uniform(-R, R, 2000)
    err = _max_error(fn, sd, R, dx, mu, xk, wk)
    assert err <= eps, (err, eps)
    assert _max_error(fn, sd, R, 4 * dx, mu, xk, wk) > 100 * err


@pytest.fixture
def tables_everywhere(monkeypatch):
    """Every set with an inner rule of more than one node takes the tabulated kernel; counts calls."""
    calls = []
    run = sources._run_tabled

    def counting(results, *a, **k):
        before = len(results)
        run(results, *a, **k)
        calls.append(len(results) - before)

    monkeypatch.setattr(sources, "_TABLE_COST", 0.0)
    monkeypatch.setattr(sources, "_LOOKUP_COST", -1e9)
    monkeypatch.setattr(sources, "_run_tabled", counting)
    monkeypatch.setattr(sources, "HOST_SETS", 0)  # the compiled kernel, not the numpy path of small work
    return calls


@pytest.fixture
def host_tables(monkeypatch):
    """As tables_everywhere, on the numpy path of small work (sources.HOST_SETS)."""
    monkeypatch.setattr(sources, "_TABLE_COST", 0.0)
    monkeypatch.setattr(sources, "_LOOKUP_COST", -1e9)
    monkeypatch.setattr(sources, "HOST_SETS", 1 << 30)


@pytest.mark.parametrize("name", ["tanh", "gelu"])
def test_host_tables_match_the_compiled_kernel(name, host_tables, monkeypatch):
    """Tables everywhere: the numpy path of small work gives the compiled kernel's values to rounding."""
    K = _kernel(5, 2, collinear=False)
    act = et.get_activation(name)
    host = sources.source_moments(act, K)
    monkeypatch.setattr(sources, "HOST_SETS", 0)
    kernel = sources.source_moments(act, K)
    for a, b in zip(host, kernel):
        assert np.max(np.abs(a - b)) < 1e-13 * max(1.0, np.max(np.abs(b)))


def test_sin_closed_form_with_tables(tables_everywhere):
    K = _kernel(5, 0)
    Mss, Mds, Mdd = sources.source_moments(et.get_activation("sin"), K)
    assert sum(tables_everywhere) > 0
    for M, kinds in ((Mss, (0, 0, 0, 0)), (Mds, (1, 1, 0, 0)), (Mdd, (1, 1, 1, 1))):
        ref = np.empty_like(M)
        for idx in itertools.product(range(5), repeat=4):
            ref[idx] = _sin_moment(K, idx, kinds)
        np.testing.assert_allclose(M, ref, atol=2e-9, rtol=0)


def test_tanh_with_tables_against_cholesky_rule(tables_everywhere):
    K = _kernel(5, 2, collinear=False)
    K = 1.5 * K / K.diagonal().max()
    Mss, Mds, Mdd = sources.source_moments(et.get_activation("tanh"), K)
    assert sum(tables_everywhere) > 0
    fn, dfn = np.tanh, lambda z: 1 / np.cosh(z) ** 2
    for idx, M, kinds in [((0, 1, 2, 4), Mss, (0, 0, 0, 0)), ((0, 3, 1, 2), Mds, (1, 1, 0, 0)),
                          ((1, 2, 3, 4), Mdd, (1, 1, 1, 1)), ((4, 1, 1, 2), Mss, (0, 0, 0, 0))]:
        ref = _cholesky_rule(fn, dfn, K, idx, kinds, 56 if len(set(idx)) == 4 else 120)
        assert abs(M[idx] - ref) < 2e-9 * max(1.0, abs(ref)), (idx, M[idx], ref)


@pytest.mark.parametrize("name", ["tanh", "gelu", "softplus"])
def test_tables_agree_with_the_nested_rule(name, tables_everywhere, monkeypatch):
    """Wide, correlated, collinear and nearly collinear inputs (variances up to 3): tables
    everywhere against no tables, both at tol = 1e-10."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 4))
    x[2] = -1.5 * x[1]
    x[0] = 0.995 * x[3] + 0.05 * rng.normal(size=4)
    K = x @ x.T / 4
    K = 3.0 * K / K.diagonal().max()
    act = et.get_activation(name)
    tabled = sources.source_moments(act, K, tol=1e-10)
    assert sum(tables_everywhere) > 0
    monkeypatch.setattr(sources, "table_spacing", lambda *a, **k: 0.0)
    nested = sources.source_moments(act, K, tol=1e-10)
    for a, b in zip(tabled, nested):
        assert np.max(np.abs(a - b)) < 2e-10 * max(1.0, np.max(np.abs(b)))


def test_default_choice_tabulates_wide_sets():
    """At the default costs the four-input sets of wide first-layer kernels are tabulated (the
    path the finite-width speed relies on), the small deep-layer ones need not be."""
    rng = np.random.default_rng(16)
    x = rng.normal(size=(8, 4))
    K = x @ x.T / 4
    sets = sources._sets(8, 4)
    S = K[sets[:, :, None], sets[:, None, :]]
    fn = et.get_activation("tanh").fn
    dx = _tables.table_spacing(fn, PAIRS, 20.0, np.diagonal(S, axis1=1, axis2=2).ravel(), 1e-9)
    ntab = sources._conditional_factor(S, 1e-9, 6.5, dx)[4]
    assert np.mean(ntab > 0) > 0.5


def test_lookup_on_cell_boundaries():
    """An outer node whose last member falls exactly on a table point (a cell boundary), one rounding
    step either side of it, or on the table's ends +-R (where the cell index is clipped) reads the
    table correctly: the compiled lookup (_tables._interpolate) and the numpy one of small work
    (_tables.host_tabled) agree with direct evaluation to rounding (at a table point the local
    polynomial interpolates, so no interpolation error remains)."""
    fn = et.get_activation("tanh").fn
    sd, R = 0.4, 2.0
    xk, wk = normal_rule(24)
    pts = int(_tables.table_points(np.array([R]), 0.05)[0])
    dx = 2.0 * R / (pts - 6)
    lo = -R - 2.0 * dx
    grid = lo + dx * np.arange(pts)  # as call_tables and host_tabled place the points
    on = grid[2:pts - 3]  # every cell boundary of [-R, R], its ends included
    mu = np.concatenate([on, np.nextafter(on, -np.inf), np.nextafter(on, np.inf), [-R, R]])
    ref = {p: _direct(fn, p, mu, sd, xk, wk) for p in PAIRS}
    # compiled: one item, c = 1 (its last member is the outer node itself), the aux of call_tables
    tab = _tables.build_tables(fn, PAIRS, grid, np.full(pts, sd), xk, wk)
    Lb = np.array([[[1.0, 0.0], [1.0, sd]]])
    aux = np.array([[lo, 1.0 / dx, pts - 5.0]])
    h = _tables._interpolate(tab, PAIRS, jnp.asarray(Lb), jnp.asarray(aux), jnp.zeros(1, jnp.int32),
                             jnp.asarray(mu[None, :]))
    # numpy: items of one set of two members, the last at mu (one outer node of weight 1)
    Li = np.zeros((mu.size, 2, 2))
    Li[:, 1, 0] = mu
    sets = np.array([[[1.0, 0.0], [0.0, sd]]])
    for p in PAIRS:
        got = np.asarray(h[p]).reshape(-1)
        host = _tables.host_tabled(fn, (((0, 0), p),), PAIRS, Li, np.zeros(mu.size, int), np.ones((1, 1)),
                                   np.ones(1), xk, wk, np.array([R]), sets, np.array([pts]))[:, 0]
        assert np.max(np.abs(got - ref[p])) < 1e-13, (p, np.max(np.abs(got - ref[p])))
        assert np.max(np.abs(host - ref[p])) < 1e-13, (p, np.max(np.abs(host - ref[p])))


def test_four_input_tables_compile_one_program_per_table_size(tables_everywhere, monkeypatch):
    """Sets of four inputs whose outer grids differ in size (here at least three sizes) run the
    tabulated kernel (_tables._tabled_pairs) with the grid, the items and the chunks per item as
    run-time values: it is traced (one compiled program each time) once per table size, not once per
    grid size and batch as the kernel it replaced (11-13 programs at N = 16, depth 10).  The values
    are the numpy path's (sources.HOST_SETS) to rounding."""
    traces, grids = [], set()
    kernel = _tables._tabled_pairs

    def counting(*a):
        traces.append(a[3].shape)  # L: (items, k, k)
        return kernel(*a)

    grid = sources._pair_grid_np

    def recording(X, W, real):
        grids.add(real)
        return grid(X, W, real)

    monkeypatch.setattr(_tables, "_tabled_pairs", counting)
    monkeypatch.setattr(sources, "_pair_grid_np", recording)
    _tables.tabled_kernel.cache_clear()
    sources._pair_grid.cache_clear()
    try:
        rng = np.random.default_rng(7)
        x = rng.normal(size=(6, 3)) * np.array([[0.3], [0.6], [1.0], [1.4], [2.0], [2.6]])
        K = x @ x.T / 3 + 0.05
        act = et.get_activation("tanh")
        got = sources.source_moments(act, K)
    finally:
        _tables.tabled_kernel.cache_clear()
        sources._pair_grid.cache_clear()
    assert len(grids) >= 3, grids
    assert 1 <= len(traces) <= 2, (traces, grids)
    monkeypatch.setattr(sources, "HOST_SETS", 1 << 30)
    host = sources.source_moments(act, K)
    for a, b in zip(got, host):
        assert np.max(np.abs(a - b)) < 1e-13 * max(1.0, np.max(np.abs(b)))
