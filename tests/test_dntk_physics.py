"""The dNTK/ddNTK statistics P, Q, R, S, T, U (docs/dntk.md) against sampled networks, by width sweep.

Depth 3, two outputs (so that every tensor is measured separately from the output pairs i != k),
widths 16, 32, 64, 128 (a factor of eight), M networks per width, standard errors over networks.
The estimators are n_{L-1} times the measured correlator, i.e. the first-order tensor plus O(1/n), so
each entry is fitted as a + c1/n (weighted least squares) and a must agree with the prediction.  This
is the protocol's "c1 of the raw statistic" with its infinite-width value known to be zero: the raw
correlators are O(1/n) and carry no O(1) part.

Many entries are compared (every distinct entry of six tensors for two activations), and entries of one
tensor share most of their sampling noise, so the 3-sigma rule is applied with a Bonferroni correction
for the total number of entries (the whole file has the false-alarm rate of one 3-sigma test), as in
tests/test_finite_physics.py; the pulls, their rms and the residual slopes are printed.  The residual of
the raw statistic after the first-order term, m(n) - c1_pred/n, must fall like 1/n^2 where it is resolved
(>= 2 standard errors at >= 3 widths); at these ensemble sizes it mostly is not, which is reported.
"""

import numpy as np
import pytest
from scipy.stats import norm

from efftheory.empirical.dntk import dntk_estimates
from efftheory.empirical.sweep import residual_scaling, width_sweep_fit
from efftheory.network import MLP
from efftheory.theory.dntk import dntk_statistics

pytestmark = pytest.mark.physics

WIDTHS = (16, 32, 64, 128)
DEPTH = 3
X = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.8], [0.93, 0.42, -0.43]])
NAMES = "PQRSTU"
# activation, C_W, C_b, inputs, networks per width
CASES = {
    "tanh-critical": ("tanh", 1.0, 0.0, 3, 304),
    "gelu-ordered": ("gelu", 1.0, 0.1, 2, 496),
}


def _n_entries():
    return sum(len(NAMES) * c[3] ** 4 for c in CASES.values())


NSIGMA = float(norm.isf(norm.sf(3.0) / _n_entries()))  # ~4.3 for the ~580 entries here


@pytest.fixture(scope="module", params=sorted(CASES))
def sweep(request):
    act, C_W, C_b, N, M = CASES[request.param]
    x = X[:N]
    theory = dntk_statistics(MLP(DEPTH, width=WIDTHS[0], activation=act, C_W=C_W, C_b=C_b), x)
    ests = [dntk_estimates(MLP(DEPTH, width=n, activation=act, C_W=C_W, C_b=C_b, output_width=2), x, M,
                           seed=9000 + n, chunk=16) for n in WIDTHS]
    return request.param, theory, ests


def test_dntk_width_sweep(sweep):
    name, theory, ests = sweep
    w = np.asarray(WIDTHS, np.float64)
    worst = 0.0
    for k in NAMES:
        pred = np.asarray(getattr(theory, k)[-1])
        v = np.stack([getattr(e, k).value for e in ests])
        s = np.stack([getattr(e, k).stderr for e in ests])
        fit = width_sweep_fit(WIDTHS, v, s, infinite=pred, order=1)
        shape = (-1,) + (1,) * pred.ndim
        _, resolved, slope, slope_se, ok = residual_scaling(WIDTHS, v / w.reshape(shape), s / w.reshape(shape),
                                                            np.zeros_like(pred), pred)
        pulls = fit.a_pull
        top = np.unravel_index(np.argmax(np.abs(pred)), pred.shape)
        print(f"{name} {k}: max|pred| {pred[top]:+.4f} fit {fit.a[top]:+.4f} +- {fit.a_stderr[top]:.4f}; "
              f"max |pull| {np.max(np.abs(pulls)):.2f}, rms pull {np.sqrt(np.mean(pulls**2)):.2f}; "
              f"residual slope resolved for {int(np.sum(ok))}/{ok.size} entries"
              + (f", slopes {np.round(slope[ok], 2)} +- {np.round(slope_se[ok], 2)}" if ok.any() else ""))
        assert np.abs(pred).max() > 1e-2  # a nontrivial comparison
        assert np.all(np.abs(pulls) <= NSIGMA), (k, np.max(np.abs(pulls)))
        if ok.any():
            assert np.all(np.abs(slope[ok] + 2) <= 0.3 + 2 * slope_se[ok]), (k, slope[ok], slope_se[ok])
        worst = max(worst, float(np.max(np.abs(pulls))))
    # the n_L = 1 combinations (i = k) agree statistically with the separately measured tensors (i != k)
    combos = {"dntk": [("P", (0, 1, 2, 3)), ("P", (0, 2, 1, 3)), ("Q", (0, 1, 2, 3))],
              "ddntk_I": [("R", (0, 1, 2, 3)), ("R", (0, 2, 1, 3)), ("R", (0, 2, 3, 1))],
              "ddntk_II": [("S", (0, 1, 2, 3)), ("T", (0, 1, 2, 3)), ("U", (0, 1, 2, 3))]}
    for e in ests:
        for comb, terms in combos.items():
            c = getattr(e, comb)
            want = sum(getattr(e, k).value.transpose(ax) for k, ax in terms)
            se = c.stderr + sum(getattr(e, k).stderr.transpose(ax) for k, ax in terms)  # correlated: add
            assert np.all(np.abs(c.value - want) <= NSIGMA * se + 1e-12), comb
    print(f"{name}: worst |pull| {worst:.2f} (limit {NSIGMA:.2f})")


def test_estimates_do_not_depend_on_chunking():
    net = MLP(DEPTH, width=WIDTHS[0], activation="tanh", C_W=1.0, C_b=0.0, output_width=2)
    a = dntk_estimates(net, X, 20, seed=3, chunk=16)  # chunk 16: compiled by the tanh sweep already
    b = dntk_estimates(net, X, 16, seed=3, chunk=16)
    for k in a.per_network:
        np.testing.assert_allclose(a.per_network[k][:16], b.per_network[k], rtol=1e-12, atol=1e-13)
    assert a.fan_in == WIDTHS[0] and a.n_networks == 20 and a.per_network["P"].shape == (20, 3, 3, 3, 3)
