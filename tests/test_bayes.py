"""efftheory.bayes: the 1/n correction to the Bayesian posterior, against independent computations.

* A Gaussian mixture with random covariance Sigma(s) = K + eps G1 + (s - 1) Q, s ~ Gamma with mean 1
  and variance eps, has exactly metric K + eps G1 and fourth cumulant eps (Q Q + 2 pairings) with the
  d_ij structure of docs/theory.md (V = Q (x) Q, 1/n = eps).  Its exact posterior is a one-dimensional
  integral over s (scipy quadrature); the first-order coefficient is d/d eps at eps = 0
  (Richardson extrapolation of difference quotients at three eps).
* Any pair-symmetric V is the covariance of a random metric G^ (to this order), and a Gaussian with a
  random metric averages as E[F(G^)] = F(K) + (1/n)[G1 . dF + (1/2) V . d^2 F]: the posterior moments
  of a Gaussian prior differentiated twice in the metric numerically (no Edgeworth, no Wick).
* Deep linear network: G1 = 0 and V closed form (docs/theory.md), non-uniform widths.
"""

import math

import jax
import numpy as np
import pytest
from scipy import integrate, stats

import efftheory as et
from efftheory.bayes import FiniteWidthPosterior, posterior, posterior_from_statistics
from efftheory.predict import gp_posterior, train_test_kernels


def _random_psd(rng, N, scale=1.0):
    A = rng.normal(size=(N, N))
    return scale * (A @ A.T / N + 0.3 * np.eye(N))


def _gaussian_posterior(S, y, noise):
    """log Z, mean (N_T, k), second moment (N_T, k, N_T, k) of the Gaussian prior S (x) 1_k."""
    d, k = y.shape
    A = S[:d, :d] + noise * np.eye(d)
    Ai = np.linalg.inv(A)
    logZ = -0.5 * np.sum(y * (Ai @ y)) - 0.5 * k * np.linalg.slogdet(A)[1]
    m = S[d:, :d] @ Ai @ y
    C = S[d:, d:] - S[d:, :d] @ Ai @ S[:d, d:]
    return logZ, m, np.einsum("tu,ij->tiuj", C, np.eye(k)) + np.einsum("ti,uj->tiuj", m, m)


def _mixture_posterior(K, G1, Q, y, noise, eps):
    """Exact posterior mean and covariance of the Gamma scale mixture (quadrature over s)."""
    if eps == 0:
        _, m, sec = _gaussian_posterior(K, y, noise)
        return m, sec - np.einsum("ti,uj->tiuj", m, m)
    a = 1.0 / eps
    logZ1 = _gaussian_posterior(K + eps * G1, y, noise)[0]
    sd = math.sqrt(eps)

    def f(s):
        logZ, m, sec = _gaussian_posterior(K + eps * G1 + (s - 1) * Q, y, noise)
        w = math.exp(stats.gamma.logpdf(s, a, scale=eps) + logZ - logZ1)
        return w * np.concatenate([[1.0], m.ravel(), sec.ravel()])

    out, _ = integrate.quad_vec(f, max(0.0, 1 - 15 * sd), 1 + 20 * sd, epsabs=0, epsrel=1e-13, limit=400)
    NT, k = K.shape[0] - y.shape[0], y.shape[1]
    m = out[1:1 + NT * k].reshape(NT, k) / out[0]
    sec = out[1 + NT * k:].reshape(NT, k, NT, k) / out[0]
    return m, sec - np.einsum("ti,uj->tiuj", m, m)


def _richardson(K, G1, Q, y, noise, h):
    m0, c0 = _mixture_posterior(K, G1, Q, y, noise, 0.0)
    D = []
    for e in (h, h / 2, h / 4):
        m, c = _mixture_posterior(K, G1, Q, y, noise, e)
        D.append(((m - m0) / e, (c - c0) / e))
    weights = (1 / 3, -2.0, 8 / 3)  # cancels the eps and eps^2 terms of the difference quotient
    return (sum(w * d[0] for w, d in zip(weights, D)), sum(w * d[1] for w, d in zip(weights, D)))


