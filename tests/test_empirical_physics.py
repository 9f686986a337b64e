"""Sampled networks against the theory, by docs/theory.md's width-sweep protocol.

The slow checks carry ``@pytest.mark.physics`` (run them with ``-m physics``; a few minutes on two
CPU cores); ``test_cheap_sweep_matches_infinite_width`` is their small version in the default suite.
Comparisons with the first-order theory (G1, V, H1, A, B, D, F) use ``efftheory.theory.finite``.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import efftheory
from efftheory import empirical as E

X3 = np.array([[1.0, 0.3, -0.5, 0.2], [0.1, -1.0, 0.4, 0.6], [0.7, 0.7, 0.0, -0.3]])
WIDTHS = (8, 16, 32, 64, 128)
CRITICAL = {"tanh": dict(activation="tanh", C_W=1.0, C_b=0.0), "relu": dict(activation="relu", C_W=2.0, C_b=0.0)}
ALL = ("metric", "four_point", "ntk", "ntk_variance", "ntk_preactivation")


def _fit(est, a_pred, c1_pred=None, widths=WIDTHS):
    return E.width_sweep_fit(widths, est.value, est.stderr, infinite=a_pred, first_order=c1_pred)


def _coef(est, widths=WIDTHS):
    """n x (a statistic at width n, the estimators' normalisation): an estimate of its 1/n coefficient."""
    return est.scaled(np.asarray(widths, np.float64).reshape((-1,) + (1,) * (np.ndim(est.value) - 1)))


def _assert_pulls(name, pulls, max_pull, rms_max=2.5):
    """Every pull below max_pull; the rms is only a guard against gross errors, since the entries of
    one tensor come from the same networks and fluctuate together."""
    p = np.asarray(pulls)
    p = p[np.isfinite(p)]
    assert p.size, name
    rms = float(np.sqrt(np.mean(p**2)))
    print(f"{name}: max |pull| {np.max(np.abs(p)):.2f}, rms {rms:.2f} over {p.size} entries")  # shown with -s
    assert np.max(np.abs(p)) < max_pull and rms < rms_max, f"{name}: max |pull| {np.max(np.abs(p)):.2f}, rms {rms:.2f}"


def test_cheap_sweep_matches_infinite_width():
    """Default-suite version: tanh at criticality, 4 widths (8x), 1200 networks each."""
    net = efftheory.MLP(3, 8, **CRITICAL["tanh"])
    x = X3[:2]
    widths = (8, 16, 32, 64)
    sweep = E.sample(net, x, widths, 1200, seed=5, statistics=("metric", "ntk"), dtype=jnp.float32, progress=False)
    inf = efftheory.infinite_width(net, x)
    m, h = sweep.estimate(E.metric), sweep.estimate(E.ntk_mean)
    metric_fit, ntk_fit = _fit(m, inf.K, widths=widths), _fit(h, inf.Theta[-1], widths=widths)
    assert np.all(np.abs(metric_fit.a_pull) < 3) and np.all(np.abs(ntk_fit.a_pull) < 3)
    assert E.agrees(metric_fit, inf.K).all() and E.agrees(ntk_fit, inf.Theta[-1]).all()
    # and the sweep resolves the answer: intercept errors of a few percent at most
    assert np.max(metric_fit.a_stderr / np.abs(inf.K).max()) < 0.03
    assert np.max(ntk_fit.a_stderr / np.abs(inf.Theta[-1]).max()) < 0.03


@pytest.fixture(scope="module", params=sorted(CRITICAL))
def critical_sweep(request):
    net = efftheory.MLP(3, 8, output_width=2, **CRITICAL[request.param])
    sweep = E.sample(net, X3, WIDTHS, 6000, seed=0, statistics=ALL, progress=False)
    return request.param, net, sweep


@pytest.mark.physics
def test_critical_metric_and_ntk_extrapolate_to_infinite_width(critical_sweep):
    """Definition of done: the extrapolated metric and mean NTK match efftheory.infinite_width (3 sigma).

    Every entry within 3 sigma is a strict criterion for 36 correlated entries: with these settings
    the largest metric pull exceeds 3 in about 1 sweep in 40 (test_intercept_pulls_are_calibrated).
    """
    name, net, sweep = critical_sweep
    inf = efftheory.infinite_width(net, X3)
    metric_fit = _fit(sweep.estimate(E.metric), inf.K)
    ntk_fit = _fit(sweep.estimate(E.ntk_mean), inf.Theta[-1])
    _assert_pulls(f"{name} metric a", metric_fit.a_pull, 3.0)
    _assert_pulls(f"{name} ntk_mean a", ntk_fit.a_pull, 3.0)
    # resolved: intercepts to 2% of the kernel's scale or better (the output layer's metric, an average
    # over its two neurons only, is the least precise)
    assert np.max(metric_fit.a_stderr / np.abs(inf.K).max()) < 0.02
    assert np.max(ntk_fit.a_stderr / np.abs(inf.Theta[-1]).max()) < 0.02


@pytest.mark.physics
def test_critical_first_order_statistics_match_finite_width_theory(critical_sweep):
    """G1, H1 (slopes c1) and V, A, B, D, F (intercepts) against efftheory.theory.finite.

    Hundreds of correlated entries are compared, so each must sit within 4 sigma; where the residual
    after the first-order correction is resolved its log-log slope must pass E.slope_consistent
    (-2 within 0.3 plus twice its own standard error).
    """
    finite = pytest.importorskip("efftheory.theory.finite")
    name, net, sweep = critical_sweep
    fw = finite.finite_width(net, X3)
    metric_fit = _fit(sweep.estimate(E.metric), fw.K, fw.G1)
    ntk_fit = _fit(sweep.estimate(E.ntk_mean), fw.Theta[-1], fw.H1[-1])
    _assert_pulls(f"{name} G1 (metric c1)", metric_fit.c1_pull, 4.0)
    _assert_pulls(f"{name} H1 (ntk c1)", ntk_fit.c1_pull, 4.0)
    # where the residual m(n) - K - G1/n is resolved it must fall like 1/n^2
    for fit in (metric_fit, ntk_fit):
        assert np.all(E.slope_consistent(fit.slope, fit.slope_stderr, fit.slope_resolved)), fit.slope[fit.slope_resolved]
    V = _coef(sweep.estimate(E.four_point))
    for l in (1, 2):  # layer 3 is the output layer: one pair of distinct neurons, noisy but unbiased
        _assert_pulls(f"{name} V layer {l + 1}", _fit(E.Estimate(V.value[:, l], V.stderr[:, l]), fw.V[l]).a_pull, 4.0)
    var, df = sweep.estimate(E.ntk_variance), sweep.estimate(E.ntk_preactivation)
    A, B, D, F = (np.asarray(t[-1]) for t in (fw.A, fw.B, fw.D, fw.F))
    _assert_pulls(f"{name} A", _fit(_coef(var.cross_cov), A).a_pull, 4.0)
    _assert_pulls(f"{name} B", _fit(_coef(var.offdiag), B).a_pull, 4.0)
    ABB = A + np.einsum("acbd->abcd", B) + np.einsum("adbc->abcd", B)
    _assert_pulls(f"{name} A+B+B", _fit(_coef(var.cov), ABB).a_pull, 4.0)
    _assert_pulls(f"{name} D", _fit(_coef(df.cross_cov), D).a_pull, 4.0)
    _assert_pulls(f"{name} F", _fit(_coef(df.offdiag), F).a_pull, 4.0)
    _assert_pulls(f"{name} D+F+F", _fit(_coef(df.cov), D + np.einsum("acbd->abcd", F) + np.einsum("adbc->abcd", F)).a_pull,
                  4.0)


@pytest.mark.physics
def test_deep_linear_fourth_moment_with_explicit_weights():
    """E[z^4]/(3 E[z^2]^2) = (1 + 2/n)^(l-1) at widths 4, 8, 32, 128, networks with explicit weights."""
    net = efftheory.MLP(4, 1, "linear", C_W=0.8)
    x = np.array([[0.5, -1.0, 2.0]])
    for n in (4, 8, 32, 128):
        ens = E.sample_ensemble(net.with_width(n), x, 10000, seed=n, statistics=("four_point",), progress=False)
        est = E.fourth_moment_ratio(ens)
        exact = np.array([(1 + 2 / n) ** l for l in range(4)])[:, None]
        _assert_pulls(f"linear n={n}", est.pull(exact), 3.0)


@pytest.mark.physics
def test_relu_exact_single_input_results():
    """ReLU at criticality, one input (docs/theory.md exact results): K constant in depth,
    V^(l) = 5 K^2 (l - 1), G1_aa = 0 and H1_aa = 0 (no 1/n correction to the diagonal metric or NTK)."""
    net = efftheory.MLP(4, 8, "relu", C_W=2.0)
    x = np.array([[1.0, -0.4, 0.6]])
    K = 2.0 * float((x @ x.T)[0, 0]) / 3
    sweep = E.sample(net, x, WIDTHS, 8000, seed=1, statistics=("four_point", "ntk"), progress=False)
    m = sweep.estimate(E.metric)
    metric_fit = _fit(E.Estimate(m.value[:, :, 0, 0], m.stderr[:, :, 0, 0]), np.full(4, K), np.zeros(4))
    _assert_pulls("relu K, G1 = 0 (a)", metric_fit.a_pull, 3.0)
    _assert_pulls("relu K, G1 = 0 (c1)", metric_fit.c1_pull, 3.0)
    V = _coef(sweep.estimate(E.four_point))
    V_fit = _fit(E.Estimate(V.value[:, 1:3, 0, 0, 0, 0], V.stderr[:, 1:3, 0, 0, 0, 0]), 5 * K**2 * np.array([1.0, 2.0]))
    _assert_pulls("relu V = 5 K^2 (l - 1)", V_fit.a_pull, 3.0)
    Theta = efftheory.infinite_width(net, x).Theta[-1, 0, 0]
    h = sweep.estimate(E.ntk_mean)
    ntk_fit = _fit(E.Estimate(h.value[:, 0, 0], h.stderr[:, 0, 0]), Theta, 0.0)
    _assert_pulls("relu Theta, H1 = 0", [ntk_fit.a_pull, ntk_fit.c1_pull], 3.0)


@pytest.mark.physics
def test_intercept_pulls_are_calibrated():
    """Over independent seeds the fitted intercepts' pulls against the theory are standard normal:
    the standard errors (over networks, through the WLS fit) are neither too small nor too large."""
    finite = pytest.importorskip("efftheory.theory.finite")
    net = efftheory.MLP(3, 8, **CRITICAL["relu"])
    fw = finite.finite_width(net, X3)
    iu = np.triu_indices(3)
    pulls = []
    for seed in range(100, 116):
        sweep = E.sample(net, X3, WIDTHS, 4000, seed=seed, statistics=("four_point",), method="conditional",
                         chunk=1000, progress=False)
        metric_fit = _fit(sweep.estimate(E.metric), fw.K)
        V = _coef(sweep.estimate(E.four_point))
        V_fit = _fit(E.Estimate(V.value[:, 1], V.stderr[:, 1]), fw.V[1])
        pulls.append(metric_fit.a_pull[:, iu[0], iu[1]].ravel())
        pulls.append(V_fit.a_pull[iu[0], iu[1]][:, iu[0], iu[1]].ravel())
    p = np.concatenate(pulls)
    print(f"calibration: {p.size} intercept pulls, mean {np.mean(p):.3f}, std {np.std(p):.3f}")  # shown with -s
    assert abs(np.mean(p)) < 0.15 and 0.85 < np.std(p) < 1.15, (np.mean(p), np.std(p))
