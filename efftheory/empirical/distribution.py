r"""Sampled output distributions against the first-order density (docs/distribution.md, "Sampled comparison").

Networks are drawn with the exact layer-by-layer conditional law (:func:`.networks.conditional_forward`):
given layer l-1, the neurons of layer l are independent Gaussians with covariance

    G_hat = C_b + (C_W / n_{l-1}) sigma(z^(l-1)) sigma(z^(l-1))^T      (N x N, one per network),

so one network contributes its k sampled neurons (z, shape (k, N)) *and* G_hat.  The law of a neuron is
the mixture E_networks[N(0, G_hat)], and two estimators of it are offered:

* ``"conditional"`` (default): the mixture itself, F_hat(z) = mean_m Phi(z / sqrt(G_hat_m)) (one input) or
  the mean over networks of the Gaussian bin probabilities (two inputs).  Unbiased for the true law, with
  only the network-to-network fluctuation of G_hat (O(1/sqrt(n)) relative) as noise: the noise floor
  of a distance falls like 1/sqrt(n M) instead of 1/sqrt(M).
* ``"samples"``: the empirical CDF / histogram of the sampled neurons (all k neurons of each network).

Distances between the sampled law and three predictions (:class:`~efftheory.theory.distribution.OutputDistribution`):
"infinite" (Gaussian, K), "gaussian" (Gaussian, K + G1/n) and "first_order" (the Edgeworth density):
Kolmogorov-Smirnov sup |F_hat - F| for one input, binned total variation (1/2) sum_b |P_hat_b - P_b| for
two.  Standard errors: the networks are split into ``groups`` independent groups (networks are
independent; the neurons of one network stay together), and the delete-one-group jackknife gives the
standard error of the distance of the pooled estimate.  The noise floor -- the distance the pooled
estimate would have from the truth by noise alone -- is estimated from the same split as
mean_g dist(F_hat_g, F_hat_{-g}) sqrt(G - 1)/G, and ``corrected`` = sqrt(max(D^2 - floor^2, 0)).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from numpy.typing import ArrayLike, DTypeLike

from .. import _validate
from .._pytree import result
from ..network import MLP
from .networks import check_dtype, check_net, check_x, conditional_forward

if TYPE_CHECKING:
    from ..theory.distribution import OutputDistribution
    from ..theory.finite import FiniteWidth

__all__ = ["OutputSamples", "sample_outputs", "ks_distances", "tv_distances", "histogram", "histogram2d",
           "distribution_sweep", "plot_distribution", "plot_distances", "distance_table", "compare_distribution",
           "write_json", "MODELS"]

#: The three predictions every distance is taken against.
MODELS = ("infinite", "gaussian", "first_order")


@result(meta=("net", "seed", "layer"))
class OutputSamples:
    """Sampled preactivations of one layer: z (M, k, N) (k neurons of each of M networks) and the conditional
    covariance G (M, N, N) of that layer's neurons given the layer below (module docstring).  ``n`` is the
    fan-in n_{l-1}."""

    z: np.ndarray
    G: np.ndarray
    n: int
    net: MLP
    seed: int
    layer: int

    @property
    def n_networks(self) -> int:
        return int(self.z.shape[0])


def _truncate(net: MLP, layer: int, k: int) -> MLP:
    """The first ``layer`` layers of ``net`` with ``k`` neurons in the last one."""
    l = layer
    if net.skips[l - 1] != 0.0 or net.branches[l - 1] != 1.0:
        raise ValueError(f"layer: layer {l} of {net!r} is a residual layer; sampling its preactivations as the output "
                         "of a truncated network is not supported for residual layers yet")
    return MLP(l, net.hidden_widths[: l - 1], net.sigma, net.C_Ws[:l], net.C_bs[:l], net.lambda_Ws[:l],
               net.lambda_bs[:l], output_width=k, skip=net.skips[:l], branch=net.branches[:l])


@functools.lru_cache(maxsize=32)
def _chunk_fn(net: MLP, dtype_name: str, chunk: int):
    dtype = jnp.dtype(dtype_name)

    def one(key, x):
        zs = conditional_forward(net, key, x, dtype)
        if net.depth == 1:
            a, n_in = jnp.asarray(x, dtype), x.shape[1]
        else:
            a, n_in = net.sigma(zs[-2]), net.widths[-2]
        G = net.C_bs[-1] + (net.C_Ws[-1] / n_in) * a @ a.T
        return zs[-1].T, G  # (k, N), (N, N)

    def run(base, start, x):
        keys = jax.vmap(lambda m: jax.random.fold_in(base, m))(start + jnp.arange(chunk, dtype=jnp.uint32))
        return jax.vmap(one, in_axes=(0, None))(keys, x)

    return jax.jit(run)


def sample_outputs(net: MLP, x: ArrayLike, n_networks: int, seed: int, *, layer: int = -1, neurons: int = 1,
                   width: int | None = None, dtype: DTypeLike = jnp.float64, chunk: int = 4096) -> OutputSamples:
    """Draw ``n_networks`` networks (exact conditional law, :mod:`.networks`) and return the preactivations of
    ``neurons`` neurons of ``layer`` and their conditional covariance (:class:`OutputSamples`).

    Network m uses key fold_in(PRNGKey(seed), m), or fold_in(fold_in(PRNGKey(seed), width), m) when
    ``width`` is given (then ``net.with_width(width)`` is sampled: widths of a sweep are independent).
    """
    check_net(net)
    xa = np.asarray(check_x(x), np.float64)
    M = _validate.positive_int("n_networks", n_networks, maximum=_validate.MAX_NETWORKS)
    seed = _validate.seed("seed", seed)
    k = _validate.positive_int("neurons", neurons, maximum=4096)
    chunk = _validate.positive_int("chunk", chunk)
    dt = np.dtype(check_dtype(dtype)).name
    L = net.depth
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (-L <= layer <= L) or layer == 0:
        raise ValueError(f"layer: expected 1..{L} or -{L}..-1, got {layer!r}")
    l = int(layer) if layer > 0 else L + 1 + int(layer)
    base = jax.random.PRNGKey(seed)
    if width is not None:
        width = _validate.positive_int("width", width, maximum=_validate.MAX_WIDTH)
        net = net.with_width(width)
        base = jax.random.fold_in(base, width)
    sub = _truncate(net, l, k)
    chunk = min(chunk, M)
    fn = _chunk_fn(sub, dt, chunk)
    zs, Gs = [], []
    for start in range(0, M, chunk):
        z, G = fn(base, np.uint32(start), xa)
        stop = min(chunk, M - start)
        zs.append(np.asarray(z[:stop], np.float64))
        Gs.append(np.asarray(G[:stop], np.float64))
    z, G = np.concatenate(zs), np.concatenate(Gs)
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(G))):
        raise ValueError("net: the sampled preactivations are not finite (overflow: use float64 or a smaller C_W)")
    n_in = xa.shape[1] if l == 1 else sub.widths[l - 2]
    return OutputSamples(z=z, G=G, n=int(n_in), net=net, seed=seed, layer=l)


# ---------------------------------------------------------------------------------------------
# predictions on grids


def _check_samples(samples):
    if not isinstance(samples, OutputSamples):
        raise ValueError(f"samples: expected an OutputSamples (sample_outputs), got {type(samples).__name__}")
    return samples


def _check_dist(dist, N):
    from ..theory.distribution import OutputDistribution

    if not isinstance(dist, OutputDistribution):
        raise ValueError(f"dist: expected an OutputDistribution (output_distribution), got {type(dist).__name__}")
    if dist.n_inputs != N:
        raise ValueError(f"dist: has {dist.n_inputs} inputs, the samples {N}")
    return dist.joint(1) if dist.neurons != 1 else dist


def _groups(M: int, groups: int):
    groups = _validate.positive_int("groups", groups, minimum=2)
    if groups > M:
        raise ValueError(f"groups: expected at most n_networks = {M} groups, got {groups}")
    return np.array_split(np.arange(M), groups)


def _input(name, a, N):
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not 0 <= a < N:
        raise ValueError(f"{name}: expected an input index in [0, {N}), got {a!r}")
    return int(a)


def _distance_stats(est_groups, counts, preds, dist_fn):
    """Pooled distance, jackknife stderr over groups and noise floor, for each prediction.

    est_groups: (G, P) per-group estimates (CDF values or bin probabilities), counts: (G,) weights.
    """
    w = np.asarray(counts, np.float64)
    tot = est_groups.T @ w / w.sum()
    Gn = len(w)
    loo = [(tot * w.sum() - est_groups[g] * w[g]) / (w.sum() - w[g]) for g in range(Gn)]
    floor = np.mean([dist_fn(est_groups[g], loo[g]) for g in range(Gn)]) * math.sqrt(Gn - 1) / Gn
    out = {}
    for name, pred in preds.items():
        D = float(dist_fn(tot, pred))
        Dj = np.array([dist_fn(loo[g], pred) for g in range(Gn)])
        se = float(math.sqrt((Gn - 1) / Gn * np.sum((Dj - Dj.mean()) ** 2)))
        corr = math.sqrt(max(D * D - floor * floor, 0.0))
        out[name] = {"distance": D, "stderr": se, "floor": float(floor), "corrected": corr,
                     "resolved": bool(D - floor >= 2 * se)}
    return out


def _ks(a, b):
    return float(np.max(np.abs(a - b)))


def _tv(a, b):
    return float(0.5 * (np.sum(np.abs(a - b)) + abs(np.sum(b) - np.sum(a))))  # the outside region as one bin


@functools.partial(jax.jit, static_argnums=())
def _mixture_cdf(z, G):
    Gs = jnp.where(G > 0, G, 1.0)[:, None]
    step = (z[None, :] >= 0).astype(z.dtype)  # a network whose layer below is all zero (relu): an atom at 0
    return jnp.mean(jnp.where(G[:, None] > 0, ndtr(z[None, :] / jnp.sqrt(Gs)), step), axis=0)


def ks_distances(samples: OutputSamples, dist: OutputDistribution, *, input: int = 0, groups: int = 20,
                 estimator: str = "conditional", grid: int = 2001) -> dict:
    """Kolmogorov-Smirnov distances of one input's sampled law to the three predictions (module docstring).

    Returns {model: {"distance", "stderr", "floor", "corrected", "resolved"}} for the models in :data:`MODELS`.
    """
    s = _check_samples(samples)
    N = s.z.shape[2]
    a = _input("input", input, N)
    d = _check_dist(dist, N).marginal([a])
    estimator = _validate.choice("estimator", estimator, ("conditional", "samples"))
    grid = _validate.positive_int("grid", grid, minimum=11)
    parts = _groups(s.n_networks, groups)
    sd = math.sqrt(float(d.covariance[0, 0]))
    zg = np.linspace(-8 * sd, 8 * sd, grid)
    est = []
    for idx in parts:
        if estimator == "conditional":
            G = s.G[idx, a, a]
            acc = np.zeros(grid)
            for c in range(0, len(G), 8192):
                acc += np.asarray(_mixture_cdf(jnp.asarray(zg), jnp.asarray(G[c:c + 8192]))) * len(G[c:c + 8192])
            est.append(acc / len(G))
        else:
            v = np.sort(s.z[idx, :, a].ravel())
            est.append(np.searchsorted(v, zg, side="right") / v.size)
    preds = {"infinite": np.asarray(d.cdf(zg, corrected_gaussian=False)),
             "gaussian": np.asarray(d.cdf(zg, corrected_gaussian=True)),
             "first_order": np.asarray(d.cdf(zg))}
    return _distance_stats(np.array(est), [len(p) for p in parts], preds, _ks)


def _bin_nodes(edges0, edges1, order=4):
    """Gauss-Legendre nodes (B0, B1, q*q, 2) and weights (B0, B1, q*q) for every bin of a 2-d grid."""
    t, w = np.polynomial.legendre.leggauss(order)

    def axis(e):
        mid, half = (e[1:] + e[:-1]) / 2, (e[1:] - e[:-1]) / 2
        return mid[:, None] + half[:, None] * t[None, :], half[:, None] * w[None, :]

    x0, w0 = axis(edges0)
    x1, w1 = axis(edges1)
    X0 = np.broadcast_to(x0[:, None, :, None], (len(x0), len(x1), order, order))
    X1 = np.broadcast_to(x1[None, :, None, :], (len(x0), len(x1), order, order))
    W = w0[:, None, :, None] * w1[None, :, None, :]
    nodes = np.stack([X0, X1], -1).reshape(len(x0), len(x1), order * order, 2)
    return nodes, W.reshape(len(x0), len(x1), order * order)


@jax.jit
def _mixture_pdf2(nodes, G):
    """mean over networks of N(nodes; G_m), nodes (P, 2), G (M, 2, 2)."""
    det = G[:, 0, 0] * G[:, 1, 1] - G[:, 0, 1] ** 2
    i00, i11, i01 = G[:, 1, 1] / det, G[:, 0, 0] / det, -G[:, 0, 1] / det
    x, y = nodes[None, :, 0], nodes[None, :, 1]
    q = i00[:, None] * x * x + i11[:, None] * y * y + 2 * i01[:, None] * x * y
    return jnp.mean(jnp.exp(-0.5 * q) / (2 * jnp.pi * jnp.sqrt(det)[:, None]), axis=0)


def _edges(d2, bins, span):
    return [np.linspace(-span * math.sqrt(float(d2.covariance[i, i])), span * math.sqrt(float(d2.covariance[i, i])),
                        bins + 1) for i in range(2)]


def tv_distances(samples: OutputSamples, dist: OutputDistribution, *, inputs: Sequence[int] = (0, 1), groups: int = 20,
                 estimator: str = "conditional", bins: int = 20, span: float = 4.0) -> dict:
    """Binned total-variation distances of two inputs' sampled joint law to the three predictions.

    Bins: ``bins`` x ``bins`` equal cells over |z_a| <= span sqrt(Sigma_aa) plus the outside as one bin.
    Bin probabilities of the predictions and of the "conditional" estimator by 4 x 4 Gauss-Legendre per cell
    (networks whose conditional Gaussian is narrower than half a bin contribute their sampled neurons instead).
    Returns the same dict as :func:`ks_distances`.
    """
    s = _check_samples(samples)
    N = s.z.shape[2]
    if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
        raise ValueError(f"inputs: expected two input indices, got {inputs!r}")
    a, b = (_input("inputs", i, N) for i in inputs)
    if a == b:
        raise ValueError("inputs: expected two different inputs")
    d2 = _check_dist(dist, N).marginal([a, b])
    estimator = _validate.choice("estimator", estimator, ("conditional", "samples"))
    bins = _validate.positive_int("bins", bins, minimum=2, maximum=400)
    span = _validate.real("span", span, positive=True)
    parts = _groups(s.n_networks, groups)
    e0, e1 = _edges(d2, bins, span)
    nodes, W = _bin_nodes(e0, e1, order=4)
    h_min = min(e0[1] - e0[0], e1[1] - e1[0])
    flat = nodes.reshape(-1, 2)

    def probs(pdf_vals):
        return (np.asarray(pdf_vals).reshape(W.shape) * W).sum(-1).ravel()

    est = []
    for idx in parts:
        if estimator == "conditional":
            G = s.G[idx][:, [a, b]][:, :, [a, b]]
            # components narrower than half a bin (or singular: relu with < 2 live units below) are not
            # integrable by the per-bin rule: those networks contribute their sampled neurons instead
            narrow = np.linalg.eigvalsh(G)[:, 0] < (h_min / 2) ** 2
            acc = np.zeros(flat.shape[0])
            Gw = G[~narrow]
            step = max(1, 2 ** 22 // flat.shape[0])
            for c in range(0, len(Gw), step):
                g = Gw[c:c + step]
                acc += np.asarray(_mixture_pdf2(jnp.asarray(flat), jnp.asarray(g))) * len(g)
            pr = probs(acc)
            if narrow.any():
                zz = s.z[idx[narrow]][:, :, [a, b]]
                hist, _, _ = np.histogram2d(zz[..., 0].ravel(), zz[..., 1].ravel(), bins=[e0, e1])
                pr = pr + hist.ravel() / zz.shape[1]
            est.append(pr / len(G))
        else:
            zz = s.z[idx][:, :, [a, b]].reshape(-1, 2)
            h, _, _ = np.histogram2d(zz[:, 0], zz[:, 1], bins=[e0, e1])
            est.append(h.ravel() / zz.shape[0])
    preds = {"infinite": probs(d2.gaussian_pdf(flat, corrected=False)),
             "gaussian": probs(d2.gaussian_pdf(flat, corrected=True)),
             "first_order": probs(d2.pdf(flat))}
    return _distance_stats(np.array(est), [len(p) for p in parts], preds, _tv)


# ---------------------------------------------------------------------------------------------
# histograms


def histogram(samples: OutputSamples, *, input: int = 0, bins: int = 60,
              range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges, density, stderr): histogram of one input's sampled neurons, normalised to a density, with the
    standard error of each bin over networks (networks independent, a network's k neurons kept together)."""
    s = _check_samples(samples)
    a = _input("input", input, s.z.shape[2])
    bins = _validate.positive_int("bins", bins, minimum=2)
    v = s.z[:, :, a]
    if range is None:
        m = float(np.max(np.abs(v)))
        range = (-m, m)
    edges = np.linspace(range[0], range[1], bins + 1)
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, -1, bins)
    inside = (idx >= 0) & (idx < bins) & (v <= edges[-1])
    per_net = np.zeros((v.shape[0], bins))
    rows = np.broadcast_to(np.arange(v.shape[0])[:, None], v.shape)
    np.add.at(per_net, (rows[inside], idx[inside]), 1.0 / v.shape[1])
    width = np.diff(edges)
    dens = per_net.mean(0) / width
    se = per_net.std(0, ddof=1) / math.sqrt(v.shape[0]) / width
    return edges, dens, se