@pytest.mark.parametrize("noise,k", [(0.4, 1), (0.25, 2), (0.0, 2)])
def test_scale_mixture_matches_exact_posterior(noise, k):
    rng = np.random.default_rng(11 + k)
    N_D, N_T = 3, 2
    N = N_D + N_T
    K = _random_psd(rng, N)
    Lk = np.linalg.cholesky(K)
    R = _random_psd(rng, N)
    Q = Lk @ (0.6 * R / np.linalg.eigvalsh(R)[-1]) @ Lk.T  # 0 < Q < K: Sigma(s) > 0 for every s >= 0
    G1 = 0.3 * (lambda B: B + B.T)(rng.normal(size=(N, N)))
    y = rng.normal(size=(N_D, k))
    V = np.einsum("ab,cd->abcd", Q, Q)
    p = posterior_from_statistics(K, G1, V, y, noise=noise)
    mean1, cov1 = _richardson(K, G1, Q, y, noise, 4e-3)
    m0, c0 = _mixture_posterior(K, G1, Q, y, noise, 0.0)
    np.testing.assert_allclose(p.mean, m0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.einsum("tu,ij->tiuj", p.cov, np.eye(k)), c0, rtol=1e-12, atol=1e-12)
    assert np.abs(p.mean1).max() > 0.05 and np.abs(p.cov1).max() > 0.05  # not a vacuous check
    np.testing.assert_allclose(p.mean1, mean1, rtol=0, atol=2e-7 * np.abs(mean1).max())  # seen: <= 1.6e-8
    np.testing.assert_allclose(p.cov1, cov1, rtol=0, atol=2e-7 * np.abs(cov1).max())
    # at a small eps the first-order prediction is the exact posterior up to O(eps^2)
    eps = 1e-3
    m, c = _mixture_posterior(K, G1, Q, y, noise, eps)
    at = p.at_width(1 / eps)
    assert np.abs(at.mean - m).max() < 30 * eps**2 * max(1, np.abs(mean1).max())
    assert np.abs(at.cov - c).max() < 30 * eps**2 * max(1, np.abs(cov1).max())


def _pair_symmetric(rng, N):
    X = rng.normal(size=(N,) * 4)
    X = X + X.transpose(1, 0, 2, 3)
    X = X + X.transpose(0, 1, 3, 2)
    return X + X.transpose(2, 3, 0, 1)


def _random_metric_route(K, G1, V, y, noise):
    """First-order posterior of a Gaussian with a random metric, by numerical derivatives in the metric."""
    d, k = y.shape

    def F(S):
        logZ, m, sec = _gaussian_posterior(S, y, noise)
        Z = math.exp(logZ)
        return np.concatenate([[Z], Z * m.ravel(), Z * sec.ravel()])

    def d2(D, h):  # second derivative of F(K + t D) at t = 0: central differences, Richardson h, h/2
        c = [(F(K + e * D) - 2 * F(K) + F(K - e * D)) / e**2 for e in (h, h / 2)]
        return (4 * c[1] - c[0]) / 3

    # V . d^2 F = sum_r lam_r d^2/dt^2 F(K + t E_r) over the eigenpairs (lam_r, E_r) of V as an N^2 x N^2 matrix
    N = K.shape[0]
    lam, E = np.linalg.eigh(V.reshape(N * N, N * N))
    h = 2e-3
    first = (8 * (F(K + h * G1) - F(K - h * G1)) - (F(K + 2 * h * G1) - F(K - 2 * h * G1))) / (12 * h)
    dF = first + 0.5 * sum(l * d2(Er.reshape(N, N), 4 * h) for l, Er in zip(lam, E.T) if abs(l) > 1e-12 * abs(lam).max())
    F0 = F(K)
    NT = N - d
    Z0, Zm0, Zs0 = F0[0], F0[1:1 + NT * k].reshape(NT, k), F0[1 + NT * k:].reshape(NT, k, NT, k)
    dZ, dZm, dZs = dF[0], dF[1:1 + NT * k].reshape(NT, k), dF[1 + NT * k:].reshape(NT, k, NT, k)
    m = Zm0 / Z0
    mean1 = (dZm - m * dZ) / Z0
    s1 = (dZs - Zs0 / Z0 * dZ) / Z0
    cov1 = s1 - np.einsum("ti,uj->tiuj", mean1, m) - np.einsum("ti,uj->tiuj", m, mean1)
    return m, mean1, cov1


