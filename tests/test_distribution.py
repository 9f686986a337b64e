"""The first-order output distribution (efftheory.theory.distribution, docs/distribution.md): normalisation and
moments by quadrature, deep linear and ReLU networks against their exact finite-width laws, and the
sampled-comparison tools of efftheory.empirical.distribution at small sizes (the width sweep is in
test_distribution_physics.py)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, signal, special, stats

import efftheory as et
from efftheory.empirical import distribution as ed
from efftheory.theory.distribution import edgeworth_logpdf, output_distribution

X2 = np.array([[1.0, 0.5], [0.3, -1.2]])


# ---------------------------------------------------------------------------------------------
# independent references


def exact_single_input_cdf(z, K, n, L, kind):
    """CDF of one output neuron on one input of a deep linear (C_W = 1) or critical ReLU (C_W = 2) network of
    depth L and hidden width n, with no expansion in 1/n.

    With one input and C_b = 0 the layer-L neuron is N(0, G_L) given the layer below and
    G_{l+1} = (C_W / n) sum_j sigma(z_j)^2 with z_j iid N(0, G_l): G_{l+1} = G_l X / n with X ~ chi^2_n
    (linear) or G_l 2 X / n with X ~ chi^2_B, B ~ Binomial(n, 1/2) (relu; B = 0 gives G = 0, an atom of the
    output at 0).  So log(G_L / K) is a sum of L - 1 iid terms: its density is an (L-2)-fold convolution
    (FFT on a grid), and F(z) = E[Phi(z / sqrt(G_L))] by the trapezoid rule.
    """
    dt, lo, hi = 0.004, -30.0, 8.0
    t = np.arange(lo, hi, dt)

    def log_chi2(y, k):
        return np.exp(k / 2 * y - np.exp(y) / 2 - k / 2 * np.log(2) - special.gammaln(k / 2))

    if kind == "relu":
        f = sum(stats.binom.pmf(b, n, 0.5) * log_chi2(t + np.log(n / 2), b) for b in range(1, n + 1))
        atom = 0.5 ** n
    else:
        f, atom = log_chi2(t + np.log(n), n), 0.0
    g, off = f.copy(), t[0]
    for _ in range(L - 2):
        g = signal.fftconvolve(g, f) * dt
        off = off + t[0]
        tt = off + dt * np.arange(len(g))
        keep = (tt >= lo) & (tt <= hi)
        g, off = g[keep], tt[keep][0]
    tt = off + dt * np.arange(len(g))
    p0 = 1 - (1 - atom) ** (L - 1)
    Z = np.asarray(z, np.float64)[:, None]
    F = np.trapezoid(g[None, :] * special.ndtr(Z * np.exp(-tt[None, :] / 2) / math.sqrt(K)), tt, axis=1)
    return F + p0 * (np.asarray(z) >= 0)


def hermite_rule(order=60):
    """Nodes and weights for int f(u) exp(-u^2/2) du (probabilists' Gauss-Hermite)."""
    return np.polynomial.hermite_e.hermegauss(order)


def quad_moments(dist, order=60):
    """Integral, second moments and fourth moments of dist.pdf over R^D by a tensor Gauss-Hermite rule in
    whitened coordinates (exact for polynomial x Gaussian integrands of degree < 2 order)."""
    D = dist.dim
    cov = np.kron(np.eye(dist.neurons), np.asarray(dist.covariance))
    Lc = np.linalg.cholesky(cov)
    g, w = hermite_rule(order)
    grids = np.meshgrid(*([g] * D), indexing="ij")
    wv = np.stack([G.ravel() for G in grids], 1)
    W = np.prod(np.meshgrid(*([w] * D), indexing="ij"), axis=0).ravel()
    z = wv @ Lc.T
    zin = z if dist.neurons == 1 else z.reshape(-1, dist.neurons, dist.n_inputs)
    p = np.asarray(dist.pdf(zin))
    f = W * p * np.exp(0.5 * np.sum(wv ** 2, 1)) * np.linalg.det(Lc)
    return f.sum(), np.einsum("p,pa,pb->ab", f, z, z), np.einsum("p,pa,pb,pc,pd->abcd", f, z, z, z, z)


@pytest.fixture(scope="module")
def tanh_fw():
    return et.finite_width(et.MLP(4, 16, "tanh", C_W=1.0), X2)


@pytest.fixture(scope="module")
def relu_fw():
    return et.finite_width(et.MLP(4, 16, "relu", C_W=2.0), X2)


# ---------------------------------------------------------------------------------------------
# normalisation and moments


@pytest.mark.parametrize("which", ["tanh", "relu"])
def test_one_and_two_inputs_integrate_to_one_with_the_predicted_moments(which, tanh_fw, relu_fw):
    fw = tanh_fw if which == "tanh" else relu_fw
    d = output_distribution(None, width=8, finite=fw)
    Sigma = np.asarray(fw.K)[-1] + np.asarray(fw.G1)[-1] / 8   # numpy: JAX's 64-bit mode may be off here
    V = np.asarray(fw.V)[-1] / 8
    kappa = V + V.transpose(0, 2, 1, 3) + np.einsum("adbc->abcd", V)
    for inputs in ([0], [1], [0, 1]):
        m = d.marginal(inputs)
        I0, M2, M4 = quad_moments(m)
        ix = np.ix_(inputs, inputs)
        S = Sigma[ix]
        wick = np.einsum("ab,cd->abcd", S, S) + np.einsum("ac,bd->abcd", S, S) + np.einsum("ad,bc->abcd", S, S)
        assert abs(I0 - 1) < 1e-12
        np.testing.assert_allclose(M2, S, atol=1e-13)
        np.testing.assert_allclose(M4 - wick, kappa[np.ix_(inputs, inputs, inputs, inputs)], atol=1e-12)
        assert np.max(np.abs(kappa)) > 1e-3  # a nonzero cumulant was tested


def test_two_neurons_correlate_through_V(tanh_fw):
    d = output_distribution(None, width=8, finite=tanh_fw).marginal([0]).joint(2)
    I0, M2, M4 = quad_moments(d)
    s2 = float(np.asarray(tanh_fw.K)[-1, 0, 0] + np.asarray(tanh_fw.G1)[-1, 0, 0] / 8)
    v = float(np.asarray(tanh_fw.V)[-1, 0, 0, 0, 0]) / 8
    assert abs(I0 - 1) < 1e-12
    np.testing.assert_allclose(M2, s2 * np.eye(2), atol=1e-13)
    assert abs(M4[0, 0, 1, 1] - s2 * s2 - v) < 1e-13          # connected E[z1^2 z2^2] = V/n
    assert abs(M4[0, 0, 0, 0] - 3 * s2 * s2 - 3 * v) < 1e-13  # connected E[z1^4] = 3V/n
    assert abs(M4[0, 0, 0, 1]) < 1e-13                        # odd in each neuron


def test_two_neurons_on_two_inputs_normalised(tanh_fw):
    d = output_distribution(None, width=16, finite=tanh_fw, neurons=2)
    I0, M2, M4 = quad_moments(d, order=20)
    assert abs(I0 - 1) < 1e-12
    np.testing.assert_allclose(M2, np.kron(np.eye(2), np.asarray(d.covariance)), atol=1e-13)
    V = np.asarray(tanh_fw.V)[-1] / 16
    # neuron 1 inputs (a, b), neuron 2 inputs (c, d): flattened index i*2 + a
    S = np.asarray(d.covariance)
    for a, b, c, e in [(0, 1, 0, 1), (0, 0, 1, 1), (0, 1, 1, 1)]:
        conn = M4[a, b, 2 + c, 2 + e] - S[a, b] * S[c, e]
        assert abs(conn - V[a, b, c, e]) < 1e-13


def test_moment_properties_match_at_width(tanh_fw):
    for n in (8, 64):
        d = output_distribution(None, width=n, finite=tanh_fw, layer=3)
        pred = tanh_fw.at_width(n)
        np.testing.assert_allclose(d.covariance, np.asarray(pred.metric)[2], rtol=1e-14)
        np.testing.assert_allclose(d.cross_connected_fourth, np.asarray(pred.four_point)[2], rtol=1e-14)
        assert d.layer == 3 and float(d.n) == n


def test_layer_one_is_exactly_gaussian(tanh_fw):
    d = output_distribution(None, width=8, finite=tanh_fw, layer=1)
    z = np.random.default_rng(0).standard_normal((50, 2))
    np.testing.assert_allclose(d.pdf(z), d.gaussian_pdf(z, corrected=False), rtol=1e-14)


def test_finite_width_is_computed_when_not_given():
    net = et.MLP(3, 16, "tanh", C_W=1.0)
    d = output_distribution(net, X2, width=32)
    fw = et.finite_width(net, X2)
    np.testing.assert_allclose(d.covariance, np.asarray(fw.K)[-1] + np.asarray(fw.G1)[-1] / 32, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# deep linear: the exact fourth moment


@pytest.mark.parametrize("L", [2, 4, 7])
def test_deep_linear_fourth_moment(L):
    net = et.MLP(L, 16, "linear", C_W=1.0)
    x = np.array([[1.3]])
    fw = et.finite_width(net, x)
    for n in (4, 16, 64):
        d = output_distribution(None, width=n, finite=fw)
        I0, M2, M4 = quad_moments(d)
        ratio = M4[0, 0, 0, 0] / (3 * M2[0, 0] ** 2)
        assert abs(ratio - (1 + 2 * (L - 1) / n)) < 1e-12    # first order: 1 + V/(n K^2) = 1 + 2(l-1)/n
        exact = (1 + 2 / n) ** (L - 1)                       # PDLT: exact at any width
        remainder = sum(math.comb(L - 1, j) * (2 / n) ** j for j in range(2, L))
        assert abs(exact - ratio - remainder) < 1e-12        # they differ exactly by the O(1/n^2) terms


# ---------------------------------------------------------------------------------------------
# exact finite-width laws: the first-order density is closer, and its error falls like 1/n^2


@pytest.mark.parametrize("kind,act,CW", [("linear", "linear", 1.0), ("relu", "relu", 2.0)])
def test_ks_to_exact_law_falls_like_one_over_n_squared(kind, act, CW):
    L = 5
    x = np.array([[0.8]])
    fw = et.finite_width(et.MLP(L, 16, act, C_W=CW), x)
    widths = np.array([16, 64, 256, 512])
    ks1, ksg = [], []
    for n in widths:
        d = output_distribution(None, width=int(n), finite=fw)
        s = math.sqrt(float(d.covariance[0, 0]))
        z = np.linspace(-8 * s, 8 * s, 2001)
        F = exact_single_input_cdf(z, float(d.K[0, 0]), int(n), L, kind)
        ks1.append(np.max(np.abs(F - np.asarray(d.cdf(z)))))
        ksg.append(np.max(np.abs(F - np.asarray(d.cdf(z, corrected_gaussian=True)))))
    ks1, ksg = np.array(ks1), np.array(ksg)
    assert np.all(ks1 < ksg / 2)
    slope1 = np.polyfit(np.log(widths[1:]), np.log(ks1[1:]), 1)[0]
    slopeg = np.polyfit(np.log(widths[1:]), np.log(ksg[1:]), 1)[0]
    assert abs(slope1 + 2) < 0.15, (slope1, ks1)
    assert abs(slopeg + 1) < 0.05, (slopeg, ksg)


# ---------------------------------------------------------------------------------------------
# one-input marginals: cdf, quantiles, intervals, positivity


def test_cdf_is_the_integral_of_the_pdf(tanh_fw):
    m = output_distribution(None, width=8, finite=tanh_fw).marginal(1)
    s = math.sqrt(float(m.covariance[0, 0]))
    for z in (-2 * s, -0.3 * s, 0.0, 1.1 * s, 3 * s):
        val, _ = integrate.quad(lambda t: float(m.pdf(np.array([t]))), -40 * s, z, epsabs=1e-13, epsrel=1e-12)
        assert abs(val - float(m.cdf(np.array(z)))) < 1e-10
    p = np.array([0.01, 0.2, 0.5, 0.9, 0.999])
    np.testing.assert_allclose(m.cdf(m.quantile(p)), p, atol=1e-12)
    lo, hi = m.interval(0.9)
    assert abs(float(m.cdf(np.array(hi)) - m.cdf(np.array(lo))) - 0.9) < 1e-12 and abs(lo + hi) < 1e-10
    # heavier tails than the Gaussian of the same variance (V > 0): the 99.9% interval is wider
    g = stats.norm(scale=s).ppf(0.9995)
    assert m.interval(0.999)[1] > g


def test_positivity_and_clipping():
    # a deep narrow tanh net: excess kurtosis > 4, so the first-order density goes negative
    net = et.MLP(8, 16, "tanh", C_W=1.0)
    x = np.array([[1.0]])
    fw = et.finite_width(net, x)
    d = output_distribution(None, width=4, finite=fw)
    gamma = float(d.excess_kurtosis[0])
    assert gamma > 4
    region = d.negative_region()
    assert len(region) == 2
    (a, b) = region[1]
    s2 = float(d.covariance[0, 0])
    # 1 + gamma He4(u)/24 = 0 at the ends, He4 by hand
    for zz in (a, b):
        u = zz / math.sqrt(s2)
        assert abs(1 + gamma * (u ** 4 - 6 * u ** 2 + 3) / 24) < 1e-10
    assert float(d.pdf(np.array([[(a + b) / 2]]))[0]) < 0
    assert not d.positive and d.min_factor() == pytest.approx(1 - gamma / 4, abs=1e-12)  # min He4 = -6
    lp = d.logpdf(np.array([[(a + b) / 2]]))
    assert np.isneginf(np.asarray(lp)).all()
    # clipped and renormalised: integrates to 1 (independent quadrature)
    t, w = np.polynomial.legendre.leggauss(300)
    val = 0.0
    for lo, hi in [(-30 * b, -b), (-b, -a), (-a, a), (a, b), (b, 30 * b)]:  # smooth on each piece
        zz = (hi + lo) / 2 + (hi - lo) / 2 * t
        val += (hi - lo) / 2 * np.sum(w * np.asarray(d.pdf(zz[:, None], clip=True)))
    assert abs(val - 1) < 1e-10
    assert float(d.clipped_mass()) > 1  # the negative mass removed
    # a wide net is positive
    assert output_distribution(None, width=64, finite=fw).positive
    # two-dimensional: min_factor on a grid is consistent with the density on random points
    d2 = output_distribution(None, width=64, finite=et.finite_width(et.MLP(6, 16, "relu", C_W=2.0), X2))
    z = np.random.default_rng(3).standard_normal((20000, 2)) * 3
    lg, c = edgeworth_logpdf(z, d2.covariance, d2.connected_fourth)
    assert float(np.min(1 + np.asarray(c))) >= d2.min_factor() - 1e-9


def test_logpdf_matches_pdf_and_is_jittable(tanh_fw):
    d = output_distribution(None, width=16, finite=tanh_fw)
    z = np.random.default_rng(1).standard_normal((30, 2)) * 0.4
    np.testing.assert_allclose(np.exp(d.logpdf(z)), d.pdf(z), rtol=1e-12)
    assert d.pdf(z).dtype == jnp.float64
    with jax.enable_x64(True):  # the user's own jit needs 64-bit mode (efftheory._precision)
        f = jax.jit(lambda z: d.pdf(z))
        np.testing.assert_allclose(f(jnp.asarray(z)), d.pdf(z), rtol=1e-13)
        g = jax.jit(edgeworth_logpdf)
        lg, c = g(jnp.asarray(z), d.covariance, d.connected_fourth)
        np.testing.assert_allclose(np.exp(lg) * (1 + c), d.pdf(z), rtol=1e-12)


def test_bad_arguments(tanh_fw):
    d = output_distribution(None, width=16, finite=tanh_fw)
    with pytest.raises(ValueError, match="^layer"):
        output_distribution(None, finite=tanh_fw, layer=5)
    with pytest.raises(ValueError, match="^layer"):
        output_distribution(None, finite=tanh_fw, layer=0)
    with pytest.raises(ValueError, match="^finite"):
        output_distribution(None, finite="nope")
    with pytest.raises(ValueError, match="^net"):
        output_distribution(None, None)
    with pytest.raises(ValueError, match="^net"):
        output_distribution(et.MLP(4, 16, "relu", C_W=2.0), finite=tanh_fw)
    with pytest.raises(ValueError, match="^x"):
        output_distribution(None, np.ones((3, 2)), finite=tanh_fw)
    with pytest.raises(ValueError, match="^width"):
        output_distribution(None, finite=tanh_fw, width=-3)
    with pytest.raises(ValueError, match="^neurons"):
        output_distribution(None, finite=tanh_fw, neurons=0)
    with pytest.raises(ValueError, match="^z"):
        d.pdf(np.ones((4, 3)))
    with pytest.raises(ValueError, match="^z"):
        d.joint(2).pdf(np.ones((4, 2)))
    with pytest.raises(ValueError, match="^inputs"):
        d.marginal([2])
    with pytest.raises(ValueError, match="^cdf"):
        d.cdf(np.zeros(3))
    with pytest.raises(ValueError, match="^p"):
        d.marginal(0).quantile(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="^x"):  # K + G1/n < 0 at n = 1 (deep tanh): no distribution
        output_distribution(None, width=1, finite=et.finite_width(et.MLP(8, 16, "tanh"), np.array([[1.0]]))).cdf(0.0)
    with pytest.raises(ValueError, match="^level"):
        d.marginal(0).interval(1.5)
    with pytest.raises(ValueError, match="^x"):
        output_distribution(None, finite=et.finite_width(et.MLP(3, 8, "tanh"), np.array([[1.0], [1.0]]))).pdf(
            np.zeros(2))


# ---------------------------------------------------------------------------------------------
# the sampled comparison (small sizes)


@pytest.fixture(scope="module")
def relu_samples():
    net = et.MLP(3, 16, "relu", C_W=2.0)
    return net, ed.sample_outputs(net, X2, 3000, 5, neurons=4)


def test_sample_outputs_shapes_and_conditional_covariance(relu_samples):
    net, s = relu_samples
    assert s.z.shape == (3000, 4, 2) and s.G.shape == (3000, 2, 2) and s.n == 16 and s.layer == 3
    # the conditional covariance averages to E[zz] (independent estimate from the sampled neurons)
    zz = np.einsum("mka,mkb->ab", s.z, s.z) / (3000 * 4)
    np.testing.assert_allclose(s.G.mean(0), zz, rtol=0.05)
    # layer 1: G is the exact kernel
    s1 = ed.sample_outputs(net, X2, 10, 0, layer=1)
    K1 = np.asarray(et.infinite_width(net, X2).K)[0]
    np.testing.assert_allclose(s1.G, np.broadcast_to(K1, (10, 2, 2)), rtol=1e-12)
    # widths of a sweep are independent but reproducible
    a = ed.sample_outputs(net, X2, 5, 1, width=8)
    b = ed.sample_outputs(net, X2, 5, 1, width=8)
    np.testing.assert_array_equal(a.z, b.z)
    assert a.n == 8


def test_distances_and_histograms(relu_samples, tmp_path):
    net, s = relu_samples
    d = output_distribution(net, X2, width=16)
    ks = ed.ks_distances(s, d, groups=10)
    ks_raw = ed.ks_distances(s, d, groups=10, estimator="samples")
    tv = ed.tv_distances(s, d, groups=10, bins=12)
    for res in (ks, ks_raw, tv):
        assert set(res) == set(ed.MODELS)
        for st in res.values():
            assert st["distance"] >= 0 and st["stderr"] > 0 and st["floor"] > 0
    # the two estimators agree within their noise; the conditional one is less noisy
    for m in ed.MODELS:
        assert abs(ks[m]["distance"] - ks_raw[m]["distance"]) < 4 * (ks_raw[m]["stderr"] + ks_raw[m]["floor"])
    assert ks["first_order"]["floor"] < ks_raw["first_order"]["floor"]
    edges, dens, se = ed.histogram(s, bins=30)
    assert abs(np.sum(dens * np.diff(edges)) - 1) < 1e-12 and np.all(se >= 0)
    e0, e1, h2 = ed.histogram2d(s, bins=10)
    assert h2.shape == (10, 10) and 0.9 < np.sum(h2 * np.outer(np.diff(e0), np.diff(e1))) <= 1
    paths = ed.plot_distribution(s, d, str(tmp_path / "relu"))
    assert paths[0].endswith("relu_linear.png") and paths[1].endswith("relu_log.png")
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


def test_distribution_sweep_is_json_ready(tmp_path):
    net = et.MLP(3, 16, "tanh", C_W=1.0)
    rep = ed.distribution_sweep(net, X2, [8, 16, 32], 400, 0, inputs2=(0, 1), groups=4)
    text = json.dumps(rep)
    back = json.loads(text)
    assert back["widths"] == [8, 16, 32] and set(back["ks"]["8"]) == set(ed.MODELS)
    assert set(back["slopes"]) == {"ks", "tv"}
    ed.write_json(rep, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["n_networks"] == 400


def test_empirical_bad_arguments(relu_samples):
    net, s = relu_samples
    d = output_distribution(net, X2, width=16)
    with pytest.raises(ValueError, match="^samples"):
        ed.ks_distances("s", d)
    with pytest.raises(ValueError, match="^dist"):
        ed.ks_distances(s, "d")
    with pytest.raises(ValueError, match="^input"):
        ed.ks_distances(s, d, input=2)
    with pytest.raises(ValueError, match="^groups"):
        ed.ks_distances(s, d, groups=1)
    with pytest.raises(ValueError, match="^estimator"):
        ed.ks_distances(s, d, estimator="x")
    with pytest.raises(ValueError, match="^inputs"):
        ed.tv_distances(s, d, inputs=(0, 0))
    with pytest.raises(ValueError, match="^layer"):
        ed.sample_outputs(net, X2, 10, 0, layer=4)
    with pytest.raises(ValueError, match="^n_networks"):
        ed.sample_outputs(net, X2, 0, 0)


def test_compare_distribution_writes_report_and_figures(tmp_path):
    net = et.MLP(3, 16, "relu", C_W=2.0, output_width=3)
    x = np.random.default_rng(0).standard_normal((4, 3))
    res = ed.compare_distribution(net, x, [8, 16, 32], 300, 0, str(tmp_path), groups=5)
    rep = json.loads(open(res["paths"]["distribution"]).read())
    assert res["paths"]["distribution"] == str(tmp_path / "distribution") + ".json"
    assert rep["widths"] == [8, 16, 32] and rep["tv"] is not None
    assert "KS distance" in res["table"] and "binned TV" in res["table"] and "slope" in res["table"]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"distribution_n8_linear.png", "distribution_n32_log.png", "distribution_distances.png"} <= names
    with pytest.raises(ValueError, match="^out_dir"):
        ed.compare_distribution(net, x, [8], 10, 0, None)
