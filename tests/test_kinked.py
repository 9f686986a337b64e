"""Three- and four-input Gaussian moments of kinked activations (efftheory.products, efftheory._orthant)
against references computed differently:

* a nested Gauss-Legendre rule in the preactivations themselves over each sign orthant, where the kinks
  are the faces of the domain and the integrand is analytic inside (panels graded toward the faces,
  the last variable in closed form: truncated moments of a shifted normal);
* closed forms for orthogonal inputs (products of one-dimensional half-moments);
* the identities leaky_relu(a)(z) = relu(z) - a relu(-z) and |z| = relu(z) + relu(-z) (with their
  derivatives), which turn the leaky_relu and abs moments into relu moments of sign-flipped kernels.

Errors are measured relative to the natural scale of an entry, prod_i sqrt(K_ii)^(number of sigma
factors on input i).
"""

from __future__ import annotations

import itertools
import math
import warnings
from math import comb

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

import efftheory as et
from efftheory.gaussian import _orthant
from efftheory.gaussian import _sources as sources

KINDS = {"ss": (0, 0, 0, 0), "ds": (1, 1, 0, 0), "dd": (1, 1, 1, 1)}
SLOPES = {"relu": (1.0, 0.0), "leaky_relu(0.2)": (1.0, 0.2), "abs": (1.0, -1.0)}


# ----------------------------------------------------------------------------------------- reference
def _panels(lo, hi, npts, levels):
    x, w = np.polynomial.legendre.leggauss(npts)
    npan = 16  # panels of 1.5 standard deviations over 24, the first graded toward lo
    edges = np.concatenate([[0.0], 2.0 ** -np.arange(levels, 0, -1), np.arange(1, npan + 1)]) / npan
    a, b = edges[:-1], edges[1:]
    t = ((a + b)[:, None] / 2 + (b - a)[:, None] / 2 * x).reshape(-1)
    wt = ((b - a)[:, None] / 2 * w).reshape(-1)
    lo, hi = np.asarray(lo)[..., None], np.asarray(hi)[..., None]
    return lo + (hi - lo) * t, (hi - lo) * wt


def reference_orthant(S, ms, npts=6, levels=10):
    """E[y^m 1{y > 0}], y ~ N(0, S), for each m in ms: nested quadrature over y_1 .. y_{k-1} > 0 in the
    order that leaves the most independent variable innermost, y_k | rest in closed form."""
    S = np.asarray(S, float)
    k = S.shape[0]
    order, rest = [], list(range(k))
    while rest:
        def rel(j):
            o = [i for i in rest if i != j]
            v = S[j, j] - (S[j, o] @ np.linalg.solve(S[np.ix_(o, o)], S[o, j]) if o else 0.0)
            return v / S[j, j]
        best = max(rest, key=rel)
        order.insert(0, best)
        rest.remove(best)
    P = S[np.ix_(order, order)]
    coef, sd = [np.zeros(0)], [math.sqrt(P[0, 0])]
    for t in range(1, k):
        b = np.linalg.solve(P[:t, :t], P[:t, t])
        coef.append(b)
        sd.append(math.sqrt(P[t, t] - P[:t, t] @ b))
    Y, W = [], np.ones(())
    for t in range(k - 1):
        mu = sum(coef[t][i] * Y[i] for i in range(t)) if t else np.zeros(())
        lo, hi = np.maximum(mu - 12 * sd[t], 0.0), np.maximum(mu + 12 * sd[t], 0.0)
        x, w = _panels(lo, hi, npts, levels)
        dens = np.exp(-0.5 * ((x - np.asarray(mu)[..., None]) / sd[t]) ** 2) / (sd[t] * math.sqrt(2 * math.pi))
        Y = [y[..., None] * np.ones(x.shape) for y in Y] + [x]
        W = W[..., None] * w * dens
    mu = sum(coef[k - 1][i] * Y[i] for i in range(k - 1))
    s = sd[k - 1]
    a = mu / s
    phi = np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    J = [ndtr(a), phi]  # int_{-a}^inf x^p phi(x) dx
    for p in range(2, 5):
        J.append((-a) ** (p - 1) * phi + (p - 1) * J[p - 2])
    out = []
    for m in ms:
        m = [m[i] for i in order]
        f = W.copy()
        for i in range(k - 1):
            f = f * Y[i] ** m[i]
        inner = sum(comb(m[-1], p) * mu ** (m[-1] - p) * s ** p * J[p] for p in range(m[-1] + 1))
        out.append(float(np.sum(f * inner)))
    return np.array(out)


