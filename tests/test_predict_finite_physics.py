"""efftheory.predict_finite against sampled networks (slow: ``-m physics``; run with ``-s`` for the tables).

* Last-layer training: kernel regression with sampled random features (numpy, exact per sample) at
  n = 8..64 against the frozen-NTK parts m_H1 + m_AB (the dNTK vanishes identically there).
* Full training: depth-3 tanh and gelu networks trained to convergence at n = 16..128
  (benchmarks/trained_first_order.py has the estimators and a bigger sweep on two test inputs): the 1/n coefficients of the
  frozen part, the NTK-motion part and the total mean against m_H1 + m_AB, m_dNTK + m_ddNTK and their sum.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import efftheory as et
from efftheory import predict
from efftheory.predict_finite import trained_mean_first_order

pytestmark = pytest.mark.physics

XD = np.array([[1.0, 0.3], [-0.4, 0.9], [0.5, -0.7]])
XT = np.array([[0.8, 0.6], [-0.9, -0.2]])
YD = np.array([0.7, -0.4, 0.2])


def test_last_layer_training_frozen_part_against_sampled_features():
    """Depth 2, only the last layer trains: the trained network is kernel regression with its own random
    feature kernel H^ = lambda_b + (lambda_W/n) sigma(z1).sigma(z1), z1 ~ N(0, K^(1)) exactly (dNTK = 0).
    Its mean, sampled at n = 8..64 (numpy, exact per sample), gives c1 = m_H1 + m_AB."""
    net = predict.last_layer_net(et.MLP(2, 8, activation="tanh", C_W=1.5, C_b=0.2))
    eta = 0.5 * predict.stability_bound(predict.train_test_kernels(net, XD, XT))
    pred = trained_mean_first_order(net, XD, YD, XT, learning_rate=eta, motion=False, tol=1e-7)
    assert not pred.complete and pred.dntk is None
    x = np.concatenate([XD, XT])
    K1 = net.C_bs[0] + net.C_Ws[0] * x @ x.T / x.shape[1]
    Lc = np.linalg.cholesky(K1 + 1e-12 * np.eye(5))
    rng = np.random.default_rng(5)
    widths, M = np.array([8, 16, 32, 64]), 40000
    means, ses = [], []
    for n in widths:
        z1 = np.einsum("ab,mjb->mja", Lc, rng.normal(size=(M, n, 5)))
        s = np.tanh(z1)
        H = net.lambda_bs[1] + net.lambda_Ws[1] * np.einsum("mja,mjb->mab", s, s) / n
        f = np.einsum("mxd,md->mx", H[:, 3:, :3], np.linalg.solve(H[:, :3, :3], np.broadcast_to(YD, (M, 3))[..., None])[..., 0])
        means.append(f.mean(0))
        ses.append(f.std(0) / math.sqrt(M))
    means, ses = np.array(means), np.array(ses)
    X = np.stack([np.ones(4), 1.0 / widths, 1.0 / widths ** 2], 1)
    for x_i in range(2):
        w = 1 / ses[:, x_i] ** 2
        cov = np.linalg.inv(X.T @ (X * w[:, None]))
        a, c1, _ = cov @ (X.T @ (w * means[:, x_i]))
        assert abs(a - pred.mean_infinite[x_i, 0]) < 3 * math.sqrt(cov[0, 0])
        assert abs(c1 - pred.total[x_i, 0]) < 3 * math.sqrt(cov[1, 1]), (c1, math.sqrt(cov[1, 1]), pred.total)
    # the prediction is resolved by this test: |c1| well above its error for at least one test input
    assert np.max(np.abs(pred.total)) > 0.02
    np.testing.assert_allclose(pred.at_width(32), pred.mean_infinite + pred.total / 32)


# ------------------------------------------------------------------------------------ full training
X_TRAIN = np.array([[1.0, 0.2, -0.5], [-0.3, 1.1, 0.4], [0.6, -0.8, 0.9]])
Y_TRAIN = np.array([0.8, -0.5, 0.3])
X_TEST = np.array([[-0.9, 0.1, 0.6]])             # one test input: the theory costs one 4-input dNTK set
NETS = {"tanh": dict(activation="tanh", C_W=1.5, C_b=0.1), "gelu": dict(activation="gelu", C_W=2.0, C_b=0.1)}
FRACTION = {"tanh": 0.5, "gelu": 0.3}          # eta / (infinite-width stability bound)
WIDTHS = np.array([16, 32, 64, 128])
NETWORKS = (2000, 1000, 500, 250)
STEPS = 300
PARTS = ("frozen", "motion", "total")


def _estimators(tr, Pi):
    """Per network: frozen = H_xD H_DD^-1 y - Pi y, motion = z_T(x) - [z_0(x) + H_xD H_DD^-1 (y - z_0(D))], total.
    Unbiased for (m_H1 + m_AB)/n, (m_dNTK + m_ddNTK)/n and E[z_T] - Pi y (the dropped z_0 terms are odd
    under the sign flip of the last layer)."""
    d = tr.n_train
    H = tr.ntk_start[:, 0, 0]
    G = np.einsum("mxd,mde->mxe", H[:, d:, :d], np.linalg.inv(H[:, :d, :d]))
    y = tr.y_train[:, 0]
    frozen = G @ y - Pi @ y
    motion = tr.f_test[:, -1, :, 0] - (tr.f_test[:, 0, :, 0] + np.einsum("mxd,md->mx", G, y[None] - tr.f_train[:, 0, :, 0]))
    return np.stack([frozen, motion, frozen + motion], axis=1)


def _fit(values, stderrs, free_a=True):
    X = np.stack([np.ones(len(WIDTHS)), 1.0 / WIDTHS, 1.0 / WIDTHS ** 2], 1)[:, (0 if free_a else 1):]
    w = 1 / stderrs ** 2
    cov = np.linalg.inv(X.T @ (X * w[:, None]))
    beta = cov @ (X.T @ (w * values))
    return beta, np.sqrt(np.diag(cov))


@pytest.fixture(scope="module", params=sorted(NETS))
def sweep(request):
    import jax

    from efftheory.empirical import train

    act = request.param
    net = et.MLP(3, int(WIDTHS[0]), **NETS[act])
    kern = predict.train_test_kernels(net, X_TRAIN, X_TEST)
    eta = FRACTION[act] * predict.stability_bound(kern)
    pred = trained_mean_first_order(net, X_TRAIN, Y_TRAIN, X_TEST, learning_rate=eta, motion=True, tol=1e-5)
    theory = np.stack([pred.frozen[:, 0], pred.motion[:, 0], pred.total[:, 0]])
    Pi = kern.Theta_cross @ np.linalg.inv(kern.Theta_train)
    means, ses = [], []
    for n, M in zip(WIDTHS, NETWORKS):
        tr = train(net.with_width(int(n)), X_TRAIN, Y_TRAIN, X_TEST, steps=STEPS, learning_rate=eta, n_networks=M,
                   key=jax.random.fold_in(jax.random.PRNGKey(7), int(n)), progress=False)
        assert np.max(tr.final_loss) < 1e-4 and np.median(tr.final_loss) < 1e-20
        e = _estimators(tr, Pi)
        means.append(e.mean(0))
        ses.append(e.std(0, ddof=1) / math.sqrt(M))
    means, ses = np.array(means), np.array(ses)
    print(f"\n{act}: theory c1 (frozen, motion, total) x test input\n{np.round(theory, 4)}")
    for e, part in enumerate(PARTS):
        for x in range(len(X_TEST)):
            (a, c1, _), (sa, sc1, _) = _fit(means[:, e, x], ses[:, e, x])
            (c1z, _), (sc1z, _) = _fit(means[:, e, x], ses[:, e, x], free_a=False)
            print(f"  {part:6s} x{x}: n*m(n) {np.round(WIDTHS * means[:, e, x], 3)} +- {np.round(WIDTHS * ses[:, e, x], 3)}"
                  f" | c1 {c1:+.4f} +- {sc1:.4f} (a = 0 imposed: {c1z:+.4f} +- {sc1z:.4f}) theory {theory[e, x]:+.4f}"
                  f" | a/se {a / sa:+.2f}")
    return act, pred, theory, means, ses


def test_trained_mean_c1_matches_the_first_order_prediction(sweep):
    """THEORY.md's protocol per part and test input: a = 0 and c1 = prediction within 3 standard errors."""
    act, _, theory, means, ses = sweep
    for e, part in enumerate(PARTS):
        for x in range(len(X_TEST)):
            (a, c1, _), (sa, sc1, _) = _fit(means[:, e, x], ses[:, e, x])
            assert abs(a) < 3 * sa, f"{act} {part} x{x}: a = {a} +- {sa}"
            assert abs(c1 - theory[e, x]) < 3 * sc1, f"{act} {part} x{x}: c1 = {c1} +- {sc1}, theory {theory[e, x]}"


def test_trained_mean_prediction_is_resolved(sweep):
    """Power: with the known n = inf value (a = 0) imposed, every part matches the prediction within 3
    standard errors, and for tanh (at eta = 0.5 of the bound) the NTK-motion coefficient is resolved (> 3
    standard errors from zero).  gelu's motion part at eta = 0.3 of the bound (-0.03) is below this
    ensemble's resolution (the benchmark's bigger sweep: -0.037 +- 0.038 measured)."""
    act, _, theory, means, ses = sweep
    resolved = 0
    for e, part in enumerate(PARTS):
        for x in range(len(X_TEST)):
            (c1, _), (sc1, _) = _fit(means[:, e, x], ses[:, e, x], free_a=False)
            assert abs(c1 - theory[e, x]) < 3 * sc1, f"{act} {part} x{x}: c1 = {c1} +- {sc1}, theory {theory[e, x]}"
            resolved += part == "motion" and abs(c1) > 3 * sc1
    assert resolved >= 1 or act != "tanh"
