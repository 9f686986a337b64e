"""efftheory.plotting: every function returns a labelled matplotlib Figure that saves to PNG."""

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

import efftheory as et
from efftheory import compare as cmp
from efftheory import plotting

NET = et.MLP(3, 8, "tanh", C_W=1.0, C_b=0.0)
WIDTHS = (8, 16, 32)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    x = cmp.default_inputs(2, 8, seed=5)
    return cmp.compare(NET, x, WIDTHS, 50, 5, progress=False,
                       cache_dir=str(tmp_path_factory.mktemp("plot_cache")))


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


def _visible(fig):
    return [a for a in fig.axes if a.get_visible() and a.get_xlabel()]


def _check(fig, n_axes):
    assert isinstance(fig, Figure)
    axes = _visible(fig)
    assert len(axes) >= n_axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None
    assert _png(fig).startswith(b"\x89PNG")


def _errorbars(ax):
    return [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]


def test_width_sweep(report):
    fig = plotting.plot_width_sweep(report)
    _check(fig, 5)
    axes = _visible(fig)
    assert all(ax.get_xlabel() == "$1/n$" for ax in axes)
    for ax in axes:
        bars = _errorbars(ax)
        assert len(bars) == 1 and len(bars[0].lines[0].get_xdata()) == len(WIDTHS)
        labels = ax.get_legend_handles_labels()[1]
        assert any("n=" in s or "infty" in s for s in labels) and any("first order" in s for s in labels)


def test_width_sweep_panels(report):
    fig = plotting.plot_width_sweep(report, panels=[("ntk_mean", 3, (0, 1))])
    _check(fig, 1)
    with pytest.raises(ValueError, match="statistic"):
        plotting.plot_width_sweep(report, panels=[("nope", 3, (0, 0))])
    with pytest.raises(ValueError, match="layers"):
        plotting.plot_width_sweep(report, panels=[("ntk_mean", 2, (0, 0))])
    with pytest.raises(ValueError, match="not measured"):
        plotting.plot_width_sweep(report, panels=[("four_point", 3, (0, 0, 0, 0))])


def test_four_point_depth(report):
    fig = plotting.plot_four_point_depth(report)
    _check(fig, 2)
    left = _visible(fig)[0]
    assert len(_errorbars(left)) == len(WIDTHS)
    assert len([ln for ln in left.get_lines() if ln.get_label().startswith("theory")]) == len(WIDTHS)
    fig1 = plotting.plot_depth_profile(report.depth_profile, collapse=False)
    _check(fig1, 1)
    with pytest.raises(ValueError):
        plotting.plot_depth_profile("not a profile")


def test_kernels():
    x = cmp.default_inputs(3, 8, seed=0)
    net = et.MLP(4, 1, "relu", C_W=2.0, C_b=0.0)
    _check(plotting.plot_kernels(net, x), 3)
    one = plotting.plot_kernels(et.infinite_width(net, x[:1]))  # one input: an empty correlation panel
    assert isinstance(one, Figure) and _png(one).startswith(b"\x89PNG")
    assert "no pairs" in one.axes[1].texts[0].get_text()
    with pytest.raises(ValueError):
        plotting.plot_kernels(net)


def test_criticality():
    fig = plotting.plot_criticality("relu", C_W=np.linspace(0.5, 4, 15))
    _check(fig, 2)
    with pytest.raises(ValueError):
        plotting.plot_criticality("relu", C_W=[-1.0])


def test_fixed_points_match_the_library():
    Ks = plotting._fixed_points(et.get_activation("tanh"), [0.8, 1.5], 0.0)
    assert Ks[0] == 0.0
    assert Ks[1] == pytest.approx(et.fixed_point("tanh", 1.5, 0.0), rel=1e-3)


def test_universality():
    fig = plotting.plot_universality(("relu", "tanh"), depth=8)
    _check(fig, 2)
