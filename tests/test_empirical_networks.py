"""efftheory.empirical.networks and .ntk: one finite MLP, its forward pass and its exact NTK."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory
from efftheory import empirical as E

X = np.random.default_rng(0).normal(size=(5, 6))


def test_init_params_shapes_dtypes_and_variances():
    net = efftheory.MLP(3, [400, 300], "tanh", C_W=[1.5, 2.0, 0.5], C_b=[0.0, 0.3, 1.0], output_width=200)
    for dtype in (jnp.float32, jnp.float64):
        p = E.init_params(net, jax.random.PRNGKey(0), 500, dtype)
        assert [l["W"].shape for l in p] == [(400, 500), (300, 400), (200, 300)]
        assert [l["b"].shape for l in p] == [(400,), (300,), (200,)]
        assert all(l["W"].dtype == dtype and l["b"].dtype == dtype for l in p)
    p = E.init_params(net, jax.random.PRNGKey(1), 500)
    for l, (n_in, C_W) in enumerate(zip((500, 400, 300), net.C_Ws)):
        var = float(jnp.var(p[l]["W"])) * n_in
        assert var == pytest.approx(C_W, rel=0.02)
    assert np.all(np.asarray(p[0]["b"]) == 0.0)  # C_b = 0 gives exactly zero biases
    assert float(jnp.var(p[2]["b"])) == pytest.approx(1.0, rel=0.25)


def test_init_params_is_a_function_of_the_key():
    net = efftheory.MLP(2, 4, "relu")
    a = E.init_params(net, jax.random.PRNGKey(3), 2)
    b = E.init_params(net, jax.random.key(3), 2)  # typed keys give the same numbers
    c = E.init_params(net, jax.random.PRNGKey(4), 2)
    for la, lb, lc in zip(a, b, c):
        np.testing.assert_array_equal(la["W"], lb["W"])
        assert not np.allclose(la["W"], lc["W"])


def test_apply_matches_a_numpy_forward_pass():
    net = efftheory.MLP(3, [7, 5], "tanh", C_W=1.3, C_b=0.2, output_width=2)
    p = E.init_params(net, jax.random.PRNGKey(2), 6)
    a, zs = X, []
    for layer in p:
        z = a @ np.asarray(layer["W"]).T + np.asarray(layer["b"])
        zs.append(z)
        a = np.tanh(z)
    got = E.apply_all(net, p, X)
    assert len(got) == 3 and [g.shape for g in got] == [(5, 7), (5, 5), (5, 2)]
    for g, z in zip(got, zs):
        np.testing.assert_allclose(g, z, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(E.apply(net, p, X), got[-1])
    # jit-able: tracers pass the rank check
    np.testing.assert_allclose(jax.jit(lambda p, x: E.apply(net, p, x))(p, X), got[-1], rtol=1e-13)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_layer_ntk_equals_autodiff_ntk(activation):
    net = efftheory.MLP(4, [9, 6, 8], activation, C_W=1.7, C_b=0.3, lambda_W=[0.5, 1.0, 2.0, 0.7],
                        lambda_b=[0.1, 0.0, 0.4, 1.3], output_width=3)
    p = E.init_params(net, jax.random.PRNGKey(7), 6)
    lr = E.learning_rates(net, 6)

    def apply_fn(q, x):
        return E.apply(net, q, x)

    full = E.ntk_full(net, p, X)
    auto = E.ntk_autodiff(apply_fn, p, X, learning_rates=lr, output=None)
    assert full.shape == auto.shape == (3, 3, 5, 5)
    assert float(jnp.max(jnp.abs(full - auto)) / jnp.max(jnp.abs(auto))) < 1e-10
    np.testing.assert_allclose(E.ntk(net, p, X, output=2), full[2, 2], rtol=1e-12, atol=1e-14)
    # symmetry H_{ij;ab} = H_{ji;ba} and positive semi-definiteness of the (output, input) matrix
    np.testing.assert_allclose(full, full.transpose(1, 0, 3, 2), rtol=1e-12, atol=1e-14)
    evals = np.linalg.eigvalsh(np.asarray(full).transpose(0, 2, 1, 3).reshape(15, 15))
    assert evals.min() > -1e-10 * evals.max()


def test_ntk_default_learning_rates_and_single_layer():
    # lambda = C by default; depth 1: H = C_b + C_W x.x/n_0 exactly
    net = efftheory.MLP(1, activation="tanh", C_W=2.0, C_b=0.5)
    p = E.init_params(net, jax.random.PRNGKey(0), 6)
    np.testing.assert_allclose(E.ntk(net, p, X), 0.5 + 2.0 * X @ X.T / 6, rtol=1e-13)
    # learning_rates=None means 1 for every parameter; output=i picks one output neuron
    H1 = E.ntk_autodiff(lambda q, x: E.apply(net, q, x), p, X)
    np.testing.assert_allclose(H1, 1.0 + X @ X.T, rtol=1e-13)
    net3 = efftheory.MLP(2, 5, "tanh", output_width=3)
    p3 = E.init_params(net3, jax.random.PRNGKey(1), 6)
    auto = E.ntk_autodiff(lambda q, x: E.apply(net3, q, x), p3, X, learning_rates=E.learning_rates(net3, 6), output=1)
    np.testing.assert_allclose(E.ntk(net3, p3, X, output=1), auto, rtol=1e-10)


def test_float32_network_matches_float64_network():
    net = efftheory.MLP(4, 64, "tanh", C_W=1.0)
    p64 = E.init_params(net, jax.random.PRNGKey(5), 6)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p64)
    z64, z32 = E.apply(net, p64, X), E.apply(net, p32, X)
    assert z32.dtype == jnp.float32
    np.testing.assert_allclose(z32, z64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(E.ntk(net, p32, X), E.ntk(net, p64, X), rtol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (lambda net, p: E.apply(net, p, X[0]), "^x: "),
    (lambda net, p: E.apply(net, p, np.where(X > 1, np.nan, X)), "^x: .*NaN"),
    (lambda net, p: E.apply(net, p[:1], X), "^params: "),
    (lambda net, p: E.apply(net, p, X[:, :4]), r"^params\[0\]\['W'\]"),
    (lambda net, p: E.apply("net", p, X), "^net: "),
    (lambda net, p: E.init_params(net, jax.random.PRNGKey(0), 0), "^input_dim: "),
    (lambda net, p: E.init_params(net, 3, 6), "^key: "),
    (lambda net, p: E.init_params(net, jax.random.PRNGKey(0), 6, jnp.int32), "^dtype: "),
    (lambda net, p: E.ntk(net, p, X, output=1), "^output: "),
    (lambda net, p: E.ntk(net, p, X[None]), "^x: "),
    (lambda net, p: E.ntk_autodiff(None, p, X), "^apply_fn: "),
    (lambda net, p: E.ntk_autodiff(lambda q, x: E.apply(net, q, x), p, X, learning_rates=(1.0,)),
     "^learning_rates: "),
])
def test_bad_arguments_raise_value_error_naming_them(bad, match):
    net = efftheory.MLP(2, 4, "relu")
    p = E.init_params(net, jax.random.PRNGKey(0), 6)
    with pytest.raises(ValueError, match=match):
        bad(net, p)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-13), ("float32", 2e-6)])
def test_householder_r_is_lapack_qr_r(dtype, rtol):
    """The conditional sampler's LAPACK-free R factor: R equals LAPACK's (jnp.linalg.qr, same sign convention)
    and R^T R = A^T A, for tall, wide and square A; rank-deficient A (repeated, opposite, zero columns) gives a
    finite R with R^T R = A^T A (its rows beyond the rank are zero to rounding)."""
    from efftheory.empirical.networks import householder_r

    rng = np.random.default_rng(7)
    for m, N in [(64, 16), (4, 16), (16, 16), (3, 5), (100, 1), (1, 4)]:
        A = jnp.asarray(rng.normal(size=(m, N)), dtype)
        R, R0 = np.asarray(householder_r(A), np.float64), np.asarray(jnp.linalg.qr(A, mode="r"), np.float64)
        assert R.shape == R0.shape == (min(m, N), N)
        np.testing.assert_allclose(R, R0, atol=rtol * np.abs(R0).max(), err_msg=f"{m}x{N}")
    A = rng.normal(size=(20, 6))
    A[:, 3], A[:, 4], A[:, 5] = A[:, 1], -2 * A[:, 1], 0.0
    R = np.asarray(householder_r(jnp.asarray(A, dtype)), np.float64)
    G = A.T @ A
    assert np.all(np.isfinite(R))
    np.testing.assert_allclose(R.T @ R, G, atol=10 * rtol * np.abs(G).max())
    assert np.abs(R[4:]).max() <= 10 * rtol * np.abs(R).max()  # rank 4
    np.testing.assert_array_equal(np.asarray(householder_r(jnp.zeros((5, 3), dtype))), 0.0)
