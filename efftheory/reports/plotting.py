r"""Figures of the theory and of theory beside sampled networks (matplotlib; every function returns a Figure).

* :func:`plot_kernels`      K^(l)_aa, the correlation K_ab/sqrt(K_aa K_bb) and Theta^(l)_aa across layers
* :func:`plot_criticality`  chi_parallel and chi_perp at the fixed point K*, and K*, against C_W
* :func:`plot_universality` chi_parallel(K), chi_perp(K) at criticality and the flow of K^(l), per class
* :func:`plot_width_sweep`  a statistic against 1/n: measured points with error bars, the infinite-width
  value, the first-order line a + c1/n and the fitted a + c1/n + c2/n^2
* :func:`plot_depth_profile` a normalised statistic against depth (V/(n K^2), relative NTK variance):
  theory lines per width, measured points with error bars

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state), so they can be created in
scripts and tests without a display; ``fig.savefig(path)`` writes them, and Jupyter shows them when
they are the value of a cell (after ``%matplotlib inline``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from .._precision import wrap_module

if TYPE_CHECKING:
    from ..activations import Activation
    from ..network import MLP
    from ..theory.finite import FiniteWidth
    from ..theory.infinite import InfiniteWidth
    from .compare import DepthProfile, Report, StatisticComparison

__all__ = ["plot_kernels", "plot_criticality", "plot_universality", "plot_width_sweep", "plot_depth_profile",
           "plot_four_point_depth", "default_panels"]

_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7")


def _figure(ncols: int, nrows: int = 1, size=(4.2, 3.4)) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    return fig, axes


# ------------------------------------------------------------------------------------------ infinite width
def plot_kernels(kernels: InfiniteWidth | FiniteWidth | MLP, x: ArrayLike | None = None, *,
                 max_pairs: int = 6) -> Figure:
    """K^(l)_aa, correlations rho^(l)_ab = K_ab / sqrt(K_aa K_bb), and Theta^(l)_aa against the layer l.

    Args:
      kernels: an :class:`efftheory.InfiniteWidth` (or :class:`efftheory.FiniteWidth`), or an
        :class:`efftheory.MLP` together with inputs ``x`` (N, n_0).
      max_pairs: at most this many input pairs in the correlation panel.
    """
    from ..network import MLP
    from ..theory.infinite import infinite_width

    if isinstance(kernels, MLP):
        if x is None:
            raise ValueError("x: inputs are needed when kernels is an MLP")
        kernels = infinite_width(kernels, x)
    if not hasattr(kernels, "K") or not hasattr(kernels, "Theta"):
        raise ValueError(f"kernels: expected an InfiniteWidth/FiniteWidth or an MLP, got {type(kernels).__name__}")
    K, Th = np.asarray(kernels.K), np.asarray(kernels.Theta)
    L, N = K.shape[0], K.shape[1]
    layers = np.arange(1, L + 1)
    fig, ax = _figure(3)
    for a in range(N):
        c = _COLORS[a % len(_COLORS)]
        ax[0].plot(layers, K[:, a, a], "o-", color=c, ms=3, label=fr"$K_{{{a}{a}}}$")
        ax[2].plot(layers, Th[:, a, a], "o-", color=c, ms=3, label=fr"$\Theta_{{{a}{a}}}$")
    pairs = [(a, b) for a in range(N) for b in range(a + 1, N)][:max_pairs]
    for i, (a, b) in enumerate(pairs):
        rho = K[:, a, b] / np.sqrt(np.maximum(K[:, a, a] * K[:, b, b], 1e-300))
        ax[1].plot(layers, rho, "o-", ms=3, color=_COLORS[i % len(_COLORS)], label=fr"$\rho_{{{a}{b}}}$")
    ax[0].set_ylabel(r"$K^{(\ell)}_{\alpha\alpha}$")
    ax[0].set_title("NNGP kernel (diagonal)")
    ax[1].set_ylabel(r"$K_{\alpha\beta}/\sqrt{K_{\alpha\alpha}K_{\beta\beta}}$")
    ax[1].set_title("correlation of inputs")
    ax[2].set_ylabel(r"$\Theta^{(\ell)}_{\alpha\alpha}$")
    ax[2].set_title("frozen NTK (diagonal)")
    if not pairs:
        ax[1].text(0.5, 0.5, "one input: no pairs", ha="center", va="center", transform=ax[1].transAxes)
    for a_, vals in ((ax[0], K), (ax[2], Th)):
        diag = np.concatenate([vals[:, a, a] for a in range(N)])
        top = float(np.max(diag[np.isfinite(diag)])) if np.any(np.isfinite(diag)) else 1.0
        if top > 0:
            a_.set_ylim(0, 1.1 * top)
    for a_ in ax:
        a_.set_xlabel(r"layer $\ell$")
        a_.grid(alpha=0.3)
        if a_.get_legend_handles_labels()[0]:
            a_.legend(fontsize=8)
    net = getattr(kernels, "net", None)
    if net is not None:
        fig.suptitle(f"infinite width: {net.sigma.name}, C_W = {_short(net.C_Ws)}, C_b = {_short(net.C_bs)}")
    return fig


def _short(vals):
    vals = tuple(vals)
    return f"{vals[0]:.4g}" if len(set(vals)) == 1 else "per layer"


def _sig2_grid(act, K):
    """<sigma^2>_K on an array of variances (one quadrature rule for the whole grid), in float64."""
    import jax.numpy as jnp

    from .._precision import enable_x64
    from ..gaussian import expect1, rule_size

    with enable_x64(True):
        order = rule_size(act, float(np.max(K)), check=False)  # a figure over K up to 1e5: ~1e-3 there is fine
        return np.asarray(expect1(lambda z: act.fn(z) ** 2, jnp.asarray(K, jnp.float64), order=order))


def _fixed_points(act, C_Ws, C_b, K0=1.0):
    """K* reached from K0 for each C_W (0 when the flow decays, inf when it grows without bound).

    Scale-invariant activations: :func:`efftheory.fixed_point` (closed form; on the critical line every
    K is a fixed point and K0 is returned).  Others: a dense logarithmic grid of
    g(K) = C_b + C_W <sigma^2>_K - K (interpolated in log K; within ~1e-4 of ``fixed_point``).
    """
    if act.homogeneous:
        from ..theory.criticality import fixed_point

        return np.asarray([float(fixed_point(act, C_W, C_b, K0=K0)) for C_W in C_Ws])
    grid = np.geomspace(1e-8, 1e5, 1200)
    s = _sig2_grid(act, grid)
    s0 = float(_sig2_grid(act, np.asarray([K0]))[0])
    out = []
    for C_W in C_Ws:
        g = C_b + C_W * s - grid
        g0 = C_b + C_W * s0 - K0
        if g0 == 0:
            out.append(K0)
            continue
        up = g0 > 0
        idx = np.nonzero(grid > K0)[0] if up else np.nonzero(grid < K0)[0][::-1]
        prevK, prevg = K0, g0
        found = math.inf if up else 0.0
        for i in idx:
            if not np.isfinite(g[i]):
                found = math.inf
                break
            if np.sign(g[i]) != np.sign(g0):
                la, lb = math.log(prevK), math.log(grid[i])
                t = prevg / (prevg - g[i])
                found = math.exp(la + t * (lb - la))
                break
            prevK, prevg = grid[i], g[i]
        out.append(found)
    return np.asarray(out)


def _criticality_curves(act, C_W, C_b, K0=1.0):
    """(chi_parallel, chi_perp, K*) at the fixed point reached from K0, for each C_W (what
    :func:`plot_criticality` draws).  chi at K* = inf is NaN except for the scale-invariant class,
    whose chi = C_W (c+^2 + c-^2)/2 does not depend on K (relu: C_W/2 for every C_W, 1 at C_W = 2)."""
    from ..theory.criticality import chi_parallel, chi_perp

    C_W = np.asarray(C_W, np.float64).reshape(-1)
    Ks = _fixed_points(act, C_W, C_b, K0)
    finite = np.isfinite(Ks)
    K_eval = np.where(finite, Ks, 1.0)
    chi_par = np.asarray(chi_parallel(act, K_eval, 1.0)) * C_W
    chi_per = np.asarray(chi_perp(act, K_eval, 1.0)) * C_W
    if not act.homogeneous:  # chi at K* = inf is meaningless except for scale-invariant activations
        chi_par = np.where(finite, chi_par, np.nan)
        chi_per = np.where(finite, chi_per, np.nan)
    return chi_par, chi_per, Ks


def plot_criticality(activation: str | Activation | Callable, C_b: float | None = None, C_W: ArrayLike | None = None,
                     *, K0: float = 1.0) -> Figure:
    r"""chi_parallel and chi_perp at the fixed point, and the fixed point K*, against C_W (PDLT ch. 5).

    Args:
      activation: a registry name, an Activation or a callable.
      C_b: bias variance held fixed (default: the critical C_b, 0 where no criticality exists).
      C_W: the C_W values (default: 60 points from 0.25 to 2 x the critical C_W, or to 4).
      K0: where the single-input flow K -> C_b + C_W <sigma^2>_K starts; K* is where it ends
        (0: decays to zero, inf: grows without bound).
    """
    from ..activations import get_activation
    from ..theory.criticality import critical_init

    act = get_activation(activation)
    crit = critical_init(act)
    has_crit = math.isfinite(crit.C_W)
    if C_b is None:
        C_b = crit.C_b if has_crit else 0.0
    C_b = float(C_b)
    if C_W is None:
        top = 2 * crit.C_W if has_crit else 4.0
        C_W = np.linspace(0.25 * (crit.C_W if has_crit else 1.0), top, 60)
    C_W = np.asarray(C_W, np.float64).reshape(-1)
    if C_W.size == 0 or np.any(~np.isfinite(C_W)) or np.any(C_W <= 0):
        raise ValueError("C_W: expected positive finite values")
    chi_par, chi_per, Ks = _criticality_curves(act, C_W, C_b, K0)
    finite = np.isfinite(Ks)

    fig, ax = _figure(2)
    ax[0].plot(C_W, chi_par, "-", color="C0", label=r"$\chi_\parallel(K^\star)$")
    ax[0].plot(C_W, chi_per, "--", color="C1", label=r"$\chi_\perp(K^\star)$")
    ax[0].axhline(1.0, color="0.5", lw=0.8)
    ax[0].set_ylabel("susceptibility at the fixed point")
    ax[0].set_title(f"{act.name}: susceptibilities, C_b = {C_b:.4g}")

    shown = np.where(finite, Ks, np.nan)
    ax[1].plot(C_W, shown, "-", color="C2", label=r"$K^\star$ reached from $K^{(1)}=$" + f"{K0:g}")
    if np.any(~finite):
        ax[1].fill_between(C_W, 0, 1, where=~finite, transform=ax[1].get_xaxis_transform(), color="C3",
                           alpha=0.12, label=r"$K^{(\ell)} \to \infty$")
    ax[1].set_ylabel(r"fixed point $K^\star$")
    ax[1].set_title(r"fixed point of $K \to C_b + C_W\langle\sigma^2\rangle_K$")
    fin = np.concatenate([Ks[finite], [crit.K_star] if has_crit and crit.K_star is not None else []])
    if fin.size and np.max(fin) > 0:
        ax[1].set_ylim(-0.05 * np.max(fin), 1.1 * np.max(fin))
    if has_crit and abs(C_b - crit.C_b) < 1e-12:
        ax[0].plot([crit.C_W], [1.0], "k*", ms=9, label=r"criticality: $\chi_\parallel=\chi_\perp=1$")
        if crit.K_star is not None:
            ax[1].plot([crit.C_W], [crit.K_star], "k*", ms=9, label=f"critical K* = {crit.K_star:.3g}")
        elif crit.marginal_line:  # scale-invariant: on the critical line every K is a fixed point
            ax[1].axvline(crit.C_W, color="C2", lw=3, alpha=0.5, label="every K is a fixed point")
    for a_ in ax:
        if has_crit and abs(C_b - crit.C_b) < 1e-12:
            a_.axvline(crit.C_W, color="k", ls=":", lw=1, label=f"critical C_W = {crit.C_W:.4g}")
        a_.set_xlabel(r"$C_W$")
        a_.grid(alpha=0.3)
        a_.legend(fontsize=8)
    fig.suptitle(f"criticality of {act.name} ({crit.universality_class} class)")
    return fig


def plot_universality(activations: str | Sequence[str | Activation | Callable] = ("relu", "tanh", "gelu"), *,
                      depth: int = 100, K1: float = 1.0, K_range: tuple[float, float] = (1e-3, 1e2)) -> Figure:
    r"""Universality classes at criticality: chi_parallel(K), chi_perp(K), and the flow of K^(l).

    For each activation at its :func:`efftheory.critical_init`: left, the two susceptibilities against K
    (both 1 at K* -- everywhere for the scale-invariant class, only as K -> 0 for the K*=0 class, at one
    K* for the half-stable class); right, K^(l) of a single input with K^(1) = ``K1`` against l (log-log:
    constant for scale-invariant, a 1/l power law for K*=0).
    """
    import jax.numpy as jnp

    from ..activations import get_activation
    from ..network import MLP
    from ..theory.criticality import chi_parallel, chi_perp, critical_init
    from ..theory.infinite import infinite_width

    if isinstance(activations, str):
        activations = (activations,)
    Kgrid = np.geomspace(K_range[0], K_range[1], 200)
    fig, ax = _figure(2, size=(5.0, 3.8))
    for i, name in enumerate(activations):
        act = get_activation(name)
        crit = critical_init(act)
        c = _COLORS[i % len(_COLORS)]
        if not math.isfinite(crit.C_W):
            ax[0].plot([], [], color=c, label=f"{act.name}: no criticality")
            continue
        ax[0].plot(Kgrid, chi_parallel(act, Kgrid, crit.C_W), "-", color=c,
                   label=fr"{act.name} ({crit.universality_class}): $\chi_\parallel$")
        ax[0].plot(Kgrid, chi_perp(act, Kgrid, crit.C_W), "--", color=c, label=r"$\chi_\perp$")
        if crit.K_star is not None and crit.K_star > 0:
            ax[0].axvline(crit.K_star, color=c, ls=":", lw=1)
        if K1 <= crit.C_b:
            continue
        x = jnp.asarray([[math.sqrt((K1 - crit.C_b) / crit.C_W)]])
        net = MLP(depth, 1, act, C_W=crit.C_W, C_b=crit.C_b)
        K = np.asarray(infinite_width(net, x).K)[:, 0, 0]
        ax[1].loglog(np.arange(1, depth + 1), K, "-", color=c, label=f"{act.name}")
        if crit.K_star is not None and crit.K_star > 0:
            ax[1].axhline(crit.K_star, color=c, ls=":", lw=1, label=fr"$K^\star$ = {crit.K_star:.3g}")
    ells = np.arange(1, depth + 1)
    ax[1].loglog(ells, 1 / (2 * ells), color="0.6", lw=0.8, ls="--", label=r"$1/(2\ell)$ (tanh asymptote)")
    ax[0].set_xscale("log")
    ax[0].axhline(1.0, color="0.5", lw=0.8)
    ax[0].set_xlabel("$K$")
    ax[0].set_ylabel("susceptibility at critical $(C_b, C_W)$")
    ax[0].set_title(r"$\chi_\parallel(K)$ (solid), $\chi_\perp(K)$ (dashed)")
    ax[1].set_xlabel(r"layer $\ell$")
    ax[1].set_ylabel(r"$K^{(\ell)}$")
    ax[1].set_title(fr"kernel flow at criticality, $K^{{(1)}} = {K1:g}$")
    for a_ in ax:
        a_.grid(alpha=0.3, which="both")
        a_.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------ finite width
def default_panels(report: Report) -> list[tuple[str, int, tuple]]:
    """Representative (statistic, layer, entry) panels of a :class:`efftheory.compare.Report`."""
    comps = report.comparisons
    L = comps["metric"].layers[-1]
    N = report.x.shape[0]
    panels = [("metric", L, (0, 0))]
    if N >= 2:
        panels.append(("metric", L, (0, 1)))
    fp = comps["four_point"]
    vlayers = [f.layer for f in fp.fits if f.entry == (0, 0, 0, 0)] or \
              [r.layer for r in fp.rows if r.entry == (0, 0, 0, 0)]
    if vlayers:
        panels.append(("four_point", max(vlayers), (0, 0, 0, 0)))
    panels += [("ntk_mean", L, (0, 0)), ("ntk_variance", L, (0, 0, 0, 0))]
    return panels


def plot_width_sweep(report: Report | Mapping[str, StatisticComparison],
                     panels: Sequence[tuple[str, int, tuple]] | None = None, *, ncols: int | None = None) -> Figure:
    r"""A statistic against 1/n: sampled values with error bars, the infinite-width value a (dashed),
    the first-order prediction a + c1/n (solid) and the weighted fit a + c1/n + c2/n^2 (dotted).

    Args:
      report: a :class:`efftheory.compare.Report` (or a dict statistic -> StatisticComparison).
      panels: a list of (statistic, layer, entry) (default :func:`default_panels`).
    """
    from .compare import STATISTICS, entry_label

    comps = getattr(report, "comparisons", report)
    if panels is None:
        panels = default_panels(report)
    if not panels:
        raise ValueError("panels: expected at least one (statistic, layer, entry)")
    n = len(panels)
    ncols = ncols or min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, ax = _figure(ncols, nrows)
    for k, (stat, layer, entry) in enumerate(panels):
        if stat not in comps:
            raise ValueError(f"panels: unknown statistic {stat!r}; expected one of {sorted(comps)}")
        comp = comps[stat]
        if layer not in comp.layers:
            raise ValueError(f"panels: statistic {stat!r} has layers {comp.layers}, not {layer}")
        m, s, a, c1 = comp.series(layer, entry)
        w = np.asarray(comp.widths, np.float64)
        ok = np.isfinite(m)
        if not np.any(ok):
            raise ValueError(f"panels: {stat} {entry_label(entry)} was not measured at layer {layer} "
                             f"(a layer with one neuron has no cross-neuron statistics)")
        inv = 1.0 / w
        xs = np.linspace(0.0, 1.08 * inv.max(), 100)
        axk = ax[k]
        axk.errorbar(inv[ok], m[ok], yerr=s[ok], fmt="o", color="k", ms=4, capsize=3, label="sampled networks")
        axk.axhline(a, color="C0", ls="--", lw=1.2, label=r"$n=\infty$")
        axk.plot(xs, a + c1 * xs, color="C3", lw=1.5, label="first order: " + r"$a + c_1/n$")
        fit = comp.fit(layer, tuple(entry))
        if fit is not None:
            c2 = fit.c2 if math.isfinite(fit.c2) else 0.0
            axk.plot(xs, fit.a + fit.c1 * xs + c2 * xs**2, color="0.5", ls=":", lw=1.2,
                     label="fit " + (r"$a + c_1/n + c_2/n^2$" if fit.order == 2 else r"$a + c_1/n$"))
            axk.text(0.97, 0.03, f"verdict: {fit.verdict}\n" + fr"$c_1$ = {fit.c1:.3g} ± {fit.c1_stderr:.2g} "
                     fr"(theory {_small0(fit.predicted_c1, fit.c1_stderr)})", transform=axk.transAxes, ha="right",
                     va="bottom", fontsize=7, color=_VERDICT_COLOR.get(fit.verdict, "k"))
        axk.set_xlim(0, xs[-1])
        axk.set_xlabel(r"$1/n$")
        axk.set_ylabel(STATISTICS[stat][1])
        where = "output layer" if stat.startswith("ntk") else "layer"
        axk.set_title(f"{stat} {entry_label(entry)}, {where} {layer}", fontsize=10)
        axk.grid(alpha=0.3)
        for xi, yi, wi in zip(inv[ok], m[ok], w[ok]):
            axk.annotate(f"n={int(wi)}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7,
                         color="0.3")
        axk.legend(fontsize=7)
    for k in range(n, len(ax)):
        ax[k].set_visible(False)
    cfg = getattr(report, "config", None)
    if cfg:
        from .compare import verdict_counts

        net = cfg["network"]
        c = verdict_counts(report.fits)
        fig.suptitle(f"{net['activation']}, depth {net['depth']}, C_W = {_fmt(net['C_W'])}, C_b = {_fmt(net['C_b'])}: "
                     f"{cfg['n_networks']} networks per width ({cfg['dtype']})\nall {sum(c.values())} fits: "
                     f"{c['agrees']} agree, {c['consistent, unresolved']} consistent but unresolved, "
                     f"{c['disagrees']} disagree")
    return fig


_VERDICT_COLOR = {"agrees": "C2", "consistent, unresolved": "0.35", "disagrees": "C3"}


def _small0(v, ref) -> str:
    """v to 3 significant digits, or 0 when it is rounding noise next to ``ref`` (a zero prediction)."""
    return "0" if abs(v) <= 1e-9 * abs(ref) else f"{v:.3g}"


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, (int, float)) else "per layer"


def plot_depth_profile(profile: DepthProfile, *, collapse: bool = True, logy: bool = False) -> Figure:
    r"""A :class:`efftheory.compare.DepthProfile` against depth.

    Left: the first-order theory line for each width (solid) and the sampled networks at that width
    (markers with error bars).  Right (``collapse``): the same multiplied by n, where first-order theory
    is one width-independent curve (black) and the sampled widths must collapse onto it (their spread
    is the O(1/n) next order), with known asymptotes (dotted, e.g. 5(l-1) for relu, (2/3) l for tanh).
    """
    if not hasattr(profile, "theory") or not hasattr(profile, "layers"):
        raise ValueError(f"profile: expected a DepthProfile, got {type(profile).__name__}")
    fig, axes = _figure(2 if collapse else 1, size=(5.4, 4.2))
    layers = np.asarray(profile.layers, np.float64)
    widths = np.asarray(profile.widths, np.float64)
    W = len(widths)
    missing = []
    for panel, ax in enumerate(axes):
        scale = widths if panel == 1 else np.ones_like(widths)
        for i, n in enumerate(widths):
            c = _COLORS[i % len(_COLORS)]
            if panel == 0:
                ax.plot(layers, profile.theory[i], "-", color=c, lw=1.5, label=f"theory, n = {int(n)}")
            m, s = profile.measured[i] * scale[i], profile.stderr[i] * scale[i]
            ok = np.isfinite(m)
            if panel == 0:
                missing = [int(v) for v in layers[~ok]]
            if np.any(ok):
                ax.errorbar(layers[ok] + 0.06 * (i - (W - 1) / 2), m[ok], yerr=s[ok], fmt="o", color=c, ms=4,
                            capsize=3, label=f"sampled, n = {int(n)}")
        if panel == 1:
            ax.plot(layers, profile.theory[0] * widths[0], "-", color="k", lw=1.5, label="first-order theory")
            for lab, vals in profile.reference:
                ax.plot(layers, np.asarray(vals), ":", color="0.4", lw=1.2, label=lab.replace("/n", ""))
            ax.set_ylabel(r"$n\times$" + profile.label)
            ax.set_title("times n: widths collapse at first order", fontsize=10)
        else:
            ax.set_ylabel(profile.label)
            title = {"four_point": "normalised four-point vertex (input {a})",
                     "ntk_variance": "relative NTK variance, output layer (input {a})"}
            ax.set_title(title.get(profile.name, profile.name).format(a=profile.input), fontsize=10)
        ax.set_xlabel(profile.xlabel)
        if logy:
            ax.set_yscale("log")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if panel == 0 else 1)
    if missing:
        axes[0].text(0.98, 0.02, f"not measurable (one neuron) at {', '.join(map(str, missing))}", ha="right",
                     va="bottom", fontsize=7, color="0.4", transform=axes[0].transAxes)
    return fig


def plot_four_point_depth(report: Report | DepthProfile) -> Figure:
    """V_(aa)(aa)/(n K_aa^2) against depth from a :class:`efftheory.compare.Report` (or a DepthProfile)."""
    return plot_depth_profile(getattr(report, "depth_profile", report))


wrap_module(sys.modules[__name__])  # every public function here runs in float64 (efftheory._precision)
