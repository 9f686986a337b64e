r"""Theory beside measurement: first-order predictions against sampled finite networks.

Every comparison here puts a statistic in the form docs/theory.md states it,

    m(n) = a + c1/n + O(1/n^2),      n = the hidden width (n_{l-1} for layers l >= 2),

measures m(n) on ensembles at several widths (standard errors over networks), and fits the
width-sweep protocol of docs/theory.md ("How a prediction is confirmed") entry by entry:

=============  =======================================  =================  ===================
statistic      measured quantity                        a (n = inf)        c1 (first order)
=============  =======================================  =================  ===================
metric         E[z_{i;a1} z_{i;a2}] at layer l          K^(l)              G1^(l)
four_point     E[z_{i;a1} z_{i;a2} z_{j;a3} z_{j;a4}]   0                  V^(l)_{(a1a2)(a3a4)}
               - E[zz] E[zz]  (i != j, connected)
ntk_mean       E[H_{ii;a1a2}]  (output layer L)         Theta^(L)          H1^(L)
ntk_variance   Cov(H_{ii;a1a2}, H_{ii;a3a4})  (layer L) 0                  A_(12)(34) + B_(13)(24)
                                                                             + B_(14)(23)
=============  =======================================  =================  ===================

(layer 1 has no 1/n correction: c1 = G1^(1) = V^(1) = 0.)  The connected four-point function and
the NTK covariance are reported unscaled, so that the infinite-width value is 0 and the 1/n
coefficient *is* V (resp. A + 2B); :func:`four_point_depth` gives the normalised V/(n K^2).

One function per comparison, each returning a frozen dataclass:

* :func:`metric_comparison`, :func:`four_point_comparison`, :func:`ntk_mean_comparison`,
  :func:`ntk_variance_comparison`: a :class:`Sweep` and a :class:`FiniteWidth` ->
  :class:`StatisticComparison` (rows per width and fits per entry);
* :func:`four_point_depth`: V_(aa)(aa)/(n K_aa^2) against depth -> :class:`DepthProfile`;
* :func:`compare`: samples once, computes the theory once, and runs all of the above -> :class:`Report`
  (``report.table()``, ``report.to_json()``, ``report.save(dir)``);
* :func:`compare_ntk_depth`: the relative NTK variance of the output layer against depth (one
  ensemble per depth) -> :class:`DepthProfile`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .._io import atomic_write
from .._precision import wrap_module
from ..network import MLP
from ._table import clean, finite_or_none, g, net_config, num, pm, render

if TYPE_CHECKING:
    from ..empirical.ensemble import Sweep
    from ..theory.finite import FiniteWidth

__all__ = [
    "Row",
    "Fit",
    "StatisticComparison",
    "DepthProfile",
    "Report",
    "STATISTICS",
    "metric_comparison",
    "four_point_comparison",
    "ntk_mean_comparison",
    "ntk_variance_comparison",
    "four_point_depth",
    "compare",
    "compare_ntk_depth",
    "default_inputs",
    "versions",
    "verdict_counts",
    "verdict_summary",
    "VERDICT_RULE",
]

#: statistic name -> (short label for tables, axis label for plots, description)
STATISTICS = {
    "metric": ("K", r"$E[z_{i;\alpha_1} z_{i;\alpha_2}]$",
               "metric E[z_{i;a1} z_{i;a2}] at layer l = K + G1/n"),
    "four_point": ("V/n", r"$E[z_i z_i z_j z_j]_{\rm conn}$",
                   "connected cross-neuron four-point function E[z_{i;a1} z_{i;a2} z_{j;a3} z_{j;a4}] - "
                   "E[zz]E[zz] (i != j) at layer l = 0 + V/n"),
    "ntk_mean": ("Theta", r"$E[\hat H_{ii;\alpha_1\alpha_2}]$",
                 "mean output-layer NTK E[H_{ii;a1a2}] = Theta + H1/n"),
    "ntk_variance": ("Var H", r"${\rm Cov}(\hat H_{ii;\alpha_1\alpha_2}, \hat H_{ii;\alpha_3\alpha_4})$",
                     "output-layer NTK covariance Cov(H_{ii;a1a2}, H_{ii;a3a4}) = 0 + (A_(12)(34) + "
                     "B_(13)(24) + B_(14)(23))/n"),
}

_SAMPLED = ("metric", "four_point", "ntk", "ntk_variance")

#: the verdict rule in words (report.json, table titles); the rule itself is efftheory.empirical.verdict
VERDICT_RULE = ("agrees: |a - a_pred| <= 3 se and |c1 - c1_pred| <= 3 se, resolved residual slope within "
                "-2 +- (0.3 + 2 se), and c1 resolved: se(c1) <= |c1_pred|/2 (for |c1_pred| below 0.05 x the "
                "tensor's c1 scale: se(c1) <= 0.025 x that scale); consistent, unresolved: within those error "
                "bars but c1 not resolved; disagrees: outside them")
MAX_INPUTS = 8


# ------------------------------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True)
class Row:
    """One statistic entry at one width: measured +- stderr beside the two predictions.

    ``entry`` holds input indices (0-based): (a1, a2) or (a1, a2, a3, a4); ``layer`` is 1-based.
    ``predicted_infinite`` is the n = inf value a, ``predicted_first_order`` is a + c1/n.
    ``shown``: whether the entry belongs to the printed (representative) table.
    """

    statistic: str
    layer: int
    entry: tuple[int, ...]
    width: int
    measured: float
    stderr: float
    predicted_infinite: float
    predicted_first_order: float
    shown: bool = False

    @property
    def label(self) -> str:
        return entry_label(self.entry)

    @property
    def pull(self) -> float:
        """(measured - first-order prediction) / stderr."""
        return (self.measured - self.predicted_first_order) / self.stderr if self.stderr > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class Fit:
    """The width-sweep fit m(n) = a + c1/n [+ c2/n^2] of one entry, against the predictions.

    ``verdict`` is one of docs/theory.md's three verdicts (:func:`efftheory.empirical.verdict`):
    "agrees" (a and c1 within 3 standard errors, a resolved residual slope within -2 +- (0.3 + 2 its
    stderr), and c1 resolved: its standard error at most half of |predicted c1|, or of the floor
    0.05 x the tensor's c1 scale for a small or zero predicted c1), "consistent, unresolved" (within
    the error bars, c1 not resolved) or "disagrees".  ``agrees`` is ``verdict == "agrees"``.
    """

    statistic: str
    layer: int
    entry: tuple[int, ...]
    order: int
    a: float
    a_stderr: float
    c1: float
    c1_stderr: float
    c2: float
    c2_stderr: float
    predicted_a: float
    predicted_c1: float
    a_pull: float
    c1_pull: float
    chi2_dof: float
    slope: float
    slope_stderr: float
    slope_resolved: bool
    verdict: str
    shown: bool = False
    note: str = ""  # why the fit is unavailable (empirical.WidthFit.UNAVAILABLE), else empty

    @property
    def label(self) -> str:
        return entry_label(self.entry)

    @property
    def agrees(self) -> bool:
        return self.verdict == "agrees"


@dataclasses.dataclass(frozen=True, eq=False)
class StatisticComparison:
    """One statistic measured across widths beside its prediction a + c1/n (module docstring).

    Arrays (S = entry shape, (N, N) or (N, N, N, N)):
      widths (W,); layers (nl,) 1-based layer numbers;
      measured, stderr (W, nl, *S); infinite, first_order (nl, *S) (a and c1).
    rows: every symmetry-distinct entry at every layer and width (NaN measurements skipped);
    fits: one :class:`Fit` per entry and layer (empty with a single width).
    """

    statistic: str
    widths: np.ndarray
    layers: tuple[int, ...]
    measured: np.ndarray
    stderr: np.ndarray
    infinite: np.ndarray
    first_order: np.ndarray
    rows: tuple[Row, ...]
    fits: tuple[Fit, ...]

    def prediction(self, n: float) -> np.ndarray:
        """a + c1/n at hidden width n: (nl, *S)."""
        return self.infinite + self.first_order / float(n)

    def fit(self, layer: int, entry: Sequence[int]) -> Fit | None:
        for f in self.fits:
            if f.layer == layer and f.entry == tuple(entry):
                return f
        return None

    def series(self, layer: int, entry: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(measured (W,), stderr (W,), a, c1) of one entry at one layer."""
        i = self.layers.index(layer)
        idx = (slice(None), i) + tuple(entry)
        return (self.measured[idx], self.stderr[idx], float(self.infinite[(i,) + tuple(entry)]),
                float(self.first_order[(i,) + tuple(entry)]))


