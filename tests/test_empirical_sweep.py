"""efftheory.empirical.sweep: the a + c1/n + c2/n^2 width-sweep protocol of docs/theory.md."""

import numpy as np
import pytest

from efftheory import empirical as E

W = np.array([8.0, 16.0, 32.0, 64.0, 128.0])


def test_exact_quadratic_is_recovered():
    y = 2.0 + 3.0 / W - 5.0 / W**2
    fit = E.width_sweep_fit(W, y, np.full(5, 1e-3))
    assert (fit.a, fit.c1, fit.c2) == pytest.approx((2.0, 3.0, -5.0), rel=1e-9)
    assert fit.chi2 == pytest.approx(0.0, abs=1e-12) and fit.dof == 2
    # WLS covariance: (X^T S^-2 X)^-1
    X = np.stack([np.ones(5), 1 / W, 1 / W**2], 1)
    cov = np.linalg.inv(X.T @ X / 1e-6)
    np.testing.assert_allclose(fit.cov, cov, rtol=1e-8)
    assert fit.a_stderr == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-8)
    assert np.isnan(fit.a_pull) and fit.status == "unresolved"


def test_pulls_are_standard_normal_over_many_noisy_fits():
    rng = np.random.default_rng(0)
    se = 0.01 * (1 + 8 / W)  # heteroscedastic
    truth = (1.5, -2.0, 4.0)
    y = truth[0] + truth[1] / W + truth[2] / W**2
    noisy = y[:, None] + se[:, None] * rng.normal(size=(5, 4000))
    fit = E.width_sweep_fit(W, noisy, np.broadcast_to(se[:, None], noisy.shape), infinite=truth[0],
                            first_order=truth[1])
    assert fit.a.shape == (4000,)
    for pulls in (fit.a_pull, fit.c1_pull, (fit.c2 - truth[2]) / fit.c2_stderr):
        assert abs(np.mean(pulls)) < 0.06 and np.std(pulls) == pytest.approx(1.0, abs=0.05)
    assert np.mean(fit.chi2_dof) == pytest.approx(1.0, abs=0.06)
    assert E.agrees(fit, truth[0], truth[1]).mean() > 0.98


def test_residual_slope_resolved_and_unresolved():
    y = 1.0 + 2.0 / W + 30.0 / W**2
    fit = E.width_sweep_fit(W, y, np.full(5, 1e-5), infinite=1.0, first_order=2.0)
    assert fit.status == "resolved" and bool(fit.slope_resolved)
    assert fit.slope == pytest.approx(-2.0, abs=1e-6) and fit.slope_stderr < 0.01
    np.testing.assert_allclose(fit.residual, 30.0 / W**2)
    assert E.agrees(fit, 1.0, 2.0)
    # a wrong first-order coefficient leaves a 1/n piece in the residual: its slope is not -2
    r, resolved, slope, slope_se, ok = E.residual_scaling(W, y, np.full(5, 1e-5), 1.0, 1.0)
    assert ok and -1.8 < slope < -1.0
    assert not E.agrees(fit, 1.0, 1.0)
    # a residual that changes sign is not fitted on a log scale
    assert not E.residual_scaling(W, y, np.full(5, 1e-5), 1.0, 2.5)[-1]
    # noise-dominated residual: unresolved, no slope is invented
    noisy = E.width_sweep_fit(W, y, np.full(5, 1.0), infinite=1.0, first_order=2.0)
    assert noisy.status == "unresolved" and np.isnan(noisy.slope) and not noisy.resolved.any()
    assert E.agrees(noisy, 1.0, 2.0)


