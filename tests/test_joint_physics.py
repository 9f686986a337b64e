"""Joint chi^2 tests of the first-order tensors against sampled networks (efftheory.empirical.joint).

Entries of one tensor share networks, so their errors are correlated, and a quadrature error in the
prediction moves several entries at once: a 1% error in ReLU's three-input NTK covariance passed every
per-entry test and failed a joint chi^2 at 283/21.  Here, for each tensor and layer, all distinct
entries are fitted together (m_e(n) = a_e + c1_e/n + c2_e/n^2, the covariance between entries at each
width from the delete-one jackknife over networks, widths independent), and the chi^2 of the fitted c1
vector against the prediction, with the full covariance of the fit, must pass at the 1% level for the
file as a whole (Bonferroni over its checks).

Setup: depth 4, three inputs with a nearly collinear pair (cosine 0.99, as tests/test_finite_physics.py),
widths 16..128 (a factor of eight), relu at criticality, tanh at criticality, gelu off criticality.

The unit test of the fit on synthetic data (answer known) runs in the default suite.
"""

from __future__ import annotations

import numpy as np
import pytest

import efftheory as et
from efftheory import empirical as em
from efftheory.empirical.joint import jackknife_covariance, joint_width_fit

WIDTHS = (16, 32, 64, 128)
DEPTH = 4
M = 12000
X = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.8], [0.93, 0.42, -0.43]])
CASES = {"relu": ("relu", 2.0, 0.0), "tanh": ("tanh", 1.0, 0.0), "gelu": ("gelu", 1.5, 0.2)}
CHECKS_PER_CASE = 9  # metric and V at layers 2..4, NTK mean, NTK covariance, NTK-preactivation
ALPHA = 0.01 / (CHECKS_PER_CASE * len(CASES))


# ------------------------------------------------------------------------------------------ unit test
def test_joint_fit_on_synthetic_data():
    """Correlated entries with known a, c1, c2: the jackknife covariance of a mean is the sample
    covariance over M; chi^2 of the true c1 follows chi^2_E (mean E, over 300 replicates); the fitted
    c1 is unbiased; and a shift of c1 that no entry resolves on its own is rejected jointly."""
    rng = np.random.default_rng(11)
    E, Mn = 6, 300
    widths = np.array([16.0, 32.0, 64.0, 128.0, 256.0])
    a = rng.normal(size=E)
    c1 = rng.normal(size=E) * 4
    c2 = rng.normal(size=E) * 20
    B = rng.normal(size=(E, E))
    Sigma = B @ B.T / E + 0.9 * np.ones((E, E))  # strongly correlated entries
    Lc = np.linalg.cholesky(Sigma)
    x = rng.normal(size=(Mn, E)) @ Lc.T
    val, cov = jackknife_covariance(lambda m: m, x)
    np.testing.assert_allclose(val, x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.T) / Mn, rtol=1e-10, atol=1e-14)
    chis, fits = [], []
    for _ in range(300):
        ys, Cs = [], []
        for n in widths:
            per = a + c1 / n + c2 / n**2 + (rng.normal(size=(Mn, E)) @ Lc.T) / np.sqrt(n)
            v, C = jackknife_covariance(lambda m: m, per)
            ys.append(v)
            Cs.append(C)
        fit = joint_width_fit(widths, np.array(ys), np.array(Cs), first_order=c1)
        chis.append(fit.chi2_c1)
        fits.append(fit.c1)
    chis = np.array(chis)
    assert fit.dof == E and fit.dof_fit == E * 2
    # mean of chi^2_E over 300 replicates: E +- sqrt(2E/300) = 6 +- 0.2 (plus the small excess of an
    # estimated covariance, ~E^2/M)
    assert abs(chis.mean() - E) < 0.8, chis.mean()
    se = np.sqrt(np.diag(fit.c1_cov))
    assert np.all(np.abs(np.mean(fits, 0) - c1) < 4 * se / np.sqrt(300))
    # power where per-entry tests have none: a shift of c1 along the best-measured direction of the
    # fit, 7 of its standard errors, moves every entry by less than 3 of its own standard errors
    # (the entries' errors are correlated) but is rejected by the joint chi^2 (expected ~49 + 6)
    lam, Q = np.linalg.eigh(fit.c1_cov)
    shift = Q[:, 0] * 7 * np.sqrt(lam[0])
    assert np.max(np.abs(shift) / se) < 3
    bad = joint_width_fit(widths, np.array(ys), np.array(Cs), first_order=fit.c1 + shift)
    assert bad.p_c1 < 1e-6, bad.chi2_c1
    with pytest.raises(ValueError, match="widths"):
        joint_width_fit(widths[:3], np.array(ys)[:3], np.array(Cs)[:3])
    with pytest.raises(ValueError, match="first_order"):
        joint_width_fit(widths, np.array(ys), np.array(Cs), first_order=c1[:3])


