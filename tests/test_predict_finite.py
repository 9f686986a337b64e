"""efftheory.predict_finite: the first-order mean of trained networks, checked without the code under test.

* The NTK-motion parts against gradient descent run step by step on a polynomial model (cubic in its
  parameters, any learning rate below the bound): first order in the model's curvature by a central
  difference, for one network (the formula's moments replaced by that network's own tensors).
* The ddH^II terms against the discrete recursions of z, H and dH iterated directly.
* The frozen-NTK parts against kernel regression with a shifted kernel (H1) and against second directional
  derivatives for a Gaussian random kernel (A, B).
(Sampled networks: tests/test_predict_finite_physics.py.)
"""


import numpy as np
import pytest

import efftheory as et
from efftheory import predict
from efftheory.predict_finite import frozen_ntk_parts, ntk_covariance_tensor, ntk_motion_parts, trained_mean_first_order


def _polynomial_model(k=2, N=5, d=3, P0=4, seed=0):
    rng = np.random.default_rng(seed)
    J0 = rng.normal(size=(N, P0))
    Pn = k * P0
    J = np.zeros((k * N, Pn))
    for i in range(k):
        J[i * N:(i + 1) * N, i * P0:(i + 1) * P0] = J0          # frozen NTK delta_ij Theta
    H2 = rng.normal(size=(k * N, Pn, Pn))
    H2 = (H2 + H2.transpose(0, 2, 1)) / 2
    H3 = rng.normal(size=(k * N, Pn, Pn, Pn))
    perms = [(0, 1, 2, 3), (0, 1, 3, 2), (0, 2, 1, 3), (0, 2, 3, 1), (0, 3, 1, 2), (0, 3, 2, 1)]
    H3 = sum(H3.transpose(p) for p in perms) / 6
    lam = np.tile(np.exp(0.3 * rng.normal(size=P0)), k)            # diagonal learning-rate tensor
    z0 = rng.normal(size=k * N)
    y = rng.normal(size=(d, k))
    return J, H2, H3, lam, z0, y, J0 @ np.diag(lam[:P0]) @ J0.T


@pytest.mark.parametrize("fraction", [0.3, 0.8])
def test_motion_parts_match_gradient_descent_on_a_cubic_model(fraction):
    k, N, d = 2, 5, 3
    J, H2, H3, lam, z0, y, Theta = _polynomial_model(k, N, d)
    eta = fraction * predict.stability_bound(predict.TrainTestKernels(K=Theta, Theta=Theta, n_train=d))
    D = np.concatenate([np.arange(i * N, i * N + d) for i in range(k)])
    yD = y.T.reshape(-1)

    def outputs(th, s):
        return z0 + J @ th + 0.5 * s * np.einsum("Imn,m,n->I", H2, th, th) + s / 6 * np.einsum(
            "Imnr,m,n,r->I", H3, th, th, th)

    def trained(s, steps=2500):
        th = np.zeros(J.shape[1])
        for _ in range(steps):
            grad = J + s * np.einsum("Imn,n->Im", H2, th) + 0.5 * s * np.einsum("Imnr,n,r->Im", H3, th, th)
            th = th - eta * lam * (grad[D].T @ (outputs(th, s)[D] - yD))
        z = outputs(th, s)
        assert np.max(np.abs(z[D] - yD)) < 1e-9                       # converged
        return z.reshape(k, N)[:, d:].T

    s = 1e-4
    first_order = (trained(s) - trained(-s)) / (2 * s)
    L = J * lam                                                       # lambda_mu d z / d theta_mu
    dH = np.einsum("Imn,Jm,Ln->IJL", H2, L, L)
    ddI = np.einsum("Imnr,Jm,Ln,Mr->IJLM", H3, L, L, L)
    eps = z0[D] - yD
    m2 = np.einsum("IJL,A,B->IJLAB", dH, eps, eps)
    e3 = np.einsum("A,B,C->ABC", eps, eps, eps)
    a, b = ntk_motion_parts(Theta, d, k, eta, m2, ddI, np.zeros_like(ddI), e3)
    assert np.max(np.abs(a)) > 1 and np.max(np.abs(b)) > 1            # both parts matter here
    np.testing.assert_allclose(a + b, first_order, rtol=1e-5, atol=1e-5 * np.max(np.abs(first_order)))