def test_array_statistics_and_agrees():
    y = np.stack([1.0 + 1.0 / W, 2.0 - 4.0 / W], axis=1)[:, :, None]  # (W, 2, 1)
    fit = E.width_sweep_fit(W, y, np.full(y.shape, 1e-3), infinite=[[1.0], [2.0]], first_order=[[1.0], [-4.0]])
    assert fit.a.shape == (2, 1) and fit.cov.shape == (2, 1, 3, 3) and fit.status.shape == (2, 1)
    np.testing.assert_allclose(fit.a[:, 0], [1.0, 2.0], atol=1e-9)
    assert E.agrees(fit, [[1.0], [2.0]], [[1.0], [-4.0]]).all()
    assert E.agrees(fit, [[1.0], [2.1]]).tolist() == [[True], [False]]
    lin = E.width_sweep_fit(W[:3], y[:3], np.full(y[:3].shape, 1e-3), order=1)
    assert np.isnan(lin.c2).all() and lin.dof == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(widths=[8, 16]), "^widths: "),
    (dict(widths=[8, 16, 16, 32, 64]), "^widths: "),
    (dict(widths=[8, 16, -32, 64, 128]), "^widths: "),
    (dict(values=np.ones(4)), "^values: "),
    (dict(values=np.array([1, 2, np.nan, 4, 5.0])), "^values: "),
    (dict(stderrs=np.zeros(5)), "^stderrs: "),
    (dict(stderrs=np.ones(4)), "^stderrs: "),
    (dict(first_order=1.0), "^first_order: "),
    (dict(infinite=np.ones(3)), "^infinite: "),
    (dict(order=3), "^order: "),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    args = dict(widths=W, values=1 + 1 / W, stderrs=np.full(5, 0.1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        E.width_sweep_fit(**args)
    with pytest.raises(ValueError, match="^fit: "):
        E.agrees(None, 1.0)


# ------------------------------------------------------------------------------------------ verdicts
def test_verdict_agrees_when_c1_is_resolved():
    y = 1.0 + 2.0 / W + 30.0 / W**2  # exact data: every pull is 0
    fit = E.width_sweep_fit(W, y, np.full(5, 1e-4), infinite=1.0, first_order=2.0)
    assert fit.c1_stderr <= 0.5 * 2.0
    assert E.verdict(fit, 1.0, 2.0) == "agrees"


def test_verdict_consistent_unresolved_when_c1_error_exceeds_half_the_prediction():
    y = 1.0 + 2.0 / W + 30.0 / W**2
    fit = E.width_sweep_fit(W, y, np.full(5, 0.05), infinite=1.0, first_order=2.0)
    assert fit.c1_stderr > 1.0  # the set-up: se(c1) above |c1_pred|/2 = 1
    assert abs(fit.a_pull) < 3 and abs(fit.c1_pull) < 3
    assert E.verdict(fit, 1.0, 2.0) == "consistent, unresolved"
    # so is a c1 of 0: the same sweep cannot tell 2 from 0 either (|2 - 0| < 3 se)
    assert E.verdict(fit, 1.0, 0.0) == "consistent, unresolved"
    assert E.agrees(fit, 1.0, 2.0)  # agrees() is only "within the error bars"


def test_verdict_disagrees_outside_three_sigma():
    y = 1.0 + 2.0 / W + 30.0 / W**2
    fit = E.width_sweep_fit(W, y, np.full(5, 1e-4), infinite=1.0, first_order=2.0)
    assert E.verdict(fit, 1.0, 1.0) == "disagrees"  # wrong c1
    assert E.verdict(fit, 1.1, 2.0) == "disagrees"  # wrong a
    noisy = E.width_sweep_fit(W, y, np.full(5, 0.05))
    assert E.verdict(noisy, 1.0, 2.0 + 4 * noisy.c1_stderr) == "disagrees"  # even when c1 is unresolved


def test_verdict_floor_for_a_zero_prediction():
    # c1_pred = 0 on a scalar: floor 0.05 x n_min |a_pred| = 0.05 x 8 x 1 = 0.4, resolved when se(c1) <= 0.2
    y = 1.0 + 5.0 / W**2
    sharp = E.width_sweep_fit(W, y, np.full(5, 1e-4))
    assert sharp.c1_stderr < 0.2 and E.verdict(sharp, 1.0, 0.0) == "agrees"
    wide = E.width_sweep_fit(W, y, np.full(5, 0.02))
    assert wide.c1_stderr > 0.2 and E.verdict(wide, 1.0, 0.0) == "consistent, unresolved"
    # one tensor, entries c1 = (10, 0, 0.3): scale 10 -> entries below 0.5 need se(c1) <= 0.25
    y3 = np.stack([10.0 / W, 0.0 * W, 0.3 / W], axis=1)
    for se, expected in ((1e-4, ["agrees"] * 3), (0.1, None)):
        fit = E.width_sweep_fit(W, y3, np.full(y3.shape, se))
        v = E.verdict(fit, 0.0, [10.0, 0.0, 0.3])
        if expected is not None:
            assert v.tolist() == expected
        else:  # se(c1) between 0.25 and 5: the large entry is resolved, the small ones are not
            assert 0.25 < fit.c1_stderr[0] < 5.0
            assert v.tolist() == ["agrees", "consistent, unresolved", "consistent, unresolved"]
    assert E.c1_scale([0.0, 0.0], [10.0, -0.3], 8) == 10.0
    assert E.c1_scale([2.0, -3.0], [0.0, 0.0], 8) == 24.0
    # an explicit scale (one entry of a larger tensor fitted alone)
    fit = E.width_sweep_fit(W, 0.3 / W, np.full(5, 0.1))
    assert E.verdict(fit, 0.0, 0.3) == "consistent, unresolved"
    assert E.verdict(fit, 0.0, 0.3, scale=1000.0) == "agrees"


def test_verdict_without_a_first_order_prediction():
    y = 1.0 + 2.0 / W
    assert E.verdict(E.width_sweep_fit(W, y, np.full(5, 1e-4)), 1.0) == "agrees"  # se(a) <= 0.025 |a|
    wide = E.width_sweep_fit(W, y, np.full(5, 0.05))
    assert wide.a_stderr > 0.025 and E.verdict(wide, 1.0) == "consistent, unresolved"
    assert E.verdict(E.width_sweep_fit(W, y, np.full(5, 1e-4)), 1.01) == "disagrees"


def test_slope_rule_is_the_band_plus_twice_the_slope_error():
    # the ReLU NTK-covariance slopes of the README example: -1.69 +- 0.20 passes, the fixed band alone fails
    assert E.slope_consistent(-1.69, 0.20)
    assert not E.slope_consistent(-1.69, 0.0)
    assert E.slope_consistent(-1.75, 0.0) and not E.slope_consistent(-1.5, 0.05)
    assert E.slope_consistent(-1.0, 0.1, slope_resolved=False)  # nothing fitted, nothing judged
    ok = E.slope_consistent(np.array([-2.0, -1.2, np.nan]), np.array([0.1, 0.1, np.nan]), np.array([True, True, False]))
    assert ok.tolist() == [True, False, True]
    assert (E.SLOPE_TOLERANCE, E.SLOPE_NSIGMA) == (0.3, 2.0)


def test_count_verdicts():
    c = E.count_verdicts(["agrees", "disagrees", "agrees", "consistent, unresolved"])
    assert c == {"agrees": 2, "consistent, unresolved": 1, "disagrees": 1} and list(c) == list(E.VERDICTS)
    assert E.count_verdicts(np.array([["agrees"], ["agrees"]])) == {"agrees": 2, "consistent, unresolved": 0,
                                                                     "disagrees": 0}
    with pytest.raises(ValueError, match="^verdicts: "):
        E.count_verdicts(["agree"])
    with pytest.raises(ValueError, match="^fit: "):
        E.verdict(None, 1.0, 1.0)
