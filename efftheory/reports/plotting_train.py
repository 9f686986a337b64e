r"""Figures of trained ensembles beside the infinite-width predictions (matplotlib; every function returns a Figure).

* :func:`plot_predictions`  test predictions along the data coordinate: the infinite-width ensemble mean
  with a +-2 sd band, the NNGP posterior mean, the measured ensemble mean with its +-2 sd band at the
  narrowest and widest widths, and the training points
* :func:`plot_deviation`    the rms deviation of the measured mean and variance from the theory against
  1/n, and the extrapolated (n = inf) pulls per test input
* :func:`plot_ntk_change`   the NTK's relative change over training against the width (log-log): per
  network and of the ensemble mean, with fitted power laws
* :func:`plot_training_curves` the expected loss over the training steps at infinite width beside the
  measured mean loss at every width

Figures use :class:`matplotlib.figure.Figure` directly (no pyplot state), as in :mod:`efftheory.plotting`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from .._precision import wrap_module

if TYPE_CHECKING:
    from .compare_train import TrainingReport, TrainingSweep

__all__ = ["plot_predictions", "plot_deviation", "plot_ntk_change", "plot_training_curves"]

_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7")


def _figure(ncols: int, nrows: int = 1, size=(4.4, 3.5)):
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    return fig, axes


def _check(report):
    from .compare_train import TrainingReport

    if not isinstance(report, TrainingReport):
        raise ValueError(f"report: expected an efftheory.compare_train.TrainingReport, got {type(report).__name__}")
    return report


def _title(report) -> str:
    c = report.config
    net = c["network"]
    what = "last layer trained" if c.get("last_layer") else "all layers trained"
    return (f"{net['activation']}, depth {net['depth']}, {what}: {c['steps']} GD steps, "
            f"eta = {c['learning_rate']:.3g}")


def plot_predictions(report: TrainingReport, *, widths: Iterable[int] | None = None, max_outputs: int = 3) -> Figure:
    """Test predictions after training against the data coordinate (one panel per output component).

    Args:
      report: a :class:`efftheory.compare_train.TrainingReport`.
      widths: the measured widths to show (default: the narrowest and the widest).
      max_outputs: at most this many output components.
    """
    rep = _check(report)
    ws = [int(w) for w in rep.widths]
    show = [ws[0], ws[-1]] if widths is None else [int(w) for w in widths]
    for w in show:
        if w not in ws:
            raise ValueError(f"widths: {w} was not measured; the report has widths {ws}")
    show = sorted(set(show))
    k = min(rep.mean.shape[2], max_outputs)
    fig, axes = _figure(k, size=(5.6, 4.0))
    if rep.s_test is not None:
        xs, xd, xlabel = np.asarray(rep.s_test), np.asarray(rep.s_train), "input coordinate $s$"
    else:
        xs, xd, xlabel = np.arange(rep.mean.shape[1], dtype=float), None, "test input index"
    order = np.argsort(xs)
    m_inf, v_inf = rep.theory_mean, rep.theory_variance
    for j in range(k):
        ax = axes[j]
        sd = np.sqrt(np.maximum(v_inf[:, j], 0.0))
        ax.fill_between(xs[order], (m_inf[:, j] - 2 * sd)[order], (m_inf[:, j] + 2 * sd)[order], color="k", alpha=0.12,
                        lw=0, label=r"$n=\infty$: mean $\pm 2$ sd")
        ax.plot(xs[order], m_inf[order, j], "k-", lw=1.6, label=r"$n=\infty$ NTK ensemble mean")
        ax.plot(xs[order], rep.posterior.mean[order, j], color="0.45", ls="--", lw=1.1,
                label="NNGP posterior mean")
        for c, w in enumerate(show):
            i = ws.index(w)
            col = _COLORS[(c + 1) % len(_COLORS)]
            m = rep.mean[i, :, j]
            s = np.sqrt(np.maximum(rep.variance[i, :, j], 0.0))
            ax.errorbar(xs, m, yerr=2 * s, fmt="o", ms=3.5, color=col, capsize=2, lw=1, alpha=0.9,
                        label=f"trained, n = {w}: mean $\\pm 2$ sd")
        if xd is not None:
            ax.plot(xd, rep.y_train[:, j], "kx", ms=8, mew=2, label="training data")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("trained output $z_T(x)$" + (f", component {j}" if k > 1 else ""))
        ax.set_title(f"output {j}" if k > 1 else "test predictions", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(rep), fontsize=10)
    return fig


def _line_through_origin(inv, d, s):
    """Weighted least-squares c in d = c / n (through the origin)."""
    ok = np.isfinite(d) & np.isfinite(s) & (s > 0)
    if not np.any(ok):
        return math.nan
    w = 1.0 / s[ok] ** 2
    return float(np.sum(w * inv[ok] * d[ok]) / np.sum(w * inv[ok] ** 2))


def plot_deviation(report: TrainingReport) -> Figure:
    """The measured ensemble's deviation from the infinite-width prediction against 1/n.

    Left and middle: rms over test inputs of (measured - n = inf) for the mean and the variance, with
    standard errors and a weighted line c/n through the origin.  Right: the width-sweep extrapolations
    a (n = inf) of every test entry, as pulls (a - theory)/stderr, with the +-3 band.
    """
    rep = _check(report)
    w = np.asarray(rep.widths, np.float64)
    inv = 1.0 / w
    fig, ax = _figure(3)
    xs = np.linspace(0, 1.08 * inv.max(), 50)
    for k, (name, d, s, slope) in enumerate((
            ("mean", rep.mean_deviation, rep.mean_deviation_stderr, rep.mean_deviation_slope),
            ("variance", rep.variance_deviation, rep.variance_deviation_stderr, rep.variance_deviation_slope))):
        a = ax[k]
        a.errorbar(inv, d, yerr=s, fmt="o", color="k", ms=4, capsize=3, label="trained networks")
        c = _line_through_origin(inv, d, s)
        if math.isfinite(c):
            a.plot(xs, c * xs, color="C3", lw=1.3, label=f"$c/n$, c = {c:.3g}")
        a.axhline(0, color="C0", ls="--", lw=1.1, label=r"$n=\infty$")
        lab = f"log-log slope {slope[0]:+.2f} ± {slope[1]:.2f}" if math.isfinite(slope[0]) else "slope unresolved"
        a.text(0.03, 0.95, lab, transform=a.transAxes, fontsize=8, va="top")
        a.set_xlim(0, xs[-1])
        a.set_xlabel(r"$1/n$")
        a.set_ylabel(f"rms deviation of the {name}")
        a.set_title(f"ensemble {name} of $z_T(x)$ vs $n=\\infty$", fontsize=10)
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="center right")
        for xi, yi, wi in zip(inv, d, w):
            a.annotate(f"n={int(wi)}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7, color="0.3")
    a = ax[2]
    if rep.mean_fit is not None:
        pm = np.asarray(rep.mean_fit.a_pull).reshape(-1)
        pv = np.asarray(rep.variance_fit.a_pull).reshape(-1)
        idx = np.arange(pm.size)
        a.plot(idx - 0.1, pm, "o", color="C0", ms=4, label="mean: fit $a$ vs theory")
        a.plot(idx + 0.1, pv, "s", color="C1", ms=4, label="variance: fit $a$ vs theory")
        a.axhspan(-3, 3, color="0.9", zorder=0, label=r"$\pm 3$ standard errors")
        a.axhline(0, color="k", lw=0.8)
        lim = max(3.5, float(np.nanmax(np.abs(np.r_[pm, pv]))) * 1.15)
        a.set_ylim(-lim, lim)
        c = rep.verdict_counts()
        a.text(0.02, 0.03, "\n".join(f"{k}: {d['agrees']} agree, {d['consistent, unresolved']} consistent but unresolved, "
                                     f"{d['disagrees']} disagree" for k, d in c.items()),
               transform=a.transAxes, fontsize=7, va="bottom")
    else:
        a.text(0.5, 0.5, "one width: no extrapolation", ha="center", va="center", transform=a.transAxes)
    a.set_xlabel("test entry (input, output)")
    a.set_ylabel("pull of the $n=\\infty$ extrapolation")
    a.set_title(r"width-sweep fit $a + c_1/n + c_2/n^2$", fontsize=10)
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(_title(rep), fontsize=10)
    return fig


def plot_ntk_change(report: TrainingReport) -> Figure:
    """||H_T - H_0||_F / ||H_0||_F against the width, log-log: per network (mean over networks) and of the
    ensemble-mean NTK, with fitted power laws and the reference slopes -1/2 and -1."""
    rep = _check(report)
    w = np.asarray(rep.widths, np.float64)
    fig, axes = _figure(1, size=(5.6, 4.2))
    ax = axes[0]
    xs = np.geomspace(w.min() / 1.3, w.max() * 1.3, 50)
    for name, v, s, slope, col in (
            ("per network", rep.ntk_change, rep.ntk_change_stderr, rep.ntk_change_slope, "C0"),
            ("ensemble mean", rep.ntk_mean_change, rep.ntk_mean_change_stderr, rep.ntk_mean_change_slope, "C3")):
        ok = np.isfinite(v) & (v > 0)
        ax.errorbar(w[ok], v[ok], yerr=s[ok], fmt="o", color=col, ms=5, capsize=3,
                    label=f"{name}" + (f": slope {slope[0]:+.2f} ± {slope[1]:.2f}" if math.isfinite(slope[0]) else ""))
        if math.isfinite(slope[0]) and np.any(ok):
            wt = 1.0 / np.maximum(s[ok] / v[ok], 1e-12) ** 2
            logc = float(np.sum(wt * (np.log(v[ok]) - slope[0] * np.log(w[ok]))) / np.sum(wt))
            ax.plot(xs, np.exp(logc) * xs ** slope[0], color=col, lw=1.2)
    ref = rep.ntk_change[0] if np.isfinite(rep.ntk_change[0]) and rep.ntk_change[0] > 0 else 1.0
    for p, ls in ((-0.5, ":"), (-1.0, "--")):
        ax.plot(xs, ref * (xs / w[0]) ** p, color="0.5", ls=ls, lw=1, label=f"$n^{{{p:g}}}$ (reference)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(w, [str(int(v)) for v in w])
    ax.minorticks_off()
    ax.set_xlabel("hidden width $n$")
    ax.set_ylabel(r"$\|H_T - H_0\|_F / \|H_0\|_F$")
    ax.set_title("NTK change over training", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle(_title(rep), fontsize=9)
    return fig


def plot_training_curves(report: TrainingReport, sweep: TrainingSweep | None = None) -> Figure:
    """The loss over training: the infinite-width expectation E[L_t] at the recorded steps, and (given the
    :class:`efftheory.compare_train.TrainingSweep`) the measured mean loss at every width."""
    rep = _check(report)
    fig, axes = _figure(1, size=(5.2, 4.0))
    ax = axes[0]
    th = rep.theory
    ax.plot(th.steps, th.loss, "k-", lw=1.6, label=r"$n=\infty$: $E[L_t]$")
    if sweep is not None:
        for i, (n, tr) in enumerate(zip(sweep.widths, sweep.trainings)):
            ax.plot(tr.steps, tr.loss.mean(axis=0), "o", ms=3.5, color=_COLORS[(i + 1) % len(_COLORS)],
                    label=f"trained, n = {int(n)}")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-descent step $t$")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_title(rep), fontsize=9)
    return fig


wrap_module(sys.modules[__name__])  # every public function here runs in float64 (efftheory._precision)
