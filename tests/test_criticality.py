"""Criticality: closed values, a numerically found case, and chi = 1 checked independently."""

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy.special import erf as sp_erf
from scipy.special import expit

import efftheory as et


def gauss(f, K):
    def g(z):
        return f(z) * np.exp(-z * z / (2 * K)) / np.sqrt(2 * np.pi * K)

    return integrate.quad(g, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-13, limit=400)[0]


def test_relu_and_tanh_closed_values():
    c = et.critical_init("relu")
    assert (c.C_b, c.C_W) == (0.0, 2.0)
    assert c.universality_class == "scale-invariant" and c.K_star is None
    c = et.critical_init("tanh")
    assert tuple(c) == (0.0, pytest.approx(1.0, rel=1e-12))
    assert c.universality_class == "K*=0" and c.K_star == 0.0
    assert et.critical_init("erf").C_W == pytest.approx(np.pi / 4, rel=1e-12)
    assert et.critical_init("leaky_relu(0.2)").C_W == pytest.approx(2 / (1 + 0.2**2), rel=1e-12)


def test_gelu_matches_the_book():
    # PDLT section 5.3.4 quotes C_b = 0.17292239, C_W = 1.98305826 for GELU (half-stable class).
    c = et.critical_init("gelu")
    assert c.universality_class == "half-stable"
    assert c.C_b == pytest.approx(0.17292239, abs=2e-8)
    assert c.C_W == pytest.approx(1.98305826, abs=2e-8)


@pytest.mark.parametrize("name, sigma, dsigma", [
    ("gelu", lambda z: 0.5 * z * (1 + sp_erf(z / np.sqrt(2))),
     lambda z: 0.5 * (1 + sp_erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)),
    ("silu", lambda z: z * expit(z), lambda z: expit(z) * (1 + z * (1 - expit(z)))),
])
def test_half_stable_point_is_critical_by_independent_quadrature(name, sigma, dsigma):
    c = et.critical_init(name)
    K = c.K_star
    # fixed point
    assert c.C_b + c.C_W * gauss(lambda z: sigma(z) ** 2, K) == pytest.approx(K, rel=1e-9)
    # chi_perp = C_W <sigma'^2> = 1; chi_parallel = C_W <sigma sigma' z>/K = 1
    assert c.C_W * gauss(lambda z: dsigma(z) ** 2, K) == pytest.approx(1.0, rel=1e-9)
    assert c.C_W * gauss(lambda z: sigma(z) * dsigma(z) * z, K) / K == pytest.approx(1.0, rel=1e-9)
    # and the library's own chi functions agree
    assert float(c.chi_parallel(K)) == pytest.approx(1.0, rel=1e-9)
    assert float(c.chi_perp(K)) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("name", ["relu", "tanh", "erf", "sin", "abs"])
def test_chis_equal_one_at_returned_point(name):
    c = et.critical_init(name)
    K = 1.0 if c.K_star is None else 1e-6  # K*=0 class: chi -> 1 as K -> 0
    assert float(c.chi_parallel(K)) == pytest.approx(1.0, abs=1e-5)
    assert float(c.chi_perp(K)) == pytest.approx(1.0, abs=1e-5)
    assert float(et.chi_parallel(name, 0.0, c.C_W)) == pytest.approx(1.0, abs=1e-12) if c.K_star == 0.0 else True