def histogram2d(samples: OutputSamples, *, inputs: Sequence[int] = (0, 1), bins: int = 40,
                span: float = 4.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges_a, edges_b, density) of two inputs' sampled neurons over |z| <= span sqrt(mean G_aa)."""
    s = _check_samples(samples)
    N = s.z.shape[2]
    a, b = (_input("inputs", i, N) for i in inputs)
    sd = np.sqrt(np.mean(s.G[:, [a, b], [a, b]], axis=0))
    e0 = np.linspace(-span * sd[0], span * sd[0], bins + 1)
    e1 = np.linspace(-span * sd[1], span * sd[1], bins + 1)
    zz = s.z[:, :, [a, b]].reshape(-1, 2)
    h, _, _ = np.histogram2d(zz[:, 0], zz[:, 1], bins=[e0, e1], density=False)
    return e0, e1, h / zz.shape[0] / np.outer(np.diff(e0), np.diff(e1))


# ---------------------------------------------------------------------------------------------
# a width sweep, ready for a CLI


def _slope(widths, stats):
    """Log-log slope of the corrected distance over the resolved widths (weights from the jackknife error)."""
    n = np.array([w for w, st in zip(widths, stats) if st["resolved"] and st["corrected"] > 0], float)
    D = np.array([st["corrected"] for st in stats if st["resolved"] and st["corrected"] > 0])
    se = np.array([st["stderr"] for st in stats if st["resolved"] and st["corrected"] > 0])
    if len(n) < 3:
        return {"slope": None, "stderr": None, "widths": n.tolist()}
    X = np.stack([np.ones_like(n), np.log(n)], 1)
    w = (D / np.maximum(se, 1e-300)) ** 2
    A = X.T @ (w[:, None] * X)
    beta = np.linalg.solve(A, X.T @ (w * np.log(D)))
    resid = np.log(D) - X @ beta
    chi2 = float(np.sum(w * resid ** 2))
    cov = np.linalg.inv(A) * max(1.0, chi2 / max(len(n) - 2, 1))
    return {"slope": float(beta[1]), "stderr": float(math.sqrt(cov[1, 1])), "widths": n.tolist()}


