r"""Trained finite networks beside the infinite-width predictions of :mod:`efftheory.predict`.

At each hidden width n an ensemble of M networks is trained by full-batch gradient descent
(:func:`efftheory.empirical.train`; width n's network m starts from the key
fold_in(fold_in(PRNGKey(seed), n), m), so widths are independent samples).  After T steps the test
outputs z_T(x) are compared with the infinite-width ensemble of :func:`efftheory.predict.gradient_descent`
(the same eta, the same T), statistic by statistic:

=====================  ===============================================  =============================
statistic              estimator (standard errors over networks)        n = inf (docs/theory.md protocol)
=====================  ===============================================  =============================
mean E[z_T(x)]         P_T y + mean of (z_T - zhat_T)                   P_T y
variance Var z_T(x)    mean of (A K^ A^T)_xx + S^2(z_T) - S^2(zhat_T)   Cov_T(x, x)
NTK change             ||H_T - H_0||_F / ||H_0||_F per network, and      0 (the NTK is frozen)
                       ||E H_T - E H_0||_F / ||E H_0||_F (jackknife)
loss                   mean of L_T                                      E[L_T]
=====================  ===============================================  =============================

Both estimators are exactly unbiased at any width and far more precise than the plain ensemble mean
and variance (also reported, as ``mean_plain`` and ``variance_plain``).  Every infinite-width network
ends at zhat_T(x) = z_0(x) + P_T (y - z_0(D)) = A z_0 + P_T y from its own initial outputs
(:class:`efftheory.predict.GradientDescentPrediction`, ``P``; A = [-P_T, 1] acts on (z_0(D), z_0(x))).
Given the network's layers 1..L-1, z_0 is exactly N(0, K^) with K^ its own last-layer kernel
(``Training.kernel_start``), so E[zhat_T] = P_T y and Var zhat_T = E[A K^ A^T] exactly (total variance;
E[zhat_T | layers 1..L-1] = P_T y is constant).  Hence

    E[z_T]   = P_T y + E[z_T - zhat_T],
    Var z_T  = E[(A K^ A^T)_xx] + (Var z_T - Var zhat_T),

where z_T - zhat_T vanishes at infinite width and K^ fluctuates only at O(n^-1/2): the random parts
that remain are small, so the standard errors (over networks, jackknifed) shrink with the width as well.

Mean and variance are fitted per test input by the width sweep of docs/theory.md (m(n) = a + c1/n + c2/n^2,
:func:`efftheory.empirical.width_sweep_fit`) and a is compared with the infinite-width value; their rms
deviation over the test inputs, sqrt(mean_x (m_n(x) - m_inf(x))^2) (squared deviation jackknifed, so
unbiased), and the NTK changes are reported against n with fitted log-log slopes (:func:`loglog_slope`).

:func:`posterior_check` is the exact finite-width statement behind the NNGP posterior: when only the
last layer trains (``predict.last_layer_net``), each converged network is a sample of the Bayesian
posterior of its own last layer, whose kernel K^ is the recorded NTK (module docstring of
:mod:`efftheory.predict`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .. import _validate
from .._io import atomic_write
from .._precision import wrap_module
from ..network import MLP
from ._table import clean, g, net_config, num, pm, render

if TYPE_CHECKING:
    from ..empirical.training import Training

__all__ = ["TrainingSweep", "TrainingReport", "PosteriorCheck", "training_sweep", "compare_training",
           "loglog_slope", "posterior_check", "train_and_compare"]


# ------------------------------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True, eq=False)
class TrainingSweep:
    """Trained ensembles at several hidden widths: ``sweep[n]`` is the :class:`efftheory.empirical.Training`."""

    trainings: tuple
    widths: tuple
    seed: int

    def __getitem__(self, width: int) -> Training:
        if width not in self.widths:
            raise KeyError(f"width {width} not in this sweep's widths {self.widths}")
        return self.trainings[self.widths.index(width)]

    def __len__(self) -> int:
        return len(self.widths)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingReport:
    """Trained ensembles against the infinite-width predictions (module docstring).

    Shapes: W widths, N_T test inputs, k outputs, R recorded steps.

    Attributes:
      config: the run's configuration (network, widths, networks, steps, learning rate, seed, dtype).
      widths (W,); steps (R,) recorded steps (the comparison is at steps[-1]).
      theory: :class:`efftheory.predict.GradientDescentPrediction` at the recorded steps.
      posterior: the noise-free NNGP posterior (:func:`efftheory.predict.gp_posterior`), for reference.
      mean, mean_stderr, variance, variance_stderr: (W, N_T, k) measured at the last step (the precise
        estimators of the module docstring).
      mean_plain, mean_plain_stderr, variance_plain, variance_plain_stderr: (W, N_T, k) the plain ensemble
        mean and (jackknifed) variance of z_T(x), for comparison.
      mean_fit, variance_fit: :class:`efftheory.empirical.WidthFit` per (test input, output) (None with
        a single width); their ``a_pull`` compares the extrapolation with the theory.
      mean_deviation, variance_deviation: (W,) rms deviation over test inputs and outputs from the theory,
        with ``*_stderr``;  mean_deviation_slope, variance_deviation_slope: (slope, stderr) of log-log fits.
      ntk_change, ntk_change_stderr: (W,) mean over networks of ||H_T - H_0||_F / ||H_0||_F.
      ntk_mean_change, ntk_mean_change_stderr: (W,) ||E H_T - E H_0||_F / ||E H_0||_F.
      ntk_change_slope, ntk_mean_change_slope: (slope, stderr) against n.
      loss, loss_stderr: (W,) mean final loss;  the theory's is ``theory.loss[-1]``.
      x_train, y_train, x_test, s_train, s_test: the data (s: optional 1-D coordinates for plots).
      timings: seconds spent (not in :meth:`to_json`).
    """

    config: dict
    widths: np.ndarray
    steps: np.ndarray
    theory: object
    posterior: object
    mean: np.ndarray
    mean_stderr: np.ndarray
    variance: np.ndarray
    variance_stderr: np.ndarray
    mean_plain: np.ndarray
    mean_plain_stderr: np.ndarray
    variance_plain: np.ndarray
    variance_plain_stderr: np.ndarray
    mean_fit: object
    variance_fit: object
    mean_deviation: np.ndarray
    mean_deviation_stderr: np.ndarray
    variance_deviation: np.ndarray
    variance_deviation_stderr: np.ndarray
    mean_deviation_slope: tuple
    variance_deviation_slope: tuple
    ntk_change: np.ndarray
    ntk_change_stderr: np.ndarray
    ntk_mean_change: np.ndarray
    ntk_mean_change_stderr: np.ndarray
    ntk_change_slope: tuple
    ntk_mean_change_slope: tuple
    loss: np.ndarray
    loss_stderr: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    s_train: np.ndarray | None = None
    s_test: np.ndarray | None = None
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def theory_mean(self) -> np.ndarray:
        """(N_T, k) infinite-width E[z_T(x)]."""
        return self.theory.mean[-1]

    @property
    def theory_variance(self) -> np.ndarray:
        """(N_T, k) infinite-width Var z_T(x) (the same for every output component)."""
        v = self.theory.variance[-1]
        return np.repeat(v[:, None], self.theory.mean.shape[-1], axis=1)

    @property
    def mean_verdict(self) -> str | np.ndarray | None:
        """(N_T, k) verdicts of the mean's extrapolation a against n = inf (:func:`efftheory.empirical.verdict`
        without a first-order prediction: disagrees beyond 3 standard errors; agrees when a is also
        resolved, a_stderr <= 0.025 x the largest |theory mean|; else consistent, unresolved); None with
        one width."""
        if self.mean_fit is None:
            return None
        from ..empirical import verdict

        return verdict(self.mean_fit, self.theory_mean)

    @property
    def variance_verdict(self) -> str | np.ndarray | None:
        """(N_T, k) verdicts of the variance's extrapolation (as :attr:`mean_verdict`); None with one width."""
        if self.variance_fit is None:
            return None
        from ..empirical import verdict

        return verdict(self.variance_fit, self.theory_variance)

    def verdict_counts(self) -> dict:
        """{"mean": {verdict: count}, "variance": {...}} over every test entry; {} with one width."""
        from ..empirical import count_verdicts

        if self.mean_fit is None:
            return {}
        return {"mean": count_verdicts(self.mean_verdict), "variance": count_verdicts(self.variance_verdict)}

    def verdict_summary(self) -> str:
        """One line with the three verdict counts for the mean and the variance."""
        c = self.verdict_counts()
        if not c:
            return "no width-sweep verdicts: they need at least two widths"

        def one(d):
            return (f"{d['agrees']} agree (resolved), {d['consistent, unresolved']} consistent but unresolved, "
                    f"{d['disagrees']} disagree")

        return (f"{sum(c['mean'].values())} test entries, n = inf extrapolation against the frozen-NTK ensemble: "
                f"mean {one(c['mean'])}; variance {one(c['variance'])}")

    def header(self) -> str:
        c = self.config
        net = c["network"]
        return "\n".join([
            f"{net['activation']} MLP: depth {net['depth']}, C_W = {g(net['C_W'])}, C_b = {g(net['C_b'])}, "
            f"output width {net['output_width']}" + (" (only the last layer trains)" if c.get("last_layer") else ""),
            f"widths {', '.join(map(str, c['widths']))}; {g(c['n_networks'])} networks per width; seed {c['seed']}; "
            f"{c['dtype']} networks (theory and estimates in float64)",
            f"gradient descent: {c['steps']} steps at learning rate {c['learning_rate']:.6g} (stability bound "
            f"2/lambda_max(Theta_train) = {c['stability_bound']:.6g}); {c['n_train']} training and {c['n_test']} test "
            f"inputs ({c.get('data', 'user data')})",
        ])

    def table(self, max_inputs: int = 8) -> str:
        """Per width: rms deviations, NTK changes and loss; then measured mean and variance per test input."""
        head = ("width", "rms dev mean", "rms dev var", "NTK change/net", "NTK change of mean", "final loss")
        body = []
        for i, n in enumerate(self.widths):
            body.append((str(int(n)), pm(self.mean_deviation[i], self.mean_deviation_stderr[i]),
                         pm(self.variance_deviation[i], self.variance_deviation_stderr[i]),
                         pm(self.ntk_change[i], self.ntk_change_stderr[i]),
                         pm(self.ntk_mean_change[i], self.ntk_mean_change_stderr[i]),
                         pm(self.loss[i], self.loss_stderr[i])))
        body.append(("inf", "0", "0", "0", "0", f"{self.theory.loss[-1]:.4g}"))
        out = [render(head, body, right=range(6))]
        for name, slope in (("rms dev mean", self.mean_deviation_slope), ("rms dev var", self.variance_deviation_slope),
                            ("NTK change/net", self.ntk_change_slope), ("NTK change of mean", self.ntk_mean_change_slope)):
            out.append(f"log-log slope against n, {name}: " + (f"{slope[0]:+.2f} ± {slope[1]:.2f}"
                                                             if math.isfinite(slope[0]) else "unresolved"))
        out.append("")
        idx = self._shown(max_inputs)
        head = ("input", "output", "width", "mean ± stderr", "theory mean", "pull", "variance ± stderr",
                "theory variance", "pull")
        body = []
        tm, tv = self.theory_mean, self.theory_variance
        for a in idx:
            for j in range(tm.shape[1]):
                for i, n in enumerate(self.widths):
                    m, s, v, e = self.mean[i, a, j], self.mean_stderr[i, a, j], self.variance[i, a, j], \
                        self.variance_stderr[i, a, j]
                    body.append((str(a), str(j), str(int(n)), pm(m, s), num(tm[a, j], s), _pull(m, tm[a, j], s),
                                 pm(v, e), num(tv[a, j], e), _pull(v, tv[a, j], e)))
                body.append(None)
        out.append(f"test predictions after {int(self.steps[-1])} steps (per test input; every input in report.json)")
        out.append(render(head, body[:-1], right=(0, 1, 2, 3, 4, 5, 6, 7, 8)))
        return "\n".join(out)

    def fit_table(self, max_inputs: int = 8) -> str:
        if self.mean_fit is None:
            return "(no width-sweep fits: they need at least two widths)"
        head = ("input", "output", "fit a (mean)", "theory", "pull", "verdict", "fit a (variance)", "theory", "pull",
                "verdict")
        body = []
        tm, tv = self.theory_mean, self.theory_variance
        fm, fv = self.mean_fit, self.variance_fit
        vm, vv = self.mean_verdict, self.variance_verdict
        short = {"agrees": "agrees", "consistent, unresolved": "consistent, unresolved", "disagrees": "DISAGREES"}
        for a in self._shown(max_inputs):
            for j in range(tm.shape[1]):
                body.append((str(a), str(j), pm(fm.a[a, j], fm.a_stderr[a, j]), num(tm[a, j], fm.a_stderr[a, j]),
                             f"{fm.a_pull[a, j]:+.1f}", short[str(vm[a, j])], pm(fv.a[a, j], fv.a_stderr[a, j]),
                             num(tv[a, j], fv.a_stderr[a, j]), f"{fv.a_pull[a, j]:+.1f}", short[str(vv[a, j])]))
        model = "a + c1/n + c2/n^2" if fm.order == 2 else "a + c1/n"
        pull_m, pull_v = np.abs(fm.a_pull), np.abs(fv.a_pull)
        title = (f"width-sweep fits m(n) = {model} over widths {', '.join(str(int(w)) for w in self.widths)}: "
                 f"extrapolated a against n = inf (largest |pull| over all {pull_m.size} test entries: mean "
                 f"{np.max(pull_m):.1f}, variance {np.max(pull_v):.1f}); verdict: |pull| <= 3, and agrees only where a is "
                 f"resolved (stderr <= 0.025 x the largest |theory|)")
        return (title + "\n" + render(head, body, right=(0, 1, 2, 3, 4, 6, 7, 8)) + "\n" + self.verdict_summary())

    def _shown(self, max_inputs: int):
        N = self.mean.shape[1]
        if N <= max_inputs:
            return list(range(N))
        return sorted(set(np.linspace(0, N - 1, max_inputs).round().astype(int).tolist()))

    def to_dict(self) -> dict:
        def fit(f):
            if f is None:
                return None
            return {"a": clean(f.a), "a_stderr": clean(f.a_stderr), "c1": clean(f.c1), "c1_stderr": clean(f.c1_stderr),
                    "c2": clean(f.c2), "c2_stderr": clean(f.c2_stderr), "a_pull": clean(f.a_pull),
                    "chi2_dof": clean(f.chi2_dof), "order": f.order}

        verdicts = {} if self.mean_fit is None else {"mean": np.asarray(self.mean_verdict).tolist(),
                                                      "variance": np.asarray(self.variance_verdict).tolist()}

        th = self.theory
        return {
            "config": self.config,
            "definitions": {
                "mean": "E[z_T(x)] per test input and output: P_T y + mean of (z_T - zhat_T) (compare_train docstring)",
                "variance": "Var z_T(x) per test input and output: E[(A K^ A^T)_xx] + Var z_T - Var zhat_T (jackknife)",
                "mean_plain": "plain ensemble mean of z_T(x)", "variance_plain": "plain (jackknifed) variance of z_T(x)",
                "rms_deviation": "sqrt(mean over test inputs and outputs of (measured - infinite-width)^2)",
                "ntk_change": "mean over networks of ||H_T - H_0||_F / ||H_0||_F on training and test inputs",
                "ntk_mean_change": "||E H_T - E H_0||_F / ||E H_0||_F (jackknife)",
                "fits": "weighted least squares m(n) = a + c1/n + c2/n^2 per entry; a_pull = (a - theory)/stderr",
                "verdicts": "efftheory.empirical.verdict without a first-order prediction: disagrees when |a_pull| > 3; "
                            "agrees when also a_stderr <= 0.025 x the largest |theory| of that statistic; else "
                            "consistent, unresolved",
            },
            "verdicts": verdicts,
            "verdict_counts": self.verdict_counts(),
            "widths": clean(self.widths), "steps": clean(self.steps),
            "theory": {"steps": clean(th.steps), "mean": clean(th.mean), "variance": clean(th.variance),
                       "loss": clean(th.loss), "train_mean": clean(th.train_mean),
                       "gp_posterior_mean": clean(self.posterior.mean),
                       "gp_posterior_variance": clean(self.posterior.variance)},
            "measured": {"mean": clean(self.mean), "mean_stderr": clean(self.mean_stderr),
                         "variance": clean(self.variance), "variance_stderr": clean(self.variance_stderr),
                         "mean_plain": clean(self.mean_plain), "mean_plain_stderr": clean(self.mean_plain_stderr),
                         "variance_plain": clean(self.variance_plain),
                         "variance_plain_stderr": clean(self.variance_plain_stderr),
                         "loss": clean(self.loss), "loss_stderr": clean(self.loss_stderr)},
            "fits": {"mean": fit(self.mean_fit), "variance": fit(self.variance_fit)},
            "deviation": {"mean": clean(self.mean_deviation), "mean_stderr": clean(self.mean_deviation_stderr),
                          "variance": clean(self.variance_deviation),
                          "variance_stderr": clean(self.variance_deviation_stderr),
                          "mean_slope": clean(self.mean_deviation_slope),
                          "variance_slope": clean(self.variance_deviation_slope)},
            "ntk_change": {"per_network": clean(self.ntk_change), "per_network_stderr": clean(self.ntk_change_stderr),
                           "ensemble_mean": clean(self.ntk_mean_change),
                           "ensemble_mean_stderr": clean(self.ntk_mean_change_stderr),
                           "per_network_slope": clean(self.ntk_change_slope),
                           "ensemble_mean_slope": clean(self.ntk_mean_change_slope)},
            "data": {"x_train": clean(self.x_train), "y_train": clean(self.y_train), "x_test": clean(self.x_test),
                     "s_train": None if self.s_train is None else clean(self.s_train),
                     "s_test": None if self.s_test is None else clean(self.s_test)},
        }

    def to_json(self, indent: int | None = 1) -> str:
        """Deterministic JSON (same configuration -> the same string); NaN/inf written as null."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, out_dir: str | os.PathLike) -> dict:
        """Write ``report.json`` and ``table.txt`` into ``out_dir``; returns {name: path}."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {"report": os.path.join(out_dir, "report.json"), "table": os.path.join(out_dir, "table.txt")}
        atomic_write(paths["report"], self.to_json() + "\n")
        atomic_write(paths["table"], self.header() + "\n\n" + self.table() + "\n\n" + self.fit_table() + "\n")
        return paths


