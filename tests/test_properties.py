"""Property-based checks over random inputs and hyperparameters (issue #8).

* every tensor has the symmetries of its definition (efftheory/theory/finite.py docstring, docs/theory.md):
  K, Theta, G1, H1 symmetric; V_(ab)(cd) = V_(ba)(cd) = V_(cd)(ab), A likewise; B_(ab)(cd) = B_(ba)(dc) = B_(cd)(ab)
  (the two NTK factors, and H_ij;ab = H_ji;ba); D_abcd = D_bacd = D_abdc; F_abcd = F_cdab;
* positive semi-definiteness: K, Theta; V (an N^2 x N^2 matrix, a covariance by its recursion:
  V' = C_W^2 cov[ss, ss] + r R V R^T) and A_(12)(34) + B_(13)(24) + B_(14)(23) = n Cov(H_ii;12, H_ii;34);
* closed-form and generic paths agree (erf and sin through a plain callable);
* permuting the inputs permutes every tensor;
* the empirical module in float32 agrees with float64 within float32's rounding.

finite_width runs on N <= 3 inputs and depth <= 3 (its 3-/4-input integrals are the slow part).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import efftheory as et
from efftheory import empirical as em

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLOSED = ["relu", "erf", "sin", "abs", "linear", "leaky_relu(0.3)"]


def _inputs(seed, N, n0, scale):
    return scale * np.random.default_rng(seed).normal(size=(N, n0))


hyper = st.fixed_dictionaries({
    "C_W": st.floats(0.3, 2.5), "C_b": st.floats(0.0, 1.0), "lambda_W": st.floats(0.1, 2.0),
    "lambda_b": st.floats(0.0, 1.0),
})
# n_0 >= 2: with n_0 = 1 all inputs are collinear, see test_anticollinear_inputs_keep_kernels_symmetric
inputs = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(2, 5), st.floats(0.1, 3.0))


def _sym(T, perm, rtol=1e-10):
    """T == T transposed by ``perm`` (of the entry axes; axis 0 is the layer), to ``rtol`` of max|T|: the pair
    (a, b) and the pair (b, a) are integrated separately, in differently ordered whitened coordinates
    (measured: 1e-11 for relu's G1 at rho = 0.99)."""
    P = np.transpose(T, (0,) + tuple(1 + p for p in perm))
    scale = max(float(np.max(np.abs(T))), 1e-300)
    return float(np.max(np.abs(T - P))) <= rtol * scale


def _psd(M, rtol=1e-9):
    M = 0.5 * (M + M.T)
    w = np.linalg.eigvalsh(M)
    return w.min() >= -rtol * max(abs(w).max(), 1e-300)


# ------------------------------------------------------------------------------------------ infinite width
@settings(max_examples=15, **SETTINGS)
@given(act=st.sampled_from(CLOSED + ["tanh"]), depth=st.integers(1, 4), hp=hyper, xs=inputs, perm_seed=st.integers(0, 99))
def test_kernels_symmetric_psd_and_permutation_covariant(act, depth, hp, xs, perm_seed):
    x = _inputs(*xs)
    net = et.MLP(depth, 8, act, **hp)
    inf = et.infinite_width(net, x)
    K, T = np.asarray(inf.K), np.asarray(inf.Theta)
    assert K.shape == T.shape == (depth, x.shape[0], x.shape[0])
    assert _sym(K, (1, 0)) and _sym(T, (1, 0))
    for l in range(depth):
        assert _psd(K[l]) and _psd(T[l]), l
    p = np.random.default_rng(perm_seed).permutation(x.shape[0])
    inf_p = et.infinite_width(net, x[p])
    np.testing.assert_allclose(np.asarray(inf_p.K), K[:, p][:, :, p], rtol=1e-12, atol=1e-14 * np.abs(K).max())
    np.testing.assert_allclose(np.asarray(inf_p.Theta), T[:, p][:, :, p], rtol=1e-12, atol=1e-14 * np.abs(T).max())


def test_anticollinear_inputs_keep_kernels_symmetric():
    """1-d inputs of opposite sign: rho = -1 +- 1 ulp, where relu's arc-cosine dnngp = (pi - arccos rho)/(2 pi)
    turns an ulp into 2e-9 (square-root amplification); the (a, b) and (b, a) entries must still agree, and
    Theta^(2)_12 = lambda_b exactly (measured at 387e7a0's closed form: 1.0000000023 against 1.0)."""
    x = np.array([[0.6301626980296902], [0.1944156730403207], [-0.41208318437496066]])
    inf = et.infinite_width(et.MLP(2, 1, "relu", C_W=1.0, C_b=0.0, lambda_W=0.5, lambda_b=1.0), x)
    T, K = np.asarray(inf.Theta)[1], np.asarray(inf.K)[1]
    np.testing.assert_array_equal(T, T.T)
    np.testing.assert_array_equal(K, K.T)
    np.testing.assert_allclose(T[1, 2], 1.0, rtol=1e-13)


def _erf(z):
    return jsp.erf(z)


def _sin(z):
    return jnp.sin(z)


@settings(max_examples=6, **SETTINGS)
@given(which=st.sampled_from(["erf", "sin"]), hp=hyper,
       xs=st.tuples(st.integers(0, 2**32 - 1), st.just(3), st.integers(2, 5), st.floats(0.3, 2.0)))
def test_closed_form_and_generic_paths_agree_infinite(which, hp, xs):
    x, depth = _inputs(*xs), 3
    closed = et.infinite_width(et.MLP(depth, 8, which, **hp), x)
    generic = et.infinite_width(et.MLP(depth, 8, {"erf": _erf, "sin": _sin}[which], **hp), x)
    for name in ("K", "Theta"):
        a, b = np.asarray(getattr(closed, name)), np.asarray(getattr(generic, name))
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-10 * np.abs(a).max(), err_msg=name)


