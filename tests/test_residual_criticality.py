"""Criticality of residual MLPs (docs/theory.md, "Residual MLPs"): chi = xi^2 + gamma^2 chi_plain,
(1 - xi^2) K* = gamma^2 (C_b + C_W <sigma^2>_{K*}), critical (C_b, C_W) = plain x (1 - xi^2) / gamma^2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et


@pytest.mark.parametrize("xi, gamma, C_W", [(0.6, 0.8, 2.0), (-0.3, 1.7, 0.5), (0.95, 0.1, 3.0)])
def test_relu_chi_is_exact(xi, gamma, C_W):
    K = np.array([0.0, 1e-3, 0.7, 40.0])
    want = xi ** 2 + gamma ** 2 * C_W / 2  # <relu'^2> = d<relu^2>/dK = 1/2 at every K
    np.testing.assert_allclose(et.chi_parallel("relu", K, C_W, skip=xi, branch=gamma), want, rtol=1e-15)
    np.testing.assert_allclose(et.chi_perp("relu", K, C_W, skip=xi, branch=gamma), want, rtol=1e-15)


@pytest.mark.parametrize("xi, gamma, C_W", [(0.6, 0.8, 1.0), (0.3, 1.2, 0.7)])
def test_tanh_chi_at_zero_variance(xi, gamma, C_W):
    """tanh'(0) = 1, tanh(0) = 0: chi_perp = chi_parallel = xi^2 + gamma^2 C_W at K -> 0, and
    chi_perp(K) = xi^2 + gamma^2 C_W (1 - 2K + O(K^2)) just above."""
    want = xi ** 2 + gamma ** 2 * C_W
    assert float(et.chi_perp("tanh", 0.0, C_W, skip=xi, branch=gamma)) == pytest.approx(want, rel=1e-14)
    assert float(et.chi_parallel("tanh", 0.0, C_W, skip=xi, branch=gamma)) == pytest.approx(want, rel=1e-14)
    K = 1e-4
    assert float(et.chi_perp("tanh", K, C_W, skip=xi, branch=gamma)) == pytest.approx(
        xi ** 2 + gamma ** 2 * C_W * (1 - 2 * K), rel=1e-7)


def test_defaults_are_the_plain_susceptibilities():
    K = np.array([0.2, 1.3])
    assert np.array_equal(et.chi_perp("gelu", K, 1.7, skip=0.0, branch=1.0), et.chi_perp("gelu", K, 1.7))
    assert np.array_equal(et.chi_parallel("gelu", K, 1.7), et.chi_parallel("gelu", K, 1.7, skip=0, branch=1))


@pytest.mark.parametrize("name, plain_C_W", [("relu", 2.0), ("tanh", 1.0), ("erf", np.pi / 4)])
@pytest.mark.parametrize("xi, gamma", [(0.6, 0.8), (np.sqrt(0.9), np.sqrt(0.1)), (0.5, 1.5)])
def test_critical_init_closed_forms(name, plain_C_W, xi, gamma):
    crit = et.critical_init(name, skip=xi, branch=gamma)
    assert crit.C_b == 0.0
    assert crit.C_W == pytest.approx(plain_C_W * (1 - xi ** 2) / gamma ** 2, rel=1e-13)
    K = 0.0 if name != "relu" else 1.0
    assert float(crit.chi_perp(K)) == pytest.approx(1.0, rel=1e-12)
    assert float(crit.chi_parallel(K)) == pytest.approx(1.0, rel=1e-12)
    if xi ** 2 + gamma ** 2 == pytest.approx(1.0, rel=1e-15):  # the family where the plain C_W is critical
        assert crit.C_W == pytest.approx(et.critical_init(name).C_W, rel=1e-14)


def test_half_stable_critical_init():
    """gelu: both susceptibilities are 1 at K*, and K* is a fixed point of the residual map."""
    xi, gamma = 0.5, 0.7
    crit = et.critical_init("gelu", skip=xi, branch=gamma)
    assert crit.universality_class == "half-stable"
    Ks = crit.K_star
    assert float(crit.chi_parallel(Ks)) == pytest.approx(1.0, abs=1e-10)
    assert float(crit.chi_perp(Ks)) == pytest.approx(1.0, abs=1e-10)
    # (1 - xi^2) K* = gamma^2 (C_b + C_W <gelu^2>_{K*}), <gelu^2> by an independent Gauss-Hermite rule
    u, w = np.polynomial.hermite_e.hermegauss(160)
    z = np.sqrt(Ks) * u
    from scipy.special import erf
    s2 = np.sum(w * (0.5 * z * (1 + erf(z / np.sqrt(2)))) ** 2) / np.sum(w)
    assert (1 - xi ** 2) * Ks == pytest.approx(gamma ** 2 * (crit.C_b + crit.C_W * s2), rel=1e-10)


def test_fixed_point_matches_iterated_recursion():
    """The residual fixed point against many layers of the infinite-width recursion on one input."""
    xi, gamma, C_W, C_b = 0.5, 0.8, 1.5, 0.1
    fp = et.fixed_point("tanh", C_W, C_b, K0=1.0, skip=xi, branch=gamma)
    assert fp.kind == "stable"
    L = 120
    net = et.MLP(L, 4, "tanh", C_W=C_W, C_b=C_b, skip=xi, branch=gamma)
    K = np.asarray(et.infinite_width(net, np.array([[np.sqrt(1.0 - C_b) / np.sqrt(C_W)]]) * 1.0).K[:, 0, 0])
    assert K[L - 2] == pytest.approx(float(fp), rel=1e-10)
    # chi_parallel at K* is the contraction rate of the iterates
    rate = (K[16] - float(fp)) / (K[15] - float(fp))  # deviations ~1e-4: nonlinear terms ~1e-4 relative
    assert rate == pytest.approx(fp.chi_parallel, rel=1e-3)
    assert fp.chi_parallel == pytest.approx(float(et.chi_parallel("tanh", float(fp), C_W, skip=xi, branch=gamma)),
                                            rel=1e-12)


def test_relu_fixed_points_closed_form():
    xi, gamma = 0.6, 0.5
    fp = et.fixed_point("relu", 2.0, 0.3, skip=xi, branch=gamma)
    chi = xi ** 2 + gamma ** 2  # C_W / 2 = 1
    assert fp.kind == "stable" and float(fp) == pytest.approx(gamma ** 2 * 0.3 / (1 - chi), rel=1e-14)
    crit = et.critical_init("relu", skip=xi, branch=gamma)
    line = et.fixed_point("relu", crit.C_W, 0.0, K0=2.5, skip=xi, branch=gamma)
    assert line.marginal_line and float(line) == 2.5 and line.chi_perp == pytest.approx(1.0, rel=1e-14)


def test_skip_of_one_or_more_diverges():
    fp = et.fixed_point("tanh", 1.0, 0.0, skip=1.0, branch=0.5)
    assert fp.kind == "divergent" and float(fp) == np.inf
    with pytest.raises(ValueError, match=r"skip: a critical initialization needs \|skip\| < 1"):
        et.critical_init("relu", skip=-1.2, branch=0.5)


def test_bad_residual_arguments():
    with pytest.raises(ValueError, match=r"branch: expected a positive number"):
        et.chi_perp("relu", 1.0, 2.0, skip=0.5, branch=0.0)
    with pytest.raises(ValueError, match=r"skip: expected a finite real number"):
        et.fixed_point("relu", 2.0, 0.0, skip=np.nan)
    with pytest.raises(ValueError, match=r"branch: expected a positive"):
        et.critical_init("tanh", branch=-1.0)


def test_traced_skip_and_branch():
    """d chi_perp / d xi = 2 xi and d chi_perp / d gamma = 2 gamma C_W <sigma'^2> under jax.grad."""
    K, C_W = 0.7, 1.3
    plain = float(et.chi_perp("tanh", K, C_W))
    g_xi = jax.grad(lambda x: et.chi_perp("tanh", K, C_W, skip=x, branch=0.8))(jnp.float64(0.4))
    g_gamma = jax.grad(lambda g: et.chi_perp("tanh", K, C_W, skip=0.4, branch=g))(jnp.float64(0.8))
    assert float(g_xi) == pytest.approx(0.8, rel=1e-14)
    assert float(g_gamma) == pytest.approx(2 * 0.8 * plain, rel=1e-10)