@dataclasses.dataclass(frozen=True, eq=False)
class PosteriorCheck:
    """Last-layer training against the exact posterior of each network's own last layer.

    Attributes (N_T test inputs, k outputs):
      residual: (M, N_T, k) u = (z_T(x) - mu^(x)) / sqrt(Sigma^(x, x)) with mu^, Sigma^ the zero-noise
        posterior mean and variance of the kernel K^ = the network's recorded NTK.
      mean, mean_stderr: (N_T, k) ensemble mean of u (exactly 0 in law).
      variance, variance_stderr: (N_T, k) ensemble variance of u (exactly 1 in law).
      matheron_errors: (M,) per network, max over test inputs and outputs of
        |z_T - (z_0 + K^_xD K^_DD^{-1} (y - z_0(D)))| / max |z_T - z_0|: 0 up to the residual of finite
        training (slow for a network whose K^_DD is ill-conditioned) and rounding.
      matheron_error: the largest of them.
    """

    residual: np.ndarray
    mean: np.ndarray
    mean_stderr: np.ndarray
    variance: np.ndarray
    variance_stderr: np.ndarray
    matheron_errors: np.ndarray
    matheron_error: float


# ------------------------------------------------------------------------------------------ running
def _check_sweep_args(net, widths, n_networks):
    """Sorted widths and the number of networks at each (``n_networks``: one int, or one per width)."""
    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    if net.depth < 2:
        raise ValueError(f"net: depth {net.depth} has no hidden layer, so there is no width to sweep; use depth >= 2")
    given = _validate.widths("widths", widths)
    if isinstance(n_networks, (list, tuple, np.ndarray)):
        if len(n_networks) != len(given):
            raise ValueError(f"n_networks: expected one int or one per width ({len(given)}), got {len(n_networks)}")
        Ms = {w: _validate.positive_int(f"n_networks[{i}]", m, minimum=2) for i, (w, m) in
              enumerate(zip(given, n_networks))}
    else:
        M = _validate.positive_int("n_networks", n_networks, minimum=2)
        Ms = {w: M for w in given}
    ws = tuple(sorted(given))
    return ws, tuple(Ms[w] for w in ws)


