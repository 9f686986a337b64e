"""dNTK / ddNTK: empirical tensors against brute-force parameter Hessians, and the first-order theory
(docs/dntk.md) against closed forms, independent quadrature and symmetries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.integrate import quad

from efftheory.empirical.dntk import dntk_estimates, network_dntk, pattern_values
from efftheory.empirical.networks import forward, init_params, learning_rates
from efftheory.network import MLP
from efftheory.theory.dntk import dntk_statistics
from efftheory.theory.infinite import infinite_width

# --------------------------------------------------------------------------------------------- empirical


def _brute(net, params, x):
    """dH, ddH^I, ddH^II from the full parameter Hessian and third-derivative tensor (tiny nets only)."""
    flat, unravel = ravel_pytree(params)
    lam, _ = ravel_pytree(jax.tree.map(lambda w, l: jnp.full_like(w, l), params, learning_rates(net, x.shape[1])))
    f = lambda th: forward(net, unravel(th), x)[1][-1].T.reshape(-1)
    J, H, T3 = jax.jit(lambda th: (jax.jacfwd(f)(th), jax.hessian(f)(th), jax.jacfwd(jax.hessian(f))(th)))(flat)
    Jl = J * lam
    dH = np.einsum("cmn,am,bn->cab", H, Jl, Jl)
    d1 = np.einsum("cmnr,am,bn,dr->cabd", T3, Jl, Jl, Jl)
    d2 = np.einsum("amn,bmr,n,r,m,cn,dr->abcd", H, H, lam, lam, lam, J, J)
    return np.asarray(f(flat)), dH, d1, d2


def test_network_dntk_matches_brute_force():
    net = MLP(3, width=[2, 2], activation="tanh", C_W=1.3, C_b=0.2, lambda_W=0.7, lambda_b=0.4, output_width=2)
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
    # the pattern averages, by explicit loops over output pairs
    pv = pattern_values(t)
    z, dH, d1, d2 = (np.asarray(a) for a in (t.z, t.dH, t.ddH_I, t.ddH_II))
    nL = z.shape[0]
    pairs = [(i, k) for i in range(nL) for k in range(nL) if i != k]
    want = {
        "P": np.mean([np.einsum("abc,d->abcd", dH[i, :, i, :, k, :], z[k]) for i, k in pairs], 0),
        "Q": np.mean([np.einsum("abc,d->abcd", dH[i, :, k, :, k, :], z[i]) for i, k in pairs], 0),
        "R": np.mean([d1[i, :, i, :, k, :, k, :] for i, k in pairs], 0),
        "S": np.mean([d2[i, :, i, :, k, :, k, :] for i, k in pairs], 0),
        "T": np.mean([d2[i, :, k, :, i, :, k, :] for i, k in pairs], 0),
        "U": np.mean([d2[i, :, k, :, k, :, i, :] for i, k in pairs], 0),
        "dntk": np.mean([np.einsum("abc,d->abcd", dH[i, :, i, :, i, :], z[i]) for i in range(nL)], 0),
        "ddntk_I": np.mean([d1[i, :, i, :, i, :, i, :] for i in range(nL)], 0),
        "ddntk_II": np.mean([d2[i, :, i, :, i, :, i, :] for i in range(nL)], 0),
    }
    for name, w in want.items():
        np.testing.assert_allclose(np.asarray(pv[name]), w, atol=1e-14)


def test_dntk_estimates_errors():
    net = MLP(2, width=4, activation="tanh", output_width=2)
    x = np.random.default_rng(3).normal(size=(2, 2))
    with pytest.raises(ValueError, match="n_networks"):
        dntk_estimates(net, x, 1, 0)
    with pytest.raises(ValueError, match="chunk"):
        dntk_estimates(net, x, 4, 0, chunk=0)
    with pytest.raises(ValueError, match="net"):
        dntk_estimates("net", x, 4, 0)
    with pytest.raises(ValueError, match="x"):
        dntk_estimates(net, np.ones(3), 4, 0)
    with pytest.raises(ValueError, match="params"):
        network_dntk(net, init_params(net, jax.random.key(0), 3), x)


# --------------------------------------------------------------------------------------------- theory

X3 = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.8], [0.93, 0.42, -0.43]])


def test_deep_linear_closed_forms():
    """sigma(z) = z, C_b = lambda_b = 0, lambda_W = C_W = c, equal widths, k = K^(1) = c x.x/n_0.

    By hand (docs/dntk.md): sigma'' = 0 kills Q, R, U; with F^(l) = c^{2l-2} l(l-1)/2 k_ac k_bd and
    B^(l) = c^{2l-2} (l-1)l(2l-1)/6 k_ac k_bd the recursions sum to
    P^(l) = c^{2l-2} (l-1)l(l+1)/6 k_02 k_13, S^(l) = c^{2l-2} (l^2-1)l^2/12 k_13 k_24,
    T^(l) = c^{2l-2} (l^2-1)l^2/12 k_12 k_34.  At l = 2 the coefficients 1, 1, 1 are also the direct
    two-layer calculation: dH^(2)_{i0i1i2} = d_{i0i1} lambda_W^2/(n_1 n_0) (x_0.x_2) sum_j z_{j;1} W_{i2 j} + (1<->2),
    and ddH^II^(2) = d_{i1i2} (lambda^3/(n_1 n_0^2)) (x_1.x_3)(x_2.x_4) sum_j W_{i3 j} W_{i4 j}
    + d_{i1i3} d_{i2i4} (lambda^3/(n_1^2 n_0)) (x_1.x_2) sum_j z_{j;3} z_{j;4}.
    """
    c = 1.3
    net = MLP(4, width=7, activation="linear", C_W=c, C_b=0.0, lambda_W=c, lambda_b=0.0)
    st = dntk_statistics(net, X3)
    k = c * X3 @ X3.T / 3
    kk_ac = np.einsum("ac,bd->abcd", k, k)
    kk_ab = np.einsum("ab,cd->abcd", k, k)
    for ell in range(1, 5):
        f = c ** (2 * ell - 2)
        np.testing.assert_allclose(st.P[ell - 1], f * (ell - 1) * ell * (ell + 1) / 6 * kk_ac, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st.S[ell - 1], f * (ell**2 - 1) * ell**2 / 12 * kk_ac, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st.T[ell - 1], f * (ell**2 - 1) * ell**2 / 12 * kk_ab, rtol=1e-9, atol=1e-12)
        for name in "QRU":
            np.testing.assert_array_equal(np.asarray(getattr(st, name)[ell - 1]), 0.0)


def _tanh_derivs(z):
    t = np.tanh(z)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1, (6 * t * t - 2) * d1


def _single_input_reference(net, x1):
    """Single input, by scipy quadrature, derivatives of two-slot functions by Stein's lemma
    <f'>_K = <z f>_K / K (an independent route from the slot derivatives of the implementation)."""
    inf = infinite_width(net, x1)
    K, Th = np.asarray(inf.K)[:, 0, 0], np.asarray(inf.Theta)[:, 0, 0]
    out = [np.zeros(6)]
    b = f = 0.0  # single-input B and F (docs/theory.md / finite.py recursions), carried along
    for ell in range(1, net.depth):
        k, th, C, lam, r = K[ell - 1], Th[ell - 1], net.C_Ws[ell], net.lambda_Ws[ell], 1.0

        def E(f):
            return quad(lambda z: f(*_tanh_derivs(z), z) * np.exp(-z * z / (2 * k)) / np.sqrt(2 * np.pi * k),
                        -12 * np.sqrt(k), 12 * np.sqrt(k), epsabs=1e-13, epsrel=1e-12, limit=200)[0]

        g = lambda s, d1, d2, d3, z: lam * d1 * s + C * th * d2 * d1
        s11 = E(lambda s, d1, d2, d3, z: d1 * d1)
        dg = E(lambda s, d1, d2, d3, z: z * g(s, d1, d2, d3, z)) / k
        du = E(lambda s, d1, d2, d3, z: z * d1 * s) / k
        P, Q, R, S, T, U = out[-1]
        out.append(np.array([
            C * th * E(lambda s, d1, d2, d3, z: g(s, d1, d2, d3, z) * d1 * s)
            + r * C * (f * dg * du + C * s11 * P * du),
            C**2 * th**2 * E(lambda s, d1, d2, d3, z: d2 * d1 * d1 * s)
            + r * C**2 * s11 * (b * E(lambda s, d1, d2, d3, z: d2 * s) + Q * du),
            C * th**2 * E(lambda s, d1, d2, d3, z: (lam * d2 * s + C * th * d3 * d1) * d1 * d1)
            + r * C * s11 * (b * E(lambda s, d1, d2, d3, z: lam * d2 * s + C * th * d3 * d1) + Q * dg + C * s11 * R),
            C * th**2 * E(lambda s, d1, d2, d3, z: (lam * d1 * d1 + C * th * d2 * d2) * d1 * d1)
            + r * C * s11 * (b * E(lambda s, d1, d2, d3, z: lam * d1 * d1 + C * th * d2 * d2) + C * s11 * S),
            th * E(lambda s, d1, d2, d3, z: g(s, d1, d2, d3, z) ** 2)
            + r * (f * dg**2 + 2 * C * s11 * P * dg + C**2 * s11**2 * T),
            C**2 * th**3 * E(lambda s, d1, d2, d3, z: d2 * d2 * d1 * d1) + r * C**2 * s11**2 * U,
        ]))
        b, f = (C**2 * th**2 * E(lambda s, d1, d2, d3, z: d1**4) + r * C**2 * s11**2 * b,
                C**2 * th * E(lambda s, d1, d2, d3, z: d1 * d1 * s * s) + r * C**2 * du**2 * f)
    return np.array(out)


