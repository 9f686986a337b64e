"""The Mehler-series pair moments (efftheory.mehler) against independent scipy quadrature.

Reference: <f(z_a) g(z_b)> = int phi(u) f(a u) [int phi(v) g(b u + c v) dv] du with the 2x2 Cholesky
factor (a, b, c), both integrals by scipy.integrate.quad, sigma and sigma' written out in numpy/scipy.
Errors are measured relative to the natural scale sqrt(<f_a^2> <f_b^2>) (an entry itself may vanish;
for a zero input with f(0) = 0 the scale is floored at 1e-6 of the largest).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate as si
import scipy.special as ss

import efftheory as et
from efftheory import gaussian
from efftheory.activations import Activation, get_activation
from efftheory.gaussian import _mehler as mehler

SQ2PI = math.sqrt(2 * math.pi)

# numpy sigma and sigma', independent of the jax implementations
NUMPY = {
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    "gelu": (lambda z: z * ss.ndtr(z), lambda z: ss.ndtr(z) + z * np.exp(-0.5 * z * z) / SQ2PI),
    "silu": (lambda z: z * ss.expit(z), lambda z: ss.expit(z) * (1.0 + z * (1.0 - ss.expit(z)))),
    "softplus": (lambda z: np.logaddexp(0.0, z), ss.expit),
    "sigmoid": (ss.expit, lambda z: ss.expit(z) * (1.0 - ss.expit(z))),
}


def _phi(u):
    return math.exp(-0.5 * u * u) / SQ2PI


def scipy_pair(f, g, k11, k22, k12):
    """<f(z1) g(z2)> over N(0, [[k11, k12], [k12, k22]]) by nested scipy.integrate.quad."""
    a = math.sqrt(max(k11, 0.0))
    b = k12 / a if a > 0 else 0.0
    c = math.sqrt(max(k22 - b * b, 0.0))
    lim = 12.0

    def inner(u):
        if c < 1e-300:
            return float(g(b * u))
        return si.quad(lambda v: _phi(v) * float(g(b * u + c * v)), -lim, lim, epsabs=1e-15, epsrel=1e-13,
                       limit=200)[0]

    if a == 0.0:
        return float(f(0.0)) * inner(0.0)
    return si.quad(lambda u: _phi(u) * float(f(a * u)) * inner(u), -lim, lim, epsabs=1e-15, epsrel=1e-13,
                   limit=200)[0]


def degenerate_kernel(seed=0):
    """K for: 3 generic inputs of different norms, a near-collinear (rho ~ 0.99999), a near-anticollinear
    (rho ~ -0.9999) partner of input 0, an identical copy of input 1, an antiparallel copy of input 2
    and a zero input (C_b = 0): rho at or near +-1, zero variance, diagonals from ~0.1 to ~4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 6)) * np.array([[0.4], [1.0], [2.0]])
    e = rng.normal(size=6)
    near = x[0] + 3e-3 * np.linalg.norm(x[0]) * e / np.linalg.norm(e)
    anti = -1.3 * x[0] + 2e-2 * np.linalg.norm(x[0]) * e / np.linalg.norm(e)
    X = np.vstack([x, near, anti, x[1], -x[2], np.zeros(6)])
    K = 1.2 * X @ X.T / 6
    return 0.5 * (K + K.T)  # bitwise symmetric (a BLAS product need not be)


@pytest.mark.parametrize("host", [False, True], ids=["compiled", "numpy"])
@pytest.mark.parametrize("name", sorted(NUMPY))
def test_pair_moments_match_scipy(name, host):
    act = get_activation(name)
    K = degenerate_kernel()
    S, dS, info = mehler.pair_moments_mehler(act, K, return_info=True, host=host)
    S, dS = np.asarray(S), np.asarray(dS)
    f, df = NUMPY[name]
    N = K.shape[0]
    ref = np.zeros((2, N, N))
    for i in range(N):
        for j in range(i, N):
            ref[0, i, j] = ref[0, j, i] = scipy_pair(f, f, K[i, i], K[j, j], K[i, j])
            ref[1, i, j] = ref[1, j, i] = scipy_pair(df, df, K[i, i], K[j, j], K[i, j])
    for got, want in ((S, ref[0]), (dS, ref[1])):
        dg = np.maximum(np.diag(want), 1e-6 * np.diag(want).max())  # gelu(0) = 0: the zero input's scale
        scale = np.sqrt(np.outer(dg, dg))
        err = np.abs(got - want) / scale
        assert err.max() < 1e-8, (name, info, np.unravel_index(err.argmax(), err.shape), err.max())
    np.testing.assert_array_equal(S, S.T)
    np.testing.assert_array_equal(dS, dS.T)