def training_sweep(net: MLP, x_train: ArrayLike, y_train: ArrayLike, x_test: ArrayLike, widths: int | Sequence[int],
                   n_networks: int | Sequence[int], *, steps: int, learning_rate: float, seed: int = 0,
                   record_every: int | None = None, dtype: DTypeLike = "float32",
                   cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   log: Callable[[str], object] | None = None) -> TrainingSweep:
    """Train networks at each hidden width (``net.with_width(n)``), independent across widths.

    ``n_networks`` is the number of networks per width (>= 2), or a sequence with one per width (narrow
    networks are cheap: more of them sharpen the narrow end of a sweep).  Width n's network m starts
    from the key fold_in(fold_in(PRNGKey(seed), n), m).  Other arguments as in
    :func:`efftheory.empirical.train`; ``cache_dir`` makes the run resumable.
    """
    import jax

    from .. import empirical as em

    ws, Ms = _check_sweep_args(net, widths, n_networks)
    seed = _validate.positive_int("seed", seed, minimum=0)
    say = log or (lambda s: None)
    base = jax.random.PRNGKey(seed)
    trainings = []
    for n, M in zip(ws, Ms):
        say(f"training {M} networks of width {n} for {steps} steps ...")
        trainings.append(em.train(net.with_width(n), x_train, y_train, x_test, steps=steps, learning_rate=learning_rate,
                                  n_networks=M, key=jax.random.fold_in(base, n), record_every=record_every,
                                  dtype=dtype, cache_dir=cache_dir, progress=progress))
    return TrainingSweep(trainings=tuple(trainings), widths=ws, seed=seed)