# ------------------------------------------------------------------------------------------ finite width
def _check_finite_symmetries(fw):
    """Each tensor against its natural size (K for G1, Theta for H1, K^2 for V, Theta^2 for A, B, K Theta for
    D, F), so that a tensor that is nearly zero (H1 in the ordered phase) is not held to its own rounding."""
    k, t = (float(np.max(np.abs(np.asarray(a)))) for a in (fw.K, fw.Theta))
    size = {"K": k, "Theta": t, "G1": k, "H1": t, "V": k * k, "A": t * t, "B": t * t, "D": k * t, "F": k * t}

    def sym(name, perm):
        T = np.asarray(getattr(fw, name))
        P = np.transpose(T, (0,) + tuple(1 + p for p in perm))
        return float(np.max(np.abs(T - P))) <= 1e-10 * max(size[name], float(np.max(np.abs(T))))

    for name in ("K", "Theta", "G1", "H1"):
        assert sym(name, (1, 0)), name
    for name in ("V", "A"):
        assert sym(name, (1, 0, 2, 3)) and sym(name, (0, 1, 3, 2)) and sym(name, (2, 3, 0, 1)), name
    assert sym("B", (1, 0, 3, 2)) and sym("B", (2, 3, 0, 1)), "B"
    assert sym("D", (1, 0, 2, 3)) and sym("D", (0, 1, 3, 2)), "D"
    assert sym("F", (2, 3, 0, 1)), "F"


def _check_finite_psd(fw, rtol=1e-9):
    N = fw.K.shape[1]
    V, A, B = (np.asarray(t) for t in (fw.V, fw.A, fw.B))
    cov = A + B.transpose(0, 1, 3, 2, 4) + B.transpose(0, 1, 3, 4, 2)  # A_(12)(34) + B_(13)(24) + B_(14)(23)
    for l in range(V.shape[0]):
        assert _psd(V[l].reshape(N * N, N * N), rtol), ("V", l)
        assert _psd(cov[l].reshape(N * N, N * N), rtol), ("A + B + B", l)
        assert _psd(np.asarray(fw.K)[l]) and _psd(np.asarray(fw.Theta)[l])


@settings(max_examples=5, **SETTINGS)
@given(act=st.just("relu"), depth=st.integers(2, 3), hp=hyper,
       xs=st.tuples(st.integers(0, 2**32 - 1), st.integers(2, 3), st.integers(2, 4), st.floats(0.2, 2.0)),
       widths=st.lists(st.integers(1, 64), min_size=2, max_size=2), perm_seed=st.integers(0, 99))
def test_finite_width_symmetries_psd_and_permutations(act, depth, hp, xs, widths, perm_seed):
    """Homogeneous activations: cheap enough to explore many hyperparameters.  Two inputs run on the exact
    polar rule (PSD to rounding); three inputs need the 3-/4-input rules, which for a kink converge only
    algebraically (~1e-3 of an entry, see test_degenerate), so PSD is asked to 1e-4 there."""
    x = _inputs(*xs)
    net = et.MLP(depth, widths[: depth - 1], act, **hp)
    fw = et.finite_width(net, x)
    _check_finite_symmetries(fw)
    _check_finite_psd(fw, 1e-9 if x.shape[0] == 2 else 1e-4)
    p = np.random.default_rng(perm_seed).permutation(x.shape[0])
    fp = et.finite_width(net, x[p])
    for name in ("K", "Theta", "G1", "H1", "V", "A", "B", "D", "F"):
        T = np.asarray(getattr(fw, name))
        idx = (slice(None),) + np.ix_(*([p] * (T.ndim - 1)))
        np.testing.assert_allclose(np.asarray(getattr(fp, name)), T[idx], rtol=1e-10,
                                   atol=1e-12 * max(np.abs(T).max(), np.abs(np.asarray(fw.K)).max() ** 2),
                                   err_msg=name)