@pytest.mark.parametrize("host", [False, True], ids=["compiled", "numpy"])
@pytest.mark.parametrize("rho", [-1.0, -0.999999, -0.97, -0.5, 0.0, 0.3, 0.9, 0.99999, 1.0])
def test_correlation_sweep_tanh_large_variance(rho, host):
    """tanh at K = 3 (slowly decaying coefficients): series or fallback, 1e-8 of scipy for any rho."""
    act = get_activation("tanh")
    k1, k2 = 3.0, 2.2
    K = np.array([[k1, rho * math.sqrt(k1 * k2)], [rho * math.sqrt(k1 * k2), k2]])
    S, dS = (np.asarray(v) for v in mehler.pair_moments_mehler(act, K, host=host))
    f, df = NUMPY["tanh"]
    for got, g in ((S, f), (dS, df)):
        want = scipy_pair(g, g, k1, k2, K[0, 1])
        scale = math.sqrt(scipy_pair(g, g, k1, k1, k1) * scipy_pair(g, g, k2, k2, k2))
        assert abs(got[0, 1] - want) < 1e-8 * scale


@pytest.mark.parametrize("host", [False, True], ids=["compiled", "numpy"])
def test_identical_inputs_equal_diagonal(host):
    v = np.array([0.7, -1.1, 0.4])
    x = np.stack([v, v, v])
    K = x @ x.T / 3
    for name in NUMPY:
        S, dS = (np.asarray(a) for a in mehler.pair_moments_mehler(get_activation(name), K, host=host))
        np.testing.assert_allclose(S, S[0, 0], rtol=1e-12)
        np.testing.assert_allclose(dS, dS[0, 0], rtol=1e-12)


@pytest.mark.parametrize("host", [False, True], ids=["compiled", "numpy"])
def test_zero_inputs(host):
    """Zero variance: <sigma(0) sigma(z_b)> = sigma(0) <sigma(z_b)>."""
    K = np.array([[0.0, 0.0, 0.0], [0.0, 1.7, 0.4], [0.0, 0.4, 0.0 + 0.9]])
    K[2, 2] = 0.9
    for name, (f, df) in NUMPY.items():
        S, dS = (np.asarray(a) for a in mehler.pair_moments_mehler(get_activation(name), K, host=host))
        m1 = si.quad(lambda u: _phi(u) * f(math.sqrt(1.7) * u), -12, 12, epsabs=1e-15)[0]
        dm1 = si.quad(lambda u: _phi(u) * df(math.sqrt(1.7) * u), -12, 12, epsabs=1e-15)[0]
        assert S[0, 0] == pytest.approx(f(0.0) ** 2, abs=1e-14)
        assert S[0, 1] == pytest.approx(f(0.0) * m1, abs=1e-12)
        assert dS[0, 1] == pytest.approx(df(0.0) * dm1, abs=1e-12)


def test_coefficients_of_known_expansions():
    """exp(lam z) at variance K: with t = lam sqrt(K), sigma_k = exp(t^2/2) t^k / sqrt(k!) (generating
    function of He_k), up to k = 256; its derivative lam exp(lam z) likewise."""
    lam = 0.6
    d = np.array([0.0, 0.2, 1.0, 3.0])
    C, D, m2, dm2 = (np.asarray(v) for v in mehler.coefficients(lambda z: jnp.exp(lam * z), d, 256))
    k = np.arange(257)
    logfact = np.array([math.lgamma(i + 1) for i in k])
    for i, K in enumerate(d):
        t = lam * math.sqrt(K)
        want = np.exp(0.5 * t * t + k * np.log(t) - 0.5 * logfact) if t > 0 else (k == 0).astype(float)
        atol = 1e-13 * math.sqrt(m2[i])  # rounding in sum_i w_i f(x_i) h_k(x_i)
        np.testing.assert_allclose(C[i], want, rtol=1e-12, atol=atol)
        np.testing.assert_allclose(D[i], lam * want, rtol=1e-12, atol=lam * atol)
        assert m2[i] == pytest.approx(math.exp(2 * t * t), rel=1e-13)