@dataclasses.dataclass(frozen=True, eq=False)
class DepthProfile:
    """A normalised statistic against depth: theory lines per width and measured points.

    Attributes:
      name: "four_point" (V_(aa)(aa)/(n K_aa^2)) or "ntk_variance" (Var H_aa / Theta_aa^2).
      label: axis label (matplotlib mathtext).
      layers (nl,): 1-based layer numbers (or network depths for output-layer statistics).
      widths (W,): hidden widths n.
      theory (W, nl): first-order prediction; measured, stderr (W, nl): NaN where not measured.
      input: the input index a.
      reference: tuple of (label, (nl,) values at width 1) asymptotes, e.g. ("5 l/n", 5 l); a plot
        divides them by n.
    """

    name: str
    label: str
    layers: np.ndarray
    widths: np.ndarray
    theory: np.ndarray
    measured: np.ndarray
    stderr: np.ndarray
    input: int = 0
    xlabel: str = r"layer $\ell$"
    reference: tuple = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "input": self.input, "layers": clean(self.layers), "widths": clean(self.widths),
                "theory": clean(self.theory), "measured": clean(self.measured), "stderr": clean(self.stderr)}


@dataclasses.dataclass(frozen=True, eq=False)
class Report:
    """Everything :func:`compare` measured and predicted.

    Attributes:
      config: the run's configuration (network, inputs, widths, networks, seed, dtype, ...).
      versions: efftheory, jax, numpy, python.
      x: (N, n_0) inputs.
      comparisons: dict statistic -> :class:`StatisticComparison` (metric, four_point, ntk_mean,
        ntk_variance).
      depth_profile: V/(n K^2) against depth (:func:`four_point_depth`).
      theory: the :class:`efftheory.FiniteWidth` (computed once per run).
      timings: seconds spent on theory, sampling, estimation (not part of :meth:`to_json`, so that a
        resumed run writes an identical report).
    """

    config: dict
    versions: dict
    x: np.ndarray
    comparisons: dict
    depth_profile: DepthProfile
    theory: object
    timings: dict

    @property
    def rows(self) -> tuple[Row, ...]:
        return tuple(r for c in self.comparisons.values() for r in c.rows)

    @property
    def fits(self) -> tuple[Fit, ...]:
        return tuple(f for c in self.comparisons.values() for f in c.fits)

    def __getitem__(self, statistic: str) -> StatisticComparison:
        return self.comparisons[statistic]

    def table(self, all_rows: bool = False) -> str:
        """The per-width table (representative entries unless ``all_rows``)."""
        return format_rows([r for r in self.rows if all_rows or r.shown])

    def fit_table(self, all_rows: bool = False) -> str:
        return format_fits([f for f in self.fits if all_rows or f.shown], self.config["widths"])

    def header(self) -> str:
        c = self.config
        net = c["network"]
        crit = c.get("criticality") or {}
        cls = f", {crit['universality_class']} class" if crit.get("universality_class") else ""
        lines = [
            f"{net['activation']} MLP: depth {net['depth']}, C_W = {g(net['C_W'])}, C_b = {g(net['C_b'])}"
            f"{' (critical' + cls + ')' if c.get('critical') else ''}, output width {net['output_width']}",
            f"widths {', '.join(map(str, c['widths']))}; {c['n_networks']} networks per width; seed {c['seed']}; "
            f"{c['dtype']} sampling (theory and estimates in float64)",
            f"inputs: {c['inputs']['n_inputs']} x n_0 = {c['inputs']['input_dim']} ({c['inputs']['source']})",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        th = self.theory
        return {
            "config": self.config,
            "versions": self.versions,
            "definitions": {k: v[2] for k, v in STATISTICS.items()},
            "columns": {
                "measured": "ensemble mean over networks at this width, stderr over networks",
                "predicted_infinite": "a: the infinite-width value",
                "predicted_first_order": "a + c1/n with the first-order (1/n) coefficient c1 of efftheory.finite_width",
                "fit": "weighted least squares m(n) = a + c1/n + c2/n^2 over the widths (docs/theory.md protocol)",
                "verdict": VERDICT_RULE,
            },
            "verdict_counts": verdict_counts(self.fits),
            "rows": [_row_dict(r) for r in self.rows],
            "fits": [_fit_dict(f) for f in self.fits],
            "depth_profile": self.depth_profile.to_dict(),
            "theory": {k: clean(np.asarray(getattr(th, k))) for k in ("K", "Theta", "G1", "H1", "V", "A", "B")},
        }

    def to_json(self, indent: int | None = 1) -> str:
        """Deterministic JSON (same inputs, same seed -> the same string); NaN/inf written as null."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, out_dir: str | os.PathLike) -> dict:
        """Write ``report.json``, ``table.txt`` and ``report.npz`` into ``out_dir``; returns {name: path}.

        ``report.npz`` holds the whole report (arrays in the npz, everything else as JSON inside it,
        no pickle: :mod:`efftheory._io`), which :meth:`load` reads back.
        """
        from .. import _io

        os.makedirs(out_dir, exist_ok=True)
        paths = {"report": os.path.join(out_dir, "report.json"), "table": os.path.join(out_dir, "table.txt"),
                 "data": os.path.join(out_dir, "report.npz")}
        atomic_write(paths["report"], self.to_json() + "\n")
        atomic_write(paths["table"], self.header() + "\n\n" + self.table() + "\n\n" + self.fit_table() + "\n")
        _io.save(self, paths["data"])
        return paths

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        """Read a report written by :meth:`save`: ``path`` is its directory or its ``report.npz``.

        Arrays come back bitwise, rows and fits as saved, ``theory`` as a :class:`efftheory.FiniteWidth`.
        """
        from .. import _io

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "report.npz")
        return _io.load(path, cls)

    def __repr__(self) -> str:
        c = self.config
        net = c.get("network", {})
        stats = ", ".join(f"{k}: {len(v.rows)} rows, {len(v.fits)} fits" for k, v in self.comparisons.items())
        x = np.asarray(self.x)
        return (f"Report({net.get('activation')} MLP depth {net.get('depth')}, N={x.shape[0]}, x={x.shape}, "
                f"widths={c.get('widths')}, n_networks={c.get('n_networks')}, seed={c.get('seed')}; {stats}; "
                f"theory={type(self.theory).__name__})")


# ------------------------------------------------------------------------------------------ helpers
def versions() -> dict:
    import jax

    from .. import __version__

    return {"efftheory": __version__, "jax": jax.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def verdict_counts(fits: Sequence[Fit]) -> dict:
    """{"agrees": k, "consistent, unresolved": k, "disagrees": k} over fits (:class:`Fit`)."""
    from ..empirical import count_verdicts

    if isinstance(fits, (str, bytes)) or not hasattr(fits, "__iter__"):
        raise ValueError(f"fits: expected an iterable of efftheory.compare.Fit, got {_validate.short_repr(fits)}")
    fits = list(fits)
    if not all(isinstance(f, Fit) for f in fits):
        raise ValueError("fits: expected an iterable of efftheory.compare.Fit")
    return count_verdicts([f.verdict for f in fits])


def verdict_summary(fits: Sequence[Fit], what: str = "width-sweep fits") -> str:
    """One line: "N width-sweep fits: a agree, u consistent but unresolved, d disagree"."""
    c = verdict_counts(fits)
    return (f"{sum(c.values())} {what}: {c['agrees']} agree (c1 resolved), {c['consistent, unresolved']} "
            f"consistent but unresolved, {c['disagrees']} disagree")


def entry_label(entry: Sequence[int]) -> str:
    e = tuple(entry)
    if len(e) == 2:
        return f"({e[0]},{e[1]})"
    return f"({e[0]}{e[1]})({e[2]}{e[3]})"


def _row_dict(r: Row) -> dict:
    return {"statistic": r.statistic, "layer": r.layer, "entry": list(r.entry), "label": r.label, "width": r.width,
            "measured": finite_or_none(r.measured), "stderr": finite_or_none(r.stderr),
            "predicted_infinite": finite_or_none(r.predicted_infinite),
            "predicted_first_order": finite_or_none(r.predicted_first_order), "shown": r.shown}


def _fit_dict(f: Fit) -> dict:
    d = {k.name: getattr(f, k.name) for k in dataclasses.fields(f)}
    d["entry"] = list(f.entry)
    d["label"] = f.label
    return {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in d.items()}


def _pairs(N):
    return [(a, b) for a in range(N) for b in range(a, N)]


def _entries(ndim: int, N: int):
    """Symmetry-distinct entries: (a<=b) for matrices; pairs p<=q of pairs for four-index tensors."""
    if ndim == 2:
        return _pairs(N)
    P = _pairs(N)
    return [p + q for i, p in enumerate(P) for q in P[i:]]


def _shown(statistic: str, layer: int, entry: tuple, L: int, deepest_v: int, N: int) -> bool:
    """The representative entries of the printed table."""
    if statistic in ("metric", "ntk_mean"):
        return layer == L and entry in ((0, 0), (1, 1), (0, 1))
    four = ((0, 0, 0, 0), (0, 1, 0, 1), (0, 0, 1, 1))
    if statistic == "four_point":
        return (layer >= 2 and entry == (0, 0, 0, 0)) or (layer == deepest_v and entry in four)
    if statistic == "ntk_variance":
        return entry in four
    return False


def _check_theory(theory, sweep):
    """The sampled depth L; the theory may be deeper (layer l's statistics do not depend on later layers)."""
    from ..empirical import Sweep
    from ..theory.finite import FiniteWidth

    if not isinstance(theory, FiniteWidth):
        raise ValueError(f"theory: expected an efftheory.FiniteWidth, got {type(theory).__name__}")
    if not isinstance(sweep, Sweep):
        raise ValueError(f"sweep: expected an efftheory.empirical.Sweep, got {type(sweep).__name__}")
    net, tnet = sweep.ensembles[0].net, theory.net
    L = net.depth
    if theory.K.shape[0] < L:
        raise ValueError(f"theory: depth {theory.K.shape[0]} is shallower than the sampled networks' depth {L}")
    same = (tnet.sigma == net.sigma and tnet.C_Ws[:L] == net.C_Ws and tnet.C_bs[:L] == net.C_bs
            and tnet.lambda_Ws[:L] == net.lambda_Ws and tnet.lambda_bs[:L] == net.lambda_bs)
    if not same:
        raise ValueError(f"theory: computed for {tnet!r}, but the sweep sampled {net!r}")
    if theory.K.shape[1] != sweep.ensembles[0].x.shape[0]:
        raise ValueError("theory: computed on a different number of inputs than the sweep")
    return L


def _build(statistic, widths, layers, measured, stderr, a, c1, *, L, N, deepest_v) -> StatisticComparison:
    """Rows and fits of one statistic. measured/stderr (W, nl, *S), a/c1 (nl, *S)."""
    widths = np.asarray(widths, np.float64)
    W = len(widths)
    ndim = measured.ndim - 2
    rows, fits = [], []
    order = 2 if W >= 3 else 1
    from .. import empirical as em

    for li, layer in enumerate(layers):
        scale = em.c1_scale(a[li], c1[li], widths.min()) if W else 0.0
        for e in _entries(ndim, N):
            idx = (li,) + e
            shown = _shown(statistic, layer, e, L, deepest_v, N)
            m, s = measured[(slice(None),) + idx], stderr[(slice(None),) + idx]
            av, cv = float(a[idx]), float(c1[idx])
            ok = np.isfinite(m)
            for w in range(W):
                if ok[w]:
                    rows.append(Row(statistic, int(layer), e, int(widths[w]), float(m[w]), float(s[w]), av,
                                    av + cv / widths[w], shown))
            if W < 2 or not np.all(ok) or not np.all(np.isfinite(s) & (s > 0)):
                continue
            fit = em.width_sweep_fit(widths, m, s, infinite=av, first_order=cv, order=order)
            v = em.verdict(fit, av, cv, scale=scale)
            fits.append(Fit(statistic, int(layer), e, order, float(fit.a), float(fit.a_stderr), float(fit.c1),
                            float(fit.c1_stderr), float(fit.c2), float(fit.c2_stderr), av, cv, float(fit.a_pull),
                            float(fit.c1_pull), float(fit.chi2_dof), float(fit.slope), float(fit.slope_stderr),
                            bool(fit.slope_resolved), str(v), shown,
                            fit.UNAVAILABLE if bool(fit.unavailable) else ""))
    return StatisticComparison(statistic, widths, tuple(int(v) for v in layers), measured, stderr, np.asarray(a),
                               np.asarray(c1), tuple(rows), tuple(fits))


def _deepest_four_point(sweep) -> int:
    """The deepest layer whose cross-neuron four-point function is measurable (n_l >= 2)."""
    widths = sweep.ensembles[0].net.widths
    return max(l + 1 for l, w in enumerate(widths) if w >= 2)


def _theory_arrays(theory, L: int | None = None):
    return {k: np.asarray(getattr(theory, k), np.float64)[:L] for k in ("K", "Theta", "G1", "H1", "V", "A", "B")}


# ------------------------------------------------------------------------------------------ comparisons
def metric_comparison(sweep: Sweep, theory: FiniteWidth) -> StatisticComparison:
    """E[z_{i;a1} z_{i;a2}] at every layer against K + G1/n (docs/theory.md, first order)."""
    from .. import empirical as em

    L = _check_theory(theory, sweep)
    th = _theory_arrays(theory, L)
    est = sweep.estimate(em.metric)
    N = th["K"].shape[1]
    return _build("metric", sweep.widths, range(1, L + 1), est.value, est.stderr, th["K"], th["G1"], L=L, N=N,
                  deepest_v=_deepest_four_point(sweep))


def four_point_comparison(sweep: Sweep, theory: FiniteWidth) -> StatisticComparison:
    """Connected cross-neuron four-point function at every layer against 0 + V/n.

    The empirical estimator returns the connected function at the sampled width (the normalisation of
    ``at_width(n).four_point``), so the fit's c1 is V itself.  Layers with a single neuron (the output
    layer when n_L = 1) are NaN.
    """
    from .. import empirical as em

    L = _check_theory(theory, sweep)
    th = _theory_arrays(theory, L)
    est = sweep.estimate(em.four_point)
    N = th["K"].shape[1]
    return _build("four_point", sweep.widths, range(1, L + 1), est.value, est.stderr,
                  np.zeros_like(th["V"]), th["V"], L=L, N=N, deepest_v=_deepest_four_point(sweep))


def ntk_mean_comparison(sweep: Sweep, theory: FiniteWidth) -> StatisticComparison:
    """Mean output-layer NTK E[H_{ii;a1a2}] against Theta^(L) + H1^(L)/n."""
    from .. import empirical as em

    L = _check_theory(theory, sweep)
    th = _theory_arrays(theory, L)
    est = sweep.estimate(em.ntk_mean)
    N = th["K"].shape[1]
    return _build("ntk_mean", sweep.widths, (L,), est.value[:, None], est.stderr[:, None], th["Theta"][-1:],
                  th["H1"][-1:], L=L, N=N, deepest_v=_deepest_four_point(sweep))


def ntk_variance_comparison(sweep: Sweep, theory: FiniteWidth) -> StatisticComparison:
    """Output-layer Cov(H_{ii;a1a2}, H_{ii;a3a4}) against 0 + (A_(12)(34) + B_(13)(24) + B_(14)(23))/n."""
    from .. import empirical as em

    L = _check_theory(theory, sweep)
    th = _theory_arrays(theory, L)
    est = sweep.estimate(em.ntk_variance).cov
    A, B = th["A"][-1], th["B"][-1]
    c1 = A + B.transpose(0, 2, 1, 3) + B.transpose(0, 2, 3, 1)
    N = th["K"].shape[1]
    return _build("ntk_variance", sweep.widths, (L,), est.value[:, None], est.stderr[:, None],
                  np.zeros_like(c1)[None], c1[None], L=L, N=N, deepest_v=_deepest_four_point(sweep))


def four_point_depth(sweep: Sweep, theory: FiniteWidth, input: int = 0) -> DepthProfile:
    r"""The normalised four-point function V_(aa)(aa)^(l) / (n K_aa^(l)^2) against the layer l.

    Measured: E[z_{i;a}^2 z_{j;a}^2]_conn / E[z_{i;a}^2]^2 (i != j), a ratio of ensemble means,
    jackknifed over networks; it needs no n and is NaN at a layer with one neuron.  Theory: the first-order
    V^(l)/(n_{l-1} (K^(l))^2) with n_{l-1} = n for l >= 2 (0 at l = 1).
    """
    from .. import empirical as em

    L = _check_theory(theory, sweep)
    th = _theory_arrays(theory, L)
    N = th["K"].shape[1]
    a = _validate.positive_int("input", input, minimum=0)
    if a >= N:
        raise ValueError(f"input: expected an input index below {N}, got {a}")
    Vaa = th["V"][:, a, a, a, a]
    Kaa = th["K"][:, a, a]
    widths = np.asarray(sweep.widths, np.float64)
    theory_lines = np.stack([np.concatenate([[0.0], Vaa[1:] / (n * Kaa[1:] ** 2)]) for n in widths])
    meas, err = [], []
    for ens in sweep.ensembles:
        cross = ens.stats["zz_zz"][:, :, a, a, a, a]
        zz = ens.stats["zz"][:, :, a, a]
        est = em.jackknife(lambda c, z: (c - z * z) / (z * z), cross, zz)
        meas.append(est.value)
        err.append(est.stderr)
    ref = _reference_growth(theory.net, L)
    return DepthProfile("four_point", r"$V_{(\alpha\alpha)(\alpha\alpha)}/(n K_{\alpha\alpha}^2)$",
                        np.arange(1, L + 1), widths, theory_lines, np.stack(meas), np.stack(err), a, reference=ref)


def _reference_growth(net: MLP, L: int) -> tuple:
    """Known depth growth of V/(n K^2) at criticality (docs/theory.md): 5(l-1)/n for relu, (2/3) l/n for tanh
    (asymptotic).  Returned at n = 1."""
    name = getattr(net.sigma, "name", "")
    ells = np.arange(1, L + 1, dtype=np.float64)
    zero_bias = all(c == 0 for c in net.C_bs)
    if name == "relu" and zero_bias and all(abs(c - 2.0) < 1e-9 for c in net.C_Ws):
        return ((r"$5(\ell-1)/n$ (exact)", 5.0 * (ells - 1)),)
    if name == "tanh" and zero_bias and all(abs(c - 1.0) < 1e-9 for c in net.C_Ws):
        return ((r"$(2/3)\,\ell/n$ (large $\ell$)", 2.0 / 3.0 * ells),)
    return ()


# ------------------------------------------------------------------------------------------ inputs
def default_inputs(n_inputs: int = 2, input_dim: int = 8, seed: int = 0, correlation: float = 0.6) -> np.ndarray:
    """Seeded inputs with (1/n_0) |x_a|^2 = 1: x_0 random, x_1 at cosine ``correlation`` with x_0
    (a moderately correlated pair), further inputs independent random directions."""
    N = _validate.positive_int("n_inputs", n_inputs, maximum=_validate.MAX_WIDTH)
    n0 = _validate.positive_int("input_dim", input_dim, minimum=2, maximum=_validate.MAX_WIDTH)
    rho = _validate.real("correlation", correlation)
    seed = _validate.seed("seed", seed)
    _validate.memory("n_inputs, input_dim", 8.0 * N * n0, f"{N} inputs of dimension {n0}")
    if not -1 < rho < 1:
        raise ValueError(f"correlation: expected a number in (-1, 1), got {rho}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    G = rng.normal(size=(N, n0))

    def unit(v):
        return v / np.linalg.norm(v)

    xs = [unit(G[0])]
    if N >= 2:
        g = G[1] - (G[1] @ xs[0]) * xs[0]
        xs.append(rho * xs[0] + math.sqrt(1 - rho**2) * unit(g))
    xs += [unit(G[i]) for i in range(2, N)]
    return np.stack(xs) * math.sqrt(n0)


# ------------------------------------------------------------------------------------------ the run
def _check_compare_args(net, x, widths, n_networks):
    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    if net.depth < 2:
        raise ValueError(f"net: depth {net.depth} has no hidden layer, so there is no width to sweep; use depth >= 2")
    if len(set(net.hidden_widths)) > 1:
        raise ValueError(f"net: compare sweeps uniform hidden widths, got {net.hidden_widths}")
    x = _validate.inputs("x", x)
    if x.shape[0] > MAX_INPUTS:
        raise ValueError(f"x: at most {MAX_INPUTS} inputs (four-point statistics grow like N^4), got {x.shape[0]}")
    ws = _validate.widths("widths", widths)
    M = _validate.positive_int("n_networks", n_networks, minimum=2, maximum=_validate.MAX_NETWORKS)
    return x, tuple(sorted(ws)), M


def _check_dtype(dtype):
    import jax.numpy as jnp

    names = {"float32": jnp.float32, "float64": jnp.float64}
    if isinstance(dtype, str) or dtype is None:
        key = dtype
    else:
        try:
            key = np.dtype(dtype).name
        except (TypeError, ValueError):
            key = None
    if key not in names:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {_validate.short_repr(dtype)}")
    return names[key]


def _check_given_theory(theory, net: MLP, x) -> None:
    """A precomputed theory must be a FiniteWidth of ``net``'s activation and hyperparameters on ``x``."""
    from ..theory.finite import FiniteWidth

    if not isinstance(theory, FiniteWidth):
        raise ValueError(f"theory: expected an efftheory.FiniteWidth, got {type(theory).__name__}")
    tnet, L = theory.net, net.depth
    if theory.K.shape[0] < L:
        raise ValueError(f"theory: depth {theory.K.shape[0]} is shallower than the network's depth {L}")
    same = (tnet.sigma == net.sigma and tnet.C_Ws[:L] == net.C_Ws and tnet.C_bs[:L] == net.C_bs
            and tnet.lambda_Ws[:L] == net.lambda_Ws and tnet.lambda_bs[:L] == net.lambda_bs)
    if not same:
        raise ValueError(f"theory: computed for {tnet!r}, not for net = {net!r}")
    if theory.K.shape[1] != x.shape[0]:
        raise ValueError(f"theory: computed on {theory.K.shape[1]} inputs, x has {x.shape[0]}")


def compare(net: MLP, x: ArrayLike, widths: Sequence[int], n_networks: int, seed: int = 0, *, dtype: str = "float32",
            cache_dir: str | os.PathLike | None = None, progress: bool = True, log: Callable[[str], Any] | None = None,
            config_extra: dict | None = None, theory: FiniteWidth | None = None, chunk: int | None = None) -> Report | None:
    """Sample ensembles at every width, compute the theory once, and compare (module docstring).

    Args:
      net: the MLP (uniform hidden width; its width is replaced by each of ``widths``); depth >= 2.
      x: inputs (N, n_0), N <= 8.
      widths: hidden widths (distinct, >= 1); docs/theory.md's protocol asks for >= 4 spanning >= 8x.
      n_networks: networks per width, >= 2.
      seed: network m at width n uses fold_in(fold_in(PRNGKey(seed), n), m) (efftheory.empirical.sample).
      dtype: "float32" (default, faster) or "float64" arithmetic of the sampled networks.
      cache_dir: where finished chunks are written and reused (resumable; a chunk written for another
        configuration raises :class:`efftheory.empirical.CacheMismatchError`).
      progress: tqdm bars on stderr.
      log: optional callable(str) for stage messages.
      config_extra: merged into ``report.config`` (e.g. how the inputs were chosen).
      theory: a precomputed :func:`efftheory.finite_width` of ``net`` on ``x`` (else computed here, once).
      chunk: networks per sampled (and cached) chunk; default from a memory budget.  The report does not
        depend on it.

    Returns:
      A :class:`Report`; with several processes (:mod:`efftheory.distributed`) all of them compute
      their share of the theory and of the ensembles, and only process 0 returns the report (the
      others return None and write nothing).
    """
    from .. import distributed
    from .. import empirical as em
    from ..theory.finite import finite_width

    x, ws, M = _check_compare_args(net, x, widths, n_networks)
    dt = _check_dtype(dtype)
    seed = _validate.seed("seed", seed)
    cache_dir = _validate.optional_path("cache_dir", cache_dir)
    progress = _validate.flag("progress", progress)
    _validate.optional_callable("log", log)
    if config_extra is not None and not isinstance(config_extra, dict):
        raise ValueError(f"config_extra: expected a dict or None, got {type(config_extra).__name__}")
    if theory is not None:
        _check_given_theory(theory, net, x)
    if chunk is not None:
        chunk = _validate.positive_int("chunk", chunk, maximum=_validate.MAX_NETWORKS)
    say = log or (lambda s: None)
    timings = {}
    base = net.with_width(ws[0])

    t0 = time.perf_counter()
    if theory is None:
        say("theory: first-order recursions (K, Theta, G1, V, H1, A, B), once for all widths ...")
        theory = finite_width(base, x)
    timings["theory"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"sampling {M} networks at each of the widths {', '.join(map(str, ws))} ({np.dtype(dt).name}) ...")
    sweep = em.sample(base, x, ws, M, seed, statistics=_SAMPLED, dtype=dt, progress=progress, chunk=chunk,
                      cache_dir=cache_dir)
    timings["sampling"] = time.perf_counter() - t0
    if distributed.process_index() != 0:
        return None
    _check_sampled(sweep, np.dtype(dt).name)

    t0 = time.perf_counter()
    comps = {
        "metric": metric_comparison(sweep, theory),
        "four_point": four_point_comparison(sweep, theory),
        "ntk_mean": ntk_mean_comparison(sweep, theory),
        "ntk_variance": ntk_variance_comparison(sweep, theory),
    }
    profile = four_point_depth(sweep, theory)
    timings["estimates"] = time.perf_counter() - t0

    config = {
        "network": net_config(net),
        "widths": list(ws),
        "n_networks": M,
        "seed": int(seed),
        "dtype": np.dtype(dt).name,
        "sampling": "efftheory.empirical.sample, method 'weights'; standard errors over networks",
        "inputs": {"n_inputs": int(x.shape[0]), "input_dim": int(x.shape[1]), "source": "user", "x": x.tolist()},
        "protocol_widths_ok": bool(len(ws) >= 4 and ws[-1] >= 8 * ws[0]),
    }
    for k, v in (config_extra or {}).items():
        if isinstance(v, dict) and isinstance(config.get(k), dict):
            config[k] = {**config[k], **v}
        else:
            config[k] = v
    return Report(config=config, versions=versions(), x=x, comparisons=comps, depth_profile=profile, theory=theory,
                  timings=timings)


def _check_sampled(sweep, dtype_name: str) -> None:
    """Per-network statistics that are never NaN by construction must be finite: otherwise the sampled
    networks overflowed their dtype (float32 above ~1e38), and the report would be silently empty."""
    bad = [n for n, e in zip(sweep.widths, sweep.ensembles)
           if not all(np.all(np.isfinite(e.stats[k])) for k in ("zz", "zzzz", "H", "HH") if k in e.stats)]
    if bad:
        raise ValueError(f"dtype: {dtype_name} sampling overflowed at widths {bad} (non-finite per-network "
                         "statistics); use dtype float64, or smaller C_W, C_b or inputs")


def compare_ntk_depth(net: MLP, x: ArrayLike, depths: Sequence[int], widths: Sequence[int], n_networks: int,
                      seed: int = 0, *, input: int = 0, dtype: str = "float32", progress: bool = True,
                      theory: FiniteWidth | None = None) -> DepthProfile:
    r"""Relative NTK variance Var(H_{ii;aa}) / E[H_{ii;aa}]^2 of the output layer against the depth.

    Theory (first order): (A + 2B)^(l)_{(aa)(aa)} / (n Theta^(l)_aa^2), read off one
    :func:`efftheory.finite_width` of the deepest network (layer l's statistics do not depend on
    later layers).  Measured: one ensemble per depth d in ``depths`` (the output layer of a depth-d
    network is layer d), the ratio of ensemble means jackknifed over networks.

    Args:
      net: the MLP; its depth is replaced by each of ``depths`` (>= 2, distinct).
      x, widths, n_networks, seed, dtype, progress: as in :func:`compare`.
      input: the input index a.
      theory: optional precomputed finite_width of ``net.replace(depth=max(depths))`` on x.
    """
    from .. import empirical as em
    from ..theory.finite import finite_width

    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    if isinstance(depths, np.ndarray) and depths.ndim == 0:
        depths = (depths.item(),)
    if not isinstance(depths, (Sequence, np.ndarray)) or isinstance(depths, (str, bytes)) or len(depths) == 0:
        raise ValueError(f"depths: expected a non-empty sequence of depths >= 2, got {_validate.short_repr(depths)}")
    ds = tuple(sorted(_validate.positive_int(f"depths[{i}]", d, minimum=2, maximum=_validate.MAX_DEPTH)
                      for i, d in enumerate(depths)))
    if len(set(ds)) != len(ds):
        raise ValueError(f"depths: expected distinct depths, got {ds}")
    deep = net.replace(depth=ds[-1])
    x, ws, M = _check_compare_args(deep, x, widths, n_networks)
    a = _validate.positive_int("input", input, minimum=0)
    if a >= x.shape[0]:
        raise ValueError(f"input: expected an input index below {x.shape[0]}, got {a}")
    _check_dtype(dtype)
    seed = _validate.seed("seed", seed)
    progress = _validate.flag("progress", progress)
    if theory is None:
        theory = finite_width(deep.with_width(ws[0]), x)
    else:
        _check_given_theory(theory, deep, x)
    th = _theory_arrays(theory)
    idx = np.asarray(ds) - 1
    cov = th["A"][idx, a, a, a, a] + 2 * th["B"][idx, a, a, a, a]
    rel = cov / th["Theta"][idx, a, a] ** 2
    wf = np.asarray(ws, np.float64)
    lines = rel[None, :] / wf[:, None]
    meas = np.full((len(ws), len(ds)), np.nan)
    err = np.full_like(meas, np.nan)
    for j, d in enumerate(ds):
        sweep = em.sample(deep.replace(depth=d).with_width(ws[0]), x, ws, M, seed, statistics=("ntk", "ntk_variance"),
                          dtype=dtype, progress=progress)
        for i, ens in enumerate(sweep.ensembles):
            hh = ens.stats["HH"][:, a, a, a, a]
            h = ens.stats["H"][:, a, a]
            est = em.jackknife(lambda q, m: (q - m * m) / (m * m), hh, h)
            meas[i, j], err[i, j] = float(est.value), float(est.stderr)
    return DepthProfile("ntk_variance", r"${\rm Var}(\hat H_{ii;\alpha\alpha}) / E[\hat H_{ii;\alpha\alpha}]^2$",
                        np.asarray(ds), wf, lines, meas, err, a, xlabel="depth $L$")


# ------------------------------------------------------------------------------------------ tables
def format_rows(rows: Sequence[Any]) -> str:
    """Plain-text table: statistic, layer, entry, width, measured +- stderr, n = inf, first order, pull."""
    head = ("statistic", "layer", "entry", "width", "measured ± stderr", "theory n=∞", "theory 1st order", "pull")
    body = []
    prev = None
    for r in rows:
        key = (r.statistic, r.layer, r.entry)
        if prev is not None and key[:1] != prev[:1]:
            body.append(None)
        prev = key
        body.append((f"{r.statistic} ({STATISTICS[r.statistic][0]})", str(r.layer), r.label, str(r.width),
                     pm(r.measured, r.stderr), num(r.predicted_infinite, r.stderr),
                     num(r.predicted_first_order, r.stderr), f"{r.pull:+.1f}" if math.isfinite(r.pull) else "—"))
    return render(head, body, right=(1, 3, 4, 5, 6, 7))


def format_fits(fits: Sequence[Fit], widths: Sequence[int] | None = None) -> str:
    head = ("statistic", "layer", "entry", "fit a", "theory a", "pull", "fit c1", "theory c1", "pull",
            "residual slope", "verdict")
    body = []
    prev = None
    for f in fits:
        if prev is not None and f.statistic != prev:
            body.append(None)
        prev = f.statistic
        if f.slope_resolved:
            slope = f"{f.slope:+.2f} ± {f.slope_stderr:.2f}"
        else:
            slope = "unresolved"
        body.append((f.statistic, str(f.layer), f.label, pm(f.a, f.a_stderr), num(f.predicted_a, f.a_stderr),
                     f"{f.a_pull:+.1f}", pm(f.c1, f.c1_stderr), num(f.predicted_c1, f.c1_stderr),
                     f"{f.c1_pull:+.1f}", slope, _VERDICT_SHORT[f.verdict]))
    if not body:
        return "(no width-sweep fits: they need at least two widths)"
    orders = {f.order for f in fits}
    model = "a + c1/n + c2/n^2" if orders == {2} else "a + c1/n" if orders == {1} else "a + c1/n [+ c2/n^2]"
    title = f"width-sweep fits m(n) = {model} (weighted least squares"
    if widths is not None:
        title += f" over widths {', '.join(map(str, widths))}"
    title += ("; verdict: agrees = |pulls| <= 3, residual slope -2 ± (0.3 + 2 se) where resolved, and c1 resolved "
              "(se(c1) <= |theory c1|/2, floor 0.05 x the tensor's c1 scale); unresolved = within the error bars "
              "but c1 not resolved)")
    return title + "\n" + render(head, body, right=(1, 3, 4, 5, 6, 7, 8))


_VERDICT_SHORT = {"agrees": "agrees", "consistent, unresolved": "consistent, unresolved",
                  "disagrees": "DISAGREES"}




wrap_module(sys.modules[__name__])  # every public function here runs in float64 (efftheory._precision)