@pytest.mark.physics  # slow (a 3-/4-input integral per example): runs in CI's second step, `make physics`
@settings(max_examples=3, **SETTINGS)
@given(act=st.sampled_from(["tanh", "erf"]), hp=hyper,
       xs=st.tuples(st.integers(0, 2**32 - 1), st.just(2), st.integers(1, 4), st.floats(0.3, 1.5)))
def test_finite_width_smooth_activations_symmetric_and_psd(act, hp, xs):
    fw = et.finite_width(et.MLP(3, 16, act, **hp), _inputs(*xs))
    _check_finite_symmetries(fw)
    _check_finite_psd(fw)


def test_closed_form_and_generic_paths_agree_finite():
    """The finite-width tensors need only the pair operators of sigma, never its closed-form kernels, but the
    K and Theta they start from do: erf through the registry and through a plain callable agree."""
    x = _inputs(7, 2, 3, 0.8)
    kw = dict(C_W=1.4, C_b=0.1)
    closed = et.finite_width(et.MLP(3, 16, "erf", **kw), x)
    generic = et.finite_width(et.MLP(3, 16, _erf, **kw), x)
    for name in ("K", "Theta", "G1", "H1", "V", "A", "B", "D", "F"):
        a, b = np.asarray(getattr(closed, name)), np.asarray(getattr(generic, name))
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-9 * max(np.abs(a).max(), 1e-300), err_msg=name)


# ------------------------------------------------------------------------------------------ empirical
@settings(max_examples=3, **SETTINGS)
@given(act=st.sampled_from(["relu", "tanh", "gelu"]), depth=st.integers(1, 4), width=st.sampled_from([4, 16, 64]),
       hp=st.fixed_dictionaries({"C_W": st.sampled_from([0.5, 1.0, 2.0]), "C_b": st.sampled_from([0.0, 0.3])}),
       xs=st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 5), st.floats(0.3, 2.0)),
       seed=st.integers(0, 2**31 - 1))
def test_float32_and_float64_networks_agree(act, depth, width, hp, xs, seed):
    """One network, its float64 parameters rounded to float32: preactivations and the exact NTK agree to
    |f32 - f64| <= 2e-5 max|f64| (float32's 6e-8 rounding, grown by sums over <= 64 fan-in and 4 layers)."""
    x = _inputs(*xs)
    net = et.MLP(depth, width, act, output_width=2, **hp)
    p64 = em.init_params(net, jax.random.PRNGKey(seed), x.shape[1], dtype="float64")
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p64)
    z64, z32 = em.apply_all(net, p64, x), em.apply_all(net, p32, x)
    for l, (a, b) in enumerate(zip(z64, z32)):
        assert b.dtype == jnp.float32
        assert np.max(np.abs(np.asarray(b, np.float64) - np.asarray(a))) <= 2e-5 * np.max(np.abs(a)) + 1e-30, l
    H64, H32 = np.asarray(em.ntk_full(net, p64, x)), np.asarray(em.ntk_full(net, p32, x), np.float64)
    assert np.max(np.abs(H32 - H64)) <= 2e-5 * np.max(np.abs(H64)) + 1e-30


@pytest.mark.physics  # sampled ensembles: runs in CI's second step, `make physics`
def test_float32_and_float64_ensembles_agree_statistically():
    """The two dtypes draw different networks (draws in their own dtype), so their ensemble estimates agree
    within the combined standard errors (5 sigma, every entry of the metric and the four-point function)."""
    net = et.MLP(2, 16, "tanh", C_W=1.2, C_b=0.1)
    x = _inputs(3, 2, 4, 1.0)
    kw = dict(statistics=("four_point",), progress=False)
    e32 = em.sample_ensemble(net, x, 600, 0, dtype="float32", **kw)
    e64 = em.sample_ensemble(net, x, 600, 0, dtype="float64", **kw)
    assert e32.stats["zz"].dtype == np.float32 and e64.stats["zz"].dtype == np.float64
    for est in (em.metric, em.four_point_same_neuron):
        a, b = est(e32), est(e64)
        z = np.abs(a.value - b.value) / np.sqrt(a.stderr**2 + b.stderr**2)
        assert np.all(z <= 5), (est.__name__, float(np.max(z)))
