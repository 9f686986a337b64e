"""The three- and four-input source moments (efftheory.products) against independent references:
closed forms from the characteristic function (sin), Isserlis' theorem (linear), and a plain
numpy tensor rule in Cholesky coordinates (tanh, gelu)."""

import itertools
import math

import numpy as np
import pytest

import efftheory as et
from efftheory.gaussian import _sources as sources
from efftheory.gaussian import _tables as tables


def _kernel(N, seed, collinear=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 3))
    if collinear:
        x[2] = -1.5 * x[1]  # an exactly collinear (rank-deficient) pair
    x[0] = 0.995 * x[3] + 0.05 * rng.normal(size=3)  # a nearly collinear pair
    return x @ x.T / 3 + 0.05


def _sin_moment(K, idx, kinds):
    """<prod_s f_s(z_{idx_s})> with f = sin (kind 0) or cos (kind 1), exactly:
    sin z = (e^{iz} - e^{-iz}) / 2i, cos z = (e^{iz} + e^{-iz}) / 2, and <e^{i t.z}> = e^{-t.K.t/2}."""
    total = 0.0
    for eps in itertools.product((1, -1), repeat=4):
        t = np.zeros(K.shape[0])
        coef = 1.0 + 0j
        for e, a, kind in zip(eps, idx, kinds):
            t[a] += e
            coef *= (e / 2j) if kind == 0 else 0.5
        total += coef * np.exp(-0.5 * t @ K @ t)
    return total.real


def test_sin_closed_form_all_entries():
    K = _kernel(5, 0)
    Mss, Mds, Mdd = sources.source_moments(et.get_activation("sin"), K)
    for M, kinds in ((Mss, (0, 0, 0, 0)), (Mds, (1, 1, 0, 0)), (Mdd, (1, 1, 1, 1))):
        ref = np.empty_like(M)
        for idx in itertools.product(range(5), repeat=4):
            ref[idx] = _sin_moment(K, idx, kinds)
        np.testing.assert_allclose(M, ref, atol=2e-9, rtol=0)


def test_linear_isserlis():
    K = _kernel(6, 1)
    Mss, Mds, Mdd = sources.source_moments(et.get_activation("linear"), K)
    ref = np.einsum("ab,cd->abcd", K, K) + np.einsum("ac,bd->abcd", K, K) + np.einsum("ad,bc->abcd", K, K)
    np.testing.assert_allclose(Mss, ref, atol=1e-12)
    np.testing.assert_allclose(Mds, np.broadcast_to(K[None, None], Mds.shape), atol=1e-12)
    np.testing.assert_allclose(Mdd, 1.0, atol=1e-12)


def _cholesky_rule(fn, dfn, K, idx, kinds, n):
    """Plain numpy tensor trapezoid rule in Cholesky coordinates over the distinct inputs."""
    uniq = sorted(set(idx))
    S = K[np.ix_(uniq, uniq)]
    C = np.linalg.cholesky(S + 0.0)
    u = -8 + (np.arange(n) + 0.5) * 16 / n
    w = np.exp(-u * u / 2)
    w /= w.sum()
    grids = np.meshgrid(*([u] * len(uniq)), indexing="ij")
    W = np.ones_like(grids[0])
    for g in grids:
        W = W * np.exp(-g * g / 2)
    W /= W.sum()
    z = [sum(C[i, j] * grids[j] for j in range(len(uniq))) for i in range(len(uniq))]
    f = W
    for a, kind in zip(idx, kinds):
        zz = z[uniq.index(a)]
        f = f * (fn(zz) if kind == 0 else dfn(zz))
    return f.sum()


@pytest.mark.parametrize("name", ["tanh", "gelu"])
def test_smooth_against_cholesky_rule(name):
    from scipy.special import erf

    fns = {
        "tanh": (np.tanh, lambda z: 1 / np.cosh(z) ** 2),
        "gelu": (lambda z: z * 0.5 * (1 + erf(z / np.sqrt(2))),
                 lambda z: 0.5 * (1 + erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)),
    }
    fn, dfn = fns[name]
    K = _kernel(5, 2, collinear=False)
    K = 1.5 * K / K.diagonal().max()  # variances <= 1.5: the plain reference rule converges to 1e-11
    Mss, Mds, Mdd = sources.source_moments(et.get_activation(name), K)
    cases = [((0, 1, 2, 4), Mss, (0, 0, 0, 0)), ((0, 3, 1, 2), Mds, (1, 1, 0, 0)),
             ((1, 2, 3, 4), Mdd, (1, 1, 1, 1)), ((0, 0, 3, 1), Mds, (1, 1, 0, 0)), ((4, 1, 1, 2), Mss, (0, 0, 0, 0))]
    for idx, M, kinds in cases:
        n = 56 if len(set(idx)) == 4 else 120
        ref = _cholesky_rule(fn, dfn, K, idx, kinds, n)
        assert abs(M[idx] - ref) < 2e-9 * max(1.0, abs(ref)), (idx, M[idx], ref)


