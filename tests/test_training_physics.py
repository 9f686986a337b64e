"""Trained finite networks against the infinite-width predictions of efftheory.predict (slow: ``-m physics``).

Setting: the circle task (6 training points, 6 test points), depth-3 erf and ReLU networks, full-batch
gradient descent for 100 steps at half the infinite-width stability bound, float32 networks; widths
32..512 with more networks at the cheap narrow end.  Means and variances are the precise, exactly
unbiased estimators of efftheory.compare_train (control variates built from each network's own initial
outputs), so the comparisons resolve the finite-width deviations at every width.  Run with ``-s`` to see
the tables; about 4-5 minutes on two CPU cores.
"""

import math

import numpy as np
import pytest

import efftheory as et
from efftheory import compare_train as ct
from efftheory import datasets, predict
from efftheory import empirical as E

DS = datasets.circle_regression(6, 6, seed=0)
WIDTHS = (32, 64, 128, 256, 512)
NETWORKS = (1600, 800, 400, 200, 200)
STEPS = 100
NETS = {"erf": dict(activation="erf", C_W=2.0, C_b=0.3), "relu": dict(activation="relu", C_W=2.0, C_b=0.0)}

pytestmark = pytest.mark.physics


@pytest.fixture(scope="module", params=sorted(NETS))
def trained(request):
    net = et.MLP(3, WIDTHS[0], **NETS[request.param])
    rep = ct.train_and_compare(net, DS.x_train, DS.y_train, DS.x_test, WIDTHS, NETWORKS, steps=STEPS, seed=1,
                               progress=False)
    print(f"\n{rep.header()}\n{rep.table()}\n{rep.fit_table()}")
    return request.param, rep


def _power_fit(widths, values, stderrs, powers):
    """Weighted least squares m(n) = sum_p c_p n^-p, per entry: (intercept, its stderr, chi2/dof)."""
    w = np.asarray(widths, np.float64)
    X = np.stack([w ** -p for p in powers], axis=1)
    y = values.reshape(len(w), -1)
    s = stderrs.reshape(len(w), -1)
    a, se, chi = [], [], []
    for e in range(y.shape[1]):
        wt = 1 / s[:, e] ** 2
        cov = np.linalg.inv(X.T @ (X * wt[:, None]))
        beta = cov @ (X.T @ (wt * y[:, e]))
        a.append(beta[0])
        se.append(math.sqrt(cov[0, 0]))
        chi.append(np.sum(wt * (y[:, e] - X @ beta) ** 2) / (len(w) - len(powers)))
    shape = values.shape[1:]
    return np.reshape(a, shape), np.reshape(se, shape), np.reshape(chi, shape)


def test_trained_ensemble_extrapolates_to_the_infinite_width_prediction(trained):
    """The extrapolated (n = inf) ensemble mean and variance of the test predictions are the NTK ensemble's.

    erf: docs/theory.md's fit a + c1/n + c2/n^2.  ReLU: its deviations fall more slowly than 1/n over these
    widths (test_deviation_shrinks_with_width prints the slopes), so the 1/n fit cannot extrapolate it at
    this precision; there the fit a + b/sqrt(n) + c/n is used, and the 1/n fit's pulls are printed.
    """
    name, rep = trained
    for stat, fit, theory, values, stderrs in (
            ("mean", rep.mean_fit, rep.theory_mean, rep.mean, rep.mean_stderr),
            ("variance", rep.variance_fit, rep.theory_variance, rep.variance, rep.variance_stderr)):
        print(f"{name} {stat}: 1/n fit pulls {np.round(fit.a_pull.ravel(), 2)}, chi2/dof "
              f"{np.round(fit.chi2_dof.ravel(), 2)}")
        if name == "relu":
            a, se, chi = _power_fit(rep.widths, values, stderrs, (0, 0.5, 1))
            pulls = (a - theory) / se
            print(f"{name} {stat}: a + b/sqrt(n) + c/n fit pulls {np.round(pulls.ravel(), 2)}, chi2/dof "
                  f"{np.round(chi.ravel(), 2)}")
        else:
            pulls, se = fit.a_pull, fit.a_stderr
        assert np.all(np.abs(pulls) < 3), f"{name} {stat}: extrapolation pulls {pulls.ravel()}"
        # and the extrapolation resolves the answer: to a few percent of the predicted spread
        scale = np.sqrt(rep.theory_variance) if stat == "mean" else rep.theory_variance
        assert np.all(se < 0.15 * scale), f"{name} {stat}: stderr {se.ravel()} against scale {scale.ravel()}"


def test_deviation_shrinks_with_width(trained):
    """rms over the test inputs of (measured - n = inf): the mean's falls significantly from n = 32 to 512,
    the variance's does not grow (for erf it is small at every width)."""
    name, rep = trained
    dm, sm = rep.mean_deviation, rep.mean_deviation_stderr
    dv, sv = rep.variance_deviation, rep.variance_deviation_stderr
    print(f"{name}: rms deviation of the mean {np.round(dm, 4)} +- {np.round(sm, 4)}, slope "
          f"{rep.mean_deviation_slope[0]:+.2f} +- {rep.mean_deviation_slope[1]:.2f}")
    print(f"{name}: rms deviation of the variance {np.round(dv, 4)} +- {np.round(sv, 4)}, slope "
          f"{rep.variance_deviation_slope[0]:+.2f} +- {rep.variance_deviation_slope[1]:.2f}")
    assert dm[0] > 3 * sm[0], "the narrowest width must resolve the deviation of the mean"
    assert dm[0] - dm[-1] > 3 * math.hypot(sm[0], sm[-1])
    assert dv[-1] < dv[0]