def loglog_slope(widths: ArrayLike, values: ArrayLike, stderrs: ArrayLike) -> tuple[float, float]:
    """Weighted least-squares slope of log(value) against log(n), errors stderr/value (delta method).

    Uses the widths where the value is resolved (value >= 2 stderr); (nan, nan) with fewer than two.
    """
    w = np.asarray(widths, np.float64)
    v = np.asarray(values, np.float64)
    s = np.asarray(stderrs, np.float64)
    ok = np.isfinite(v) & np.isfinite(s) & (v > 0) & (v >= 2 * s)
    if ok.sum() < 2:
        return (math.nan, math.nan)
    X = np.stack([np.ones(ok.sum()), np.log(w[ok])], axis=1)
    sig = np.maximum(s[ok] / v[ok], 1e-12)
    A = X.T @ (X / sig[:, None] ** 2)
    cov = np.linalg.inv(A)
    beta = cov @ (X.T @ (np.log(v[ok]) / sig**2))
    return (float(beta[1]), float(math.sqrt(cov[1, 1])))


def _rms_deviation(f, *arrays):
    """sqrt of the jackknifed (unbiased) mean squared deviation D^2 (0 when D^2 < 0); its stderr by the delta
    method, s/(2 D), capped at sqrt(s) (the scale of D where D^2 is unresolved)."""
    from ..empirical import jackknife

    est = jackknife(f, *arrays)
    d2, s2 = float(est.value), float(est.stderr)
    d = math.sqrt(max(d2, 0.0))
    se = min(s2 / (2 * d), math.sqrt(s2)) if d > 0 else math.sqrt(s2)
    return d, se