def reference_pattern(K, idx, kinds, slopes, **kw):
    """<prod_s f_s(z_{idx_s})>, f = sigma (kind 0) or sigma' (kind 1), sigma = c+ z / c- z, split over the
    sign orthants of the distinct inputs, each orthant integrated by reference_orthant."""
    cp, cm = slopes
    uniq = sorted(set(idx))
    S = K[np.ix_(uniq, uniq)]
    e = np.zeros((len(uniq), 2), int)
    for a, kind in zip(idx, kinds):
        e[uniq.index(a), kind] += 1
    m = tuple(int(v) for v in e[:, 0])
    total = 0.0
    for s in itertools.product((1, -1), repeat=len(uniq)):
        coef = 1.0
        for i, si in enumerate(s):
            coef *= (cp if si > 0 else cm) ** int(e[i].sum()) * si ** m[i]
        if coef != 0.0:
            D = np.array(s, float)
            total += coef * reference_orthant(S * D[:, None] * D[None], [m], **kw)[0]
    return total


def _scale(K, idx, kinds):
    return float(np.prod([math.sqrt(K[a, a]) for a, kind in zip(idx, kinds) if kind == 0]))


def _kernels():
    rng = np.random.default_rng(28)
    x = rng.normal(size=(4, 5))
    yield "random", x @ x.T / 5 + 0.1
    x = rng.normal(size=(4, 5))
    x[1] = x[0] + 1e-3 * rng.normal(size=5)  # nearly collinear: 1 - rho ~ 1e-7
    x[3] = -x[2] + 2e-2 * rng.normal(size=5)  # nearly opposite
    yield "near-collinear", x @ x.T / 5
    yield "orthogonal", np.diag([0.7, 1.3, 2.0, 0.4])


KERNELS = dict(_kernels())


def _entries(k):
    """Index tuples with k distinct inputs of each kind, among inputs 0..3."""
    pick = {3: [((0, 1, 2, 2), "ss"), ((1, 2, 0, 0), "ds"), ((0, 0, 1, 2), "ds"), ((0, 1, 2, 1), "dd")],
            4: [((0, 1, 2, 3), "ss"), ((0, 1, 2, 3), "ds"), ((2, 3, 0, 1), "ds"), ((0, 1, 2, 3), "dd")]}
    return pick[k]


# ----------------------------------------------------------------------------------------- moments
@pytest.mark.parametrize("geometry", list(KERNELS))
@pytest.mark.parametrize("name", list(SLOPES))
def test_three_input_moments_against_the_orthant_reference(name, geometry):
    K = KERNELS[geometry]
    M = dict(zip(KINDS, sources.source_moments(et.get_activation(name), K)))
    for idx, kind in _entries(3):
        ref = reference_pattern(K, idx, KINDS[kind], SLOPES[name])
        err = abs(M[kind][idx] - ref) / _scale(K, idx, KINDS[kind])
        assert err < 1e-9, (name, geometry, idx, kind, M[kind][idx], ref)


@pytest.mark.parametrize("geometry", ["random", "near-collinear"])
def test_four_input_relu_moments_against_the_orthant_reference(geometry):
    K = KERNELS[geometry]
    M = dict(zip(KINDS, sources.source_moments(et.get_activation("relu"), K)))
    S = K.copy()
    ms = [(1, 1, 1, 1), (0, 0, 1, 1), (1, 1, 0, 0), (0, 0, 0, 0)]
    ref = dict(zip(ms, reference_orthant(S, ms)))  # relu: only the positive orthant
    sd = np.sqrt(np.diag(K))
    checks = [(M["ss"][0, 1, 2, 3], ref[(1, 1, 1, 1)], np.prod(sd)),
              (M["ds"][0, 1, 2, 3], ref[(0, 0, 1, 1)], sd[2] * sd[3]),
              (M["ds"][2, 3, 0, 1], ref[(1, 1, 0, 0)], sd[0] * sd[1]),
              (M["dd"][0, 1, 2, 3], ref[(0, 0, 0, 0)], 1.0)]
    for got, want, scale in checks:
        assert abs(got - want) / scale < 1e-9, (geometry, got, want)


def _half_moment(p, v, sign):
    """E[z^p 1{sign z > 0}], z ~ N(0, v)."""
    return sign**p * v ** (p / 2) * 2 ** (p / 2) * math.gamma((p + 1) / 2) / (2 * math.sqrt(math.pi))


