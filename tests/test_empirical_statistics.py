"""efftheory.empirical.statistics: estimators with standard errors over networks."""

import numpy as np
import pytest

import efftheory
from efftheory import empirical as E
from efftheory.empirical import statistics as stats_mod


def test_mean_and_stderr():
    v = np.random.default_rng(0).normal(size=(50, 3, 2))
    est = E.mean_and_stderr(v)
    np.testing.assert_allclose(est.value, v.mean(0))
    np.testing.assert_allclose(est.stderr, v.std(0, ddof=1) / np.sqrt(50))
    one = E.mean_and_stderr(v[:1])
    assert np.all(np.isnan(one.stderr)) and np.array_equal(one.value, v[0])
    assert est.pull(est.value).max() == 0.0 and np.all(est.agrees(est.value + est.stderr))
    with pytest.raises(ValueError, match="^per_network_values: "):
        E.mean_and_stderr(np.float64(1.0))


def test_jackknife_linear_and_product_of_means(monkeypatch):
    rng = np.random.default_rng(1)
    u, v = rng.normal(1.0, 1.0, size=(40, 3)), rng.normal(2.0, 1.0, size=(40, 3))
    lin = E.jackknife(lambda a: 2 * a, u)
    ref = E.mean_and_stderr(2 * u)
    np.testing.assert_allclose(lin.value, ref.value, rtol=1e-12)
    np.testing.assert_allclose(lin.stderr, ref.stderr, rtol=1e-10)
    # bias-corrected jackknife of a product of means is the U-statistic sum_{m != m'} u_m v_m' / (M(M-1))
    prod = E.jackknife(lambda a, b: a * b, u, v)
    M = len(u)
    ustat = (u.sum(0) * v.sum(0) - (u * v).sum(0)) / (M * (M - 1))
    np.testing.assert_allclose(prod.value, ustat, rtol=1e-12)
    # blocked leave-one-out gives the same answer
    monkeypatch.setattr(stats_mod, "_JACKKNIFE_BLOCK", 7)
    blocked = E.jackknife(lambda a, b: a * b, u, v)
    np.testing.assert_allclose(blocked.value, prod.value, rtol=1e-12)
    np.testing.assert_allclose(blocked.stderr, prod.stderr, rtol=1e-10)
    with pytest.raises(ValueError, match="^per_network_values: "):
        E.jackknife(lambda a, b: a * b, u, v[:5])
    with pytest.raises(ValueError, match="^f: "):
        E.jackknife(None, u)


@pytest.fixture(scope="module")
def linear_sweep():
    """Deep linear nets (C_b = 0) on one input: exact finite-width moments at any width."""
    net = efftheory.MLP(4, 1, "linear", C_W=1.5)
    x = np.array([[1.0, -0.5, 0.8]])
    return net, x, E.sample(net, x, [4, 8, 32, 128], 20000, seed=0, method="conditional", progress=False)


def test_deep_linear_fourth_moment_is_exact_at_any_width(linear_sweep):
    """E[z^4] / (3 E[z^2]^2) = (1 + 2/n)^(l-1) (docs/theory.md, exact results), same neuron."""
    net, x, sweep = linear_sweep
    for n in sweep.widths:
        est = E.fourth_moment_ratio(sweep[n])
        exact = np.array([(1 + 2 / n) ** l for l in range(net.depth)])[:, None]
        assert np.max(np.abs(est.pull(exact))) < 3, (n, est.value[:, 0], exact[:, 0], est.stderr[:, 0])
        assert np.all((exact[1:3] - 1) > 5 * est.stderr[1:3])  # the 1/n effect is resolved, not merely noisy


def test_deep_linear_four_point_is_exact_at_any_width(linear_sweep):
    """Cross-neuron: given layer l-1 the z_i are i.i.d., so E[z_i^2 z_j^2] = E[z^4]/3 and the connected
    function at width n is K^2 ((1 + 2/n)^(l-1) - 1) exactly, K = C_W^(l-1) K^(1) (the estimator returns
    the statistic at the sampled width, no factor n); same neuron gives 3 times that."""
    net, x, sweep = linear_sweep
    K1 = 1.5 * float((x @ x.T)[0, 0]) / 3
    for n in sweep.widths:
        K = np.array([1.5 ** l * K1 for l in range(net.depth)])
        exact = K**2 * (np.array([(1 + 2 / n) ** l for l in range(net.depth)]) - 1)
        V = E.four_point(sweep[n])
        assert V.value.shape == (4, 1, 1, 1, 1)
        assert np.isnan(V.value[3]).all()  # output layer has one neuron: no distinct pairs
        # 4 sigma here: 28 more comparisons on heavy-tailed (products of chi^2) data at n = 4
        assert np.max(np.abs(V.pull(exact[:, None, None, None, None])[:3])) < 4
        S = E.four_point_same_neuron(sweep[n])
        assert np.max(np.abs(S.pull(3 * exact[:, None, None, None, None]))) < 4
        np.testing.assert_allclose(E.metric(sweep[n]).value[:, 0, 0], K, rtol=0.05)


