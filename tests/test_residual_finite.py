"""First order in 1/n for residual MLPs (docs/finite_width.md, "Residual layers"): exact checks.

The deep linear residual network (sigma(z) = z) has an exact first-order expansion that owes nothing
to the Gaussian expectations of finite.residual_step.  With u = b + W z^(l) and G = (1/n) z.z^T the
layer's collective metric, given layer l the neurons of z^(l+1) = xi z^(l) + gamma u are independent,
u_i ~ N(0, Sigma), Sigma = C_b + C_W G, so

    E[G' | l]       = (xi^2 + gamma^2 C_W) G + gamma^2 C_b                       (linear: G1 = 0, exactly)
    n cov[G'_12, G'_34 | l] = xi^2 gamma^2 (G_13 S_24 + G_14 S_23 + G_23 S_14 + G_24 S_13)
                              + gamma^4 (S_13 S_24 + S_14 S_23)

and C4 = n cov[G_12, G_34] obeys C4' = c^2 C4 + the above at G = K, c = xi^2 + gamma^2 C_W; the four-point
vertex is V = C4 - K_13 K_24 - K_14 K_23 in hidden layers and V = C_W^2 C4 after the plain output layer.
The NTK's mean is linear in the weights' second moments too: H1 = 0.
"""

import numpy as np
import pytest
from _tensor_checks import assert_pair_symmetries

import efftheory as et


def _linear_reference(x, depth, C_W, C_b, xi, gamma):
    """K, V (per layer, index 0 = layer 1) of the deep linear residual MLP, from the recursion above."""
    K = C_b + C_W * x @ x.T / x.shape[1]
    pair = lambda A, B: np.einsum("ac,bd->abcd", A, B) + np.einsum("ad,bc->abcd", A, B)
    C4 = pair(K, K)
    Ks, Vs = [K], [np.zeros_like(C4)]
    for l in range(1, depth - 1):  # hidden residual layers 2 .. depth-1
        S = C_b + C_W * K
        cross = (np.einsum("ac,bd->abcd", K, S) + np.einsum("ad,bc->abcd", K, S)
                 + np.einsum("bc,ad->abcd", K, S) + np.einsum("bd,ac->abcd", K, S))
        c = xi[l] ** 2 + gamma[l] ** 2 * C_W
        C4 = c**2 * C4 + xi[l] ** 2 * gamma[l] ** 2 * cross + gamma[l] ** 4 * pair(S, S)
        K = c * K + gamma[l] ** 2 * C_b
        Ks.append(K)
        Vs.append(C4 - pair(K, K))
    Ks.append(C_b + C_W * K)  # the plain output layer
    Vs.append(C_W**2 * C4)
    return np.array(Ks), np.array(Vs)


@pytest.mark.parametrize("C_b, skip, branch", [
    (0.0, 0.8, 0.6),            # xi^2 + gamma^2 = 1
    (0.2, 0.95, np.sqrt(0.1)),
    (0.1, [0.0, 0.9, 0.5, 0.7, 0.3, 0.0], [1.0, 0.4, 0.8, 1.1, 0.6, 1.0]),  # per layer
])
def test_deep_linear_residual_is_exact(C_b, skip, branch):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5))
    depth, C_W = 6, 1.1
    net = et.MLP(depth, 12, "linear", C_W=C_W, C_b=C_b, skip=skip, branch=branch, output_width=3)
    th = et.finite_width(net, x)
    K, V = _linear_reference(x, depth, C_W, C_b, net.skips, net.branches)
    np.testing.assert_allclose(th.K, K, rtol=1e-12)
    scale = np.abs(V).max(axis=(1, 2, 3, 4), keepdims=True) + 1e-300
    assert np.max(np.abs(np.asarray(th.V) - V) / scale) < 1e-10
    np.testing.assert_allclose(th.G1, 0.0, atol=1e-12 * np.abs(K).max())
    np.testing.assert_allclose(th.H1, 0.0, atol=1e-10 * np.abs(np.asarray(th.Theta)).max())


def test_residual_tensors_have_the_symmetries():
    x = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.8], [0.93, 0.42, -0.43]])
    for act, C_W in (("tanh", 1.0), ("relu", 2.0)):
        assert_pair_symmetries(et.finite_width(et.MLP(4, 10, act, C_W=C_W, C_b=0.05, skip=0.8, branch=0.6), x))


def test_residual_identical_inputs_are_finite_and_consistent():
    x = np.array([[0.5, -1.0, 0.7], [0.5, -1.0, 0.7], [1.0, -2.0, 1.4]])
    for act in ("relu", "tanh"):
        r = et.finite_width(et.MLP(5, 10, act, skip=0.9, branch=np.sqrt(0.19)), x)
        for name in ("G1", "V", "H1", "A", "B", "D", "F"):
            assert np.all(np.isfinite(np.asarray(getattr(r, name)))), (act, name)
        np.testing.assert_allclose(r.V[:, 0, 0, 0, 0], r.V[:, 1, 1, 1, 1], rtol=1e-9)
        np.testing.assert_allclose(r.B[:, 0, 1, 0, 1], r.B[:, 0, 0, 0, 0], rtol=1e-8)