def compare_training(sweep: TrainingSweep, *, config_extra: dict | None = None, s_train: ArrayLike | None = None,
                     s_test: ArrayLike | None = None) -> TrainingReport:
    """Measured statistics of a :class:`TrainingSweep` beside the infinite-width predictions (module docstring)."""
    import jax.numpy as jnp

    from .. import empirical as em
    from .. import predict

    if not isinstance(sweep, TrainingSweep):
        raise ValueError(f"sweep: expected a TrainingSweep, got {type(sweep).__name__}")
    t0 = time.perf_counter()
    tr0 = sweep.trainings[0]
    net, eta, steps = tr0.net, tr0.learning_rate, tr0.steps
    kern = predict.train_test_kernels(net, tr0.x_train, tr0.x_test)
    theory = predict.gradient_descent(kern, tr0.y_train, learning_rate=eta, steps=steps)
    posterior = predict.gp_posterior(kern, tr0.y_train)
    P, y = theory.P[-1], tr0.y_train
    p_mean, p_var = theory.mean[-1], theory.variance[-1][:, None]
    ws = np.asarray(sweep.widths, np.float64)
    W = len(ws)
    A = np.concatenate([-P, np.eye(P.shape[0])], axis=1)             # zhat_T = A z_0 + P_T y
    keys = ("m", "ms", "v", "vs", "mp", "mps", "vp", "vps", "dm", "dms", "dv", "dvs", "c", "cs", "cm", "cms", "l", "ls")
    out = {k: [] for k in keys}

    def variance(q, a, a2, b, b2):  # E[(A K^ A^T)_xx] + Var z_T - Var zhat_T
        return q + (a2 - a * a) - (b2 - b * b)

    for n, tr in zip(sweep.widths, sweep.trainings):
        bad = ~np.all(np.isfinite(tr.f_test[:, -1].reshape(tr.n_networks, -1)), axis=1)
        if np.any(bad):
            raise ValueError(f"sweep: gradient descent diverged in {int(bad.sum())} of {tr.n_networks} networks of "
                             f"width {n} (learning rate {eta:.4g}; a finite network's NTK fluctuates above Theta, so "
                             f"its own stability bound can be lower than 2/lambda_max(Theta_train) = {theory.bound:.4g}); "
                             f"use a smaller learning rate")
        zT, z0, z0D = tr.f_test[:, -1], tr.f_test[:, 0], tr.f_train[:, 0]
        zhat = z0 + np.einsum("ab,mbj->maj", P, y[None] - z0D)
        d = zT - zhat                                               # (M, N_T, k), mean = E[z_T] - P_T y
        q = np.einsum("xa,mab,xb->mx", A, tr.kernel_start, A)[:, :, None] * np.ones_like(zT)
        est = em.mean_and_stderr(d)
        out["m"].append(est.value + p_mean)
        out["ms"].append(est.stderr)
        var = em.jackknife(variance, q, zT, zT * zT, zhat, zhat * zhat)
        out["v"].append(var.value)
        out["vs"].append(var.stderr)
        plain = em.mean_and_stderr(zT)
        out["mp"].append(plain.value)
        out["mps"].append(plain.stderr)
        pvar = em.jackknife(lambda a, a2: a2 - a * a, zT, zT * zT)
        out["vp"].append(pvar.value)
        out["vps"].append(pvar.stderr)
        dm = _rms_deviation(lambda a: jnp.mean(a * a), d)
        dv = _rms_deviation(lambda *m: jnp.mean((variance(*m) - p_var) ** 2), q, zT, zT * zT, zhat, zhat * zhat)
        out["dm"].append(dm[0])
        out["dms"].append(dm[1])
        out["dv"].append(dv[0])
        out["dvs"].append(dv[1])
        ch = em.mean_and_stderr(tr.ntk_relative_change())
        out["c"].append(float(ch.value))
        out["cs"].append(float(ch.stderr))
        M = tr.n_networks
        h0, h1 = tr.ntk_start.reshape(M, -1), tr.ntk_end.reshape(M, -1)
        cm = em.jackknife(lambda a, b: jnp.sqrt(jnp.sum((b - a) ** 2) / jnp.sum(a * a)), h0, h1)
        out["cm"].append(float(cm.value))
        out["cms"].append(float(cm.stderr))
        ls = em.mean_and_stderr(tr.final_loss)
        out["l"].append(float(ls.value))
        out["ls"].append(float(ls.stderr))
    arr = {k: np.asarray(v, np.float64) for k, v in out.items()}
    mean_fit = variance_fit = None
    if W >= 2:
        order = 2 if W >= 3 else 1
        se_m = np.maximum(arr["ms"], 1e-300)
        se_v = np.maximum(arr["vs"], 1e-300)
        mean_fit = em.width_sweep_fit(ws, arr["m"], se_m, infinite=p_mean, order=order)
        variance_fit = em.width_sweep_fit(ws, arr["v"], se_v, infinite=np.broadcast_to(p_var, p_mean.shape),
                                          order=order)
    net_cfg = net_config(net)
    Ms = [tr.n_networks for tr in sweep.trainings]
    config = {"network": net_cfg, "widths": [int(w) for w in sweep.widths],
              "n_networks": Ms[0] if len(set(Ms)) == 1 else Ms,
              "seed": sweep.seed, "steps": int(steps[-1]), "record_every": int(steps[1] - steps[0]) if len(steps) > 1
              else int(steps[-1]), "learning_rate": float(eta), "stability_bound": float(theory.bound),
              "dtype": tr0.dtype, "n_train": tr0.n_train, "n_test": int(tr0.x_test.shape[0]),
              "last_layer": bool(all(v == 0 for v in net.lambda_Ws[:-1]) and all(v == 0 for v in net.lambda_bs[:-1])),
              "protocol_widths_ok": bool(W >= 4 and ws[-1] >= 8 * ws[0])}
    config.update(config_extra or {})
    return TrainingReport(
        config=config, widths=ws, steps=np.asarray(steps), theory=theory, posterior=posterior,
        mean=arr["m"], mean_stderr=arr["ms"], variance=arr["v"], variance_stderr=arr["vs"],
        mean_plain=arr["mp"], mean_plain_stderr=arr["mps"], variance_plain=arr["vp"],
        variance_plain_stderr=arr["vps"],
        mean_fit=mean_fit, variance_fit=variance_fit,
        mean_deviation=arr["dm"], mean_deviation_stderr=arr["dms"],
        variance_deviation=arr["dv"], variance_deviation_stderr=arr["dvs"],
        mean_deviation_slope=loglog_slope(ws, arr["dm"], arr["dms"]),
        variance_deviation_slope=loglog_slope(ws, arr["dv"], arr["dvs"]),
        ntk_change=arr["c"], ntk_change_stderr=arr["cs"], ntk_mean_change=arr["cm"],
        ntk_mean_change_stderr=arr["cms"], ntk_change_slope=loglog_slope(ws, arr["c"], arr["cs"]),
        ntk_mean_change_slope=loglog_slope(ws, arr["cm"], arr["cms"]),
        loss=arr["l"], loss_stderr=arr["ls"], x_train=tr0.x_train, y_train=tr0.y_train, x_test=tr0.x_test,
        s_train=None if s_train is None else np.asarray(s_train, np.float64),
        s_test=None if s_test is None else np.asarray(s_test, np.float64),
        timings={"estimates": time.perf_counter() - t0})


