"""Every first-order tensor against sampled networks, by the width-sweep protocol of docs/theory.md.

For each activation: 3 inputs (one nearly collinear pair, cosine 0.99), depth 5, widths
16, 32, 64, 128, 256 (a factor of sixteen), M networks per width, standard errors over networks.

* raw statistics m(n) are fitted as a + c1/n + c2/n^2 (weighted least squares):
  metric E[z z]      -> a = K,     c1 = G1
  NTK mean E[H_ii]   -> a = Theta, c1 = H1
  connected correlators (four-point, NTK covariances, NTK-preactivation) -> a = 0, c1 = V, A, B, D, F
* a and c1 must agree within 3 standard errors.  This file makes many comparisons (every distinct
  entry of 13 statistics for 4 activations), so the 3-sigma rule is applied with a Bonferroni
  correction for their total number: the whole file has the false-alarm rate of one 3-sigma test
  (0.27%), which puts the per-entry limit near 4.6 sigma.  (Run with a fixed seed, an uncorrected
  3-sigma rule failed here on a 4.3-sigma fluctuation of the layer-2 metric, whose exact value
  the theory knows: K^(2) has no 1/n correction at all.)  The mean squared pull is printed
  but not asserted: entries of one tensor share most of their sampling noise, so it is not chi^2.
* where the residual m(n) - a - c1/n is resolved (>= 2 standard errors at >= 3 widths), its
  log-log slope must be -2 within 0.3 plus twice its own standard error (which at these ensemble
  sizes is itself ~0.3): em.slope_consistent, the rule `efftheory compare` uses; unresolved
  residuals are reported, not fitted.
* the estimators return every statistic at the sampled width (the normalisation of at_width(n)), so
  the connected correlators are fitted as they come, with c1 = V, A, B, D, F.
"""

import numpy as np
import pytest
from _tensor_checks import distinct
from scipy.stats import norm

import efftheory as et
from efftheory import empirical as em

pytestmark = pytest.mark.physics

