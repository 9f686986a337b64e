"""Physics step: sampled output distributions of critical tanh and relu networks against the first-order
density (docs/distribution.md).  About 3 minutes on two CPU cores.

Sizes: the conditional (mixture) estimator's noise floor falls like 1/sqrt(n M); with M = 100000 the
first-order KS distance of tanh at depth 6 is resolved up to n = 64 and the Gaussians' at every width.
A GPU run with M = 10^6 (docs/distribution.md, "Measured") resolves everything up to n = 128.
"""

import math

import numpy as np
import pytest
from test_distribution import exact_single_input_cdf

import efftheory as et
from efftheory.empirical import distribution as ed
from efftheory.theory.distribution import output_distribution

pytestmark = pytest.mark.physics

X2 = np.array([[1.0, 0.5], [0.3, -1.2]])


def _fit_slope(widths, values):
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


@pytest.mark.timeout(900)
def test_tanh_ks_first_order_beats_gaussians_and_falls_like_n_minus_2():
    net = et.MLP(6, 16, "tanh", C_W=1.0)  # criticality: C_b = 0, C_W = 1
    widths = [8, 16, 32, 64]
    rep = ed.distribution_sweep(net, X2, widths, 100000, 11, groups=20)
    for n in widths:
        st = rep["ks"][str(n)]
        f, g, i = st["first_order"], st["gaussian"], st["infinite"]
        for other in (g, i):
            assert other["distance"] - f["distance"] > 3 * math.hypot(other["stderr"], f["stderr"]), (n, st)
    for m in ("infinite", "gaussian"):
        sl = rep["slopes"]["ks"][m]
        assert sl["slope"] is not None and len(sl["widths"]) == len(widths)
        assert abs(sl["slope"] + 1) < 0.15, (m, sl)
    sl = rep["slopes"]["ks"]["first_order"]
    assert sl["slope"] is not None and len(sl["widths"]) >= 3, sl
    assert abs(sl["slope"] + 2) < 0.3, sl


@pytest.mark.timeout(900)
def test_relu_sampled_ks_matches_the_exact_law():
    """On one input a critical relu network's output law is known exactly (a Gaussian scale mixture, see
    test_distribution.exact_single_input_cdf): the sampled KS distances to the three predictions must equal
    the exact law's within the errors, and the first-order density must be the closest."""
    L = 4
    x = np.array([[0.8]])
    net = et.MLP(L, 16, "relu", C_W=2.0)
    fw = et.finite_width(net, x)
    for n in (16, 32, 64):
        s = ed.sample_outputs(net, x, 20000, 12, width=n)
        d = output_distribution(None, width=n, finite=fw)
        st = ed.ks_distances(s, d, groups=20)
        sd = math.sqrt(float(d.covariance[0, 0]))
        z = np.linspace(-8 * sd, 8 * sd, 2001)  # the grid ks_distances uses
        F = exact_single_input_cdf(z, float(np.asarray(d.K)[0, 0]), n, L, "relu")
        exact = {"infinite": np.max(np.abs(F - np.asarray(d.cdf(z, corrected_gaussian=False)))),
                 "first_order": np.max(np.abs(F - np.asarray(d.cdf(z))))}
        for m, e in exact.items():
            assert abs(st[m]["distance"] - e) < 4 * st[m]["stderr"] + 2 * st[m]["floor"], (n, m, st[m], e)
        assert st["infinite"]["distance"] - st["first_order"]["distance"] > 10 * st["first_order"]["stderr"]


@pytest.mark.timeout(900)
def test_tanh_two_input_tv_first_order_beats_gaussians():
    net = et.MLP(6, 16, "tanh", C_W=1.0)
    widths = [16, 32, 64]
    rep = ed.distribution_sweep(net, X2, widths, 20000, 13, inputs2=(0, 1), groups=10)
    tv = rep["tv"]
    for n in widths:
        f, g = tv[str(n)]["first_order"], tv[str(n)]["gaussian"]
        assert f["resolved"] and g["resolved"]
        assert g["distance"] - f["distance"] > 3 * math.hypot(g["stderr"], f["stderr"]) + f["floor"], (n, tv[str(n)])
    sf = _fit_slope(widths, [tv[str(n)]["first_order"]["corrected"] for n in widths])
    sg = _fit_slope(widths, [tv[str(n)]["gaussian"]["corrected"] for n in widths])
    assert sf < sg - 0.5, (sf, sg)
    assert abs(sg + 1) < 0.2, sg