def train_and_compare(net: MLP, x_train: ArrayLike, y_train: ArrayLike, x_test: ArrayLike, widths: int | Sequence[int],
                      n_networks: int | Sequence[int], *, steps: int, learning_rate: float | None = None, seed: int = 0,
                      record_every: int | None = None, dtype: DTypeLike = "float32",
                      cache_dir: str | os.PathLike | None = None, progress: bool = True,
                      log: Callable[[str], object] | None = None, s_train: ArrayLike | None = None,
                      s_test: ArrayLike | None = None, config_extra: dict | None = None) -> TrainingReport | None:
    """:func:`training_sweep` then :func:`compare_training`; ``learning_rate=None`` takes half the
    infinite-width stability bound, 1/lambda_max(Theta_train).  The learning rate is checked against the
    bound before any network trains (ValueError naming it).  With several processes
    (:mod:`efftheory.distributed`) all of them train their share and only process 0 returns the
    report; the others return None."""
    from .. import distributed, predict

    ws, Ms = _check_sweep_args(net, widths, n_networks)
    kern = predict.train_test_kernels(net, x_train, x_test)
    bound = predict.stability_bound(kern)
    eta = 0.5 * bound if learning_rate is None else learning_rate
    predict.gradient_descent(kern, y_train, learning_rate=eta, steps=0)  # validates eta against the bound
    t0 = time.perf_counter()
    sweep = training_sweep(net, x_train, y_train, x_test, ws, Ms, steps=steps, learning_rate=eta, seed=seed,
                           record_every=record_every, dtype=dtype, cache_dir=cache_dir, progress=progress, log=log)
    t_train = time.perf_counter() - t0
    if distributed.process_index() != 0:
        return None
    report = compare_training(sweep, config_extra=config_extra, s_train=s_train, s_test=s_test)
    report.timings["training"] = t_train
    return report