@pytest.fixture(scope="module")
def ntk_ensemble():
    net = efftheory.MLP(3, 12, "tanh", C_W=1.0, C_b=0.1, output_width=3)
    x = np.array([[1.0, 0.2, -0.4], [-0.3, 0.9, 0.5]])
    stats = ("metric", "ntk", "ntk_variance", "ntk_preactivation")
    return E.sample_ensemble(net, x, 3000, seed=4, statistics=stats, progress=False)


def test_ntk_estimators_shapes_and_exact_identities(ntk_ensemble):
    ens = ntk_ensemble
    s = ens.stats
    assert E.ntk_mean(ens).value.shape == (2, 2)
    var, df = E.ntk_variance(ens), E.ntk_preactivation(ens)
    for est in (var.cross_cov, var.offdiag, var.cov, df.cross_cov, df.offdiag, df.cov):
        assert est.value.shape == est.stderr.shape == (2, 2, 2, 2)
        assert np.all(np.isfinite(est.stderr)) and np.all(est.stderr > 0)
    # Rotation invariance of the output layer: same-neuron = cross-diagonal + two off-diagonal pairings,
    # exactly in expectation (per-network residuals, so the paired error is right)
    res = s["HH"] - s["H_H"] - s["HoffHoff"] - s["HoffHoff"].transpose(0, 1, 2, 4, 3)
    assert np.max(np.abs(E.mean_and_stderr(res).pull(0.0))) < 4
    res = s["Hzz"] - s["H_zz"] - s["Hoff_zz"] - s["Hoff_zz"].transpose(0, 1, 2, 4, 3)
    assert np.max(np.abs(E.mean_and_stderr(res).pull(0.0))) < 4
    # the same identities in the documented index conventions
    B, F = var.offdiag.value, df.offdiag.value
    # cov_{a1a2a3a4} = cross_cov_{a1a2a3a4} + offdiag[a1, a3, a2, a4] + offdiag[a1, a4, a2, a3]
    np.testing.assert_allclose(var.cov.value, var.cross_cov.value + np.einsum("acbd->abcd", B) + np.einsum("adbc->abcd", B),
                               atol=6 * np.max(var.cov.stderr))
    np.testing.assert_allclose(df.cov.value, df.cross_cov.value + np.einsum("acbd->abcd", F) + np.einsum("adbc->abcd", F),
                               atol=6 * np.max(df.cov.stderr))
    # no factor n: the per-network second moments minus products of means, directly
    n = 12.0
    hh, h = s["HH"].mean(0), s["H"].mean(0)
    plug_in = hh - np.einsum("ab,cd->abcd", h, h)
    np.testing.assert_allclose(var.cov.value, plug_in, atol=3 * np.max(var.cov.stderr))
    assert not np.allclose(var.cov.value, n * plug_in, atol=3 * np.max(var.cov.stderr))
    np.testing.assert_allclose(var.offdiag.value, s["HoffHoff"].mean(0).transpose(0, 2, 1, 3), rtol=1e-12)
    sc = var.cov.scaled(n)
    np.testing.assert_allclose(sc.value, n * var.cov.value)
    np.testing.assert_allclose(sc.stderr, n * var.cov.stderr)


def test_single_output_gives_cov_only():
    net = efftheory.MLP(2, 8, "relu", C_W=2.0)
    ens = E.sample_ensemble(net, np.eye(2, 3), 50, seed=0, statistics=("ntk_variance", "ntk_preactivation"),
                            progress=False)
    var, df = E.ntk_variance(ens), E.ntk_preactivation(ens)
    assert var.cross_cov is None and var.offdiag is None and df.cross_cov is None and df.offdiag is None
    assert np.all(np.isfinite(var.cov.value)) and np.all(np.isfinite(df.cov.value))
    with pytest.raises(ValueError, match="^ensemble: .*'four_point'"):
        E.four_point(ens)
    with pytest.raises(ValueError, match="^ensemble: "):
        E.metric("not an ensemble")