def test_output_components_couple_through_V():
    rng = np.random.default_rng(5)
    N_D, N_T, k = 3, 2, 3
    N = N_D + N_T
    K = _random_psd(rng, N)
    G1 = rng.normal(size=(N, N))
    G1 = G1 + G1.T
    V = _pair_symmetric(rng, N)                # not positive: the formula is algebraic in V
    y = rng.normal(size=(N_D, k))
    p = posterior_from_statistics(K, G1, V, y, noise=0.3)
    m, mean1, cov1 = _random_metric_route(K, G1, V, y, 0.3)
    np.testing.assert_allclose(p.mean, m, rtol=1e-12, atol=1e-13)
    scale = np.abs(mean1).max()
    np.testing.assert_allclose(p.mean1, mean1, rtol=0, atol=1e-7 * scale)
    np.testing.assert_allclose(p.cov1, cov1, rtol=0, atol=1e-7 * np.abs(cov1).max())
    # components are coupled: off-diagonal covariances at O(1/n), and other components' targets move a mean
    off = cov1[:, 0, :, 1]
    assert np.abs(off).max() > 0.05 * np.abs(cov1).max()
    y2 = y.copy()
    y2[:, 1:] *= 2.0
    p2 = posterior_from_statistics(K, G1, V, y2, noise=0.3)
    assert np.abs(p2.mean1[:, 0] - p.mean1[:, 0]).max() > 1e-3 * scale
    np.testing.assert_allclose(p2.mean[:, 0], p.mean[:, 0], rtol=1e-14)
    # one component alone is not the k = 3 answer for that component
    p1 = posterior_from_statistics(K, G1, V, y[:, :1], noise=0.3)
    assert np.abs(p1.mean1[:, 0] - p.mean1[:, 0]).max() > 1e-3 * scale


LIN_X = np.array([[0.8, -0.4, 1.1], [1.6, -0.8, 2.2], [0.3, 1.2, -0.5]])  # rows 0, 1 collinear
LIN_Y = np.array([[0.7, -1.1], [1.5, -2.0]])
C_W = 1.3
WIDTHS = (16, 48)


@pytest.fixture(scope="module")
def linear():
    net = et.MLP(3, WIDTHS, "linear", C_W=C_W, C_b=0.0, output_width=2)
    return net, posterior(net, LIN_X[:2], LIN_Y, LIN_X[2:], noise=0.2)