WIDTHS = (16, 32, 64, 128, 256)
DEPTH = 5
M = 6000
X = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.8], [0.93, 0.42, -0.43]])
CHECKS_PER_CASE = 13  # metric and V at four layers; NTK mean, A, B, D, F
CASES = {
    "tanh-critical": ("tanh", 1.0, 0.0),
    "relu-critical": ("relu", 2.0, 0.0),
    "gelu-off-critical": ("gelu", 1.5, 0.2),
    "softplus-off-critical": ("softplus", 0.8, 0.1),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    act, C_W, C_b = CASES[request.param]
    net = et.MLP(DEPTH, WIDTHS[0], act, C_W=C_W, C_b=C_b, output_width=4)
    theory = et.finite_width(net, X)
    sweep = em.sample(net, X, WIDTHS, M, seed=7,
                      statistics=("metric", "four_point", "ntk", "ntk_variance", "ntk_preactivation"),
                      dtype=np.float32, progress=False)
    return request.param, theory, sweep


def _pulls(widths, est, a_pred, c1_pred):
    v, s = np.asarray(est.value, dtype=np.float64), np.asarray(est.stderr, dtype=np.float64)
    fit = em.width_sweep_fit(widths, v, s, infinite=np.asarray(a_pred), first_order=np.asarray(c1_pred))
    keep = distinct(v.shape[1:])
    pulls = np.concatenate([np.asarray(fit.a_pull)[keep], np.asarray(fit.c1_pull)[keep]])
    return pulls, norm.isf(0.00135 / (pulls.size * CHECKS_PER_CASE * len(CASES)))


def _check(name, widths, est, a_pred, c1_pred, *, slope_check=True):
    """Fit, then assert the protocol; returns a one-line summary for the log."""
    v, s = np.asarray(est.value, dtype=np.float64), np.asarray(est.stderr, dtype=np.float64)
    a_pred, c1_pred = np.asarray(a_pred), np.asarray(c1_pred)
    fit = em.width_sweep_fit(widths, v, s, infinite=a_pred, first_order=c1_pred)
    keep = distinct(v.shape[1:])
    pulls = np.concatenate([np.asarray(fit.a_pull)[keep], np.asarray(fit.c1_pull)[keep]])
    m = pulls.size
    limit = norm.isf(0.00135 / (m * CHECKS_PER_CASE * len(CASES)))
    worst = float(np.max(np.abs(pulls)))
    msq = float(np.mean(pulls**2))
    assert worst <= limit, (f"{name}: worst pull {worst:.2f} > {limit:.2f} "
                            f"(Bonferroni over {m} entries x {CHECKS_PER_CASE * len(CASES)} checks)")
    _, resolved, slope, slope_se, ok = em.residual_scaling(widths, v, s, a_pred, c1_pred)
    slope, slope_se, ok = np.asarray(slope)[keep], np.asarray(slope_se)[keep], np.asarray(ok)[keep]
    if slope_check and ok.any():
        bad = ~em.slope_consistent(slope[ok], slope_se[ok])
        assert not bad.any(), f"{name}: residual slopes {slope[ok][bad]} +- {slope_se[ok][bad]} not -2"
    c1 = np.abs(c1_pred[keep])
    big = c1 > 1e-12 * np.max(c1, initial=0.0)  # entries whose c1 vanishes (G1 one layer after V = 0) have none
    rel = f"{np.median(np.asarray(fit.c1_stderr)[keep][big] / c1[big]):.3f}" if big.any() else "n/a (c1 = 0)"
    return (f"{name}: worst pull {worst:.2f} (limit {limit:.2f}), mean pull^2 {msq:.2f}, "
            f"c1 relative error {rel}, resolved slopes {np.round(slope[ok], 2).tolist()}")


def test_metric_and_four_point(case, capsys):
    label, th, sw = case
    out = []
    for l in (1, 2, DEPTH - 2, DEPTH - 1):
        m = sw.estimate(em.metric)
        est = type(m)(m.value[:, l], m.stderr[:, l])
        out.append(_check(f"{label} metric l={l + 1}", WIDTHS, est, th.K[l], th.G1[l]))
        v = sw.estimate(em.four_point)
        est = type(v)(v.value[:, l], v.stderr[:, l])
        out.append(_check(f"{label} V l={l + 1}", WIDTHS, est, np.zeros_like(th.V[l]), th.V[l]))
    # the same data must reject a wrong first-order coefficient (the check has power).  Measured at
    # M = 6000 on layer 3: V x 1.3 gives worst pulls 1.8-3.0 (not resolved at the Bonferroni
    # limit 4.85), V x 2 gives 5.9-11.1; so this check resolves factor-of-two errors in the
    # multi-input V, while V's exact forms (tests/test_finite.py) pin it to 1e-8.
    l = 2
    v = sw.estimate(em.four_point)
    est = type(v)(v.value[:, l], v.stderr[:, l])
    pulls, limit = _pulls(WIDTHS, est, np.zeros_like(th.V[l]), 2.0 * np.asarray(th.V[l]))
    out.append(f"{label} V l=3 with V x 2: worst pull {np.max(np.abs(pulls)):.2f}")
    assert np.max(np.abs(pulls)) > limit, "a factor-2 error in V went unnoticed: the check has no power"
    with capsys.disabled():
        print("\n" + "\n".join(out))


def test_ntk_mean_variance_and_cross_correlations(case, capsys):
    label, th, sw = case
    L = DEPTH - 1
    out = [_check(f"{label} NTK mean", WIDTHS, sw.estimate(em.ntk_mean), th.Theta[L], th.H1[L])]
    var = sw.estimate(em.ntk_variance)
    z4 = np.zeros_like(th.A[L])
    out.append(_check(f"{label} A", WIDTHS, var.cross_cov, z4, th.A[L]))
    out.append(_check(f"{label} B", WIDTHS, var.offdiag, z4, th.B[L]))
    pre = sw.estimate(em.ntk_preactivation)
    out.append(_check(f"{label} D", WIDTHS, pre.cross_cov, z4, th.D[L]))
    out.append(_check(f"{label} F", WIDTHS, pre.offdiag, z4, th.F[L]))
    pulls, limit = _pulls(WIDTHS, var.offdiag, z4, 1.3 * np.asarray(th.B[L]))
    out.append(f"{label} B with B x 1.3: worst pull {np.max(np.abs(pulls)):.2f}")
    assert np.max(np.abs(pulls)) > limit, "a 30% error in B went unnoticed: the check has no power"
    with capsys.disabled():
        print("\n" + "\n".join(out))
