"""The Gaussian engine against adaptive quadrature (scipy.integrate), an independent method."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy.special import erf as sp_erf

from efftheory import get_activation
from efftheory.gaussian import expect1, expect2, expectk, pair_moments_quadrature

SMOOTH = {"tanh": np.tanh, "erf": sp_erf, "sin": np.sin, "gelu": lambda z: 0.5 * z * (1 + sp_erf(z / np.sqrt(2)))}


def quad1(f, K):
    def g(z):
        return f(z) * np.exp(-z * z / (2 * K)) / np.sqrt(2 * np.pi * K)

    return integrate.quad(g, -np.inf, np.inf, epsabs=1e-15, epsrel=1e-13, limit=400)[0]


def quad2(f, k11, k22, k12):
    # conditional form: z2 | z1 ~ N(k12/k11 z1, k22 - k12^2/k11); inner integral in 1-d again
    b, c2 = k12 / k11, k22 - k12**2 / k11

    def inner(z1):
        return quad1(lambda v: f(z1, b * z1 + v), c2) if c2 > 0 else f(z1, b * z1)

    return quad1(np.vectorize(inner), k11)


@pytest.mark.parametrize("name", sorted(SMOOTH))
@pytest.mark.parametrize("K", [0.05, 1.0, 4.0, 10.0])
def test_expect1_matches_adaptive_quadrature(name, K):
    act = get_activation(name)
    got = float(expect1(lambda z: act.fn(z) ** 2, K))
    want = quad1(lambda z: SMOOTH[name](z) ** 2, K)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("name", ["tanh", "gelu"])
@pytest.mark.parametrize("k", [(1.0, 0.7, 0.3), (3.0, 2.0, -2.2), (0.4, 5.0, 1.2)])
def test_expect2_matches_adaptive_quadrature(name, k):
    act = get_activation(name)
    got = float(expect2(lambda a, b: act.fn(a) * act.fn(b), *k))
    want = quad2(lambda a, b: SMOOTH[name](a) * SMOOTH[name](b), *k)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("name", ["relu", "erf", "abs", "sin", "leaky_relu(0.3)", "linear"])
def test_closed_forms_match_generic_quadrature(name, rng):
    """Closed-form kernels against the generic 2-d rule (with a high order for kinks)."""
    act = get_activation(name)
    generic = type(act)(act.name, act.fn)  # same sigma, no closed forms
    x = rng.normal(size=(6, 4)) * 1.5
    K = x @ x.T / 4 + 0.2
    S, dS = pair_moments_quadrature(act, jnp.asarray(K))
    order = None if act.smooth else 2000
    Sg, dSg = pair_moments_quadrature(generic, jnp.asarray(K), order=order)
    tol = 1e-10 if act.smooth else 2e-4  # Gauss-Hermite converges only algebraically across a kink
    np.testing.assert_allclose(S, Sg, rtol=tol, atol=tol)
    np.testing.assert_allclose(dS, dSg, rtol=50 * tol, atol=50 * tol)


def test_relu_closed_form_against_conditional_quadrature():
    """Arc-cosine kernel vs a 1-d quadrature of the closed conditional expectation over u > 0."""
    from scipy.stats import norm

    act = get_activation("relu")
    for k11, k22, k12 in [(1.0, 2.0, 0.5), (2.0, 0.5, -0.9), (1.5, 1.5, 1.4999)]:
        a = np.sqrt(k11)
        b, c = k12 / a, np.sqrt(k22 - k12**2 / k11)
        def inner(u):  # E[relu(bu + cv)]
            return (b * u) * norm.cdf(b * u / c) + c * norm.pdf(b * u / c)

        want = integrate.quad(lambda u: a * u * inner(u) * norm.pdf(u), 0, np.inf, epsabs=1e-14)[0]
        dwant = integrate.quad(lambda u: norm.cdf(b * u / c) * norm.pdf(u), 0, np.inf, epsabs=1e-14)[0]
        args = tuple(map(jnp.asarray, (k11, k22, k12)))
        assert float(act.nngp(*args)) == pytest.approx(want, rel=1e-10)
        assert float(act.dnngp(*args)) == pytest.approx(dwant, rel=1e-10)
    assert float(act.nngp(jnp.asarray(3.0), jnp.asarray(3.0), jnp.asarray(3.0))) == pytest.approx(1.5, rel=1e-14)


def test_degenerate_covariances_are_finite():
    act = get_activation("tanh")
    K = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # identical pair, zero input
    S, dS = pair_moments_quadrature(act, K)
    assert np.all(np.isfinite(S)) and np.all(np.isfinite(dS))
    assert float(S[0, 1]) == pytest.approx(float(S[0, 0]), rel=1e-13)
    assert float(S[2, 2]) == 0.0
    for name in ["relu", "erf", "abs", "leaky_relu", "sin", "linear"]:
        S, dS = pair_moments_quadrature(get_activation(name), K)
        assert np.all(np.isfinite(S)) and np.all(np.isfinite(dS)), name


def test_expectk_rank_deficient_four_dimensional():
    # z = (g, g, h, -h): fourth moment E[g^2 h^2] = k_g k_h, a 2-d marginal inside a 4x4 covariance
    S = np.array([[2.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.5, -0.5], [0.0, 0.0, -0.5, 0.5]])
    val = expectk(lambda z: z[..., 0] * z[..., 1] * z[..., 2] * z[..., 3], S)
    assert float(val) == pytest.approx(-2.0 * 0.5, rel=1e-12)
    # full rank: Isserlis for a random covariance
    A = np.random.default_rng(0).normal(size=(4, 4))
    S = A @ A.T
    want = S[0, 1] * S[2, 3] + S[0, 2] * S[1, 3] + S[0, 3] * S[1, 2]
    assert float(expectk(lambda z: jnp.prod(z, axis=-1), S)) == pytest.approx(want, rel=1e-11)
