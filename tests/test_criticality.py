"""Criticality: closed values, a numerically found case, and chi = 1 checked independently."""

import numpy as np
import pytest
from scipy import integrate
from scipy.special import erf as sp_erf, expit

import efftheory as et


def gauss(f, K):
    g = lambda z: f(z) * np.exp(-z * z / (2 * K)) / np.sqrt(2 * np.pi * K)
    return integrate.quad(g, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-13, limit=400)[0]


def test_relu_and_tanh_closed_values():
    c = et.critical_init("relu")
    assert (c.C_b, c.C_W) == (0.0, pytest.approx(2.0, rel=1e-12))
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
