"""The fast closed-form kernels (efftheory._fastmath) and infinite_width's layer selection and host assembly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory import _fastmath
from efftheory.activations import get_activation
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


def test_host_assembly_equals_stack(monkeypatch):
    """Results above the size threshold are assembled in host memory: same values as jnp.stack."""
    x = np.random.default_rng(2).normal(size=(40, 3))
    net = et.MLP(4, 8, "relu", C_W=2.0)
    monkeypatch.setattr(infinite, "_HOST_STACK_BYTES", 1)
    host = et.infinite_width(net, x)
    monkeypatch.setattr(infinite, "_HOST_STACK_BYTES", 2**62)
    dev = et.infinite_width(net, x)
    assert isinstance(host.K, jax.Array)
    np.testing.assert_array_equal(np.asarray(host.K), np.asarray(dev.K))
    np.testing.assert_array_equal(np.asarray(host.Theta), np.asarray(dev.Theta))


def test_row_blocks_equal_one_block(monkeypatch):
    x = np.random.default_rng(3).normal(size=(300, 3))   # 300 rows: 3 blocks of 128 with padding
    net = et.MLP(3, 8, "erf", C_W=1.7, C_b=0.2)
    blocked = et.infinite_width(net, x)
    monkeypatch.setattr(infinite, "_ROW_BLOCK", 10**6)
    infinite._closed_form_step.clear_cache()  # retrace with one block
    whole = et.infinite_width(net, x)
    infinite._closed_form_step.clear_cache()
    np.testing.assert_array_equal(np.asarray(blocked.K), np.asarray(whole.K))
    np.testing.assert_array_equal(np.asarray(blocked.Theta), np.asarray(whole.Theta))
