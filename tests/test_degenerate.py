"""Degenerate but legitimate geometry (issue #8): duplicate, collinear and zero inputs, inputs scaled by 1e-6
and 1e6, a single input, depth 1, one very narrow layer, and kernels that become (numerically) singular during
the recursion.  Every answer is checked against an independent reference: a closed form, an exact symmetry
(scaling, duplication), or the computation without the degeneracy.  Singular kernels must be handled on the
lower-dimensional marginal, so duplicates reproduce the single computation (no jitter): to rounding for the
two-index tensors, within the integration tolerance for the four-index ones."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory import empirical as em

TWO = ("K", "Theta", "G1", "H1")
FOUR = ("V", "A", "B", "D", "F")
RNG = np.random.default_rng(20261122)
XA, XB = RNG.normal(size=6), RNG.normal(size=6)


def _arr(result, name):
    return np.asarray(getattr(result, name), dtype=np.float64)


def _scale(result, name):
    """The natural size of a tensor: K_max for two-index tensors, K_max^2 for four-index ones (so that a
    tensor that vanishes, like G1 of ReLU, is compared on the scale it would have)."""
    k = float(np.max(np.abs(_arr(result, "K")))) or 1.0
    return k if name in TWO else k * k


def _gather(tensor, index):
    """tensor[l, index[a1], index[a2], ...] for every layer."""
    idx = (np.arange(tensor.shape[0]),) + (np.asarray(index),) * (tensor.ndim - 1)
    return tensor[np.ix_(*idx)]


def _assert_entries(got, ref, index, names, rtol, what):
    for name in names:
        g, r = _arr(got, name), _gather(_arr(ref, name), index)
        err = float(np.max(np.abs(g - r))) / _scale(ref, name)
        assert err <= rtol, f"{what}: {name} differs by {err:.2e} of its scale (allowed {rtol:.0e})"


# ------------------------------------------------------------------------------------------ duplicates
@pytest.mark.parametrize("activation", ["relu", "erf", "tanh"])
def test_duplicate_inputs_infinite_width(activation):
    net = et.MLP(4, 8, activation, C_W=1.6, C_b=0.1)
    ref = et.infinite_width(net, np.stack([XA, XB]))
    got = et.infinite_width(net, np.stack([XA, XB, XA]))
    _assert_entries(got, ref, [0, 1, 0], ("K", "Theta"), 1e-12, f"{activation} duplicates")


@pytest.fixture(scope="module", params=["relu", "tanh"])
def duplicated(request):
    # tol=1e-12: the two computations batch their 3- and 4-input integrals differently, so the rules (and the
    # trapezoid range, products._tail_for) differ; each is within tol, so the comparison needs tol << 1e-11
    # (at the default 1e-9 they differ by up to 3.5e-11 of K_max^2 for tanh, by 9e-14 at 1e-11).
    net = et.MLP(2, 10, request.param, C_W=1.7, C_b=0.2)
    return (request.param, et.finite_width(net, np.stack([XA, XB, XA]), tol=1e-12),
            et.finite_width(net, np.stack([XA, XB]), tol=1e-12))


def test_duplicate_inputs_two_index_tensors_are_the_single_computation(duplicated):
    act, got, ref = duplicated
    _assert_entries(got, ref, [0, 1, 0], TWO, 1e-12, f"{act} [a, b, a] vs [a, b]")


def test_duplicate_inputs_four_index_tensors_are_the_single_computation(duplicated):
    act, got, ref = duplicated
    _assert_entries(got, ref, [0, 1, 0], FOUR, 1e-11, f"{act} [a, b, a] vs [a, b]")


# ------------------------------------------------------------------------------------------ collinear
@pytest.mark.parametrize("C_W", [2.0, 1.5])
def test_collinear_relu_closed_forms(C_W):
    """x and 2x, C_b = 0: z(2x) = 2 z(x) in every network, so every tensor is the single-input one times
    2^(number of indices on 2x); single-input ReLU with C_b = 0 has K^(l) = (C_W/2)^(l-1) K^(1),
    Theta^(l) = l K^(l), V^(l) = 5 (l-1) K^(l)^2 and G1 = 0 (docs/theory.md's recursions, solved by hand)."""
    L = 3
    net = et.MLP(L, 16, "relu", C_W=C_W, C_b=0.0)
    fw = et.finite_width(net, np.stack([XA, 2 * XA]))
    one = et.finite_width(net, XA[None])
    s = np.array([1.0, 2.0])
    K1 = C_W * XA @ XA / XA.size
    for l in range(1, L + 1):
        Kl = (C_W / 2) ** (l - 1) * K1
        np.testing.assert_allclose(_arr(fw, "K")[l - 1], Kl * np.outer(s, s), rtol=1e-13)
        np.testing.assert_allclose(_arr(fw, "Theta")[l - 1], l * Kl * np.outer(s, s), rtol=1e-13)
        np.testing.assert_allclose(_arr(fw, "V")[l - 1], 5 * (l - 1) * Kl**2 * np.einsum("a,b,c,d->abcd", s, s, s, s),
                                   rtol=1e-12, atol=1e-14 * Kl**2)
    np.testing.assert_allclose(_arr(fw, "G1"), 0.0, atol=1e-13 * K1)
    if C_W == 2.0:  # criticality: the diagonal of the mean NTK has no 1/n correction (docs/theory.md)
        np.testing.assert_allclose(_arr(fw, "H1"), 0.0, atol=1e-12 * K1)
    s4 = np.einsum("a,b,c,d->abcd", s, s, s, s)
    for name in FOUR:
        np.testing.assert_allclose(_arr(fw, name), _arr(one, name)[:, 0, 0, 0, 0][:, None, None, None, None] * s4,
                                   rtol=1e-11, atol=1e-13 * K1**2, err_msg=name)


@pytest.mark.parametrize("activation", ["relu", "callable"])  # a callable relu: the same closed forms
def test_opposite_inputs_relu_closed_forms(activation):
    """x and -x, C_b = 0: theta = pi at layer 1, so K^(2)_12 = Theta^(2)_12 = 0, and at layer 3 (rho = 0)
    K^(3)_12 = C_W K^(2)_11 / (2 pi), Theta^(3)_12 = lambda_W K^(2)_11 / (2 pi)  (arc-cosine kernels)."""
    act = "relu" if activation == "relu" else (lambda z: jnp.maximum(z, 0.0))
    C_W = 1.8
    inf = et.infinite_width(et.MLP(3, 8, act, C_W=C_W, C_b=0.0), np.stack([XA, -XA]))
    K, T = _arr(inf, "K"), _arr(inf, "Theta")
    scale = K[1, 0, 0]
    assert abs(K[1, 0, 1]) <= 1e-12 * scale and abs(T[1, 0, 1]) <= 1e-12 * scale
    np.testing.assert_allclose(K[2, 0, 1], C_W * K[1, 0, 0] / (2 * math.pi), rtol=1e-10)
    np.testing.assert_allclose(T[2, 0, 1], C_W * K[1, 0, 0] / (2 * math.pi), rtol=1e-10)
    np.testing.assert_allclose(K[1, 0, 0], C_W / 2 * K[0, 0, 0], rtol=1e-12)


# ------------------------------------------------------------------------------------------ zero input
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_zero_input_with_zero_bias(activation):
    """sigma(0) = 0 and C_b = 0: the zero input's preactivations vanish in every layer of every network, so
    each entry touching it is exactly 0 and the others are the computation without it."""
    net = et.MLP(2 if activation == "tanh" else 3, 8, activation, C_W=1.4, C_b=0.0)
    fw = et.finite_width(net, np.stack([np.zeros(6), XB]))
    one = et.finite_width(net, XB[None])
    for name in TWO + FOUR:
        T = _arr(fw, name)
        touches_zero = np.any(np.indices(T.shape[1:]) == 0, axis=0)
        assert np.all(T[:, touches_zero] == 0.0), name
    for name in TWO + FOUR:
        T = _arr(fw, name)[(slice(None),) + (1,) * (_arr(fw, name).ndim - 1)]
        R = _arr(one, name).reshape(T.shape[0], -1)[:, 0]
        np.testing.assert_allclose(T, R, rtol=1e-12, atol=1e-14 * _scale(one, name), err_msg=name)


def test_zero_input_with_an_activation_nonzero_at_zero():
    """sigmoid(0) = 1/2: a zero input with C_b = 0 has z^(1) = 0 exactly, so z^(2) = sum_j W_j / 2 has
    K^(2) = C_W / 4 and no four-point connected part (V^(2) = G1^(2) = 0); Theta^(2) = lambda_W / 4."""
    C_W = 1.3
    net = et.MLP(3, 8, "sigmoid", C_W=C_W, C_b=0.0)
    inf = et.infinite_width(net, np.stack([np.zeros(6), XB]))
    np.testing.assert_allclose(_arr(inf, "K")[1, 0, 0], C_W / 4, rtol=1e-13)
    np.testing.assert_allclose(_arr(inf, "Theta")[1, 0, 0], C_W / 4, rtol=1e-13)
    fw = et.finite_width(net, np.zeros((1, 6)))
    assert np.all(np.isfinite(_arr(fw, "V"))) and np.all(np.isfinite(_arr(fw, "H1")))
    assert abs(_arr(fw, "V")[1, 0, 0, 0, 0]) <= 1e-14 and abs(_arr(fw, "G1")[1, 0, 0]) <= 1e-14
    np.testing.assert_allclose(_arr(fw, "K")[:2, 0, 0], [0.0, C_W / 4], atol=1e-15)


# ------------------------------------------------------------------------------------------ scale
@pytest.mark.parametrize("s", [1e-6, 1e6])
def test_relu_scales_exactly(s):
    """Positively homogeneous sigma and C_b = lambda_b = 0: K, Theta, G1, H1 scale like s^2, the four-index
    tensors like s^4."""
    net = et.MLP(3, 8, "relu", C_W=1.6, C_b=0.0)
    x = np.stack([XA, XB])
    ref, got = et.finite_width(net, x), et.finite_width(net, s * x)
    for name in TWO + FOUR:
        p = 2 if name in TWO else 4
        np.testing.assert_allclose(_arr(got, name) / s**p, _arr(ref, name), rtol=1e-11,
                                   atol=1e-13 * _scale(ref, name), err_msg=name)


@pytest.mark.parametrize("activation", ["abs", "leaky_relu(0.2)"])
@pytest.mark.parametrize("s", [1e-6, 1e6])
def test_homogeneous_kernels_scale_exactly(activation, s):
    net = et.MLP(4, 8, activation, C_W=1.6, C_b=0.0)
    x = np.stack([XA, XB, -0.5 * XA + XB])
    ref, got = et.infinite_width(net, x), et.infinite_width(net, s * x)
    for name in ("K", "Theta"):
        np.testing.assert_allclose(_arr(got, name) / s**2, _arr(ref, name), rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("activation", ["tanh", "erf", "gelu", "sin"])
def test_tiny_inputs_see_the_linear_network(activation):
    """At inputs of size 1e-6 (K ~ 1e-12) sigma(z) = sigma'(0) z + O(z^2): the network is deep linear with
    C_W' = C_W sigma'(0)^2, so K^(l) = C_W'^(l-1) K^(1) and V^(l) = (l-1) C_W'^(2(l-1)) (K13 K24 + K14 K23)
    (docs/theory.md, exact results), to relative O(K) ~ 1e-12 (plus sigma''(0) z terms for gelu: O(sqrt K))."""
    slope = {"tanh": 1.0, "erf": 2 / math.sqrt(math.pi), "gelu": 0.5, "sin": 1.0}[activation]
    C_W, L, s = 1.3, 3, 1e-6
    x = s * np.stack([XA, XB])
    net = et.MLP(L, 8, activation, C_W=C_W, C_b=0.0)
    inf = et.infinite_width(net, x)
    K1 = _arr(inf, "K")[0]
    c = C_W * slope**2
    tol = 1e-5 if activation == "gelu" else 1e-9
    for l in range(1, L + 1):
        np.testing.assert_allclose(_arr(inf, "K")[l - 1], c ** (l - 1) * K1, rtol=tol)
    if activation == "tanh":  # one finite-width check (the others share the machinery)
        fw = et.finite_width(net, x)
        S = np.einsum("ac,bd->abcd", K1, K1) + np.einsum("ad,bc->abcd", K1, K1)
        for l in range(1, L + 1):
            np.testing.assert_allclose(_arr(fw, "V")[l - 1], (l - 1) * c ** (2 * (l - 1)) * S, rtol=1e-8,
                                       atol=1e-8 * np.max(np.abs(S)))
        assert np.max(np.abs(_arr(fw, "G1"))) <= 1e-8 * np.max(np.abs(K1))


def _sign_kernel(x):
    G = x @ x.T / x.shape[1]
    d = np.sqrt(np.diag(G))
    return 2 / math.pi * np.arcsin(np.clip(G / np.outer(d, d), -1, 1)), G


def _erf_at_1e6():
    """Theta^(2) of erf at inputs of size 1e6 and its closed form (test_huge_inputs_erf_closed_form)."""
    x = 1e6 * np.stack([XA, XB])
    inf = et.infinite_width(et.MLP(2, 8, "erf", C_W=1.0, C_b=0.0), x)
    G = x @ x.T / x.shape[1]
    d = 1 + 2 * np.diag(G)
    K2 = 2 / math.pi * np.arcsin(2 * np.diag(G) / d)
    return np.diag(_arr(inf, "Theta")[1]), K2 + 4 / math.pi * np.diag(G) / np.sqrt(1 + 4 * np.diag(G))


def test_huge_inputs_erf_closed_form():
    """At inputs of size 1e6 (K ~ 1e12) erf(z) is sign(z) but for |z| < 1: Williams' arcsine kernels
    K^(2)_ab = (2/pi) arcsin(2 K_ab / sqrt((1 + 2 K_aa)(1 + 2 K_bb))) and
    Theta^(2)_ab = K^(2)_ab + (4/pi) K_ab / sqrt((1 + 2 K_aa)(1 + 2 K_bb) - 4 K_ab^2)  (C_W = lambda_W = 1, C_b = 0),
    evaluated here with the determinant from Lagrange's identity (no cancellation at K ~ 1e12); and the sign
    network's arcsine kernel (2/pi) arcsin(rho) to O(1/K).  (The diagonal of Theta: the next test.)"""
    x = 1e6 * np.stack([XA, XB])
    inf = et.infinite_width(et.MLP(2, 8, "erf", C_W=1.0, C_b=0.0), x)
    sign, G = _sign_kernel(x)
    n0 = x.shape[1]
    wedge = sum((x[0, i] * x[1, j] - x[0, j] * x[1, i]) ** 2 for i in range(n0) for j in range(i + 1, n0)) / n0**2
    d = 1 + 2 * np.diag(G)
    det = np.array([[1 + 4 * G[0, 0], 1 + 2 * G[0, 0] + 2 * G[1, 1] + 4 * wedge],
                    [1 + 2 * G[0, 0] + 2 * G[1, 1] + 4 * wedge, 1 + 4 * G[1, 1]]])
    K2 = 2 / math.pi * np.arcsin(2 * G / np.sqrt(np.outer(d, d)))
    # on the diagonal arcsin(1 - delta) = pi/2 - 2 arcsin(sqrt(delta/2)), delta = 1/(1 + 2K): no cancellation
    K2[np.diag_indices(2)] = 1 - 4 / math.pi * np.arcsin(np.sqrt(0.5 / d))
    # rtol 1e-9: the arcsine's argument is 1 - 5e-13 on the diagonal, where float64 rounding of it costs 1e-10
    np.testing.assert_allclose(_arr(inf, "K")[1], K2, rtol=1e-9)
    np.testing.assert_allclose(_arr(inf, "K")[1], sign, rtol=1e-6)
    T2 = _arr(inf, "Theta")[1]
    np.testing.assert_allclose(T2[0, 1], K2[0, 1] + 4 / math.pi * G[0, 1] / np.sqrt(det[0, 1]), rtol=1e-9)


def test_huge_inputs_erf_ntk_diagonal():
    got, expected = _erf_at_1e6()
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_huge_inputs_tanh_sees_the_sign_network():
    """As for erf, tanh -> sign at K = 1e12; its criticality, <sigma'^2>_K = int sech^4 / sqrt(2 pi K) =
    (4/3) / sqrt(2 pi K), comes from uncapped rules; its kernels would need a rule the capped trapezoid
    cannot give there (a peak of width 1e-6), so they refuse with the variance and the limit instead of
    returning Theta^(2)_aa = 1.0 for ~4.3e5 (tests/test_large_variance.py)."""
    x = 1e6 * np.stack([XA, XB])
    np.testing.assert_allclose(et.chi_perp("tanh", 1e12), 4 / 3 / math.sqrt(2 * math.pi * 1e12), rtol=1e-3)
    with pytest.raises(ValueError, match=r"variance reaches K = .*tanh.*K <= "):
        et.infinite_width(et.MLP(2, 8, "tanh", C_W=1.0, C_b=0.0), x)


# ------------------------------------------------------------------------------------------ one input, one layer
def test_single_input_exact_results():
    """docs/theory.md's exact single-input results: ReLU at criticality V = 5 K^2 (l-1), G1 = 0, H1 = 0; deep linear
    V = (l-1) C_W^(2(l-1)) 2 K1^2, G1 = 0; and finite_width_diagonal reads the same numbers."""
    L = 3
    relu = et.finite_width(et.MLP(L, 8, "relu", C_W=2.0, C_b=0.0), XA[None])
    K = _arr(relu, "K")[:, 0, 0]
    np.testing.assert_allclose(K, K[0], rtol=1e-13)
    np.testing.assert_allclose(_arr(relu, "V")[:, 0, 0, 0, 0], 5 * K**2 * np.arange(L), rtol=1e-12)
    np.testing.assert_allclose(_arr(relu, "G1")[:, 0, 0], 0, atol=1e-13 * K[0])
    np.testing.assert_allclose(_arr(relu, "H1")[:, 0, 0], 0, atol=1e-12 * K[0])
    C_W = 1.4
    lin = et.finite_width(et.MLP(L, 8, "linear", C_W=C_W, C_b=0.0), XA[None])
    K1 = C_W * XA @ XA / XA.size
    ells = np.arange(1, L + 1)
    np.testing.assert_allclose(_arr(lin, "V")[:, 0, 0, 0, 0], (ells - 1) * C_W ** (2 * (ells - 1)) * 2 * K1**2,
                               rtol=1e-12)
    np.testing.assert_allclose(_arr(lin, "G1")[:, 0, 0], 0, atol=1e-13 * K1)
    diag = et.finite_width_diagonal(et.MLP(L, 8, "relu", C_W=2.0, C_b=0.0), np.stack([XA, XA]))
    for name in TWO:
        np.testing.assert_allclose(_arr(diag, name)[:, 1], _arr(relu, name)[:, 0, 0], rtol=1e-13, atol=1e-15)
    for name in FOUR:
        np.testing.assert_allclose(_arr(diag, name)[:, 1], _arr(relu, name)[:, 0, 0, 0, 0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_depth_one(activation):
    """One layer: K = C_b + C_W x.x/n_0, Theta = lambda_b + lambda_W x.x/n_0, every 1/n correction is 0; the
    sampled metric of a depth-1 network has the same mean."""
    net = et.MLP(1, 5, activation, C_W=1.3, C_b=0.2, lambda_W=0.7, lambda_b=0.4, output_width=3)
    x = np.stack([XA, XB])
    G = x @ x.T / x.shape[1]
    fw = et.finite_width(net, x)
    np.testing.assert_allclose(_arr(fw, "K"), (0.2 + 1.3 * G)[None], rtol=1e-14)
    np.testing.assert_allclose(_arr(fw, "Theta"), (0.4 + 0.7 * G)[None], rtol=1e-14)
    for name in ("G1", "H1") + FOUR:
        assert _arr(fw, name).shape[0] == 1 and np.all(_arr(fw, name) == 0.0), name
    ens = em.sample_ensemble(net, x, 400, 0, statistics=("metric", "ntk"), progress=False)
    est = em.metric(ens)
    assert np.all(np.abs(est.value[0] - (0.2 + 1.3 * G)) <= 5 * est.stderr)
    np.testing.assert_allclose(em.ntk_mean(ens).value, 0.4 + 0.7 * G, rtol=1e-12)  # exact at depth 1


@pytest.mark.parametrize("widths", [[64, 1, 64], [1, 64, 64], [64, 64, 1]])
def test_one_very_narrow_layer_deep_linear(widths):
    """Deep linear, C_b = 0, widths n_1..n_{L-1}: the first-order connected four-point function at layer l is
    V^(l)/n_{l-1} = C_W^(2(l-1)) (K13 K24 + K14 K23) sum_{k<l} 1/n_k (docs/theory.md's V recursion with
    r_l = n_l/n_{l-1}, unrolled by hand)."""
    C_W = 1.3
    x = np.stack([XA, XB])
    fw = et.finite_width(et.MLP(4, widths, "linear", C_W=C_W, C_b=0.0), x)
    pred = fw.at_width()
    K1 = _arr(fw, "K")[0]
    S = np.einsum("ac,bd->abcd", K1, K1) + np.einsum("ad,bc->abcd", K1, K1)
    for l in range(2, 5):
        expected = C_W ** (2 * (l - 1)) * S * sum(1.0 / n for n in widths[: l - 1])
        np.testing.assert_allclose(np.asarray(pred.four_point)[l - 1], expected, rtol=1e-12)


def test_one_very_narrow_layer_nonlinear_and_sampled():
    net = et.MLP(3, [32, 1], "relu", C_W=1.2, C_b=0.1, output_width=2)
    x = np.stack([XA, XB])
    fw = et.finite_width(net, x)
    for name in TWO + FOUR:
        assert np.all(np.isfinite(_arr(fw, name))), name
    ens = em.sample_ensemble(net, x, 32, 0, statistics=("four_point",), progress=False)
    fp = em.four_point(ens).value
    assert np.all(np.isnan(fp[1])) and np.all(np.isfinite(fp[0])) and np.all(np.isfinite(fp[2]))
    assert np.all(np.isfinite(em.metric(ens).value))


# ------------------------------------------------------------------------------------------ singular kernels
@pytest.mark.parametrize("activation", ["relu", pytest.param("tanh", marks=pytest.mark.physics)])  # tanh: slow
def test_nearly_identical_inputs_approach_the_duplicate_continuously(activation):
    """x and x + eps e: as eps -> 0 the kernel goes singular (1 - rho ~ eps^2 crosses the rank cut-off
    near eps ~ 1e-6); every tensor must approach the duplicate-input one linearly in eps, with no blow-up
    where Sigma^-1 is huge and no jump where the marginal drops a dimension."""
    net = et.MLP(3, 8, activation, C_W=1.7, C_b=0.2)
    e = RNG.normal(size=XA.size)
    dup = et.finite_width(net, np.stack([XA, XA]))

    def dist(eps):
        fw = et.finite_width(net, np.stack([XA, XA + eps * e]))
        return {n: float(np.max(np.abs(_arr(fw, n) - _arr(dup, n)))) / _scale(dup, n) for n in TWO + FOUR}

    base = dist(1e-3)
    for eps in ((1e-6,) if activation == "tanh" else (1e-5, 1e-6, 1e-7, 1e-9)):
        d = dist(eps)
        for n in TWO + FOUR:
            assert d[n] <= 10 * base[n] * eps / 1e-3 + 1e-10, (n, eps, d[n], base[n])


def test_kernel_singular_during_the_recursion():
    """Ordered phase: C_W = 1 in layer 1 (rho = -0.35), then C_W = 1e-6, C_b = 1, so 1 - rho falls to 5e-7 at
    layer 2 and 2e-13 at layer 3, below the rank cut-off: layer 3 runs on a singular marginal.  There K, Theta
    and the source-dominated V, A, B, D, F must agree with the duplicate-input computation to O(C_W) = 1e-6
    (their memory of layer 1 enters multiplied by C_W^2); everything stays finite and symmetric."""
    net = et.MLP(3, 8, "tanh", C_W=[1.0, 1e-6, 1e-6], C_b=[0.0, 1.0, 1.0])
    fw = et.finite_width(net, np.stack([XA, XB]))
    dup = et.finite_width(net, np.stack([XA, XA]))
    K3 = _arr(fw, "K")[2]
    assert 1 - K3[0, 1] / math.sqrt(K3[0, 0] * K3[1, 1]) < 1e-12
    for name in TWO + FOUR:
        assert np.all(np.isfinite(_arr(fw, name))), name
    for name, rtol in (("K", 1e-11), ("Theta", 1e-11), ("V", 1e-4), ("A", 1e-4), ("B", 1e-4), ("D", 1e-4),
                       ("F", 1e-4)):
        T, R = _arr(fw, name)[2], _arr(dup, name)[2]
        assert np.max(np.abs(T - R)) <= rtol * np.max(np.abs(R)), name
    np.testing.assert_allclose(_arr(fw, "V")[2], _arr(fw, "V")[2].transpose(2, 3, 0, 1), rtol=1e-12, atol=0)