def posterior_check(training: Training) -> PosteriorCheck:
    """Each network trained only in its last layer (λ = 0 below, λ^(L) = C^(L)), from the prior, to
    convergence, is a sample of the zero-noise posterior of the Bayesian linear model on its own features:

        z_T(x) = z_0(x) + K^_xD K^_DD^{-1} (y - z_0(D))   (Matheron's rule),
        u(x) = (z_T(x) - K^_xD K^_DD^{-1} y) / sqrt(K^_xx - K^_xD K^_DD^{-1} K^_Dx) ~ N(0, 1),

    exactly at any width, with K^ = C_b + (C_W/n) sigma . sigma the network's own last-layer kernel
    (``Training.kernel_start``; with lambda = C it is also the NTK, which then never changes).
    """
    from .. import empirical as em

    net = getattr(training, "net", None)
    if net is None or not hasattr(training, "ntk_start"):
        raise ValueError(f"training: expected an efftheory.empirical.Training, got {type(training).__name__}")
    lw, lb, cw, cb = net.lambda_Ws[-1], net.lambda_bs[-1], net.C_Ws[-1], net.C_bs[-1]
    if any(v != 0 for v in net.lambda_Ws[:-1] + net.lambda_bs[:-1]) or not math.isclose(lw * cb, lb * cw, rel_tol=1e-12,
                                                                                      abs_tol=1e-300):
        raise ValueError("training: expected a network trained only in its last layer, with lambda proportional to "
                         "C there (efftheory.predict.last_layer_net)")
    d = training.n_train
    y = training.y_train
    M = training.n_networks
    res = np.empty(training.f_test.shape[:1] + training.f_test.shape[2:])
    errs = np.empty(M)
    for m in range(M):
        H = training.kernel_start[m]
        Kdd, Kxd, Kxx = H[:d, :d], H[d:, :d], H[d:, d:]
        G = np.linalg.solve(Kdd, Kxd.T).T
        mu = G @ y
        var = np.diag(Kxx) - np.einsum("ab,ab->a", G, Kxd)
        zT, z0, z0D = training.f_test[m, -1], training.f_test[m, 0], training.f_train[m, 0]
        res[m] = (zT - mu) / np.sqrt(np.maximum(var, 1e-300))[:, None]
        err = float(np.max(np.abs(zT - (z0 + G @ (y - z0D)))))
        scale = float(np.max(np.abs(zT - z0)))
        errs[m] = err / scale if scale > 0 else err
    mean = em.mean_and_stderr(res)
    v = em.jackknife(lambda a, b: b - a * a, res, res * res)
    return PosteriorCheck(residual=res, mean=mean.value, mean_stderr=mean.stderr, variance=v.value,
                          variance_stderr=v.stderr, matheron_errors=errs, matheron_error=float(errs.max()))


# ------------------------------------------------------------------------------------------ formatting
def _pull(v, p, s) -> str:
    return f"{(v - p) / s:+.1f}" if s > 0 and math.isfinite(s) else "—"




wrap_module(sys.modules[__name__])  # every public function here runs in float64 (efftheory._precision)
