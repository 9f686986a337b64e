"""efftheory.predict: closed forms of the infinite-width GD ensemble and of the NNGP posterior.

Every expectation is computed here independently of predict.py: by iterating the linear recursion,
by direct linear solves, by least squares for a deep linear network, and by Bayesian linear
regression in weight space for a one-layer network.
"""

import math

import numpy as np
import pytest

import efftheory as et
from efftheory import datasets, predict

DS = datasets.circle_regression(6, 5, outputs=2, seed=3)
NET = et.MLP(3, 1, "erf", C_W=2.0, C_b=0.3)


@pytest.fixture(scope="module")
def kern():
    return predict.train_test_kernels(NET, DS.x_train, DS.x_test)


def _eta(kern, fraction):
    return fraction * 2.0 / np.linalg.eigvalsh(kern.Theta_train)[-1]


def test_train_test_kernels_are_the_last_layer_of_infinite_width(kern):
    inf = et.infinite_width(NET, np.concatenate([DS.x_train, DS.x_test]))
    np.testing.assert_allclose(kern.K, np.asarray(inf.K[-1]), rtol=1e-14)
    np.testing.assert_allclose(kern.Theta, np.asarray(inf.Theta[-1]), rtol=1e-14)
    assert kern.n_train == 6 and kern.n_test == 5
    np.testing.assert_array_equal(kern.K_cross, kern.K[6:, :6])
    np.testing.assert_array_equal(kern.Theta_test, kern.Theta[6:, 6:])


def test_t0_is_the_prior(kern):
    y = DS.y_train
    gd = predict.gradient_descent(kern, y, learning_rate=_eta(kern, 0.5), steps=0)
    np.testing.assert_array_equal(gd.mean[0], 0.0)
    np.testing.assert_allclose(gd.cov[0], kern.K_test, atol=1e-14)
    np.testing.assert_allclose(gd.train_mean[0], 0.0, atol=1e-14)
    np.testing.assert_allclose(gd.train_cov[0], kern.K_train, atol=1e-14)
    assert gd.loss[0] == pytest.approx(0.5 * np.sum(y**2) + 0.5 * 2 * np.trace(kern.K_train), rel=1e-13)


@pytest.mark.parametrize("fraction", [0.3, 0.8])  # 0.8 of the bound: modes with 1 - eta lambda < 0 oscillate
def test_discrete_formula_equals_iterating_the_recursion(kern, fraction):
    """Mean and covariance of the affine map s -> s - eta Theta_{., D} (s_D - y) iterated on the
    Gaussian joint state s = (z(D), z(x)) ~ N(0, K)."""
    eta = _eta(kern, fraction)
    y = DS.y_train
    d = kern.n_train
    N = kern.K.shape[0]
    A = np.eye(N) - eta * kern.Theta[:, :d] @ np.eye(N)[:d]
    c = eta * kern.Theta[:, :d] @ y
    mean, cov = np.zeros((N, 2)), kern.K.copy()
    steps = [0, 1, 2, 5, 37]
    want = {}
    for t in range(max(steps) + 1):
        if t in steps:
            want[t] = (mean.copy(), cov.copy())
        mean, cov = A @ mean + c, A @ cov @ A.T
    gd = predict.gradient_descent(kern, y, learning_rate=eta, steps=steps)
    np.testing.assert_array_equal(gd.steps, steps)
    for i, t in enumerate(steps):
        m, C = want[t]
        np.testing.assert_allclose(gd.mean[i], m[d:], atol=1e-12)
        np.testing.assert_allclose(gd.P[i] @ y, m[d:], atol=1e-12)
        np.testing.assert_allclose(gd.cov[i], C[d:, d:], atol=1e-12)
        np.testing.assert_allclose(gd.train_mean[i], m[:d], atol=1e-12)
        np.testing.assert_allclose(gd.train_cov[i], C[:d, :d], atol=1e-12)
        resid = m[:d] - y
        assert gd.loss[i] == pytest.approx(0.5 * np.sum(resid**2) + np.trace(C[:d, :d]), rel=1e-10, abs=1e-14)