def test_coefficients_parseval_and_node_convergence():
    d = np.array([0.05, 0.3, 1.0, 4.0, 9.0])
    for name in NUMPY:
        act = get_activation(name)
        C, D, m2, dm2 = (np.asarray(v) for v in mehler.coefficients(act.fn, d, 256))
        C2, D2, _, _ = (np.asarray(v) for v in mehler.coefficients(act.fn, d, 256, n_nodes=8192))
        np.testing.assert_allclose(C, C2, atol=1e-13 * np.sqrt(m2.max()))
        np.testing.assert_allclose(D, D2, atol=1e-13 * np.sqrt(dm2.max()))
        # Parseval: sum_k c_k^2 -> <sigma^2> (to the truncation at k = 256)
        assert np.all(np.sum(C * C, axis=1) <= m2 * (1 + 1e-13))
        np.testing.assert_allclose(np.sum(C * C, axis=1)[:3], m2[:3], rtol=1e-12)


def test_bound_is_honoured_with_few_terms():
    """max_terms = 16: the series covers only pairs its bound certifies; the rest go to the 2-d rule."""
    act = get_activation("tanh")
    K = degenerate_kernel(1) * 3.0
    S, dS, info = mehler.pair_moments_mehler(act, K, max_terms=16, tol=1e-10, return_info=True)
    assert info.terms == 16 and info.fallback_pairs > 0
    S0, dS0 = gaussian.pair_moments_quadrature(act, K)
    for got, want in ((S, S0), (dS, dS0)):
        dg = np.maximum(np.diag(want), 1e-6)
        assert np.max(np.abs(np.asarray(got) - np.asarray(want)) / np.sqrt(np.outer(dg, dg))) < 1e-9
    assert info.parities == (1, 0)  # tanh is odd, its derivative even


@pytest.mark.parametrize("host", [False, True], ids=["compiled", "numpy"])
def test_kinked_callable_close_to_closed_form(host):
    relu = get_activation("relu")
    generic = Activation("relu_callable", relu.fn, smooth=False)
    K = degenerate_kernel(2)[:-1, :-1]  # not the zero input: sigma'(0) of relu is a convention (1/2 in jax)
    S, dS = (np.asarray(v) for v in mehler.pair_moments_mehler(generic, K, host=host))
    d = np.diag(K)
    k11, k22 = np.broadcast_to(d[:, None], K.shape), np.broadcast_to(d[None, :], K.shape)
    # a kink converges like h^2 in the 1-d and 2-d rules (gaussian.rule_size): ~1e-6 and ~1e-3 here
    np.testing.assert_allclose(S, np.asarray(relu.nngp(k11, k22, K)), atol=1e-5)
    np.testing.assert_allclose(dS, np.asarray(relu.dnngp(k11, k22, K)), atol=3e-3)