def test_tolerance_knob_and_symmetry():
    act = et.get_activation("tanh")
    K = _kernel(5, 3)
    fine = sources.source_moments(act, K, tol=1e-11)
    coarse = sources.source_moments(act, K, tol=1e-5)
    for a, b in zip(fine, coarse):
        assert np.max(np.abs(a - b)) < 1e-5
        assert np.all(np.isfinite(a))
    Mss, Mds, Mdd = fine
    for perm in itertools.permutations(range(4)):
        np.testing.assert_array_equal(Mss, Mss.transpose(perm))
        np.testing.assert_array_equal(Mdd, Mdd.transpose(perm))
    np.testing.assert_array_equal(Mds, Mds.transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(Mds, Mds.transpose(0, 1, 3, 2))


def test_rule_choice():
    assert sources.rule_for_scale(0.0) == ("gh", 1)
    kind, n = sources.rule_for_scale(1.0)
    assert kind == "trap" and n >= 32
    # smaller scale never needs more nodes
    sizes = [sources.rule_for_scale(s)[1] for s in (2.0, 1.0, 0.5, 0.1, 0.01)]
    assert sizes == sorted(sizes, reverse=True)


def _reference_rule(s, tol):
    """The error models of the products module docstring, one scale at a time with plain loops
    over the node ladders (an independent statement of the rule choice)."""
    if s <= 0.0:
        return ("gh", 1)
    logtol = math.log(tol) - sources._MARGIN
    gh = next((n for n in sources._GH_LADDER
               if math.lgamma(n + 1) + 2 * n * math.log(s / (0.75 * sources.D0)) <= logtol), None)
    d = np.linspace(0.0, 1.0, 201)[1:-1] * min(sources.D0 / s, 40.0)
    pole = sources._POLE_ORDER * np.log(np.maximum(sources.D0 - s * d, 1e-300))
    trap = next((m for m in sources._TRAP_LADDER
                 if np.min(-(2 * np.pi * d * m / (2 * sources.TAIL) - d**2 / 2) - pole) <= math.log(tol) + 1.0),
                None)
    if gh is not None and (trap is None or gh <= trap):
        return ("gh", gh)
    return ("trap", sources._TRAP_LADDER[-1] if trap is None else trap)


def test_vectorised_rule_choice_matches_the_scalar_one():
    """The batched rule choice used per set is the error model's, entry by entry (against a loop
    reference); the finer rule of a set's widest direction never needs more nodes and still meets
    the trapezoid error model."""
    s = np.concatenate([np.random.default_rng(4).exponential(1.0, 400), [0.0, 1e-12, 0.05, 1.0, 5.0, 50.0]])
    for tol in (1e-5, 1e-9, 1e-12):
        kind, n = sources._rules_for_scales(s, tol)
        for si, ki, ni in zip(s, kind, n):
            assert _reference_rule(si, tol) == (("gh", "trap")[ki], ni)
            assert sources.rule_for_scale(si, tol) == (("gh", "trap")[ki], ni)
        kf, nf = sources._rules_for_scales(s, tol, fine=True)
        assert np.all(nf <= n)
        for si, ki, ni in zip(s, kf, nf):
            if ki == 1 and ni < sources._TRAP_LADDER[-1]:
                d = np.linspace(0.0, 1.0, 201)[1:-1] * min(sources.D0 / si, 40.0)
                h = 2 * sources.TAIL / ni
                err = -(2 * np.pi * d / h - d**2 / 2) - sources._POLE_ORDER * np.log(sources.D0 - si * d)
                assert np.min(err) <= np.log(tol) + 1.0 + 1e-9


def test_duplicates_in_four_input_sets_and_reproducibility():
    """A set holding an input twice is the smaller set (no NaN from the singular covariance), and
    repeated calls give the same bits."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 3))
    x[3] = x[0]           # identical inputs
    x[4] = -0.7 * x[1]    # collinear inputs
    K = x @ x.T / 3 + 0.05
    act = et.get_activation("tanh")
    first = sources.source_moments(act, K)
    again = sources.source_moments(act, K)
    for a, b in zip(first, again):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)
    Mss, Mds, Mdd = first
    # {0, 1, 2, 3} with 3 == 0 is the three-input set {0, 1, 2}
    assert abs(Mss[0, 1, 2, 3] - Mss[0, 0, 1, 2]) < 2e-9
    assert abs(Mds[0, 3, 1, 2] - Mds[0, 0, 1, 2]) < 2e-9
    assert abs(Mdd[0, 1, 2, 3] - Mdd[0, 0, 1, 2]) < 2e-9
    ref = _cholesky_rule(np.tanh, lambda z: 1 / np.cosh(z) ** 2, K, (1, 4, 2, 4), (1, 1, 0, 0), 96)
    assert abs(Mds[1, 4, 2, 4] - ref) < 2e-9 * max(1.0, abs(ref)), (Mds[1, 4, 2, 4], ref)


def test_parity_of_activations():
    """Activation.symmetric (odd or even sigma) decides the half grids of the smooth rules."""
    odd_or_even = {"tanh": True, "erf": True, "sin": True, "abs": True, "linear": True,
                   "gelu": False, "softplus": False, "sigmoid": False, "relu": False, "silu": False}
    for name, expected in odd_or_even.items():
        assert et.get_activation(name).symmetric is expected, name
    assert et.get_activation(lambda z: z**3 - z).symmetric
    assert not et.get_activation(lambda z: z**3 + 0.1).symmetric


def test_trapezoid_tail_follows_tol_and_growth():
    """The half-width T of the trapezoid rules (sources._tail_for): bounded sigma at tol 1e-9
    stops well inside the old |w| <= 8 and meets the truncation bound 2 k phi(T) / T <= tol / e;
    tighter tol or a growing sigma (gelu) never gets a shorter range, and T never exceeds TAIL."""
    S = np.full((3, 4, 4), 0.5) + 0.5 * np.eye(4)
    tanh, gelu = et.get_activation("tanh").fn, et.get_activation("gelu").fn

    def tail_for(sig, S, tol):  # the sets with covariances S (C, 4, 4)
        return sources._tail_for(sig, 4, sources._reach(4, float(np.max(np.diagonal(S, axis1=1, axis2=2)))), tol)

    T = tail_for(tanh, S, 1e-9)
    assert 6.0 < T < sources.TAIL
    assert 2 * 4 * math.exp(-T * T / 2) / math.sqrt(2 * math.pi) / T <= 1e-9 / math.e
    T0 = T - 0.05  # the next shorter range would not meet it
    assert 2 * 4 * math.exp(-T0 * T0 / 2) / math.sqrt(2 * math.pi) / T0 > 1e-9 / math.e
    tails = [tail_for(tanh, S, tol) for tol in (1e-5, 1e-7, 1e-9, 1e-12, 1e-16)]
    assert tails == sorted(tails) and tails[-1] == sources.TAIL
    assert tail_for(gelu, S, 1e-9) >= T
    assert tail_for(gelu, 3 * S, 1e-9) >= tail_for(gelu, S, 1e-9)


@pytest.mark.parametrize("name", ["tanh", "softplus"])
def test_wide_kernel_meets_tol(name):
    """Inputs of large norm (variances up to 3, as in a first layer fed raw data): the default
    tol = 1e-9 against a rule of tighter tol and the full |w| <= 8 range (tol 1e-13), and one
    three-input entry against the plain Cholesky rule."""
    rng = np.random.default_rng(16)
    x = rng.normal(size=(5, 4))
    K = x @ x.T / 4
    K = 3.0 * K / K.diagonal().max()
    act = et.get_activation(name)
    fine = sources.source_moments(act, K, tol=1e-13)
    for a, b in zip(sources.source_moments(act, K), fine):
        assert np.max(np.abs(a - b)) < 1e-9
    if name == "tanh":
        ref = _cholesky_rule(np.tanh, lambda z: 1 / np.cosh(z) ** 2, K, (0, 0, 1, 2), (1, 1, 0, 0), 160)
        assert abs(fine[1][0, 0, 1, 2] - ref) < 1e-10, (fine[1][0, 0, 1, 2], ref)


@pytest.mark.parametrize("name", ["tanh", "gelu", "sin", "relu"])
@pytest.mark.parametrize("N", [4, 6])
def test_host_path_matches_compiled_kernels(name, N, monkeypatch):
    """Small work (sources.HOST_SETS) runs in numpy with sigma evaluated on fixed-size chunks: the
    same rules as the compiled kernels, so the same moments to rounding."""
    x = np.random.default_rng(N).normal(size=(N, 3))
    K = x @ x.T / 3 + 0.1
    act = et.get_activation(name)
    monkeypatch.setattr(sources, "HOST_SETS", 1 << 30)
    host = sources.source_moments(act, K)
    monkeypatch.setattr(sources, "HOST_SETS", 0)
    kernel = sources.source_moments(act, K)
    for a, b in zip(host, kernel):
        assert np.max(np.abs(a - b)) < 1e-13 * max(1.0, np.max(np.abs(b)))


def test_host_layer_step_matches_compiled_kernels(monkeypatch):
    """finite_width with the numpy path for the pair operators and the sources against the compiled
    kernels: G1, V, H1, A, B, D, F agree to rounding."""
    from efftheory.theory import finite

    x = np.random.default_rng(1).normal(size=(5, 4))
    net = et.MLP(4, 64, "tanh")
    monkeypatch.setattr(sources, "HOST_SETS", 1 << 30)
    monkeypatch.setattr(finite, "HOST_SETS", 1 << 30)
    host = et.finite_width(net, x)
    monkeypatch.setattr(sources, "HOST_SETS", 0)
    monkeypatch.setattr(finite, "HOST_SETS", 0)
    kernel = et.finite_width(net, x)
    for name in ("G1", "V", "H1", "A", "B", "D", "F"):
        a, b = np.asarray(getattr(host, name)), np.asarray(getattr(kernel, name))
        assert np.max(np.abs(a - b)) < 1e-12 * max(1.0, np.max(np.abs(b))), name


def test_sets_of_three_compile_one_program_per_table_size(monkeypatch):
    """Sets of three inputs run the row kernels (issue #22): the outer grid's size and the batch are
    run-time values, so inputs of very different geometry (scales 0.2 to 6: other grids, tabulated or
    not) compile at most one nested program and one tabulated program per table size (their values:
    test_host_path_matches_compiled_kernels and tests/test_gaussian_tables.py, with HOST_SETS = 0)."""
    monkeypatch.setattr(sources, "HOST_SETS", 0)
    monkeypatch.setattr(sources, "HOST_WORK", 0)
    made = []
    for mod, name in ((sources, "_nested_rows_kernel"), (tables, "tabled_rows_kernel")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig: made.append(_o(*a)) or made[-1])
    rng = np.random.default_rng(3)
    for scale in (0.2, 1.0, 3.0, 6.0):
        x = rng.normal(size=(3, 3))
        K = scale * (x @ x.T / 3 + 0.05 * np.eye(3))
        sources.source_moments(et.get_activation("tanh"), K)
    programs = sum(f._cache_size() for f in {id(f): f for f in made}.values())
    assert 1 <= programs <= 5, programs  # nested + the tabulated kernel's table sizes (4096 * 4^j <= 2^18)


def test_small_four_input_groups_compile_one_block_program(monkeypatch):
    """Small four-input nested groups (at most sources.BLOCK_WORK evaluations) run the block kernel
    (issue #22): the outer grid is padded to one size in blocks and the block and item counts are
    run-time values, so inputs of very different geometry (nearly collinear, scales 0.3 to 5: other
    grids and inner rules, no tables) compile at most one program per inner rule shape (1, 4, 8
    Gauss-Hermite nodes or the padded trapezoid), and give the per-shape kernel's moments to 1e-14."""
    monkeypatch.setattr(sources, "HOST_SETS", 0)
    monkeypatch.setattr(sources, "HOST_WORK", 0)
    monkeypatch.setattr(sources, "table_spacing", lambda *a, **k: 0.0)  # every set nested
    made, calls = [], []
    orig = sources._nested_blocks_kernel
    monkeypatch.setattr(sources, "_nested_blocks_kernel", lambda *a: made.append(orig(*a)) or made[-1])
    run = sources._run_blocks
    monkeypatch.setattr(sources, "_run_blocks", lambda *a: calls.append(1) or run(*a))
    act = et.get_activation("tanh")
    rng = np.random.default_rng(5)
    for scale, spread in ((1.0, 0.05), (0.3, 1.0), (5.0, 0.3)):
        x = rng.normal(size=(1, 3)) + spread * rng.normal(size=(5, 3))  # spread 0.05: nearly collinear
        K = x @ x.T / 3 + 0.01 * np.eye(5)
        K = scale * K / K.diagonal().max()
        blocks = sources.source_moments(act, K)
        monkeypatch.setattr(sources, "BLOCK_WORK", -1)  # the per-shape kernel
        per_shape = sources.source_moments(act, K)
        monkeypatch.setattr(sources, "BLOCK_WORK", 1 << 24)
        for a, b in zip(blocks, per_shape):
            assert np.max(np.abs(a - b)) <= 1e-14 * max(1.0, np.max(np.abs(b))), scale
    assert len(calls) >= 3, calls
    programs = sum(f._cache_size() for f in {id(f): f for f in made}.values())
    assert 1 <= programs <= 4, programs
