"""The fast closed-form kernels (efftheory._fastmath) and infinite_width's layer selection and host assembly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory.activations import get_activation
from efftheory.gaussian import _fastmath
from efftheory.theory import infinite


def test_asin_within_a_few_ulp():
    x = np.concatenate([np.linspace(-1, 1, 200001), 1 - np.logspace(-17, 0, 500), -1 + np.logspace(-17, 0, 500),
                        np.logspace(-300, 0, 500), [0.0, -0.0, 0.5, -0.5, np.nextafter(0.5, 1)]])
    got = np.asarray(jax.jit(_fastmath.asin)(jnp.asarray(x)))
    want = np.arcsin(x)
    ulp = np.abs(got - want) / np.spacing(np.maximum(np.abs(want), np.finfo(float).tiny))
    assert ulp.max() <= 4
    assert np.array_equal(np.signbit(got), np.signbit(want))


def _kernel_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)) * np.array([[0.1], [1.0], [3.0], [30.0], [1.0]])
    v = x[1]
    X = np.vstack([x, v, 2 * v, -v, v + 1e-9, np.zeros(4)])   # identical, collinear, opposite, near, zero
    K = X @ X.T / 4
    return 0.5 * (K + K.T)


@pytest.mark.parametrize("name", ["relu", "abs", "erf"])
def test_fast_kernels_equal_the_registry_closed_forms(name):
    act = get_activation(name)
    kern = _fastmath.pair_kernel(act)
    assert kern is not _fastmath._generic(act)
    K = jnp.asarray(_kernel_inputs())
    d = jnp.diagonal(K)
    S, dS = kern(K, d[:, None], d[None, :], jnp.eye(K.shape[0], dtype=bool))
    k11, k22 = jnp.broadcast_to(d[:, None], K.shape), jnp.broadcast_to(d[None, :], K.shape)
    S0, dS0 = act.nngp(k11, k22, K), act.dnngp(k11, k22, K)
    # the registry's arccos(rho) loses ~1e-8 where rho rounds near +-1; elsewhere they agree to rounding
    np.testing.assert_allclose(np.asarray(S), np.asarray(S0), rtol=1e-13, atol=1e-13 * float(jnp.max(d)))
    np.testing.assert_allclose(np.asarray(dS), np.asarray(dS0), rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(S), np.asarray(S).T)
    np.testing.assert_array_equal(np.asarray(dS), np.asarray(dS).T)


def test_relu_diagonal_and_duplicates_are_exact():
    """rho = 1 exactly on the diagonal and for identical inputs: dS = 1/2 and S = K/2 there."""
    K = jnp.asarray(_kernel_inputs())
    d = jnp.diagonal(K)
    S, dS = _fastmath.pair_kernel(get_activation("relu"))(K, d[:, None], d[None, :], jnp.eye(K.shape[0], dtype=bool))
    np.testing.assert_array_equal(np.diag(np.asarray(dS)), 0.5)
    np.testing.assert_allclose(np.diag(np.asarray(S)), np.asarray(d) / 2, rtol=1e-15)
    assert float(dS[1, 5]) == 0.5 and float(dS[1, 6]) == 0.5 and float(dS[1, 7]) == 0.0


def test_erf_theta_diagonal_at_huge_variance():
    """<erf' erf'> on the diagonal is (4/pi)/sqrt(1 + 4K): no cancellation at K = 1e12."""
    K = jnp.asarray([[1e12, 3e11], [3e11, 2e12]])
    d = jnp.diagonal(K)
    _, dS = _fastmath.pair_kernel(get_activation("erf"))(K, d[:, None], d[None, :], jnp.eye(2, dtype=bool))
    np.testing.assert_allclose(np.diag(np.asarray(dS)), (4 / np.pi) / np.sqrt(1 + 4 * np.asarray(d)), rtol=1e-14)


def test_other_closed_forms_use_their_own_kernels():
    for name in ("linear", "sin", "leaky_relu(0.2)"):
        act = get_activation(name)
        assert _fastmath.pair_kernel(act) is _fastmath._generic(act)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_layers_selection(name):
    x = np.random.default_rng(1).normal(size=(5, 3))
    net = et.MLP(5, 8, name, C_W=1.5, C_b=0.1)
    full = et.infinite_width(net, x)
    assert full.layers is None and full.K.shape == (5, 5, 5)
    for layers, idx in (("last", [4]), (2, [1]), ([5, 1, 3], [0, 2, 4])):
        part = et.infinite_width(net, x, layers=layers)
        assert part.layers == tuple(i + 1 for i in idx)
        np.testing.assert_array_equal(np.asarray(part.K), np.asarray(full.K)[idx])
        np.testing.assert_array_equal(np.asarray(part.Theta), np.asarray(full.Theta)[idx])


@pytest.mark.parametrize("layers", [0, 6, [], "first", [1.5], [True], "all"])
def test_bad_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        et.infinite_width(et.MLP(5, 8, "relu"), np.eye(3), layers=layers)


def test_mehler_host_assembly_equals_stack(monkeypatch):
    """Mehler-path results above the size threshold are assembled in host memory: same values as jnp.stack."""
    x = np.random.default_rng(2).normal(size=(12, 3))
    net = et.MLP(3, 8, "tanh", C_W=1.5)
    monkeypatch.setattr(infinite, "_HOST_STACK_BYTES", 1)
    host = et.infinite_width(net, x)
    monkeypatch.setattr(infinite, "_HOST_STACK_BYTES", 2**62)
    dev = et.infinite_width(net, x)
    assert isinstance(host.K, jax.Array)
    np.testing.assert_array_equal(np.asarray(host.K), np.asarray(dev.K))
    np.testing.assert_array_equal(np.asarray(host.Theta), np.asarray(dev.Theta))


@pytest.mark.parametrize("N", [1, 2, 7, 10])
def test_fold_unfold_round_trip(N):
    A = np.random.default_rng(N).normal(size=(N, N))
    A = A + A.T
    Ne = N + N % 2
    Z = np.asarray(infinite._fold(jnp.asarray(np.pad(A, ((0, Ne - N), (0, Ne - N))))))
    assert Z.shape == (infinite._folded_rows(Ne), Ne // 2) and not Z[Ne + 1:].any()
    out = np.full((N, N), np.nan)
    infinite._unfold_host(Z, out)
    np.testing.assert_array_equal(out, A)
    np.testing.assert_array_equal(np.asarray(infinite._unfold(jnp.asarray(Z), N)), A)


def _registry_recursion(net, x):
    """Every layer's K and Theta with the registry's closed forms (arccos-based, efftheory.activations)
    on full matrices in numpy: independent of the folded/packed code under test."""
    act = net.sigma
    G = x @ x.T / x.shape[1]
    K, T = net.C_bs[0] + net.C_Ws[0] * G, net.lambda_bs[0] + net.lambda_Ws[0] * G
    Ks, Ts = [K], [T]
    for l in range(1, net.depth):
        d = np.diag(K)
        k11, k22 = np.broadcast_to(d[:, None], K.shape), np.broadcast_to(d[None, :], K.shape)
        S = np.asarray(act.nngp(jnp.asarray(k11), jnp.asarray(k22), jnp.asarray(K)))
        dS = np.asarray(act.dnngp(jnp.asarray(k11), jnp.asarray(k22), jnp.asarray(K)))
        K, T = net.C_bs[l] + net.C_Ws[l] * S, net.lambda_bs[l] + net.lambda_Ws[l] * S + net.C_Ws[l] * dS * T
        Ks.append(K)
        Ts.append(T)
    return np.stack(Ks), np.stack(Ts)


@pytest.mark.parametrize("name", ["relu", "abs", "erf"])
@pytest.mark.parametrize("N", [1, 2, 9, 40])
def test_folded_and_full_layouts_equal_the_registry_recursion(name, N):
    """layers="last" and [1, 5] run folded, all layers full: both equal the registry recursion (odd N
    included, with identical, collinear, antiparallel and zero inputs), and identical inputs keep
    identical rows to rounding."""
    x = np.random.default_rng(N).normal(size=(N, 3))
    if N >= 5:
        x[1], x[2], x[3], x[4] = x[0], 2 * x[0], -x[0], 0.0
    net = et.MLP(5, 8, name, C_W=[1.5, 1.9, 1.2, 2.0, 1.7], C_b=[0.1, 0.0, 0.3, 0.05, 0.2])
    Kr, Tr = _registry_recursion(net, x)
    full = et.infinite_width(net, x)
    folded = et.infinite_width(net, x, layers=[1, 5])
    last = et.infinite_width(net, x, layers="last")
    for K, T, idx in ((full.K, full.Theta, slice(None)), (folded.K, folded.Theta, [0, 4]), (last.K, last.Theta, [4])):
        K, T = np.asarray(K), np.asarray(T)
        np.testing.assert_allclose(K, Kr[idx], rtol=1e-13, atol=1e-13 * np.abs(Kr).max())
        np.testing.assert_allclose(T, Tr[idx], rtol=1e-12, atol=1e-12 * np.abs(Tr).max())
        np.testing.assert_array_equal(K, np.swapaxes(K, 1, 2))
        np.testing.assert_array_equal(T, np.swapaxes(T, 1, 2))
        if N >= 5:  # (x x^T itself may differ in the last bit between identical rows; rho snaps to 1, so
            # Theta, through <sigma' sigma'>, does not pick up the ~1e-8 of a correlation an ulp below 1)
            np.testing.assert_allclose(K[:, 0], K[:, 1], rtol=1e-14, atol=0)
            np.testing.assert_allclose(T[:, 0], T[:, 1], rtol=1e-14, atol=0)
    np.testing.assert_array_equal(np.asarray(folded.K[1]), np.asarray(last.K[0]))
