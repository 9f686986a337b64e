"""Large preactivation variances (issue #23, point 12).

The one- and two-input trapezoid rules stop adding nodes at K ~ 3.4e3 (4097 nodes on |u| <= 9); past
that, features of sigma(sqrt(K) u) of width 1/sqrt(K) fall between nodes (tanh at K = 1e12 gave
<sigma'^2> ~ 0).  The rules now measure their error where they are capped and refuse a variance they
resolve worse than 1e-8 with a ValueError that names the variance and the limit; below the limit they
agree with adaptive quadrature (scipy.integrate.quad, independent of the code under test).
"""

import math

import numpy as np
import pytest
from scipy import integrate

import efftheory as et
from efftheory.activations import get_activation
from efftheory.gaussian import UnresolvedVariance, normal_rule, resolvable_variance, rule_error

SMOOTH = ["tanh", "gelu", "silu", "softplus"]


def _quad(f, K):
    """<f(z)>, z ~ N(0, K), by adaptive quadrature in u = z / sqrt(K), with break points around the
    peak of width 1/sqrt(K) at the origin."""
    s = math.sqrt(K)
    pts = sorted({0.0, *(c / s for c in (-30, -10, -3, -1, 1, 3, 10, 30) if abs(c / s) < 12)})
    g = lambda u: float(f(s * u)) * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)  # noqa: E731
    val, _ = integrate.quad(g, -12.0, 12.0, points=pts, limit=2000, epsabs=0.0, epsrel=1e-13)
    return val


def _np_fn(name):
    """sigma and sigma' in numpy/math, written out here (not taken from efftheory)."""
    erf = np.vectorize(math.erf)
    if name == "tanh":
        return np.tanh, lambda z: 1.0 - np.tanh(z) ** 2
    if name == "gelu":  # exact gelu z Phi(z)
        Phi = lambda z: 0.5 * (1 + erf(z / math.sqrt(2)))  # noqa: E731
        return (lambda z: z * Phi(z)), (lambda z: Phi(z) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
    if name == "silu":
        sig = lambda z: 0.5 * (1 + np.tanh(0.5 * z))  # noqa: E731
        return (lambda z: z * sig(z)), (lambda z: sig(z) * (1 + z * (1 - sig(z))))
    if name == "softplus":
        return (lambda z: np.logaddexp(0.0, z)), (lambda z: 0.5 * (1 + np.tanh(0.5 * z)))
    raise KeyError(name)


@pytest.mark.parametrize("name,K", [("tanh", 1e4), ("tanh", 3e4), ("gelu", 1e5), ("silu", 1e5), ("softplus", 1e5)])
def test_rule_error_estimates_the_capped_rule(name, K):
    """rule_error (the rule against itself shifted by half a step) is about twice the capped rule's true
    error on <sigma'^2>, measured against adaptive quadrature: within [1x, 5x] of it."""
    act = get_activation(name)
    n = 4097
    u, w = normal_rule(n)
    _, d = _np_fn(name)
    rule = float(np.sum(w * d(math.sqrt(K) * u) ** 2))
    true = abs(rule - _quad(lambda z: d(z) ** 2, K)) / _quad(lambda z: d(z) ** 2, K)
    est = rule_error(act, K, n)
    assert true > 1e-12, "the capped rule should be visibly off here"
    assert true <= est <= 5 * true, (true, est)


def test_chi_perp_tanh_at_huge_variance():
    """criticality's own rules are not capped: <sigma'^2> of tanh at K = 1e12 is (4/3)/sqrt(2 pi K)."""
    np.testing.assert_allclose(et.chi_perp("tanh", 1e12), 4 / 3 / math.sqrt(2 * math.pi * 1e12), rtol=1e-3)


@pytest.mark.parametrize("name", SMOOTH)
def test_past_the_limit_infinite_and_finite_width_refuse(name):
    """Inputs of size 300 (K^(1) = 9e4, raw pixel values reach it) are past every limit of these four:
    a clear error naming the variance and the limit, not a kernel that jumps (issue #23.12)."""
    x = np.full((2, 4), 300.0)
    x[1, 0] = -300.0
    net = et.MLP(2, 8, name, C_W=1.0, C_b=0.0)
    limit = resolvable_variance(get_activation(name))
    assert 1e3 < limit < 9e4
    for call in (et.infinite_width, et.finite_width):
        with pytest.raises(UnresolvedVariance, match=r"K = 9e\+04.*K <= ") as info:
            call(net, x)
        assert isinstance(info.value, ValueError)
        assert info.value.K == pytest.approx(9e4) and info.value.limit == pytest.approx(limit)


def _below_the_limit(name, call):
    K1 = resolvable_variance(get_activation(name)) / 2
    assert K1 > 3e3
    x = np.full((1, 4), math.sqrt(K1))
    f, d = _np_fn(name)
    s2, ds2 = _quad(lambda z: f(z) ** 2, K1), _quad(lambda z: d(z) ** 2, K1)
    res = call(et.MLP(2, 8, name, C_W=1.0, C_b=0.0), x)
    np.testing.assert_allclose(np.asarray(res.K)[1, 0, 0], s2, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(res.Theta)[1, 0, 0], s2 + ds2 * K1, rtol=1e-9)


@pytest.mark.parametrize("name", SMOOTH)
def test_below_the_limit_infinite_width_matches_quadrature(name):
    """At K^(1) = limit / 2 (capped rules, but resolved): K^(2)_aa = <sigma^2> and
    Theta^(2)_aa = <sigma^2> + <sigma'^2> Theta^(1)_aa (C_W = lambda_W = 1, C_b = 0) within 1e-9 of
    adaptive quadrature."""
    _below_the_limit(name, et.infinite_width)


@pytest.mark.physics
@pytest.mark.parametrize("name", ["tanh", "gelu"])
def test_below_the_limit_finite_width_matches_quadrature(name):
    """The same from finite_width (slow: its pair operators take a 4097^2-node two-input rule at this
    variance, ~35 s for one input on 2 cores)."""
    _below_the_limit(name, et.finite_width)


def test_erf_closed_form_has_no_limit_but_its_finite_width_rules_do():
    """infinite_width of erf uses the arcsine closed form at any K; finite_width's rules do not."""
    x = np.full((1, 4), 1e6)
    net = et.MLP(2, 8, "erf", C_W=1.0, C_b=0.0)
    K2 = np.asarray(et.infinite_width(net, x).K)[1, 0, 0]
    np.testing.assert_allclose(K2, 2 / math.pi * math.asin(2e12 / (1 + 2e12)), rtol=1e-9)
    with pytest.raises(UnresolvedVariance):
        et.finite_width(net, x)


def test_sin_has_no_limit():
    """sin's averages are entire in K: the capped rule resolves them at every variance."""
    assert resolvable_variance(get_activation("sin")) == math.inf