def distribution_sweep(net: MLP, x: ArrayLike, widths: int | Sequence[int], n_networks: int, seed: int, *,
                       input: int = 0, inputs2: Sequence[int] | None = None, groups: int = 20,
                       estimator: str = "conditional", finite: FiniteWidth | None = None, neurons: int = 1,
                       samples_out: dict | None = None, chunk: int = 4096) -> dict:
    """KS (one input) and binned TV (two inputs, when ``inputs2`` is given) distances of the output layer's
    sampled law to the three predictions, per width, and their log-log slopes over the resolved widths.

    Returns a JSON-ready dict {"net", "widths", "n_networks", "estimator", "ks": {width: {model: stats}},
    "tv": {...} or None, "slopes": {"ks": {model: {...}}, "tv": ...}}.  ``finite``: a precomputed
    FiniteWidth of ``net`` on ``x``.  ``chunk``: networks per compiled batch.  ``samples_out``: a dict that receives
    {width: OutputSamples} (for plots).
    """
    from ..theory.distribution import output_distribution
    from ..theory.finite import finite_width

    check_net(net)
    xa = np.asarray(check_x(x), np.float64)
    ws = _validate.widths("widths", widths)
    fw = finite if finite is not None else finite_width(net, xa)
    ks, tv = {}, {}
    for n in ws:
        s = sample_outputs(net, xa, n_networks, seed, width=n, neurons=neurons, chunk=chunk)
        d = output_distribution(net, None, width=n, finite=fw)
        ks[str(n)] = ks_distances(s, d, input=input, groups=groups, estimator=estimator)
        if inputs2 is not None:
            tv[str(n)] = tv_distances(s, d, inputs=tuple(inputs2), groups=groups, estimator=estimator)
        if samples_out is not None:
            samples_out[n] = s
    slopes = {"ks": {m: _slope(ws, [ks[str(n)][m] for n in ws]) for m in MODELS}}
    if inputs2 is not None:
        slopes["tv"] = {m: _slope(ws, [tv[str(n)][m] for n in ws]) for m in MODELS}
    return {"net": net.to_dict(), "widths": list(ws), "n_networks": int(n_networks), "estimator": estimator,
            "ks": ks, "tv": tv or None, "slopes": slopes}