@pytest.mark.parametrize("name", list(SLOPES))
def test_four_orthogonal_inputs_factorise(name):
    K = KERNELS["orthogonal"]
    cp, cm = SLOPES[name]
    M = dict(zip(KINDS, sources.source_moments(et.get_activation(name), K)))
    for kind, kinds in KINDS.items():
        for idx in itertools.permutations(range(4)):
            want = 1.0
            for a, f in zip(idx, kinds):
                e0 = 1 - f
                want *= cp * _half_moment(e0, K[a, a], 1) + cm * _half_moment(e0, K[a, a], -1)
            assert abs(M[kind][idx] - want) / _scale(K, idx, kinds) < 1e-12, (name, kind, idx)


@pytest.mark.parametrize("geometry", ["random", "near-collinear"])
def test_four_input_leaky_relu_and_abs_from_relu_identities(geometry):
    """leaky_relu(a) = relu(z) - a relu(-z), leaky' = relu'(z) + a relu'(-z); |z| = relu(z) + relu(-z),
    |z|' = relu'(z) - relu'(-z): each 4-input moment is a sum of 16 relu moments of the kernel with
    inputs negated (relu(-z_i) is relu of the input -x_i), computed by the (reference-checked) relu path."""
    K = KERNELS[geometry]
    relu = et.get_activation("relu")
    flips = {}
    for s in itertools.product((1, -1), repeat=4):
        D = np.array(s, float)
        flips[s] = dict(zip(KINDS, sources.source_moments(relu, K * D[:, None] * D[None])))
    identities = {"leaky_relu(0.2)": ((1.0, -0.2), (1.0, 0.2)), "abs": ((1.0, 1.0), (1.0, -1.0))}
    for name, (sig_c, der_c) in identities.items():
        M = dict(zip(KINDS, sources.source_moments(et.get_activation(name), K)))
        for kind, kinds in KINDS.items():
            idx = (0, 1, 2, 3)
            want = 0.0
            for s in itertools.product((1, -1), repeat=4):
                c = 1.0
                for si, f in zip(s, kinds):
                    c *= (sig_c if f == 0 else der_c)[0 if si > 0 else 1]
                want += c * flips[s][kind][idx]
            assert abs(M[kind][idx] - want) / _scale(K, idx, kinds) < 1e-12, (name, geometry, kind)


def test_orthant_probabilities():
    """P4 (Plackett quadrature) sums to one over the 16 orthants, and equals the closed form for a
    block-diagonal correlation (two independent pairs: P2 P2) and for exchangeable correlation 1/2
    (P4 = 1/5)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6))
    R = x @ x.T
    d = np.sqrt(np.diag(R))
    R = R / d[:, None] / d[None]
    Rs = np.stack([R * np.outer(s, s) for s in itertools.product((1, -1), repeat=4)])
    p, e = _orthant.orthant_probability(Rs)
    assert abs(p.sum() - 1.0) < 1e-14 and np.all(e < 1e-14)
    B = np.eye(4)
    B[0, 1] = B[1, 0] = 0.6
    B[2, 3] = B[3, 2] = -0.3
    ex = np.full((4, 4), 0.5) + 0.5 * np.eye(4)
    p, e = _orthant.orthant_probability(np.stack([B, ex]))
    P2 = lambda r: 0.25 + math.asin(r) / (2 * math.pi)
    np.testing.assert_allclose(p, [P2(0.6) * P2(-0.3), 0.2], rtol=0, atol=1e-15)


def test_rank_three_sets_and_zero_inputs():
    """Four inputs in R^3 with C_b = 0 (every 4-set of rank 3), one of them zero and one a multiple of
    another: finite, and the orthant moments of the rank-3 sets add up to the Isserlis moments over the
    16 orthants; repeated inputs reproduce the smaller computation."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 3))
    x[4] = 0.0
    x[5] = 2.5 * x[1]
    K = x @ x.T / 3
    for name in SLOPES:
        out = sources.source_moments(et.get_activation(name), K)
        assert all(np.all(np.isfinite(a)) for a in out)
    S = K[:4, :4]
    for m in [(1, 1, 1, 1), (0, 0, 1, 1), (2, 0, 1, 1), (0, 0, 0, 0)]:
        tot = 0.0
        for s in itertools.product((1, -1), repeat=4):
            D = np.array(s, float)
            flipped = (S * D[:, None] * D[None])[None]
            tot += np.prod(D ** np.array(m)) * _orthant.truncated_moments(flipped, [m])[0][0, 0]
        idx = [i for i in range(4) for _ in range(m[i])]

        def wick(ix):
            return 1.0 if not ix else sum(S[ix[0], ix[t]] * wick(ix[1:t] + ix[t + 1:]) for t in range(1, len(ix)))

        assert abs(tot - wick(idx)) < 1e-13 * max(1.0, np.max(np.diag(S))) ** (sum(m) / 2), m
    Mss, Mds, Mdd = sources.source_moments(et.get_activation("leaky_relu(0.2)"), K)
    # input 5 = 2.5 x input 1: sigma(z5) = 2.5 sigma(z1), sigma'(z5) = sigma'(z1)
    assert abs(Mss[0, 1, 2, 5] - 2.5 * Mss[0, 1, 1, 2]) < 1e-13 * np.max(K) ** 2
    assert abs(Mdd[0, 1, 2, 5] - Mdd[0, 1, 1, 2]) < 1e-13
    assert Mss[0, 1, 2, 4] == 0.0  # input 4 = 0: sigma(0) = 0
    # and sigma'(0) as the rules evaluate it; relu' is 0 or 1, so relu'(z2) = relu'(z2)^2
    relu = et.get_activation("relu")
    d0 = float(relu.derivative(jnp.asarray(0.0)))
    _, _, Rdd = sources.source_moments(relu, K)
    assert abs(Rdd[0, 1, 2, 4] - d0 * Rdd[0, 1, 2, 2]) < 1e-13