def test_linear_network_closed_form(linear):
    net, p = linear
    assert isinstance(p, FiniteWidthPosterior)
    assert p.fan_in == 48 and p.width_ratio == 3.0
    K1 = C_W * LIN_X @ LIN_X.T / 3
    K = C_W**2 * K1                                             # K^(3) = C_W^2 K^(1)
    pair = np.einsum("ac,bd->abcd", K1, K1) + np.einsum("ad,bc->abcd", K1, K1)
    # each hidden layer l adds C_W^4 pair/n_l, so in units of 1/n_2: (n_2/n_1 + 1)
    V = C_W**4 * pair * (WIDTHS[1] / WIDTHS[0] + 1)
    ref = posterior_from_statistics(K, np.zeros((3, 3)), V, LIN_Y, noise=0.2)
    np.testing.assert_allclose(p.mean, ref.mean, rtol=1e-10)
    np.testing.assert_allclose(p.cov, ref.cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p.mean1, ref.mean1, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(p.cov1, ref.cov1, rtol=1e-8, atol=1e-10)
    # the network's own widths: 1/n_{L-1} = 1/48; at_width(n) puts n_1 = n, n_2 = 3n
    own = p.at_width()
    np.testing.assert_allclose(own.mean, ref.at_width(48).mean, rtol=1e-10)
    assert own.n == 48
    np.testing.assert_allclose(p.at_width(10).cov, ref.at_width(30).cov, rtol=1e-10, atol=1e-12)
    # infinite-width part is the NNGP posterior of efftheory.predict
    gp = gp_posterior(train_test_kernels(net, LIN_X[:2], LIN_X[2:]), LIN_Y, noise=0.2)
    np.testing.assert_allclose(p.mean, gp.mean, rtol=1e-10)
    np.testing.assert_allclose(p.cov, gp.cov, rtol=1e-10)


def test_degenerate_inputs_give_finite_numbers(linear):
    _, p = linear                                                # collinear training inputs
    for arr in (p.mean, p.cov, p.mean1, p.cov1):
        assert np.all(np.isfinite(arr))
    # duplicated training input and a test input equal to a training input
    rng = np.random.default_rng(3)
    B = rng.normal(size=(3, 4))
    K3 = B @ B.T
    G3 = 0.2 * (lambda C: C + C.T)(rng.normal(size=(3, 3)))
    V3 = _pair_symmetric(rng, 3)

    def stats_on(idx):
        return K3[np.ix_(idx, idx)], G3[np.ix_(idx, idx)], V3[np.ix_(idx, idx, idx, idx)]

    p = posterior_from_statistics(*stats_on([0, 0, 1, 0]), np.array([[0.5], [0.5]]), noise=0.1)
    for arr in (p.mean, p.cov, p.mean1, p.cov1):
        assert np.all(np.isfinite(arr))
    # z is the same at a duplicated input: two observations of 0.5 with noise 0.1 are one with noise 0.05
    q = posterior_from_statistics(*stats_on([0, 1, 0]), np.array([[0.5]]), noise=0.05)
    np.testing.assert_allclose(p.mean, q.mean, rtol=1e-12)
    np.testing.assert_allclose(p.cov, q.cov, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p.mean1, q.mean1, rtol=1e-10)
    np.testing.assert_allclose(p.cov1, q.cov1, rtol=1e-10, atol=1e-13)
    assert np.abs(q.mean1).max() > 1e-3
    with pytest.raises(ValueError, match="^noise:.*use noise > 0"):
        posterior_from_statistics(*stats_on([0, 0, 1, 0]), np.array([[0.5], [0.5]]), noise=0.0)


def test_argument_errors(linear):
    net, p = linear
    xd, xt, y = LIN_X[:2], LIN_X[2:], LIN_Y
    with pytest.raises(ValueError, match="^net:"):
        posterior("mlp", xd, y, xt, noise=0.1)
    with pytest.raises(ValueError, match="^x_test:"):
        posterior(net, xd, y, xt[:, :2], noise=0.1)
    with pytest.raises(ValueError, match="^x_train:"):
        posterior(net, xd[0], y, xt, noise=0.1)
    with pytest.raises(ValueError, match="^y_train:.*n_out = net.output_width = 2"):
        posterior(net, xd, y[:, :1], xt, noise=0.1)
    with pytest.raises(ValueError, match="^y_train:"):
        posterior(net, xd, y[:1], xt, noise=0.1)
    with pytest.raises(ValueError, match="^y_train:"):
        posterior(net, xd, np.full_like(y, np.nan), xt, noise=0.1)
    for bad in (-0.1, math.nan, "0.1", math.inf):
        with pytest.raises(ValueError, match="^noise:"):
            posterior(net, xd, y, xt, noise=bad)
    with pytest.raises(ValueError, match="^n:"):
        p.at_width(-3)
    K, G1, V = np.eye(3), np.zeros((3, 3)), np.zeros((3,) * 4)
    q = posterior_from_statistics(K, G1, V, [1.0, 2.0], noise=0.1)
    with pytest.raises(ValueError, match="^n:"):
        q.at_width()
    with pytest.raises(ValueError, match="^V:"):
        posterior_from_statistics(K, G1, V[0], [1.0], noise=0.1)
    with pytest.raises(ValueError, match="^G1:"):
        posterior_from_statistics(K, np.ones((2, 2)), V, [1.0], noise=0.1)
    with pytest.raises(ValueError, match="^K:"):
        posterior_from_statistics(np.triu(np.ones((3, 3))), G1, V, [1.0], noise=0.1)
    with pytest.raises(ValueError, match="^y_train:"):
        posterior_from_statistics(K, G1, V, [1.0, 2.0, 3.0], noise=0.1)   # no test input left


def test_result_is_a_pytree(linear):
    _, p = linear
    leaves = jax.tree_util.tree_leaves(p)
    assert len(leaves) == 4
    q = jax.tree_util.tree_map(lambda a: 2 * a, p)
    np.testing.assert_allclose(q.mean1, 2 * p.mean1)
    assert q.fan_in == p.fan_in


def test_depth_one_is_exactly_gaussian():
    x = np.array([[0.5, -1.0, 0.3], [1.2, 0.4, -0.7], [0.9, -0.2, 0.1]])
    y = np.array([[0.4, -0.3], [1.0, 0.2]])
    net = et.MLP(1, activation="tanh", C_W=1.7, C_b=0.2, output_width=2)
    p = posterior(net, x[:2], y, x[2:], noise=0.15)
    K = 0.2 + 1.7 * x @ x.T / 3                                  # K^(1), no hidden layer
    A = K[:2, :2] + 0.15 * np.eye(2)
    np.testing.assert_allclose(p.mean, K[2:, :2] @ np.linalg.solve(A, y), rtol=1e-12)
    np.testing.assert_allclose(p.cov, K[2:, 2:] - K[2:, :2] @ np.linalg.solve(A, K[:2, 2:]), rtol=1e-12)
    assert p.fan_in == math.inf
    assert np.all(p.mean1 == 0) and np.all(p.cov1 == 0)
    np.testing.assert_array_equal(p.at_width().mean, p.mean)
