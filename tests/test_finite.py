"""Finite-width theory: closed single-input recursions by independent quadrature, exact results."""

import numpy as np
import pytest
from _tensor_checks import assert_pair_symmetries
from scipy import integrate
from scipy.special import expit

import efftheory as et

SIG = {
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0), lambda z: np.where(z > 0, 1.0, 0.0)),
    "silu": (lambda z: z * expit(z), lambda z: expit(z) * (1 + z * (1 - expit(z)))),
}


def gauss(f, K):
    def g(z):
        return f(z) * np.exp(-z * z / (2 * K)) / np.sqrt(2 * np.pi * K)

    return sum(integrate.quad(g, a, b, epsabs=1e-15, epsrel=1e-13, limit=400)[0]
               for a, b in [(-np.inf, 0.0), (0.0, np.inf)])


def single_input_reference(name, depth, C_W, C_b, x2):
    """docs/theory.md's closed single-input recursions, integrated with scipy (independent path)."""
    s, ds = SIG[name]
    K = C_b + C_W * x2
    V, G1 = 0.0, 0.0
    out = [(K, V, G1)]
    for _ in range(depth - 1):
        s2, s4 = gauss(lambda z: s(z) ** 2, K), gauss(lambda z: s(z) ** 4, K)
        chi_par = C_W * gauss(lambda z: s(z) * ds(z) * z, K) / K
        quart = gauss(lambda z: s(z) ** 2 * (z**4 - 6 * K * z**2 + 3 * K**2), K) / K**4
        V, G1 = C_W**2 * (s4 - s2**2) + chi_par**2 * V, chi_par * G1 + C_W / 8 * quart * V
        K = C_b + C_W * s2
        out.append((K, V, G1))
    return np.array(out)


@pytest.mark.parametrize("name, C_W, C_b", [
    ("tanh", 1.0, 0.0), ("tanh", 1.6, 0.2), ("relu", 2.0, 0.0), ("relu", 1.7, 0.3), ("silu", 1.9, 0.1),
])
def test_single_input_matches_closed_recursions(name, C_W, C_b):
    x = np.array([[0.8, -1.1, 0.5]])
    depth = 5
    r = et.finite_width(et.MLP(depth, 10, name, C_W=C_W, C_b=C_b), x)
    ref = single_input_reference(name, depth, C_W, C_b, float(np.sum(x**2) / 3))
    np.testing.assert_allclose(r.K[:, 0, 0], ref[:, 0], rtol=1e-10)
    np.testing.assert_allclose(r.V[:, 0, 0, 0, 0], ref[:, 1], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r.G1[:, 0, 0], ref[:, 2], rtol=1e-8, atol=1e-12)


def test_deep_linear_several_inputs_is_exact(rng):
    x = rng.normal(size=(3, 4))
    C_W, L = 1.3, 5
    r = et.finite_width(et.MLP(L, 10, "linear", C_W=C_W, C_b=0.0), x)
    K1 = C_W * x @ x.T / 4
    pair = np.einsum("ac,bd->abcd", K1, K1) + np.einsum("ad,bc->abcd", K1, K1)
    for l in range(1, L + 1):
        # exact up to the 3-input rule (tail cut at 7.5 sigma: ~1e-10 relative)
        np.testing.assert_allclose(r.V[l - 1], (l - 1) * C_W ** (2 * (l - 1)) * pair, rtol=2e-9, atol=1e-12)
    np.testing.assert_allclose(r.G1, 0.0, atol=1e-12)


def test_relu_criticality_exact_results():
    x = np.array([[1.0, 2.0], [-0.5, 1.0], [2.0, 0.1]])
    L = 5
    r = et.finite_width(et.MLP(L, 10, "relu", C_W=2.0, C_b=0.0), x)
    for a in range(3):
        K = float(r.K[0, a, a])
        np.testing.assert_allclose(r.K[:, a, a], K, rtol=1e-13)
        np.testing.assert_allclose(r.V[:, a, a, a, a], 5 * K**2 * np.arange(L), rtol=1e-11)
    np.testing.assert_allclose(np.einsum("laa->la", r.G1), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.einsum("laa->la", r.H1), 0.0, atol=1e-9)


def test_tensor_symmetries(rng):
    x = rng.normal(size=(3, 2))
    assert_pair_symmetries(et.finite_width(et.MLP(4, 10, "tanh", C_W=1.2, C_b=0.1), x))


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_identical_and_collinear_inputs_are_finite(name):
    v = np.array([0.5, -1.0, 0.7])
    x = np.stack([v, v, 2 * v, np.array([1.0, 0.2, -0.3])])
    r = et.finite_width(et.MLP(3, 10, name, C_W=1.2, C_b=0.0), x)
    for T in (r.G1, r.V, r.H1, r.A, r.B, r.D, r.F):
        assert np.all(np.isfinite(T))
    # inputs 0 and 1 are the same point: every tensor is invariant under swapping them
    np.testing.assert_allclose(r.V[:, 0, 0, 0, 0], r.V[:, 0, 1, 1, 0], rtol=1e-8)
    np.testing.assert_allclose(r.G1[:, 0, 1], r.G1[:, 0, 0], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r.H1[:, 0, 1], r.H1[:, 1, 1], rtol=1e-8, atol=1e-12)


def test_diagonal_path_matches_full_tensors():
    x = np.array([[0.5, 1.0], [1.5, -0.2]])
    net = et.MLP(4, 10, "tanh", C_W=1.3, C_b=0.05)
    full = et.finite_width(net, x)
    diag = et.finite_width_diagonal(net, x)
    assert diag.V.shape == (4, 2)
    for name in ("K", "Theta", "G1", "H1"):
        np.testing.assert_allclose(getattr(diag, name), np.einsum("laa->la", getattr(full, name)), rtol=1e-8, atol=1e-12)
    for name in ("V", "A", "B", "D", "F"):
        np.testing.assert_allclose(getattr(diag, name), np.einsum("laaaa->la", getattr(full, name)), rtol=1e-8,
                                   atol=1e-12)


def test_at_width_predictions():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    net = et.MLP(3, 32, "relu", C_W=2.0)
    fw = et.finite_width(net, x)
    p = fw.at_width(64)
    np.testing.assert_allclose(p.metric[2], fw.K[2] + fw.G1[2] / 64)
    np.testing.assert_allclose(p.four_point[2], fw.V[2] / 64)
    cov = (fw.A[2] + fw.B[2].transpose(0, 2, 1, 3) + fw.B[2].transpose(0, 2, 3, 1)) / 64
    np.testing.assert_allclose(p.ntk_cov[2], cov)
    # non-uniform widths: layer l carries 1/n_{l-1}
    fw2 = et.finite_width(et.MLP(3, [16, 48], "relu", C_W=2.0), x)
    np.testing.assert_allclose(fw2.at_width().four_point[2], fw2.V[2] / 48)
    np.testing.assert_allclose(fw2.at_width().four_point[1], fw2.V[1] / 16)
    with pytest.raises(ValueError, match="n"):
        fw.at_width(0)
