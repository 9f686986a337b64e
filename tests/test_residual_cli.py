"""The command line with skip connections: ``efftheory kernels --skip --branch`` works and records them;
``efftheory compare --skip --branch`` runs the theory-versus-networks comparison and records them;
finite_width_diagonal and dntk_statistics refuse residual MLPs (their residual recursions do not exist yet)."""

import json
import re

import numpy as np
import pytest

import efftheory as et
from efftheory.cli import main


def _error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_kernels_with_skip_and_branch(tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["kernels", "--activation", "relu", "--depth", "5", "--critical", "--skip", "0.6", "--branch", "0.5",
                 "--inputs", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skip = 0.6, branch = 0.5" in text
    data = json.loads((out / "kernels.json").read_text())
    cfg = data["config"]
    assert cfg["skip"] == 0.6 and cfg["branch"] == 0.5
    # critical at xi, gamma: C_W = 2 (1 - xi^2) / gamma^2
    assert cfg["C_W"] == pytest.approx(2 * (1 - 0.36) / 0.25, rel=1e-14)
    net = et.MLP(5, 1, "relu", C_W=cfg["C_W"], skip=0.6, branch=0.5)
    want = et.infinite_width(net, np.asarray(cfg["inputs"]["x"]))
    np.testing.assert_allclose(data["K"], want.K, rtol=1e-14)
    np.testing.assert_allclose(data["Theta"], want.Theta, rtol=1e-14)


@pytest.mark.parametrize("argv, match", [
    (["compare", "--activation", "tanh", "--depth", "2", "--skip", "0.5", "--out", "OUT"],
     "--skip: a depth-2 MLP has no hidden"),
    (["kernels", "--activation", "tanh", "--depth", "2", "--skip", "0.5"], "--skip: a depth-2 MLP has no hidden"),
    (["kernels", "--activation", "tanh", "--depth", "4", "--branch", "0"], "--branch: expected a positive number"),
    (["kernels", "--activation", "relu", "--depth", "4", "--critical", "--skip", "1.5"],
     r"--critical with --skip: a critical initialization needs \|skip\| < 1"),
    (["kernels", "--activation", "relu", "--depth", "4", "--skip", "nan"], "--skip"),
])
def test_residual_usage_errors(argv, match, tmp_path, capsys):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = _error(capsys)
    assert re.search(match, err), err
    assert not (tmp_path / "o" / "report.json").exists()


def test_diagonal_and_dntk_theory_refuse_residual_nets():
    net = et.MLP(4, 8, "tanh", skip=0.5, branch=0.8)
    x = np.ones((1, 3))
    for fn, name in ((et.finite_width_diagonal, "finite_width_diagonal"), (et.dntk_statistics, "dntk_statistics")):
        with pytest.raises(ValueError, match=rf"net: {name} does not support residual MLPs yet \(skip/branch: layer 2"):
            fn(net, x)


def test_compare_with_skip_and_branch(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["compare", "--activation", "tanh", "--depth", "3", "--widths", "8,16,32", "--networks", "40",
            "--inputs", "2", "--skip", "0.8", "--branch", "0.6", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["config"]["network"]["skip"] == 0.8 and data["config"]["network"]["branch"] == 0.6
    net = et.MLP(3, 8, "tanh", skip=0.8, branch=0.6)
    x = np.asarray(data["config"]["inputs"]["x"])
    want = et.finite_width(net, x)
    rows = [r for r in data["rows"] if r["statistic"] == "metric" and r["layer"] == 2 and r["width"] == 8]
    assert rows
    for r in rows:
        a, b = r["entry"]
        assert r["predicted_infinite"] == pytest.approx(float(want.K[1, a, b]), rel=1e-12)
        assert r["predicted_first_order"] == pytest.approx(float(want.K[1, a, b] + want.G1[1, a, b] / 8), rel=1e-10)


def test_sampled_distribution_keeps_skip_connections():
    """The empirical output distribution truncates the network at a layer: a plain layer keeps the residual
    layers before it, a residual layer is refused (it cannot be an output layer)."""
    from efftheory.empirical import distribution

    net = et.MLP(4, 8, "tanh", skip=0.5, branch=0.8)
    sub = distribution._truncate(net, 4, 2)
    assert sub.skips == net.skips and sub.branches == net.branches and sub.output_width == 2
    with pytest.raises(ValueError, match=r"layer: layer 3 of .* is a residual layer"):
        distribution._truncate(net, 3, 2)
