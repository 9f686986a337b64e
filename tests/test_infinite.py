"""Infinite-width kernels: exact linear results, closed-form vs generic paths, degenerate and bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory.activations import Activation


def test_deep_linear_is_exact(rng):
    x = rng.normal(size=(4, 6)) * 2.0
    C_W, L = 1.7, 6
    r = et.infinite_width(et.MLP(L, 8, "linear", C_W=C_W, C_b=0.0), x)
    K1 = C_W * x @ x.T / 6
    for l in range(1, L + 1):
        np.testing.assert_allclose(r.K[l - 1], C_W ** (l - 1) * K1, rtol=1e-12)
        # NTK of a deep linear net with lambda = C: Theta^(l) = l C_W^(l-1) K1 / C_W ... = l * K^(l)
        np.testing.assert_allclose(r.Theta[l - 1], l * C_W ** (l - 1) * K1, rtol=1e-12)


def test_relu_first_layers_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    r = et.infinite_width(et.MLP(2, 4, "relu", C_W=2.0, C_b=0.0), x)
    K1 = 2.0 * x @ x.T / 2
    # orthogonal inputs: <relu relu> = sqrt(k11 k22)/(2 pi), <relu^2> = K/2
    assert float(r.K[1, 0, 1]) == pytest.approx(2.0 * np.sqrt(K1[0, 0] * K1[1, 1]) / (2 * np.pi), rel=1e-13)
    assert float(r.K[1, 1, 1]) == pytest.approx(K1[1, 1], rel=1e-13)
    # Theta^(2) = <relu relu> C_W + C_W <step step> Theta^(1); <step step> = 1/4 at rho = 0
    want = 2.0 * np.sqrt(K1[0, 0] * K1[1, 1]) / (2 * np.pi) + 2.0 * 0.25 * K1[0, 1]
    assert float(r.Theta[1, 0, 1]) == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("name", ["relu", "erf", "abs", "sin", "leaky_relu(0.1)"])
def test_closed_form_and_generic_paths_agree(name, rng):
    act = et.get_activation(name)
    x = rng.normal(size=(4, 3))
    kw = dict(C_W=1.3, C_b=0.2)
    closed = et.infinite_width(et.MLP(3, 5, act, **kw), x)
    generic = et.infinite_width(et.MLP(3, 5, Activation("generic", act.fn, smooth=act.smooth), **kw), x)
    tol = 1e-10 if act.smooth else 3e-3
    np.testing.assert_allclose(closed.K, generic.K, rtol=tol, atol=tol)
    np.testing.assert_allclose(closed.Theta, generic.Theta, rtol=tol, atol=tol)


def test_callable_activation_equals_registry():
    x = np.random.default_rng(0).normal(size=(3, 2))
    a = et.infinite_width(et.MLP(3, 5, "tanh", C_W=1.2, C_b=0.1), x)
    b = et.infinite_width(et.MLP(3, 5, lambda z: jnp.tanh(z), C_W=1.2, C_b=0.1), x)
    np.testing.assert_allclose(a.K, b.K, rtol=1e-13)
    np.testing.assert_allclose(a.Theta, b.Theta, rtol=1e-13)


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "erf", "linear"])
def test_degenerate_inputs_are_finite(name):
    v = np.array([0.3, -1.2, 2.0])
    x = np.stack([v, v, 2.5 * v, -v, np.zeros(3)])  # identical, collinear, antiparallel, zero
    r = et.infinite_width(et.MLP(4, 5, name, C_W=1.5, C_b=0.0), x)
    assert np.all(np.isfinite(r.K)) and np.all(np.isfinite(r.Theta))
    np.testing.assert_allclose(r.K[:, 0, 1], r.K[:, 0, 0], rtol=1e-12)
    for l in range(4):
        assert np.all(np.linalg.eigvalsh(np.asarray(r.K[l])) > -1e-10)
        assert np.all(np.linalg.eigvalsh(np.asarray(r.Theta[l])) > -1e-10)


def test_per_layer_hyperparameters():
    x = np.eye(2)
    r = et.infinite_width(et.MLP(3, 4, "linear", C_W=[1.0, 2.0, 3.0], C_b=[0.0, 0.5, 0.0]), x)
    K1 = np.eye(2) / 2
    np.testing.assert_allclose(r.K[1], 0.5 + 2.0 * K1)
    np.testing.assert_allclose(r.K[2], 3.0 * (0.5 + 2.0 * K1))


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(depth=0), "depth"),
        (dict(depth=2, C_W=0.0), "C_W"),
        (dict(depth=2, C_W=-1.0), "C_W"),
        (dict(depth=2, C_b=-0.1), "C_b"),
        (dict(depth=2, activation="nope"), "activation"),
        (dict(depth=2, width=0), "width"),
        (dict(depth=3, width=[4]), "width"),
        (dict(depth=2, C_W=float("nan")), "C_W"),
        (dict(depth=2, C_W=[1.0, 2.0, 3.0]), "C_W"),
        (dict(depth=2, activation=3), "activation"),
    ],
)
def test_bad_network_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        et.MLP(**kwargs)


@pytest.mark.parametrize("x", [np.ones(3), np.ones((2, 2, 2)), np.array([[np.nan, 1.0]]), np.zeros((0, 3)),
                               [["a", "b"]]])
def test_bad_inputs(x):
    with pytest.raises(ValueError, match="x"):
        et.infinite_width(et.MLP(2, 4, "relu"), x)


def test_bad_net():
    with pytest.raises(ValueError, match="net"):
        et.infinite_width("relu", np.ones((2, 2)))


def test_result_is_a_pytree():
    import jax

    r = et.infinite_width(et.MLP(2, 4, "relu"), np.eye(3))
    leaves = jax.tree_util.tree_leaves(r)
    assert len(leaves) == 2 and leaves[0].shape == (2, 3, 3)
    r2 = jax.tree_util.tree_map(lambda a: 2 * a, r)
    np.testing.assert_allclose(r2.K, 2 * r.K)