def test_ntk_change_falls_at_least_like_n_to_the_minus_0_4(trained):
    """||H_T - H_0||_F / ||H_0||_F per network and for the ensemble-mean NTK against the width."""
    name, rep = trained
    for what, v, s, (slope, se) in (("per network", rep.ntk_change, rep.ntk_change_stderr, rep.ntk_change_slope),
                                    ("ensemble mean", rep.ntk_mean_change, rep.ntk_mean_change_stderr,
                                     rep.ntk_mean_change_slope)):
        print(f"{name} NTK change {what}: {np.round(v, 4)} +- {np.round(s, 4)}; slope {slope:+.3f} +- {se:.3f}")
        assert math.isfinite(slope) and slope + 3 * se <= -0.4
    assert np.all(np.diff(rep.ntk_change) < 0)


def test_last_layer_training_samples_the_nngp_posterior():
    """Only the last layer trains, from the prior, to convergence (zero noise, zero ridge).

    Exact at every width: each network is a sample of the Bayesian posterior of its own last layer
    (Matheron's rule with its feature kernel K^), so its standardized residual
    u = (z_T - mu^)/sigma^ is N(0, 1).  At infinite width K^ -> K and the ensemble's mean and variance
    extrapolate to the NNGP posterior (docs/theory.md's fit).
    """
    net = predict.last_layer_net(et.MLP(3, WIDTHS[0], **NETS["erf"]))
    kern = predict.train_test_kernels(net, DS.x_train, DS.x_test)
    eta, steps = 0.5 * predict.stability_bound(kern), 1500
    gp = predict.gp_posterior(kern, DS.y_train)
    gd = predict.gradient_descent(kern, DS.y_train, learning_rate=eta, steps=[steps, math.inf])
    # the infinite-width theory: converged after `steps`, and then the posterior (Theta = K)
    np.testing.assert_allclose(gd.mean[1], gp.mean, atol=1e-9)
    np.testing.assert_allclose(gd.cov[1], gp.cov, atol=1e-9)
    sweep = ct.training_sweep(net, DS.x_train, DS.y_train, DS.x_test, WIDTHS, (1600, 800, 400, 400, 400),
                              steps=steps, learning_rate=eta, seed=1, progress=False)
    rep = ct.compare_training(sweep)
    assert np.max(np.abs(gd.mean[0] - gd.mean[1])) < 1e-3 * np.min(rep.mean_stderr)
    assert np.max(np.abs(gd.variance[0] - gd.variance[1])) < 1e-3 * np.min(rep.variance_stderr)
    # exact at every width
    ubar, u2 = [], []
    for n, tr in zip(sweep.widths, sweep.trainings):
        chk = ct.posterior_check(tr)
        e = chk.matheron_errors
        print(f"n = {n}: Matheron error median {np.median(e):.1e}, 99th percentile {np.percentile(e, 99):.1e}, "
              f"{int(np.sum(e > 1e-3))} of {len(e)} networks above 1e-3; mean u {np.round(chk.mean.ravel(), 3)}, "
              f"var u {np.round(chk.variance.ravel(), 3)}")
        # converged up to float32 rounding, except a rare narrow network with an ill-conditioned K^_DD (measured:
        # 13 of 1600 at n = 32, condition numbers up to 700, still training along their slowest mode)
        assert np.median(e) < 1e-5 and np.mean(e > 1e-3) < 0.01
        ubar.append(chk.residual.mean(axis=(1, 2)))
        u2.append((chk.residual ** 2).mean(axis=(1, 2)))
    m = E.mean_and_stderr(np.concatenate(ubar))
    s = E.mean_and_stderr(np.concatenate(u2))
    print(f"pooled over {len(np.concatenate(ubar))} networks: <u> = {float(m.value):.4f} +- {float(m.stderr):.4f}, "
          f"<u^2> = {float(s.value):.4f} +- {float(s.stderr):.4f}")
    assert abs(float(m.value)) < 3 * float(m.stderr)
    assert abs(float(s.value) - 1.0) < 3 * float(s.stderr)
    # infinite width: the NNGP posterior
    for stat, values, stderrs, target in (("mean", rep.mean, rep.mean_stderr, gp.mean),
                                          ("variance", rep.variance, rep.variance_stderr, gp.variance[:, None])):
        fit = E.width_sweep_fit(rep.widths, values, stderrs, infinite=target)
        print(f"last layer {stat}: extrapolated {np.round(fit.a.ravel(), 4)} +- {np.round(fit.a_stderr.ravel(), 4)}, "
              f"NNGP posterior {np.round(np.ravel(target), 4)}, pulls {np.round(fit.a_pull.ravel(), 2)}")
        assert np.all(np.abs(fit.a_pull) < 3)