def test_ddntk_terms_match_the_discrete_recursions():
    """z, H, dH iterated with independent random dH, ddH^I, ddH^II (the update rules of the derivation)."""
    rng = np.random.default_rng(3)
    k, N, d = 1, 5, 3
    X = rng.normal(size=(N, 6))
    Theta = X @ X.T / 6
    eta = 0.7 * 2 / np.linalg.eigvalsh(Theta[:d, :d])[-1]
    dH0, ddI, ddII = (0.3 * rng.normal(size=(N,) * r) for r in (3, 4, 4))
    z0, y = rng.normal(size=N), rng.normal(size=(d, 1))

    def run(s, steps=1500):
        z, H, dH = z0.copy(), Theta.copy(), s * dH0
        W = s * (ddI + ddII + ddII.transpose(0, 2, 1, 3))
        Qd = s * (ddI + ddI.transpose(1, 0, 2, 3) + 2 * ddII)
        for _ in range(steps):
            e = z[:d] - y[:, 0]
            dz = (-eta * H[:, :d] @ e + 0.5 * eta ** 2 * np.einsum("IJL,J,L->I", dH[:, :d, :d], e, e)
                  - eta ** 3 / 6 * s * np.einsum("IJLM,J,L,M->I", ddI[:, :d, :d, :d], e, e, e))
            dHH = (-eta * np.einsum("IJL,L->IJ", dH[:, :, :d] + dH.transpose(1, 0, 2)[:, :, :d], e)
                   + 0.5 * eta ** 2 * np.einsum("IJLM,L,M->IJ", Qd[:, :, :d, :d], e, e))
            ddH = -eta * np.einsum("IJLM,M->IJL", W[..., :d], e)
            z, H, dH = z + dz, H + dHH, dH + ddH
        return z[d:]

    s = 1e-7
    first = (run(s) - run(-s)) / (2 * s)
    eps = z0[:d] - y[:, 0]
    a, b = ntk_motion_parts(Theta, d, k, eta, np.einsum("IJL,A,B->IJLAB", dH0, eps, eps), ddI, ddII,
                            np.einsum("A,B,C->ABC", eps, eps, eps))
    np.testing.assert_allclose((a + b)[:, 0], first, rtol=1e-5, atol=1e-6 * np.max(np.abs(first)))


def _random_kernel(N, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, N + 2))
    return X @ X.T / (N + 2), rng


def _kernel_regression(H, y, d):
    return H[d:, :d] @ np.linalg.solve(H[:d, :d], y)


def test_ntk_mean_shift_part_is_the_derivative_of_kernel_regression():
    N, d = 6, 4
    Theta, rng = _random_kernel(N, 1)
    H1 = rng.normal(size=(N, N))
    H1 = H1 + H1.T
    y = rng.normal(size=(d, 1))
    m_h1, m_ab = frozen_ntk_parts(Theta, H1, np.zeros((N,) * 4), y, d)
    h = 1e-5
    fd = (_kernel_regression(Theta + h * H1, y, d) - _kernel_regression(Theta - h * H1, y, d)) / (2 * h)
    np.testing.assert_allclose(m_h1, fd, rtol=1e-7, atol=1e-9)
    assert np.all(m_ab == 0)