def test_homogeneous_callables_take_the_exact_route():
    """A user callable detected as positively homogeneous (Activation.homogeneous) is integrated like the
    registered activation, whatever its smooth flag: same values, bit for bit.  (The homogeneity probe is
    numerical and cached per callable, so it is asked in 64-bit mode, as efftheory's public functions do.)"""
    from efftheory._precision import enable_x64

    K = KERNELS["random"]
    ref = sources.source_moments(et.get_activation("leaky_relu(0.2)"), K)
    for act in (et.get_activation(lambda z: jnp.where(z > 0, z, 0.2 * z)),
                et.Activation("mine", lambda z: jnp.maximum(z, 0.2 * z), smooth=False)):
        with enable_x64(True):
            assert act.homogeneous
        for a, b in zip(sources.source_moments(act, K), ref):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------- tol
def test_tol_is_met_or_reported():
    """The exact route meets tol = 1e-9 silently, and reports a tol below rounding with an
    AccuracyWarning naming the sets; a kinked sigma that is not homogeneous (clip) is integrated by the
    isotropic rule, whose error estimate (from a coarser rule) is reported when it misses tol, and
    bounds its actual error (against a 192^3 rule)."""
    K = KERNELS["random"][:3, :3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sources.source_moments(et.get_activation("relu"), K, tol=1e-9)
    with pytest.warns(sources.AccuracyWarning, match=r"tol: \d+ of 1 sets of 3 inputs of relu miss tol = 1\.0e-18"):
        sources.source_moments(et.get_activation("relu"), K, tol=1e-18)
    clip = et.Activation("clip", lambda z: jnp.clip(z, -1.0, 1.0), smooth=False)
    with pytest.warns(sources.AccuracyWarning, match=r"of clip miss tol .*estimated error up to") as rec:
        got = sources.source_moments(clip, K, tol=1e-9)
    est = float(str(rec[0].message).split("estimated error up to ")[1].split(",")[0])
    S = K[None]
    L, _ = sources._eigen_factor(S)
    patterns, plan = sources._pattern_table(3)
    fine = sources._eval_sets(clip.fn, patterns, L, [(("kink", 192),) * 3])
    for name, m, pid in plan:
        actual = abs(dict(zip(KINDS, got))[name][tuple(m)] - fine[0, pid])
        assert actual <= est, (name, m, actual, est)


# ----------------------------------------------------------------------------------------- regression
def test_relu_three_input_ntk_covariance_regression():
    """n Cov(Theta_02, Theta_11) at the output of a ReLU network at criticality, depth 4, on the three
    inputs of tests/test_finite_physics.py (a pair at cosine 0.99).  Stored value 24.5348839549: the
    same finite_width with the three-input moments from the nested reference rule above instead of the
    orthant route gave 24.5348839549 (every entry within 3e-14).  The former isotropic trapezoid rules
    gave 23.70 (96^3), 24.24 (192^3) and 24.47 (384^3)."""
    X = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.8], [0.93, 0.42, -0.43]])
    net = et.MLP(4, 16, "relu", C_W=2.0, C_b=0.0, output_width=2)
    cov = np.asarray(et.finite_width(net, X).at_width(1.0).ntk_cov)[-1]  # Cov at n = 1: n Cov
    assert abs(cov[0, 2, 1, 1] - 24.5348839549) < 1e-8 * 24.53, cov[0, 2, 1, 1]
    assert abs(cov[1, 1, 0, 2] - cov[0, 2, 1, 1]) < 1e-12 * 24.53