def test_relu_chis_are_flat_and_tanh_chis_fall():
    Ks = np.array([0.1, 1.0, 10.0])
    np.testing.assert_allclose(et.chi_parallel("relu", Ks, 2.0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(et.chi_perp("relu", Ks, 2.0), 1.0, rtol=1e-12)
    cp = et.chi_perp("tanh", Ks, 1.0)
    assert np.all(np.diff(cp) < 0) and np.all(cp < 1)


@pytest.mark.parametrize("name", ["sigmoid", "softplus"])
def test_no_criticality(name):
    c = et.critical_init(name)
    assert c.universality_class == "none" and np.isnan(c.C_W)


def test_fixed_point():
    # tanh at C_W = 1.5 (chaotic side): nonzero K*, which the recursion must reproduce
    K = et.fixed_point("tanh", 1.5, 0.0)
    assert K > 0.1
    assert 1.5 * gauss(lambda z: np.tanh(z) ** 2, K) == pytest.approx(K, rel=1e-9)
    assert et.fixed_point("tanh", 1.0, 0.0) < 0.05  # power-law approach to K* = 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        et.critical_init("nope")
    with pytest.raises(ValueError, match="K"):
        et.chi_perp("tanh", -1.0)
    with pytest.raises(ValueError, match="C_W"):
        et.chi_parallel("tanh", 1.0, C_W=0.0)


# ------------------------------------------------------------------------------------------ scale-invariant class
# sigma(z) = z above 0 and a z below: <sigma'^2>_K = (1 + a^2)/2 and <sigma^2>_K = K (1 + a^2)/2 for every K > 0
# (half of the Gaussian mass on each side), so chi_par = chi_perp = C_W (1 + a^2)/2, K-independent, and the value
# at K = 0 is the limit from above.  Critical line: C_b = 0, C_W = 2/(1 + a^2).
SCALE_INVARIANT = [("relu", 0.0), ("leaky_relu(0.1)", 0.1), ("leaky_relu(0.3)", 0.3), ("abs", -1.0),
                   ("linear", 1.0)]
KS = [0.0, 1e-12, 1.0, 1e6]


@pytest.mark.parametrize("name, a", SCALE_INVARIANT)
def test_scale_invariant_chis_are_exact_at_every_K(name, a):
    C_W = 1.7
    expected = C_W * (1 + a * a) / 2
    np.testing.assert_allclose(et.chi_parallel(name, KS, C_W), expected, rtol=1e-15, atol=0)
    np.testing.assert_allclose(et.chi_perp(name, KS, C_W), expected, rtol=1e-15, atol=0)
    # the slope a below zero really is what the name says (leaky_relu(a) = max(z, a z))
    assert float(et.get_activation(name)(np.asarray(-2.0))) == pytest.approx(-2.0 * a, rel=1e-6, abs=0)


@pytest.mark.parametrize("name, a", SCALE_INVARIANT)
def test_scale_invariant_critical_line_is_exact(name, a):
    c = et.critical_init(name)
    assert c.universality_class == "scale-invariant" and c.K_star is None and c.marginal_line
    assert c.C_b == 0.0
    assert c.C_W == pytest.approx(2 / (1 + a * a), rel=1e-15, abs=0)
    np.testing.assert_allclose(c.chi_parallel(KS), 1.0, rtol=1e-15, atol=0)
    np.testing.assert_allclose(c.chi_perp(KS), 1.0, rtol=1e-15, atol=0)
    # on the critical line every K is a fixed point: the flow stays where it starts
    for K0 in (1e-3, 1.0, 1e6):
        K = et.fixed_point(name, c.C_W, 0.0, K0=K0)
        assert K == K0 and K.kind == "marginal" and K.marginal_line


def test_exact_critical_values():
    assert et.critical_init("relu").C_W == 2.0  # was 2.000000000000001
    assert et.critical_init("abs").C_W == 1.0 and et.critical_init("linear").C_W == 1.0
    assert et.chi_perp("relu", 0.0, 2.0) == 1.0  # was 0.5: the K -> 0+ limit, not sigma'(0) = 1/2
    assert et.chi_parallel("relu", 0.0, 2.0) == 1.0


def test_chis_at_zero_are_limits_from_above():
    for name, C_W in (("tanh", 1.0), ("erf", 0.7), ("gelu", 2.0), ("silu", 1.3)):
        for chi in (et.chi_parallel, et.chi_perp):
            assert float(chi(name, 0.0, C_W)) == pytest.approx(float(chi(name, 1e-9, C_W)), rel=1e-7)
    # gelu: sigma'(0) = 1/2, sigma(0) = 0: chi = C_W / 4 at K = 0
    assert float(et.chi_perp("gelu", 0.0, 2.0)) == pytest.approx(0.5, rel=1e-15)


def test_relu_criticality_figure_is_flat_through_the_critical_line():
    from efftheory import plotting

    C_W = np.array([1.0, 1.5, 1.99, 2.0, 2.01, 2.5, 4.0])
    chi_par, chi_per, Ks = plotting._criticality_curves(et.get_activation("relu"), C_W, 0.0)
    np.testing.assert_allclose(chi_par, C_W / 2, rtol=1e-15, atol=0)
    np.testing.assert_allclose(chi_per, C_W / 2, rtol=1e-15, atol=0)
    assert chi_par[3] == 1.0 and chi_per[3] == 1.0
    np.testing.assert_array_equal(Ks, [0, 0, 0, 1.0, np.inf, np.inf, np.inf])
    # and the drawn lines are exactly these numbers
    fig = plotting.plot_criticality("relu", C_W=C_W)
    lines = fig.axes[0].get_lines()
    np.testing.assert_array_equal(lines[0].get_xdata(), C_W)
    np.testing.assert_allclose(lines[0].get_ydata(), C_W / 2, rtol=1e-15, atol=0)
    np.testing.assert_allclose(lines[1].get_ydata(), C_W / 2, rtol=1e-15, atol=0)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------------------------------ fixed points
def test_fixed_point_trivial():
    # tanh, C_b = 0, C_W <= 1: the flow decays to K* = 0 (a power law at C_W = 1); relu below C_W = 2 likewise
    for C_W in (0.5, 1.0):
        K = et.fixed_point("tanh", C_W, 0.0)
        assert K == 0.0 and K.kind == "trivial" and not K.marginal_line
        assert K.chi_parallel == pytest.approx(C_W, rel=1e-12) and K.chi_perp == pytest.approx(C_W, rel=1e-12)
    K = et.fixed_point("relu", 1.0, 0.0)
    assert K == 0.0 and K.kind == "trivial" and K.chi_parallel == 0.5


def test_fixed_point_stable():
    K = et.fixed_point("tanh", 1.5, 0.0, K0=1e-6)  # K = 0 is unstable here: the flow leaves it
    assert K.kind == "stable"
    assert 1.5 * gauss(lambda z: np.tanh(z) ** 2, K) == pytest.approx(K, rel=1e-12)
    chi = 1.5 * gauss(lambda z: np.tanh(z) * z * (1 - np.tanh(z) ** 2), K) / K
    assert K.chi_parallel == pytest.approx(chi, rel=1e-9) and chi < 1
    # relu with C_b > 0: K* = C_b / (1 - C_W/2)
    K = et.fixed_point("relu", 1.0, 0.5, K0=17.0)
    assert K == 1.0 and K.kind == "stable"
    K = et.fixed_point("leaky_relu(0.3)", 1.0, 0.2)
    assert K == pytest.approx(0.2 / (1 - 1.09 / 2), rel=1e-14) and K.kind == "stable"


def test_fixed_point_divergent():
    for args in (("relu", 2.5, 0.0), ("relu", 2.0, 0.1), ("linear", 1.0, 1e-3)):
        K = et.fixed_point(*args)
        assert K == np.inf and K.kind == "divergent"
    K = et.fixed_point("gelu", 2.5, 0.1)
    assert K == np.inf and K.kind == "divergent" and np.isnan(K.chi_parallel)


GELU = lambda z: 0.5 * z * (1 + sp_erf(z / np.sqrt(2)))
DGELU = lambda z: 0.5 * (1 + sp_erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)


def gauss_finite(f, K):
    s = 12 * np.sqrt(K)
    def g(z):
        return f(z) * np.exp(-z * z / (2 * K)) / np.sqrt(2 * np.pi * K)

    return integrate.quad(g, -s, s, points=[0.0], epsabs=1e-15, epsrel=1e-13, limit=400)[0]


def test_fixed_point_half_stable_is_marginal():
    # gelu at its critical (C_b, C_W): g(K) = C_b + C_W <sigma^2>_K - K touches zero at K* from below, so a flow
    # from above stops there (power-law approach); from K0 = 1 it stops first at a lower, stable root
    c = et.critical_init("gelu")
    K = et.fixed_point("gelu", c.C_W, c.C_b, K0=10.0)
    assert K.kind == "marginal" and K == pytest.approx(c.K_star, rel=1e-9)
    assert K.chi_parallel == pytest.approx(1.0, abs=1e-8) and K.chi_perp == pytest.approx(1.0, abs=1e-8)
    K = et.fixed_point("gelu", c.C_W, c.C_b, K0=1.0)
    assert K.kind == "stable" and 3.0 < K < 3.1
    g = lambda k: c.C_b + c.C_W * gauss_finite(lambda z: GELU(z) ** 2, k) - k
    assert abs(g(K)) < 1e-12 and g(K * 0.99) > 0 > g(K * 1.01)


def test_fixed_point_unstable():
    # gelu with C_b just above critical: the tangency splits into an unstable root (g' > 0, chi_par > 1) and a
    # stable one above it.  Started exactly on the unstable root the flow stays; slightly off, it leaves it.
    c = et.critical_init("gelu")
    C_b = c.C_b + 1e-6
    g = lambda k: C_b + c.C_W * gauss_finite(lambda z: GELU(z) ** 2, k) - k
    K_u = optimize.brentq(g, 3.2, c.K_star, xtol=1e-14, rtol=1e-14)
    chi_u = c.C_W * gauss_finite(lambda z: GELU(z) * DGELU(z) * z, K_u) / K_u
    assert chi_u > 1
    K = et.fixed_point("gelu", c.C_W, C_b, K0=K_u)
    assert K == K_u and K.kind == "unstable" and K.chi_parallel == pytest.approx(chi_u, rel=1e-9)
    below = et.fixed_point("gelu", c.C_W, C_b, K0=K_u * (1 - 1e-3))
    above = et.fixed_point("gelu", c.C_W, C_b, K0=K_u * (1 + 1e-3))
    assert below.kind == above.kind == "stable" and below < K_u < above
    assert abs(g(below)) < 1e-12 and abs(g(above)) < 1e-12


@pytest.mark.parametrize("C_W", [2e10, 1e20])
def test_tanh_fixed_point_at_huge_C_W(C_W):
    # was inf: the scan stopped at K0 1e10.  K* solves K = C_W (1 - <sech^2>_K); sech^2 is negligible beyond
    # |z| = 40, where the Gaussian density is flat to 1e-8 relative, so a finite-interval quadrature is exact.
    sech2 = lambda K: integrate.quad(lambda z: np.exp(-z * z / (2 * K)) / np.cosh(z) ** 2, -40, 40,
                                     epsabs=0, epsrel=1e-13, limit=200)[0] / np.sqrt(2 * np.pi * K)
    K_ref = optimize.brentq(lambda K: C_W * (1 - sech2(K)) - K, 0.5 * C_W, C_W, xtol=1e-14 * C_W, rtol=1e-15)
    K = et.fixed_point("tanh", C_W, 0.0)
    assert K.kind == "stable" and K == pytest.approx(K_ref, rel=1e-12)
    assert K < C_W and C_W - K == pytest.approx(C_W * 2 / np.sqrt(2 * np.pi * C_W), rel=1e-3)
    # chi_perp = C_W <sech^4>_K -> C_W (4/3) / sqrt(2 pi K) (tanh is a sign function at this scale)
    assert K.chi_perp == pytest.approx(C_W * 4 / 3 / np.sqrt(2 * np.pi * K), rel=1e-6)


def test_fixed_point_is_a_float():
    import json
    import pickle

    K = et.fixed_point("tanh", 1.5, 0.0)
    assert isinstance(K, float) and float(K) == K.K_star and str(K) == repr(float(K))
    assert json.loads(json.dumps({"K": K}))["K"] == float(K)
    back = pickle.loads(pickle.dumps(K))
    assert back == K and back.kind == "stable" and back.chi_parallel == K.chi_parallel
    assert "kind='stable'" in repr(K)
