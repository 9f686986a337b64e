"""efftheory.compare_train, efftheory.plotting_train and ``efftheory train``: a tiny sweep end to end."""

import io
import json
import math

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

import efftheory as et
from efftheory import compare_train as ct
from efftheory import datasets, predict
from efftheory import empirical as E
from efftheory import plotting_train as pt
from efftheory.cli import main

WIDTHS = (8, 16)
TINY = ["train", "--activation", "erf", "--depth", "2", "--C_W", "2", "--C_b", "0.3", "--widths", "8,16",
        "--networks", "12", "--steps", "12", "--record-every", "4", "--train-points", "4", "--test-points", "5",
        "--seed", "3", "--no-progress"]


def _one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("efftheory: error:") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    assert main(TINY + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    """The same sweep through the Python API, read back from the CLI's cache (nothing is retrained)."""
    ds = datasets.circle_regression(4, 5, seed=3)
    net = et.MLP(2, 8, "erf", C_W=2.0, C_b=0.3)
    return ct.train_and_compare(net, ds.x_train, ds.y_train, ds.x_test, WIDTHS, 12, steps=12, record_every=4, seed=3,
                                cache_dir=str(run_dir / "cache"), progress=False, s_train=ds.s_train,
                                s_test=ds.s_test)


def test_cli_writes_report_table_and_plots(run_dir, capsys):
    files = set(p.name for p in run_dir.iterdir())
    assert {"report.json", "table.txt", "predictions.png", "deviation.png", "ntk_change.png", "cache"} <= files
    for png in ("predictions.png", "deviation.png", "ntk_change.png"):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG")
    data = json.loads((run_dir / "report.json").read_text())
    cfg = data["config"]
    assert cfg["widths"] == [8, 16] and cfg["n_networks"] == 12 and cfg["steps"] == 12 and cfg["seed"] == 3
    assert cfg["command"].startswith("efftheory train") and "circle" in cfg["data"]
    assert len(data["measured"]["mean"]) == 2 and len(data["measured"]["mean"][0]) == 5
    assert data["fits"]["mean"]["order"] == 1
    table = (run_dir / "table.txt").read_text()
    assert "rms dev mean" in table and "NTK change/net" in table and "width-sweep fits" in table
    # three verdicts per test entry, counted separately in the table, the JSON and the printed summary
    counts = data["verdict_counts"]
    for stat in ("mean", "variance"):
        assert list(counts[stat]) == ["agrees", "consistent, unresolved", "disagrees"]
        flat = [v for row in data["verdicts"][stat] for v in row]
        assert len(flat) == 5 and all(counts[stat][k] == flat.count(k) for k in counts[stat])
    assert "test entries, n = inf extrapolation" in table and "consistent but unresolved" in table


def test_rerun_and_interrupted_run_give_the_identical_report(run_dir, capsys):
    before = (run_dir / "report.json").read_bytes()
    capsys.readouterr()
    assert main(TINY + ["--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "theory mean" in out and "log-log slope" in out and "fit a (mean)" in out
    assert (run_dir / "report.json").read_bytes() == before
    chunks = sorted((run_dir / "cache").glob("*.npz"))
    chunks[-1].unlink()  # as if interrupted before the last chunk was written
    assert main(TINY + ["--out", str(run_dir)]) == 0
    assert (run_dir / "report.json").read_bytes() == before
    assert sorted((run_dir / "cache").glob("*.npz")) == chunks


def test_report_through_the_api_matches_the_cli(report, run_dir):
    data = json.loads((run_dir / "report.json").read_text())
    np.testing.assert_allclose(report.mean, np.asarray(data["measured"]["mean"]), rtol=1e-12)
    assert report.mean.shape == report.variance.shape == report.mean_plain.shape == (2, 5, 1)
    assert report.ntk_change.shape == (2,) and np.all(report.ntk_change > 0)
    assert report.mean_fit.a.shape == (5, 1) and report.variance_fit.order == 1
    assert report.to_json() == report.to_json()
    # verdicts: efftheory.empirical.verdict on the extrapolated a, without a first-order prediction
    assert report.mean_verdict.tolist() == E.verdict(report.mean_fit, report.theory_mean).tolist()
    scale = np.max(np.abs(report.theory_variance))
    for v, _a, se, pull in zip(report.variance_verdict.ravel(), report.variance_fit.a.ravel(),
                              report.variance_fit.a_stderr.ravel(), report.variance_fit.a_pull.ravel()):
        assert v == ("disagrees" if abs(pull) > 3 else "agrees" if se <= 0.025 * scale else "consistent, unresolved")
    # the theory is predict.gradient_descent at the recorded steps with the report's learning rate
    kern = predict.train_test_kernels(et.MLP(2, 8, "erf", C_W=2.0, C_b=0.3), report.x_train, report.x_test)
    eta = report.config["learning_rate"]
    assert eta == pytest.approx(0.5 * predict.stability_bound(kern), rel=1e-12)
    gd = predict.gradient_descent(kern, report.y_train, learning_rate=eta, steps=12)
    np.testing.assert_allclose(report.theory_mean, gd.mean[0], rtol=1e-12)
    np.testing.assert_array_equal(report.steps, [0, 4, 8, 12])


def test_precise_estimators_at_a_vanishing_learning_rate():
    """With eta -> 0 the networks stay at their initialization: P_T = 0 and zhat_T = z_T = z_0, so the precise
    mean is exactly 0 and the precise variance is exactly the ensemble average of K^_xx (the conditional
    variance given each network's features), while the plain estimators are the sample mean and variance."""
    ds = datasets.circle_regression(4, 5, seed=3)
    net = et.MLP(2, 8, "erf", C_W=2.0, C_b=0.3)
    sweep = ct.training_sweep(net, ds.x_train, ds.y_train, ds.x_test, [8], 12, steps=1, learning_rate=1e-12, seed=3,
                              progress=False)
    rep = ct.compare_training(sweep)
    tr = sweep[8]
    assert rep.mean_fit is None and rep.variance_fit is None
    np.testing.assert_allclose(rep.mean, 0.0, atol=1e-9)
    np.testing.assert_allclose(rep.variance[0, :, 0], np.diagonal(tr.kernel_start, axis1=1, axis2=2)[:, 4:].mean(0),
                               rtol=1e-6)
    z = tr.f_test[:, -1, :, 0]
    np.testing.assert_allclose(rep.mean_plain[0, :, 0], z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rep.variance_plain[0, :, 0], z.var(0, ddof=1), rtol=1e-9)


def _png(fig):
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue().startswith(b"\x89PNG")
    for ax in fig.axes:
        if ax.get_visible() and ax.has_data():
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None


def test_plots(report):
    _png(pt.plot_predictions(report))
    _png(pt.plot_predictions(report, widths=[16]))
    _png(pt.plot_deviation(report))
    _png(pt.plot_ntk_change(report))
    _png(pt.plot_training_curves(report))
    with pytest.raises(ValueError, match="widths: 64 was not measured"):
        pt.plot_predictions(report, widths=[64])
    with pytest.raises(ValueError, match="report: expected"):
        pt.plot_deviation({})


def test_loglog_slope_recovers_a_power_law():
    w = np.array([32.0, 64, 128, 256])
    v = 3.0 * w**-0.75
    slope, se = ct.loglog_slope(w, v, 0.01 * v)
    assert slope == pytest.approx(-0.75, abs=1e-12) and 0 < se < 0.02
    assert all(math.isnan(s) for s in ct.loglog_slope(w, v, v))  # nothing resolved


def test_posterior_check_of_last_layer_training():
    """Last-layer training to convergence is Matheron's rule with each network's own kernel (pathwise)."""
    ds = datasets.circle_regression(4, 3, seed=3)
    net = predict.last_layer_net(et.MLP(2, 8, "erf", C_W=2.0, C_b=0.3))
    tr = E.train(net, ds.x_train, ds.y_train, ds.x_test, steps=3000, learning_rate=0.15, n_networks=8,
                            key=jax.random.PRNGKey(0), record_every=3000, progress=False)
    chk = ct.posterior_check(tr)
    assert chk.matheron_error < 1e-6
    assert chk.residual.shape == (8, 3, 1) and np.all(np.isfinite(chk.mean))
    with pytest.raises(ValueError, match="trained only in its last layer"):
        ct.posterior_check(E.train(net.replace(lambda_b=[0.3, 0.3]), ds.x_train, ds.y_train, ds.x_test,
                                              steps=1, learning_rate=0.1, n_networks=2,
                                              key=jax.random.PRNGKey(0), progress=False))


@pytest.mark.parametrize("extra, match", [
    (["--learning-rate", "5"], "stability bound 2/lambda_max"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--networks", "1"], "--networks"),
    (["--depth", "1"], "--depth"),
    (["--widths", "8,a"], "--widths"),
    (["--noise", "-1"], "--noise"),
    (["--steps", "0"], "--steps"),
    (["--critical", "--C_W", "2"], "--critical"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, extra, match):
    args = list(TINY)
    if "--depth" in extra:
        i = args.index("--depth")
        del args[i:i + 2]
    if "--critical" in extra:
        i = args.index("--C_W")
        del args[i:i + 2]
    assert main(args + extra + ["--out", str(tmp_path / "bad")]) == 2
    assert match in _one_line_error(capsys)


def test_api_validation():
    ds = datasets.circle_regression(4, 3, seed=3)
    net = et.MLP(2, 8, "erf")
    with pytest.raises(ValueError, match="learning_rate: .*stability bound"):
        ct.train_and_compare(net, ds.x_train, ds.y_train, ds.x_test, WIDTHS, 4, steps=2, learning_rate=50.0)
    with pytest.raises(ValueError, match="n_networks: expected one int or one per width"):
        ct.training_sweep(net, ds.x_train, ds.y_train, ds.x_test, WIDTHS, [4, 4, 4], steps=2, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"n_networks\[1\]"):
        ct.training_sweep(net, ds.x_train, ds.y_train, ds.x_test, WIDTHS, [4, 1], steps=2, learning_rate=0.1)
    with pytest.raises(ValueError, match="net: depth 1"):
        ct.training_sweep(et.MLP(1, 1, "erf"), ds.x_train, ds.y_train, ds.x_test, WIDTHS, 4, steps=2,
                          learning_rate=0.1)
    with pytest.raises(ValueError, match="sweep: expected"):
        ct.compare_training(None)


def test_cache_option_puts_the_chunks_elsewhere(run_dir, tmp_path, capsys):
    cache = tmp_path / "elsewhere"
    assert main(TINY + ["--out", str(tmp_path / "out"), "--cache", str(cache)]) == 0
    assert any(cache.glob("train_*.npz")) and not (tmp_path / "out" / "cache").exists()
    assert (tmp_path / "out" / "report.json").read_bytes() == (run_dir / "report.json").read_bytes()