TANH = MLP(3, width=8, activation="tanh", C_W=1.2, C_b=0.15, lambda_W=0.8, lambda_b=0.3)


@pytest.fixture(scope="module")
def tanh_single():
    return dntk_statistics(TANH, X3[:1])


def test_single_input_against_quadrature(tanh_single):
    ref = _single_input_reference(TANH, X3[:1])
    got = np.stack([np.asarray(getattr(tanh_single, k))[:, 0, 0, 0, 0] for k in "PQRSTU"], axis=1)
    assert np.all(np.abs(ref[1:]) > 1e-3)
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-10)


def _swap01(A):
    p = np.array([1, 0, 2])
    return A[:, p][:, :, p][:, :, :, p][:, :, :, :, p]


def test_symmetries_and_degenerate_inputs(tanh_single):
    generic = dntk_statistics(TANH, X3)
    # an identical pair and a collinear third input: rank-2 kernel, no NaN
    degenerate = dntk_statistics(TANH, np.stack([X3[0], X3[0], -0.6 * X3[0]]))
    for st in (generic, degenerate):
        Q, R, S, T, U = (np.asarray(getattr(st, k)) for k in "QRSTU")
        np.testing.assert_allclose(Q, Q.transpose(0, 1, 3, 2, 4), atol=1e-12)
        np.testing.assert_allclose(R, R.transpose(0, 1, 2, 4, 3), atol=1e-12)
        for A in (S, T, U):
            np.testing.assert_allclose(A, A.transpose(0, 2, 1, 4, 3), atol=1e-12)
    # a zero input with C_b = 0: K = 0, rank 0
    zero = dntk_statistics(MLP(3, width=8, activation="tanh", C_b=0.0), np.zeros((1, 3)))
    assert all(np.all(np.isfinite(np.asarray(getattr(zero, k)))) for k in "PQRSTU")
    for k in "PQRSTU":
        A = np.asarray(getattr(degenerate, k))
        assert np.all(np.isfinite(A))
        np.testing.assert_allclose(A, _swap01(A), atol=1e-9)  # inputs 0 and 1 are the same
        np.testing.assert_allclose(A[:, 0, 0, 0, 0], np.asarray(getattr(tanh_single, k))[:, 0, 0, 0, 0], rtol=1e-8,
                                   atol=1e-12)
        assert np.abs(np.asarray(getattr(generic, k))[-1]).max() > 1e-3


def test_argument_errors():
    with pytest.raises(ValueError, match="net: .*smooth"):
        dntk_statistics(MLP(3, width=4, activation="relu"), X3)
    with pytest.raises(ValueError, match="tol"):
        dntk_statistics(TANH, X3, tol=0.5)
    with pytest.raises(ValueError, match="net"):
        dntk_statistics("tanh", X3)
    with pytest.raises(ValueError, match="x"):
        dntk_statistics(TANH, np.ones(3))