# ------------------------------------------------------------------------------------------ physics
def _pairs(N):
    return [(a, b) for a in range(N) for b in range(a, N)]


def _sym4(N):
    """Distinct entries (ab)(cd) of a tensor symmetric in a<->b, c<->d and (ab)<->(cd)."""
    P = _pairs(N)
    return [P[i] + P[j] for i in range(len(P)) for j in range(i, len(P))]


def _pair_by_pair(N):
    """Entries (ab)(cd) symmetric in a<->b and c<->d only (NTK against preactivations)."""
    P = _pairs(N)
    return [p + q for p in P for q in P]


def _index(entries):
    return tuple(np.array(entries).T)


def _joint(sweep, stat_names, f, entries, c1_pred):
    """Per width: jackknife value and covariance of f over the entries; joint fit; chi^2 of c1.
    The estimators return what ``at_width(n)`` predicts (no factor n): m(n) = a + c1/n + ..., with
    a = 0 for the connected correlators (left free here)."""
    ix = _index(entries)
    ys, Cs = [], []
    for n in WIDTHS:
        per = [np.asarray(sweep[n].stats[s], dtype=np.float64) for s in stat_names]
        v, C = jackknife_covariance(lambda *m: f(*m)[(slice(None),) + ix], *per)
        ys.append(v)
        Cs.append(C)
    return joint_width_fit(WIDTHS, np.array(ys), np.array(Cs), first_order=np.asarray(c1_pred)[ix])


def _outer(u, v):
    return u[..., :, :, None, None] * v[..., None, None, :, :]


def joint_checks(theory, sweep):
    """(name, fit) for every tensor and layer of one case (used by the test and by hand)."""
    L = DEPTH - 1
    N = X.shape[0]
    out = []
    P2 = _pairs(N)
    for l in range(1, DEPTH):
        out.append((f"metric l={l + 1}", _joint(sweep, ["zz"], lambda zz, l=l: zz[:, l], P2, theory.G1[l])))
        out.append((f"V l={l + 1}", _joint(sweep, ["zz_zz", "zz"],
                                           lambda c, zz, l=l: c[:, l] - _outer(zz[:, l], zz[:, l]),
                                           _sym4(N), theory.V[l])))
    out.append(("NTK mean", _joint(sweep, ["H"], lambda h: h, P2, theory.H1[L])))
    B = np.asarray(theory.B[L])
    ntk_cov = np.asarray(theory.A[L]) + B.transpose(0, 2, 1, 3) + B.transpose(0, 2, 3, 1)
    out.append(("NTK cov (A+B+B)", _joint(sweep, ["HH", "H"], lambda hh, h: hh - _outer(h, h), _sym4(N),
                                          ntk_cov)))
    F = np.asarray(theory.F[L])
    pre = np.asarray(theory.D[L]) + F.transpose(0, 2, 1, 3) + F.transpose(0, 2, 3, 1)
    out.append(("NTK-preactivation (D+F+F)", _joint(sweep, ["Hzz", "H", "zz"],
                                                    lambda hzz, h, zz: hzz - _outer(h, zz[:, -1]),
                                                    _pair_by_pair(N), pre)))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    act, C_W, C_b = CASES[request.param]
    net = et.MLP(DEPTH, WIDTHS[0], act, C_W=C_W, C_b=C_b, output_width=2)
    theory = et.finite_width(net, X)
    sweep = em.sample(net, X, WIDTHS, M, seed=28,
                      statistics=("metric", "four_point", "ntk", "ntk_variance", "ntk_preactivation"),
                      dtype=np.float32, progress=False)
    return request.param, theory, sweep


@pytest.mark.physics
def test_joint_chi2_of_every_tensor(case, capsys):
    label, theory, sweep = case
    lines, failed = [], []
    for name, fit in joint_checks(theory, sweep):
        ok = fit.p_c1 >= ALPHA
        lines.append(f"{label} {name}: chi2(c1) {fit.chi2_c1:.1f}/{fit.dof} (p {fit.p_c1:.3f}), "
                     f"fit {fit.chi2_fit:.1f}/{fit.dof_fit}")
        if not ok:
            failed.append(lines[-1])
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not failed, f"joint chi^2 below the 1% level (Bonferroni, p < {ALPHA:.1e}): {failed}"
