"""efftheory.empirical.trained_parts: the per-network estimators of the trained mean's first-order parts."""

import jax
import numpy as np
import pytest

import efftheory as et
from efftheory import predict
from efftheory.empirical import frozen_ntk_estimator, train, trained_mean_estimators

X_TRAIN = np.array([[1.0, 0.2, -0.5], [-0.3, 1.1, 0.4], [0.6, -0.8, 0.9]])
Y_TRAIN = np.array([[0.8, -0.1], [-0.5, 0.4], [0.3, 0.2]])
X_TEST = np.array([[0.7, 0.7, 0.0], [-0.9, 0.1, 0.6]])


@pytest.fixture(scope="module")
def linear_model():
    """Depth 1: z = W x + b is linear in its parameters, so the NTK is the same for every network (= Theta)
    and never moves; gradient descent to convergence is then exactly the frozen-NTK solution."""
    net = et.MLP(1, 8, "tanh", C_W=1.3, C_b=0.2, output_width=2)
    kern = predict.train_test_kernels(net, X_TRAIN, X_TEST)
    Pi = kern.Theta_cross @ np.linalg.inv(kern.Theta_train)
    eta = 0.5 * predict.stability_bound(kern)
    tr = train(net, X_TRAIN, Y_TRAIN, X_TEST, steps=400, learning_rate=eta, n_networks=16,
               key=jax.random.PRNGKey(0), progress=False)
    return tr, Pi


def test_frozen_ntk_parts_vanish_for_a_linear_model(linear_model):
    tr, Pi = linear_model
    assert np.max(tr.final_loss) < 1e-20
    for i in range(2):
        e = trained_mean_estimators(tr, Pi, component=i)
        assert e.shape == (16, 3, 2)
        np.testing.assert_allclose(e, 0.0, atol=1e-9)
        # what the estimators leave out: each network ends at z_0(x) + Pi (y - z_0(D)) (mean Pi y, not each)
        z0D, z0x = tr.f_train[:, 0, :, i], tr.f_test[:, 0, :, i]
        np.testing.assert_allclose(tr.f_test[:, -1, :, i], z0x + (Y_TRAIN[:, i] - z0D) @ Pi.T, atol=1e-9)
        assert np.max(np.abs(z0x - z0D @ Pi.T)) > 1e-2


def test_frozen_estimator_by_hand():
    """frozen = H_xD H_DD^-1 y - Pi y for random positive-definite H, against numpy's solve."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(5, 5, 7))
    H = np.einsum("mik,mjk->mij", A, A)
    y, Pi = rng.normal(size=3), rng.normal(size=(2, 3))
    want = np.stack([h[3:, :3] @ np.linalg.solve(h[:3, :3], y) for h in H]) - Pi @ y
    np.testing.assert_allclose(frozen_ntk_estimator(H, Pi, y), want, rtol=1e-10, atol=1e-12)


def test_bad_arguments_name_themselves(linear_model):
    tr, Pi = linear_model
    with pytest.raises(ValueError, match="Pi"):
        trained_mean_estimators(tr, Pi.T)
    with pytest.raises(ValueError, match="Pi"):
        trained_mean_estimators(tr, np.full_like(Pi, np.nan))
    with pytest.raises(ValueError, match="component"):
        trained_mean_estimators(tr, Pi, component=2)
    H = np.broadcast_to(np.eye(5), (4, 5, 5))
    with pytest.raises(ValueError, match="H"):
        frozen_ntk_estimator(H[0], Pi, Y_TRAIN[:, 0])
    with pytest.raises(ValueError, match="y"):
        frozen_ntk_estimator(H, Pi, Y_TRAIN)
