"""Activations that would give silent wrong numbers: kinked callables, sharp smooth ones, complex
or non-finite ones (issue #23, points 13 and 15).

References are independent of the code under test: kinks are known by construction, the Gaussian
moments of sharp activations come from scipy's adaptive quadrature split at the peak."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import efftheory as et
from efftheory import empirical as em
from efftheory.activations import _has_kink, _strip
from efftheory.gaussian import derivative_moments

KINKED = {
    "relu": lambda z: jnp.maximum(z, 0.0),
    "leaky 0.1": lambda z: jnp.where(z > 0, z, 0.1 * z),
    "clip": lambda z: jnp.clip(z, -1.0, 1.0),
    "abs": jnp.abs,
    "step": lambda z: jnp.where(z > 0, 1.0, 0.0),
    "kink at 7": lambda z: jnp.maximum(z - 7.0, 0.0),
}
SMOOTH = {
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "erf": jax.scipy.special.erf,
    "sin": jnp.sin,
    "linear": lambda z: z,
    "softplus(3z)/3": lambda z: jax.nn.softplus(3 * z) / 3,
    "softplus(30z)/30": lambda z: jax.nn.softplus(30 * z) / 30,
}


@pytest.mark.parametrize("name", sorted(KINKED))
def test_kinked_callables_are_detected(name):
    assert _has_kink(KINKED[name])
    assert et.get_activation(KINKED[name]).kinked


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_smooth_callables_are_not_kinked(name):
    assert not _has_kink(SMOOTH[name])


def test_registry_kinks():
    assert et.get_activation("relu").kinked and et.get_activation("abs").kinked
    assert not et.get_activation("tanh").kinked and not et.get_activation("gelu").kinked


@pytest.mark.parametrize("name", ["relu", "clip"])
def test_dntk_refuses_kinked_callables(name):
    """A callable relu used to give R = Q = U = 0 (autodiff's sigma'' of a kink is zero)."""
    net = et.MLP(depth=3, width=8, activation=KINKED[name], C_W=2.0)
    with pytest.raises(ValueError, match="net: .* kink"):
        et.dntk_statistics(net, np.array([[1.0, 0.3]]))


def test_strip_estimate():
    """tanh(a z) has its poles at i pi/(2a); the logistic family's strip is read within 20%, never above."""
    assert _strip(jnp.tanh) == pytest.approx(math.pi / 2, rel=1e-12)
    assert _strip(lambda z: jnp.tanh(4 * z)) == pytest.approx(math.pi / 8, rel=0.01)
    for beta in (3.0, 30.0):
        d = _strip(lambda z, b=beta: jax.nn.softplus(b * z) / b)
        assert 0.75 * math.pi / beta <= d <= math.pi / beta, (beta, d)
    for f in (jax.nn.gelu, jax.scipy.special.erf, jnp.sin, jax.nn.silu):  # the built-ins keep pi/2
        assert _strip(f) == math.pi / 2


def _quad_moment(fn, pattern, K):
    """<prod_k sigma^(pattern[k])(z)> for one input z ~ N(0, K), by scipy quad split at 0."""
    ds = [fn]
    for _ in range(3):
        ds.append(_jvp(ds[-1]))
    fs = [jax.jit(ds[int(p)]) for p in pattern]

    def f(z):
        v = np.prod([float(g(jnp.float64(z))) for g in fs])
        return v * math.exp(-z * z / (2 * K)) / math.sqrt(2 * math.pi * K)

    edge = 12 * math.sqrt(K)
    parts = [integrate.quad(f, a, b, epsabs=1e-13, epsrel=1e-11, limit=400)[0]
             for a, b in ((-edge, -0.5), (-0.5, 0.0), (0.0, 0.5), (0.5, edge))]
    return sum(parts)


def _jvp(fn):
    return lambda z: jax.jvp(fn, (z,), (jnp.ones_like(z),))[1]


@pytest.mark.parametrize("beta", [10.0, 30.0])
def test_sharp_activation_moments_match_adaptive_quadrature(beta):
    """softplus(beta z)/beta: the dNTK's Gaussian moments resolve the peak of sigma'' (width 1/beta).
    With tanh's strip (the rule before this check) R of a depth-3 network was off by 1% at beta = 10
    and 38% at beta = 30."""
    fn = jax.jit(lambda z: jax.nn.softplus(beta * z) / beta)
    K = np.array([[1.3]])
    act = et.get_activation(fn)
    M4, E2 = derivative_moments(fn, K, tol=1e-9, strip=act.strip)
    for p in ("3111", "2211", "2110"):
        ref = _quad_moment(fn, p, 1.3)
        assert M4[p][0, 0, 0, 0] == pytest.approx(ref, rel=1e-8, abs=1e-12), p
    for p in ("31", "22"):
        ref = _quad_moment(fn, p, 1.3)
        assert E2[p][0, 0] == pytest.approx(ref, rel=1e-8, abs=1e-12), p


def test_sharp_activation_dntk_converges_in_tol():
    x = np.array([[1.0, 0.3], [0.2, -1.0]])
    net = et.MLP(depth=3, width=64, activation=lambda z: jax.nn.softplus(10 * z) / 10, C_W=1.5, C_b=0.1)
    a, b = (np.asarray(et.dntk_statistics(net, x, tol=t).R) for t in (1e-8, 1e-11))
    assert np.max(np.abs(a - b)) <= 1e-7 * np.max(np.abs(b))


@pytest.mark.parametrize("fn, match", [
    (lambda z: jnp.exp(1j * z), "complex"),
    (lambda z: jnp.log(z), "nan at z = -20"),
    (lambda z: jnp.sum(z), "shape"),
    (lambda z: jnp.where(z > 3, jnp.inf, z), "inf at z = 3"),
])
def test_non_real_activations_are_refused(fn, match):
    with pytest.raises(ValueError, match=f"activation: .*{match}"):
        et.MLP(depth=2, activation=fn)
    with pytest.raises(ValueError, match="activation: "):
        et.get_activation(fn)


def test_nan_statistics_are_not_returned_silently():
    """sigma finite on [-20, 20] but NaN beyond (the probe cannot see it): the sampled statistics say so."""
    net = et.MLP(depth=3, width=8, activation=lambda z: jnp.where(jnp.abs(z) > 25, jnp.nan, jnp.tanh(z)), C_W=1.0)
    x = np.array([[100.0, -80.0], [0.3, 0.2]])
    with pytest.raises(ValueError, match=r"net: \d+ of 16 sampled networks .*non-finite"):
        em.sample_ensemble(net, x, 16, 0, statistics=("metric",), progress=False)


def test_homogeneous_callable_gets_exact_kernels():
    """A positively homogeneous callable (here 2z above 0, -0.5z below: not in the registry) gets exact
    kernels: K^(2) and Theta^(2) against a two-input adaptive quadrature split at the kinks (scipy)."""
    fn = lambda z: jnp.where(z > 0, 2.0 * z, -0.5 * z)  # noqa: E731
    f = lambda z: 2.0 * z if z > 0 else -0.5 * z  # noqa: E731
    df = lambda z: 2.0 if z > 0 else -0.5  # noqa: E731
    x = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.8]])
    net = et.MLP(2, 8, fn, C_W=1.3, C_b=0.2)
    assert net.sigma.has_closed_form and not net.sigma.smooth
    K1 = 0.2 + 1.3 * x @ x.T / 3
    a = math.sqrt(K1[0, 0])
    b = K1[0, 1] / a
    c = math.sqrt(K1[1, 1] - b * b)
    phi = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731

    def avg(g):
        tot = 0.0
        for ulo, uhi in ((-12.0, 0.0), (0.0, 12.0)):
            for side in (0, 1):
                lo = (lambda u: -12.0) if side == 0 else (lambda u: -b * u / c)
                hi = (lambda u: -b * u / c) if side == 0 else (lambda u: 12.0)
                tot += integrate.dblquad(lambda v, u: g(a * u, b * u + c * v) * phi(u) * phi(v), ulo, uhi, lo, hi,
                                         epsabs=1e-13, epsrel=1e-11)[0]
        return tot

    S = avg(lambda z1, z2: f(z1) * f(z2))
    dS = avg(lambda z1, z2: df(z1) * df(z2))
    inf = et.infinite_width(net, x)
    Theta1 = 0.2 + 1.3 * x @ x.T / 3
    np.testing.assert_allclose(np.asarray(inf.K)[1, 0, 1], 0.2 + 1.3 * S, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(inf.Theta)[1, 0, 1], 0.2 + 1.3 * S + 1.3 * dS * Theta1[0, 1], rtol=1e-9)
    assert et.get_activation(fn) == et.get_activation(fn)  # one activation for one function
