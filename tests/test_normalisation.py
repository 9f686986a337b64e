"""Same name, same quantity (docs/theory.md, "Normalisation of returned tensors").

An empirical estimator of efftheory.empirical and the prediction of the same name in
``finite_width(net, x).at_width(n)`` are the same statistic at width n: they are compared here at a
single width, entry by entry, with no factor of n written by hand.

* deep linear network, layer 2: the connected four-point function is exactly V/n at any width
  (given layer 1, whose preactivations are exactly Gaussian, the layer-2 preactivations are sums of n
  independent terms: E[z_i z_i z_j z_j]_conn = (C_W^2/n)(K_13 K_24 + K_14 K_23) of K^(1)), and the metric
  is exactly K (G1 = 0);
* tanh, output-layer NTK at n = 64: Cov(H_ii, H_ii) and Cov(H_ii, H_jj) against at_width(64).ntk_cov and
  .ntk_cross_cov within 3.5 standard errors plus an O(1/n^2) allowance of 6/n times the prediction (the
  first-order prediction is a 1/n term; the next is 1/n^2, i.e. a relative 1/n correction with an O(1)
  coefficient).  A factor-n mismatch (64x) is far outside either tolerance; that is asserted too.
"""

import numpy as np

import efftheory as et
from efftheory import empirical as em

X2 = np.array([[1.0, 0.4, -0.7], [0.3, -1.1, 0.5]])


def test_deep_linear_four_point_and_metric_equal_at_width_at_one_width():
    n = 16
    net = et.MLP(3, n, "linear", C_W=1.3)
    pred = et.finite_width(net, X2).at_width(n)
    ens = em.sample_ensemble(net, X2, 4000, seed=11, statistics=("four_point",), progress=False)
    fp = em.four_point(ens)
    # layer 2 (index 1): exact at any width, so only the sampling error remains
    pulls = fp.pull(np.asarray(pred.four_point[1]))[1]
    assert np.max(np.abs(pulls)) < 4, pulls  # 16 correlated entries
    # the expected value written out: (C_W^2 / n)(K13 K24 + K14 K23) with K = K^(1) = C_W x x^T / n_0
    K = 1.3 * X2 @ X2.T / 3
    exact = 1.3**2 / n * (np.einsum("ac,bd->abcd", K, K) + np.einsum("ad,bc->abcd", K, K))
    np.testing.assert_allclose(np.asarray(pred.four_point[1]), exact, rtol=1e-10)
    # the coefficient form (times n) is not what the estimator returns
    assert np.max(np.abs(fp.pull(n * exact)[1])) > 20
    # metric: exactly K^(l) = C_W^(l-1) K^(1) at any width (layers 1, 2 with all their entries)
    m = em.metric(ens)
    assert np.max(np.abs(m.pull(np.asarray(pred.metric))[:2])) < 4


def test_tanh_ntk_covariances_equal_at_width_at_one_width():
    n = 64
    net = et.MLP(3, n, "tanh", C_W=1.0, C_b=0.0, output_width=2)
    pred = et.finite_width(net, X2).at_width(n)
    ens = em.sample_ensemble(net, X2, 3000, seed=5, statistics=("ntk", "ntk_variance"), progress=False)
    var = em.ntk_variance(ens)
    for est, p in ((var.cov, pred.ntk_cov[-1]), (var.cross_cov, pred.ntk_cross_cov[-1])):
        p = np.asarray(p)
        tol = 3.5 * est.stderr + 6.0 / n * np.abs(p)
        assert np.all(np.abs(est.value - p) <= tol), (est.value, p, est.stderr)
        assert np.max(np.abs(p)) > 5 * np.max(est.stderr)  # the prediction is resolved at this width
        assert not np.all(np.abs(est.value - n * p) <= 3.5 * est.stderr + 6.0 * np.abs(p))  # n x is excluded
    # the mean NTK: Theta + H1/n, the same way
    h = em.ntk_mean(ens)
    assert np.max(np.abs(h.value - np.asarray(pred.ntk_mean[-1])) - 3.5 * h.stderr) <= 0.0