@pytest.mark.parametrize("name", ["tanh", "gelu"])
def test_infinite_width_matches_two_dimensional_rule(name):
    """The recursion through mehler equals the 2-d-rule recursion layer by layer (1e-10)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4))
    net = et.MLP(4, 8, name, C_W=1.6, C_b=0.1)
    r = et.infinite_width(net, x)
    K = net.C_bs[0] + net.C_Ws[0] * x @ x.T / 4
    T = K.copy()
    for l in range(1, 4):
        S, dS = (np.asarray(v) for v in gaussian.pair_moments_quadrature(net.sigma, K))
        K, T = net.C_bs[l] + net.C_Ws[l] * S, net.lambda_bs[l] + net.lambda_Ws[l] * S + net.C_Ws[l] * dS * T
        np.testing.assert_allclose(np.asarray(r.K[l]), K, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(r.Theta[l]), T, rtol=1e-10, atol=1e-12)


def test_series_function():
    rng = np.random.default_rng(0)
    C = rng.normal(size=(5, 20)) * 0.5 ** np.arange(20)
    R = np.clip(rng.uniform(-1, 1, size=(5, 5)), -1, 1)
    want = sum(np.outer(C[:, k], C[:, k]) * R**k for k in range(20))
    np.testing.assert_allclose(np.asarray(mehler.series(R, C)), want, rtol=1e-13, atol=1e-15)


def test_series_length_is_traced_and_sums_the_right_terms():
    """_parity_series with a traced length n sums exactly the terms k < n of the given parity (checked against a
    direct numpy sum), and _series_pair compiles one program for every n (issue #22: it compiled one per n)."""
    import jax

    rng = np.random.default_rng(3)
    N, m = 5, 65
    C = rng.normal(size=(N, m)) / (1.0 + np.arange(m))
    A = rng.normal(size=(N, N))
    R = np.clip(np.corrcoef(A), -1.0, 1.0)
    k = np.arange(m)
    for parity in (-1, 0, 1):
        fn = jax.jit(mehler._parity_series, static_argnums=(3,))
        for n in (16, 23, 48, 64):
            keep = (k < n) & ((k % 2 == parity) if parity >= 0 else True)
            direct = np.einsum("ak,bk,abk->ab", C * keep, C, R[:, :, None] ** k)
            got = np.asarray(fn(jnp.asarray(R), jnp.asarray(C), np.int32(n), parity))
            np.testing.assert_allclose(got, direct, rtol=1e-13, atol=1e-15)
    K = A @ A.T + N * np.eye(N)
    m2 = np.ones(N)
    limits = jnp.ones((4, N))
    before = mehler._series_pair._cache_size()
    for n in (16, 32, 64):
        mehler._series_pair(jnp.asarray(K), jnp.asarray(C), jnp.asarray(C), jnp.asarray(m2), jnp.asarray(m2),
                             np.int32(n), (-1, -1), True, limits)
    assert mehler._series_pair._cache_size() - before == 1


@pytest.mark.parametrize("name", ["tanh", "gelu", "callable"])
def test_numpy_twin_equals_the_compiled_path(name):
    """pair_moments_mehler(host=True) (numpy, what infinite_width runs for N <= HOST_N) sums the same
    terms as the compiled path: equal to rounding (1e-14 of the scale) on a kernel with identical,
    nearly collinear, anti-collinear and zero inputs, its fallback pairs included, with the same
    series length, parities, node count and fallback pairs."""
    act = get_activation(lambda z: jnp.tanh(z)) if name == "callable" else get_activation(name)
    K = degenerate_kernel(4)
    Sc, dSc, ic = mehler.pair_moments_mehler(act, K, return_info=True)
    Sh, dSh, ih = mehler.pair_moments_mehler(act, K, return_info=True, host=True)
    assert isinstance(Sh, np.ndarray) and ih == ic and ic.fallback_pairs > 0, (ih, ic)
    for h, c in ((Sh, Sc), (dSh, dSc)):
        c = np.asarray(c)
        dg = np.maximum(np.diag(c), 1e-6 * np.diag(c).max())
        assert np.max(np.abs(h - c) / np.sqrt(np.outer(dg, dg))) < 1e-14
        np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("residual", [False, True])
def test_infinite_width_numpy_recursion_equals_the_compiled_one(residual, monkeypatch):
    """infinite_width's Mehler recursion for few inputs (numpy, N <= HOST_N) against the compiled one
    (forced with MEHLER_HOST_N = 0): every layer of K and Theta equal to 1e-13 relative, for a plain
    and a residual MLP with identical and collinear inputs, and kept layers."""
    from efftheory.theory import infinite

    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 4))
    x[3], x[7] = x[1], -2.0 * x[2]
    kw = dict(skip=0.8, branch=0.6) if residual else {}
    net = et.MLP(6, 32, lambda z: jnp.tanh(z) + 0.1 * z, C_W=1.3, C_b=0.05, **kw)
    host = et.infinite_width(net, x, layers=[1, 4, 6])
    monkeypatch.setattr(infinite, "MEHLER_HOST_N", 0)
    compiled = et.infinite_width(net, x, layers=[1, 4, 6])
    assert host.layers == compiled.layers == (1, 4, 6)
    for name in ("K", "Theta"):
        h, c = np.asarray(getattr(host, name)), np.asarray(getattr(compiled, name))
        assert np.max(np.abs(h - c)) < 1e-13 * np.max(np.abs(c)), name