def plot_distribution(samples: OutputSamples, dist: OutputDistribution, path_prefix: str, *, input: int = 0,
                      bins: int = 60) -> list[str]:
    """Histogram of one input's sampled output with the three predicted densities, on a linear and a log
    scale (``{path_prefix}_linear.png``, ``{path_prefix}_log.png``); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = _check_samples(samples)
    a = _input("input", input, s.z.shape[2])
    d = _check_dist(dist, s.z.shape[2]).marginal([a])
    sd = math.sqrt(float(d.covariance[0, 0]))
    edges, dens, se = histogram(s, input=a, bins=bins, range=(-5 * sd, 5 * sd))
    mid = (edges[1:] + edges[:-1]) / 2
    zg = np.linspace(-5 * sd, 5 * sd, 801)
    curves = {"Gaussian, K (n = inf)": np.asarray(d.gaussian_pdf(zg[:, None], corrected=False)),
              "Gaussian, K + G1/n": np.asarray(d.gaussian_pdf(zg[:, None])),
              "first order (V/n)": np.asarray(d.pdf(zg[:, None]))}
    paths = []
    for scale in ("linear", "log"):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.errorbar(mid, dens, yerr=se, fmt=".", color="k", ms=3, lw=0.8, label=f"sampled ({s.n_networks} nets)")
        for (lab, y), st in zip(curves.items(), (":", "--", "-")):
            ax.plot(zg, np.where(y > 0, y, np.nan) if scale == "log" else y, st, label=lab)
        if scale == "log":
            ax.set_yscale("log")
            ax.set_ylim(max(1e-6, float(np.min(dens[dens > 0])) / 3) if np.any(dens > 0) else 1e-6, None)
        ax.set_xlabel(f"z (layer {s.layer}, input {a})")
        ax.set_ylabel("density")
        ax.set_title(f"n = {s.n}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = f"{path_prefix}_{scale}.png"
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_json(report: dict, path: str) -> str:
    """Write a :func:`distribution_sweep` report as JSON; returns the path."""
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


_LABELS = {"infinite": "Gaussian, K", "gaussian": "Gaussian, K + G1/n", "first_order": "first order"}


def distance_table(report: dict) -> str:
    """A plain-text table of a :func:`distribution_sweep` report: distances +- stderr per width and the slopes."""
    lines = []
    for kind, title in (("ks", "KS distance, one input"), ("tv", "binned TV distance, two inputs")):
        if not report.get(kind):
            continue
        lines.append(f"{title} ({report['n_networks']} networks per width; '*': not resolved above the noise floor)")
        lines.append(f"{'n':>6}  " + "  ".join(f"{_LABELS[m]:>24}" for m in MODELS))
        for n in report["widths"]:
            st = report[kind][str(n)]
            lines.append(f"{n:6d}  " + "  ".join(
                f"{st[m]['distance']:>12.3e} +- {st[m]['stderr']:7.1e}{' ' if st[m]['resolved'] else '*'}" for m in MODELS))
        sl = report["slopes"][kind]
        def fmt(fit):
            return "unresolved" if fit["slope"] is None else f"{fit['slope']:.2f} +- {fit['stderr']:.2f}"

        lines.append("slope   " + "  ".join(f"{fmt(sl[m]):>24}" for m in MODELS))
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_distances(report: dict, path: str) -> str:
    """Distances of a :func:`distribution_sweep` report against L/n (log-log; open markers: not resolved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kinds = [k for k in ("ks", "tv") if report.get(k)]
    L = report["net"]["depth"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    ratio = L / np.asarray(report["widths"], float)
    for ax, kind in zip(axes[0], kinds):
        for m, mk in zip(MODELS, ("o", "s", "^")):
            st = [report[kind][str(n)][m] for n in report["widths"]]
            D = np.array([t["distance"] for t in st])
            se = np.array([t["stderr"] for t in st])
            res = np.array([t["resolved"] for t in st])
            line = ax.errorbar(ratio, D, yerr=se, fmt=mk + "-", ms=5, label=_LABELS[m])
            ax.plot(ratio[~res], D[~res], mk, mfc="white", color=line[0].get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L / n")
        ax.set_ylabel("KS distance (one input)" if kind == "ks" else "binned TV distance (two inputs)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_distribution(net: MLP, x: ArrayLike, widths: int | Sequence[int], n_networks: int, seed: int, out_dir: str,
                         *, plots: bool = True, groups: int = 20, log: Callable[[str], object] | None = None) -> dict:
    """Everything ``efftheory compare --distribution`` needs: the output layer's distribution at each width
    against the three predictions (one input: KS; the first two inputs: binned TV), written to
    ``{out_dir}/distribution.json``, and with ``plots`` the histograms with the three densities
    (``distribution_n{n}_linear.png`` / ``_log.png``) and ``distribution_distances.png``.

    Only the first two inputs are used (the first-order theory is recomputed on them: O(1) cost).
    Returns {"report": the JSON-ready dict, "table": text, "paths": {name: path}}.
    """
    check_net(net)
    xa = np.asarray(check_x(x), np.float64)[:2]
    ws = _validate.widths("widths", widths)
    M = _validate.positive_int("n_networks", n_networks, minimum=2, maximum=_validate.MAX_NETWORKS)
    groups = min(_validate.positive_int("groups", groups, minimum=2), M)
    out_dir = _validate.optional_path("out_dir", out_dir)
    if out_dir is None:
        raise ValueError("out_dir: expected a folder to write the report and figures into")
    os.makedirs(out_dir, exist_ok=True)
    from ..theory.distribution import output_distribution
    from ..theory.finite import finite_width

    base = net.replace(output_width=1)
    fw = finite_width(base, xa)
    kept: dict = {}
    if log is not None:
        log(f"distribution: {M} networks per width at widths {','.join(map(str, ws))}")
    report = distribution_sweep(base, xa, ws, M, seed, inputs2=(0, 1) if xa.shape[0] >= 2 else None,
                                groups=groups, finite=fw, samples_out=kept)
    stem = "distribution"
    paths = {stem: write_json(report, os.path.join(out_dir, f"{stem}.json"))}
    if plots:
        for n in ws:
            d = output_distribution(None, width=n, finite=fw)
            for p in plot_distribution(kept[n], d, os.path.join(out_dir, f"distribution_n{n}")):
                paths[os.path.basename(p)[:-4]] = p
        paths["distribution_distances"] = plot_distances(report, os.path.join(out_dir, "distribution_distances.png"))
    return {"report": report, "table": distance_table(report), "paths": paths}