def test_convergence_is_kernel_regression_with_the_ntk(kern):
    y = DS.y_train
    gd = predict.gradient_descent(kern, y, learning_rate=_eta(kern, 0.5), steps=[math.inf, 200000])
    Tinv_y = np.linalg.solve(kern.Theta_train, y)
    Tinv_Tdx = np.linalg.solve(kern.Theta_train, kern.Theta_cross.T)
    mean = kern.Theta_cross @ Tinv_y
    cov = (kern.K_test - kern.K_cross @ Tinv_Tdx - (kern.K_cross @ Tinv_Tdx).T
           + Tinv_Tdx.T @ kern.K_train @ Tinv_Tdx)
    for i in range(2):
        np.testing.assert_allclose(gd.mean[i], mean, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(gd.cov[i], cov, rtol=1e-8, atol=1e-11)
        np.testing.assert_allclose(gd.train_mean[i], y, atol=1e-10)
        np.testing.assert_allclose(gd.train_cov[i], 0.0, atol=1e-12)
    assert gd.loss[0] == pytest.approx(0.0, abs=1e-20)
    assert np.all(np.linalg.eigvalsh(gd.cov[0]) > -1e-12)


def test_deep_linear_network_converges_to_least_squares():
    """sigma(z) = z, C_b = 0: K^(L) = C_W^L G and Theta^(L) = L K^(L) (docs/theory.md recursions by hand), so
    GD and the noise-free posterior both predict the minimum-norm least-squares fit x_test . w."""
    rng = np.random.default_rng(0)
    n0, L, CW = 9, 4, 1.3
    x_train, x_test = rng.normal(size=(5, n0)), rng.normal(size=(3, n0))
    y = rng.normal(size=(5, 2))
    net = et.MLP(L, 1, "linear", C_W=CW, C_b=0.0)
    kern = predict.train_test_kernels(net, x_train, x_test)
    xa = np.concatenate([x_train, x_test])
    G = xa @ xa.T / n0
    np.testing.assert_allclose(kern.K, CW**L * G, rtol=1e-12)
    np.testing.assert_allclose(kern.Theta, L * CW**L * G, rtol=1e-12)
    w = np.linalg.lstsq(x_train, y, rcond=None)[0]
    gd = predict.gradient_descent(kern, y, learning_rate=_eta(kern, 0.9), steps=math.inf)
    gp = predict.gp_posterior(kern, y)
    np.testing.assert_allclose(gd.mean[0], x_test @ w, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(gp.mean, x_test @ w, rtol=1e-9, atol=1e-10)
    # Theta proportional to K: the converged ensemble IS the noise-free posterior
    np.testing.assert_allclose(gd.cov[0], gp.cov, atol=1e-10)
    assert predict.stability_bound(kern) == pytest.approx(2.0 / np.linalg.eigvalsh(L * CW**L * G[:5, :5])[-1])


def test_gp_posterior_matches_bayesian_linear_regression_in_weight_space():
    """Depth 1: z = b + W x with b ~ N(0, C_b), W_j ~ N(0, C_W/n_0); posterior over (b, W) from the
    normal equations, pushed forward to the test inputs."""
    rng = np.random.default_rng(1)
    n0, CW, Cb, s2 = 3, 1.7, 0.4, 0.05
    x_train, x_test, y = rng.normal(size=(7, n0)), rng.normal(size=(4, n0)), rng.normal(size=(7, 1))
    kern = predict.train_test_kernels(et.MLP(1, 1, "linear", C_W=CW, C_b=Cb), x_train, x_test)
    phi = lambda x: np.concatenate([np.ones((len(x), 1)), x], axis=1)
    prior = np.diag([Cb] + [CW / n0] * n0)
    S = np.linalg.inv(phi(x_train).T @ phi(x_train) / s2 + np.linalg.inv(prior))
    w = S @ phi(x_train).T @ y / s2
    gp = predict.gp_posterior(kern, y, noise=s2)
    np.testing.assert_allclose(gp.mean, phi(x_test) @ w, rtol=1e-10)
    np.testing.assert_allclose(gp.cov, phi(x_test) @ S @ phi(x_test).T, rtol=1e-9, atol=1e-12)
    assert gp.noise == s2
    # infinite noise: the posterior is the prior
    big = predict.gp_posterior(kern, y, noise=1e12)
    np.testing.assert_allclose(big.mean, 0.0, atol=1e-10)
    np.testing.assert_allclose(big.cov, kern.K_test, atol=1e-10)


def test_last_layer_training_converges_to_the_noise_free_posterior():
    net = predict.last_layer_net(NET)
    assert net.lambda_Ws == (0.0, 0.0, NET.C_Ws[-1]) and net.lambda_bs == (0.0, 0.0, NET.C_bs[-1])
    kern = predict.train_test_kernels(net, DS.x_train, DS.x_test)
    np.testing.assert_allclose(kern.Theta, kern.K, rtol=1e-13)
    gd = predict.gradient_descent(kern, DS.y_train, learning_rate=_eta(kern, 0.5))
    gp = predict.gp_posterior(kern, DS.y_train, noise=0.0)
    np.testing.assert_allclose(gd.mean[0], gp.mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gd.cov[0], gp.cov, rtol=1e-7, atol=1e-10)


def test_duplicated_training_inputs():
    """A repeated input with the same target: Theta_DD is singular, and the converged predictions (the
    minimum-norm interpolant) are those without the duplicate."""
    x_train = np.concatenate([DS.x_train, DS.x_train[:1]])
    y = np.concatenate([DS.y_train, DS.y_train[:1]])
    k1 = predict.train_test_kernels(NET, x_train, DS.x_test)
    keep = np.r_[0:6, 7:12]  # the same kernels without the duplicate (row and column 6)
    k0 = predict.TrainTestKernels(K=k1.K[np.ix_(keep, keep)], Theta=k1.Theta[np.ix_(keep, keep)], n_train=6)
    eta = _eta(k1, 0.5)
    g1 = predict.gradient_descent(k1, y, learning_rate=eta, steps=math.inf)
    g0 = predict.gradient_descent(k0, DS.y_train, learning_rate=eta, steps=math.inf)
    np.testing.assert_allclose(g1.mean, g0.mean, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(g1.cov, g0.cov, rtol=1e-6, atol=1e-9)
    p1, p0 = predict.gp_posterior(k1, y), predict.gp_posterior(k0, DS.y_train)
    np.testing.assert_allclose(p1.mean, p0.mean, rtol=1e-7, atol=1e-9)


def test_multi_dimensional_targets_are_independent_components(kern):
    eta = _eta(kern, 0.5)
    both = predict.gradient_descent(kern, DS.y_train, learning_rate=eta, steps=[3, math.inf])
    for j in range(2):
        one = predict.gradient_descent(kern, DS.y_train[:, j], learning_rate=eta, steps=[3, math.inf])
        np.testing.assert_allclose(both.mean[..., j], one.mean[..., 0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(both.cov, one.cov, rtol=1e-12, atol=1e-15)
    gp = predict.gp_posterior(kern, DS.y_train, noise=0.1)
    assert gp.mean.shape == (5, 2) and gp.cov.shape == (5, 5) and gp.variance.shape == (5,)
    assert both.variance.shape == (2, 5)


def test_learning_rate_at_or_above_the_stability_bound_is_rejected(kern):
    bound = predict.stability_bound(kern)
    assert bound == pytest.approx(2.0 / np.linalg.eigvalsh(kern.Theta_train)[-1], rel=1e-14)
    predict.gradient_descent(kern, DS.y_train, learning_rate=0.999 * bound)
    for eta in (bound, 1.01 * bound):
        with pytest.raises(ValueError, match=r"learning_rate: .*stability bound 2/lambda_max\(Theta_train\)") as e:
            predict.gradient_descent(kern, DS.y_train, learning_rate=eta, steps=10)
        assert f"{bound:.6g}" in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(y_train=np.zeros((5, 2))), "y_train: expected shape"),
    (dict(y_train=np.full((6, 1), np.nan)), "y_train: contains NaN"),
    (dict(y_train=np.zeros((6, 1, 1))), "y_train: expected shape"),
    (dict(steps=-1), "steps:"),
    (dict(steps=2.5), "steps:"),
    (dict(steps=[]), "steps:"),
    (dict(steps="ten"), "steps:"),
    (dict(learning_rate=0.0), "learning_rate:"),
    (dict(learning_rate=float("nan")), "learning_rate:"),
])
def test_gradient_descent_validation(kern, kwargs, match):
    args = dict(y_train=DS.y_train, learning_rate=0.01, steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        predict.gradient_descent(kern, args.pop("y_train"), **args)


def test_kernel_and_posterior_validation(kern):
    with pytest.raises(ValueError, match="kernels: expected"):
        predict.gradient_descent(kern.K, DS.y_train, learning_rate=0.01)
    with pytest.raises(ValueError, match="noise:"):
        predict.gp_posterior(kern, DS.y_train, noise=-1.0)
    bad = predict.TrainTestKernels(K=kern.K + np.triu(np.ones_like(kern.K), 1), Theta=kern.Theta, n_train=6)
    with pytest.raises(ValueError, match="kernels.K: expected a symmetric"):
        predict.gp_posterior(bad, DS.y_train)
    nan = predict.TrainTestKernels(K=np.full_like(kern.K, np.nan), Theta=kern.Theta, n_train=6)
    with pytest.raises(ValueError, match="kernels.K: contains NaN"):
        predict.gp_posterior(nan, DS.y_train)
    for d in (0, 11, 2.0):
        with pytest.raises(ValueError, match="kernels.n_train"):
            predict.gp_posterior(predict.TrainTestKernels(K=kern.K, Theta=kern.Theta, n_train=d), DS.y_train)
    with pytest.raises(ValueError, match="x_test: expected inputs of dimension"):
        predict.train_test_kernels(NET, DS.x_train, np.ones((3, 5)))
    with pytest.raises(ValueError, match="x_train"):
        predict.train_test_kernels(NET, np.ones(3), DS.x_test)
    with pytest.raises(ValueError, match="net: expected"):
        predict.train_test_kernels("erf", DS.x_train, DS.x_test)
    with pytest.raises(ValueError, match="net: expected"):
        predict.last_layer_net(None)


def test_results_are_frozen_pytrees(kern):
    import dataclasses

    import jax

    gd = predict.gradient_descent(kern, DS.y_train, learning_rate=0.01, steps=[0, 5])
    with pytest.raises(dataclasses.FrozenInstanceError):
        gd.mean = None
    leaves = jax.tree_util.tree_leaves(gd)
    assert len(leaves) == 7 and all(np.asarray(v).dtype == np.float64 for v in leaves)
    assert jax.tree_util.tree_leaves(kern)[0].dtype == np.float64