@pytest.mark.parametrize("k", [1, 2])
def test_ntk_fluctuation_part_is_half_the_mean_second_derivative(k):
    """dH = sum_m xi_m M_m / sqrt(n m), xi ~ N(0, 1): E f(Theta + dH) - f(Theta) = (1/2n) mean_m D^2 f[M_m, M_m]."""
    N, d = 5, 3
    Theta, rng = _random_kernel(N, 2)
    y = rng.normal(size=(d, k))
    Tf = np.kron(np.eye(k), Theta)
    Ms = []
    for _ in range(7):
        M = rng.normal(size=(k * N, k * N))
        Ms.append(M + M.T)
    cov = sum(np.einsum("ab,cd->abcd", M, M) for M in Ms) / len(Ms)

    def f(H):                                   # kernel regression of every output on combined indices
        Hr = H.reshape(k, N, k, N)
        D = [(i, a) for i in range(k) for a in range(d)]
        X = [(i, a) for i in range(k) for a in range(d, N)]
        HDD = np.array([[Hr[i, a, j, b] for (j, b) in D] for (i, a) in D])
        HxD = np.array([[Hr[i, a, j, b] for (j, b) in D] for (i, a) in X])
        return (HxD @ np.linalg.solve(HDD, y.T.reshape(-1))).reshape(k, N - d).T

    h = 1e-4
    second = sum(f(Tf + h * M) + f(Tf - h * M) - 2 * f(Tf) for M in Ms) / (h ** 2 * len(Ms))
    _, m_ab = frozen_ntk_parts(Theta, np.zeros((N, N)), cov, y, d)
    np.testing.assert_allclose(m_ab, 0.5 * second, rtol=1e-5, atol=1e-7)


def test_ntk_covariance_tensor_layout():
    """n Cov(H_ii;12, H_ii;34) = A + B_(13)(24) + B_(14)(23) (finite.py's ntk_cov); i != j: only B_(13)(24)."""
    rng = np.random.default_rng(4)
    A, B = rng.normal(size=(3,) * 4), rng.normal(size=(3,) * 4)
    C = ntk_covariance_tensor(A, B, 2).reshape((2, 3) * 4)
    np.testing.assert_allclose(C[0, :, 0, :, 0, :, 0, :], A + B.transpose(0, 2, 1, 3) + B.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(C[0, :, 1, :, 0, :, 1, :], B.transpose(0, 2, 1, 3))       # H_01 H_01
    np.testing.assert_allclose(C[0, :, 0, :, 1, :, 1, :], A)                              # H_00 H_11


XD = np.array([[1.0, 0.3], [-0.4, 0.9], [0.5, -0.7]])
XT = np.array([[0.8, 0.6], [-0.9, -0.2]])
YD = np.array([0.7, -0.4, 0.2])


def test_depth_one_is_exact():
    net = et.MLP(1, activation="tanh", C_W=1.0, C_b=0.1)
    pred = trained_mean_first_order(net, XD, YD, XT, learning_rate=0.1)
    assert pred.complete and np.all(pred.total == 0)
    kern = predict.train_test_kernels(net, XD, XT)
    np.testing.assert_allclose(pred.at_width(), predict.gradient_descent(kern, YD, learning_rate=0.1).mean[0])


def test_argument_errors():
    net = et.MLP(2, 8, activation="tanh")
    with pytest.raises(ValueError, match="net"):
        trained_mean_first_order("mlp", XD, YD, XT, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        trained_mean_first_order(net, XD, YD, XT, learning_rate=100.0)
    with pytest.raises(ValueError, match="learning_rate"):
        trained_mean_first_order(net, XD, YD, XT, learning_rate=-0.1)
    with pytest.raises(ValueError, match="y_train"):
        trained_mean_first_order(net, XD, YD[:2], XT, learning_rate=0.1)
    with pytest.raises(ValueError, match="y_train"):
        trained_mean_first_order(net, XD, [0.1, np.nan, 0.2], XT, learning_rate=0.1)
    with pytest.raises(ValueError, match="x_test"):
        trained_mean_first_order(net, XD, YD, np.ones((2, 3)), learning_rate=0.1)
    with pytest.raises(ValueError, match="motion"):
        trained_mean_first_order(net, XD, YD, XT, learning_rate=0.1, motion="yes")
    with pytest.raises(ValueError, match="x_train"):            # duplicated training inputs: singular Theta_DD
        trained_mean_first_order(net, np.concatenate([XD[:2], XD[:1]]), YD, XT, learning_rate=0.1, motion=False)
    with pytest.raises(ValueError, match="n"):
        trained_mean_first_order(et.MLP(1), XD, YD, XT, learning_rate=0.1).at_width(-3)
