"""dNTK / ddNTK: empirical tensors against brute-force parameter Hessians, and the first-order theory
(docs/dntk.md) against closed forms, independent quadrature and symmetries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import efftheory  # noqa: F401
from efftheory.empirical.dntk import dntk_estimates, network_dntk, pattern_values
from efftheory.empirical.networks import forward, init_params, learning_rates
from efftheory.network import MLP

# --------------------------------------------------------------------------------------------- empirical


def _brute(net, params, x):
    """dH, ddH^I, ddH^II from the full parameter Hessian and third-derivative tensor (tiny nets only)."""
    flat, unravel = ravel_pytree(params)
    lam, _ = ravel_pytree(jax.tree.map(lambda w, l: jnp.full_like(w, l), params, learning_rates(net, x.shape[1])))
    f = lambda th: forward(net, unravel(th), x)[1][-1].T.reshape(-1)  # noqa: E731
    J, H, T3 = jax.jit(lambda th: (jax.jacfwd(f)(th), jax.hessian(f)(th), jax.jacfwd(jax.hessian(f))(th)))(flat)
    Jl = J * lam
    dH = np.einsum("cmn,am,bn->cab", H, Jl, Jl)
    d1 = np.einsum("cmnr,am,bn,dr->cabd", T3, Jl, Jl, Jl)
    d2 = np.einsum("amn,bmr,n,r,m,cn,dr->abcd", H, H, lam, lam, lam, J, J)
    return np.asarray(f(flat)), dH, d1, d2


def test_network_dntk_matches_brute_force(act="tanh"):
    net = MLP(3, width=[2, 3], activation=act, C_W=1.3, C_b=0.2, lambda_W=0.7, lambda_b=0.4, output_width=2)
    x = np.random.default_rng(0).normal(size=(2, 2))
    params = init_params(net, jax.random.key(1), 2)
    z, dH, d1, d2 = _brute(net, params, x)
    t = network_dntk(net, params, x)
    M = z.size
    np.testing.assert_allclose(np.asarray(t.z).reshape(-1), z, atol=1e-14)
    for got, want in [(t.dH.reshape((M,) * 3), dH), (t.ddH_I.reshape((M,) * 4), d1),
                      (t.ddH_II.reshape((M,) * 4), d2)]:
        assert np.max(np.abs(want)) > 1e-3  # not trivially zero
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-13 * np.max(np.abs(want)) + 1e-15)
    # exact symmetries of the definitions
    dHr = np.asarray(t.dH)
    np.testing.assert_allclose(dHr, dHr.transpose(0, 1, 4, 5, 2, 3), atol=1e-14)
    d1r = np.asarray(t.ddH_I)
    np.testing.assert_allclose(d1r, d1r.transpose(0, 1, 4, 5, 2, 3, 6, 7), atol=1e-13)
    np.testing.assert_allclose(d1r, d1r.transpose(0, 1, 2, 3, 6, 7, 4, 5), atol=1e-13)
    d2r = np.asarray(t.ddH_II)
    np.testing.assert_allclose(d2r, d2r.transpose(2, 3, 0, 1, 6, 7, 4, 5), atol=1e-14)


def test_pattern_values_by_loops():
    net = MLP(2, width=3, activation="tanh", output_width=3)
    x = np.random.default_rng(1).normal(size=(2, 3))
    t = network_dntk(net, init_params(net, jax.random.key(2), 3), x)
    pv = pattern_values(t)
    z, dH, d1, d2 = (np.asarray(a) for a in (t.z, t.dH, t.ddH_I, t.ddH_II))
    pairs = [(i, k) for i in range(3) for k in range(3) if i != k]
    P = np.mean([np.einsum("abc,d->abcd", dH[i, :, i, :, k, :], z[k]) for i, k in pairs], 0)
    Q = np.mean([np.einsum("abc,d->abcd", dH[i, :, k, :, k, :], z[i]) for i, k in pairs], 0)
    T = np.mean([d2[i, :, k, :, i, :, k, :] for i, k in pairs], 0)
    U = np.mean([d2[i, :, k, :, k, :, i, :] for i, k in pairs], 0)
    comb = np.mean([np.einsum("abc,d->abcd", dH[i, :, i, :, i, :], z[i]) for i in range(3)], 0)
    for name, want in [("P", P), ("Q", Q), ("T", T), ("U", U), ("dntk", comb)]:
        np.testing.assert_allclose(np.asarray(pv[name]), want, atol=1e-14)


def test_dntk_estimates_chunking_and_errors():
    net = MLP(2, width=4, activation="tanh", output_width=2)
    x = np.random.default_rng(3).normal(size=(2, 2))
    a = dntk_estimates(net, x, 4, 7, chunk=2)
    b = dntk_estimates(net, x, 4, 7, chunk=4)
    for k in a.per_network:
        np.testing.assert_allclose(a.per_network[k], b.per_network[k], atol=1e-13)
    assert a.fan_in == 4 and a.P.value.shape == (2, 2, 2, 2)
    one = dntk_estimates(MLP(2, width=4, activation="tanh"), x, 3, 0)
    assert one.P is None and one.dntk.value.shape == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="n_networks"):
        dntk_estimates(net, x, 1, 0)
    with pytest.raises(ValueError, match="chunk"):
        dntk_estimates(net, x, 4, 0, chunk=0)
    with pytest.raises(ValueError, match="net"):
        dntk_estimates("net", x, 4, 0)
    with pytest.raises(ValueError, match="params"):
        network_dntk(net, init_params(net, jax.random.key(0), 3), x)
