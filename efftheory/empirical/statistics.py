r"""Estimators of the first-order statistics of docs/theory.md, with standard errors over networks.

Every estimator starts from the per-network arrays of :mod:`.moments` (one number per network per
entry, already averaged over that network's neurons) and never treats neurons as independent:

* linear statistics: mean over the M networks and stderr = std(ddof=1)/sqrt(M) (:func:`mean_and_stderr`);
* statistics that are nonlinear in ensemble means (connected correlators subtract E[zz] E[zz]):
  the delete-one jackknife over networks (:func:`jackknife`).  Its value is bias-corrected, which
  removes the O(1/M) bias of the plug-in estimate: for a product of two means it is exactly the
  unbiased U-statistic (1/(M(M-1))) sum_{m != m'} u_m v_m'.  Without the correction the plug-in
  connected four-point function would be low by Cov(zz_m)/M = O(1/M).

Normalisation (docs/theory.md, "Normalisation of returned tensors"): every estimator returns the
statistic *at the sampled width* -- no factor of n applied -- which is what
``efftheory.finite_width(net, x).at_width(n)`` (:class:`efftheory.theory.finite.Prediction`) predicts
under the same name.  A measured ``four_point(ens).value`` is compared with ``at_width(n).four_point``
and ``ntk_variance(ens).cov.value`` with ``at_width(n).ntk_cov`` entry by entry, with no factor written
by hand; the 1/n *coefficients* V, A, B, D, F of ``FiniteWidth`` are (statistic) x n_{l-1} and are
what a width-sweep fit returns as c1.

Index conventions (layer l at index l-1; n = n_{l-1}, the fan-in):

* metric:      E[z_{i;a1} z_{i;a2}] = K + G1/n                                        -> [l, a1, a2]
* four_point:  E[z_{i;a1} z_{i;a2} z_{j;a3} z_{j;a4}] - E[zz]_{a1a2} E[zz]_{a3a4}, i != j
               = V_{(a1a2)(a3a4)}/n + O(1/n^2)                                        -> [l, a1, a2, a3, a4]
* four_point_same_neuron:  E[z_{i;a1} z_{i;a2} z_{i;a3} z_{i;a4}] - E[zz]_{a1a2}E[zz]_{a3a4} - 2 pairings
                          = (V_{(a1a2)(a3a4)} + V_{(a1a3)(a2a4)} + V_{(a1a4)(a2a3)})/n + O(1/n^2)
* output-layer NTK (n = n_{L-1}; H = H^(L); i != j output neurons), :class:`NTKVariance`:
    ntk_mean:   E[H_{ii;a1a2}] = Theta + H1/n                                        -> [a1, a2]
    cov       = Cov(H_{ii;a1a2}, H_{ii;a3a4}) = (A_{(a1a2)(a3a4)} + B_{(a1a3)(a2a4)} + B_{(a1a4)(a2a3)})/n
                (= at_width(n).ntk_cov)
    cross_cov = Cov(H_{ii;a1a2}, H_{jj;a3a4}) = A_{(a1a2)(a3a4)}/n  (= at_width(n).ntk_cross_cov)
                                                                                      -> [a1, a2, a3, a4]
    offdiag   = E[H_{ij;a1a2} H_{ij;a3a4}] = B_{(a1a3)(a2a4)}/n                       -> [a1, a3, a2, a4]
  and :class:`NTKPreactivation`:
    cov       = E[H_{ii;a1a2} z_{i;a3} z_{i;a4}] - E[H] E[zz] = (D_{a1a2a3a4} + F_{a1a3a2a4} + F_{a1a4a2a3})/n
    cross_cov = E[H_{ii;a1a2} z_{j;a3} z_{j;a4}] - E[H] E[zz] = D_{a1a2a3a4}/n        -> [a1, a2, a3, a4]
    offdiag   = E[H_{ij;a1a2} z_{i;a3} z_{j;a4}] = F_{a1a3a2a4}/n                     -> [a1, a3, a2, a4]

The output layer's law is invariant under rotations of its n_L neurons, so E[H_{ij}] = 0 for i != j
and cov = cross_cov + offdiag + offdiag (with the index orders above) holds exactly in expectation at
any width, while cross_cov and offdiag carry the O(1/n^2) corrections of the first-order tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .._pytree import result
from .ensemble import Ensemble

__all__ = ["Estimate", "NTKVariance", "NTKPreactivation", "mean_and_stderr", "jackknife", "metric", "four_point",
           "four_point_same_neuron", "fourth_moment_ratio", "ntk_mean", "ntk_variance", "ntk_preactivation"]

_JACKKNIFE_BLOCK = 2048


@result
class Estimate:
    """An ensemble estimate: ``value`` and its standard error ``stderr`` over networks (same shape)."""

    value: np.ndarray
    stderr: np.ndarray

    def pull(self, prediction: ArrayLike) -> np.ndarray:
        """(value - prediction) / stderr: how many standard errors the estimate sits from a prediction."""
        return (np.asarray(self.value) - np.asarray(prediction)) / np.asarray(self.stderr)

    def agrees(self, prediction: ArrayLike, nsigma: float = 3.0) -> np.ndarray:
        """|value - prediction| <= nsigma * stderr, elementwise."""
        return np.abs(self.pull(prediction)) <= nsigma

    def scaled(self, factor: ArrayLike) -> Estimate:
        """value x factor with stderr x |factor| (factor broadcast against value): e.g. ``scaled(n)`` turns
        a statistic measured at width n into an estimate of its 1/n coefficient."""
        f = np.asarray(factor, np.float64)
        return Estimate(value=np.asarray(self.value) * f, stderr=np.asarray(self.stderr) * np.abs(f))


@result
class NTKVariance:
    """Output-layer NTK fluctuations at the sampled width (module docstring), n = n_{L-1}:

    cov:       Cov(H_{ii;a1a2}, H_{ii;a3a4}), (N, N, N, N), the quantity of ``at_width(n).ntk_cov``
               = (A_(12)(34) + B_(13)(24) + B_(14)(23))/n; always present.
    cross_cov: Cov(H_{ii;a1a2}, H_{jj;a3a4}), i != j, = A/n (``at_width(n).ntk_cross_cov``); None when n_L = 1.
    offdiag:   E[H_{ij;a1a2} H_{ij;a3a4}], i != j, stored as [a1, a3, a2, a4] = B_{(a1a3)(a2a4)}/n; None when n_L = 1.
    """

    cov: Estimate
    cross_cov: Estimate | None
    offdiag: Estimate | None


@result
class NTKPreactivation:
    """Output-layer NTK-preactivation cross-correlations at the sampled width (module docstring):

    cov:       E[H_{ii;a1a2} z_{i;a3} z_{i;a4}] - E[H] E[zz] = (D + F + F)/n; always present.
    cross_cov: the same with z_j, i != j, = D/n; None when n_L = 1.
    offdiag:   E[H_{ij;a1a2} z_{i;a3} z_{j;a4}], stored as [a1, a3, a2, a4] = F/n; None when n_L = 1.
    """

    cov: Estimate
    cross_cov: Estimate | None
    offdiag: Estimate | None


def _per_network(values, name: str) -> np.ndarray:
    """Per-network values as float64 (M, ...).  NaN entries are legitimate (a statistic undefined for
    some layer, e.g. the cross-neuron moments of a one-neuron layer) and propagate to those entries."""
    arr = _validate.real_array(name, values, what="per-network values (M, ...)", finite=False)
    if arr.ndim < 1 or arr.shape[0] < 1:
        raise ValueError(f"{name}: expected per-network values with a leading axis of M >= 1 networks, "
                         f"got shape {arr.shape}")
    return arr


def mean_and_stderr(per_network_values: ArrayLike) -> Estimate:
    """Mean over networks (axis 0) and its standard error std(ddof=1)/sqrt(M) (NaN when M = 1)."""
    v = _per_network(per_network_values, "per_network_values")
    M = v.shape[0]
    se = v.std(0, ddof=1) / np.sqrt(M) if M > 1 else np.full(v.shape[1:], np.nan)
    return Estimate(value=v.mean(0), stderr=se)


def jackknife(f: Callable[..., ArrayLike], *per_network_values: ArrayLike) -> Estimate:
    """Delete-one jackknife over networks of f(mean_1, mean_2, ...), bias-corrected.

    Args:
      f: a function of the ensemble means (one per argument array), written with jax.numpy.
      per_network_values: arrays with a common leading axis M (networks).

    Returns:
      Estimate with value = f_all - (M-1) mean_m (f_{-m} - f_all) (removes the O(1/M) bias) and
      stderr = sqrt((M-1)/M sum_m (f_{-m} - mean f_{-m})^2).  Leave-one-out means are processed in
      blocks, so memory stays bounded for large M.
    """
    if not callable(f):
        raise ValueError(f"f: expected a callable of the ensemble means, got {type(f).__name__}")
    if not per_network_values:
        raise ValueError("per_network_values: expected at least one array")
    arrs = [_per_network(a, f"per_network_values[{i}]") for i, a in enumerate(per_network_values)]
    M = arrs[0].shape[0]
    if any(a.shape[0] != M for a in arrs):
        raise ValueError(f"per_network_values: expected a common number of networks, got "
                         f"{[a.shape[0] for a in arrs]}")
    sums = [a.sum(0) for a in arrs]
    f_all = np.asarray(f(*[jnp.asarray(s / M) for s in sums]), np.float64)
    if M < 2:
        return Estimate(value=f_all, stderr=np.full(f_all.shape, np.nan))
    fv = jax.vmap(f)  # eager: a fresh jit per call would recompile for every new f
    s1 = np.zeros_like(f_all)
    s2 = np.zeros_like(f_all)
    for lo in range(0, M, _JACKKNIFE_BLOCK):
        loo = [(s[None] - a[lo:lo + _JACKKNIFE_BLOCK]) / (M - 1) for s, a in zip(sums, arrs)]
        d = np.asarray(fv(*loo), np.float64) - f_all
        s1 += d.sum(0)
        s2 += (d * d).sum(0)
    var = (M - 1) / M * np.maximum(s2 - s1 * s1 / M, 0.0)
    return Estimate(value=f_all - (M - 1) * s1 / M, stderr=np.sqrt(var))


def _require(ens: Ensemble, group: str):
    if not isinstance(ens, Ensemble):
        raise ValueError(f"ensemble: expected an efftheory.empirical.Ensemble, got {type(ens).__name__}")
    if group not in ens.statistics:
        raise ValueError(f"ensemble: collected {ens.statistics}, not {group!r}; sample with "
                         f"statistics=(..., {group!r})")


def _outer(u, v):
    return u[..., :, :, None, None] * v[..., None, None, :, :]


def metric(ensemble: Ensemble) -> Estimate:
    """E[z_{i;a1} z_{i;a2}] = K + G1/n_{l-1} + O(1/n^2) per layer: value (L, N, N)."""
    _require(ensemble, "metric")
    return mean_and_stderr(ensemble.stats["zz"])


def four_point(ensemble: Ensemble) -> Estimate:
    """Connected cross-neuron E[z_{i;a1} z_{i;a2} z_{j;a3} z_{j;a4}] - E[zz] E[zz] (i != j) at the sampled
    width: value (L, N, N, N, N).

    The quantity of ``finite_width(net, x).at_width(n).four_point``: V^(l)/n_{l-1} + O(1/n^2) (no factor n
    applied; multiply by n_{l-1} for an estimate of the coefficient V, or use a width sweep, whose c1 is V).
    Layers with n_l = 1 have no distinct neuron pairs: NaN there.
    """
    _require(ensemble, "four_point")
    return jackknife(lambda cross, zz: cross - _outer(zz, zz), ensemble.stats["zz_zz"], ensemble.stats["zz"])


def _pairings(zz):
    return (_outer(zz, zz) + jnp.einsum("...ac,...bd->...abcd", zz, zz) + jnp.einsum("...ad,...bc->...abcd", zz, zz))


def four_point_same_neuron(ensemble: Ensemble) -> Estimate:
    """E[z_{i;a1} z_{i;a2} z_{i;a3} z_{i;a4}] - three pairings of E[zz] at the sampled width: value (L, N, N, N, N).

    = (V_{(a1a2)(a3a4)} + V_{(a1a3)(a2a4)} + V_{(a1a4)(a2a3)})/n_{l-1} + O(1/n^2) (no factor n applied);
    defined for every layer.
    """
    _require(ensemble, "four_point")
    return jackknife(lambda q, zz: q - _pairings(zz), ensemble.stats["zzzz"], ensemble.stats["zz"])


def fourth_moment_ratio(ensemble: Ensemble) -> Estimate:
    """E[z_{i;a}^4] / (3 E[z_{i;a}^2]^2) per layer and input (same neuron): value (L, N).

    For a deep linear network with C_b = 0 and equal widths n this is exactly (1 + 2/n)^(l-1).
    """
    _require(ensemble, "four_point")
    q = np.einsum("mlaaaa->mla", ensemble.stats["zzzz"])
    d = np.einsum("mlaa->mla", ensemble.stats["zz"])
    return jackknife(lambda q4, k2: q4 / (3 * k2 * k2), q, d)


def ntk_mean(ensemble: Ensemble) -> Estimate:
    """E[H_{ii;a1a2}] of the output layer, averaged over output neurons i: value (N, N).

    = Theta^(L) + H1^(L)/n_{L-1} + O(1/n^2) with the learning-rate tensor of ``ensemble.net``.
    """
    _require(ensemble, "ntk")
    return mean_and_stderr(ensemble.stats["H"])


def ntk_variance(ensemble: Ensemble) -> NTKVariance:
    """Output-layer NTK covariances at the sampled width: cov (= ``at_width(n).ntk_cov``), cross_cov
    (= ``at_width(n).ntk_cross_cov``) and offdiag (:class:`NTKVariance`; no factor n applied)."""
    _require(ensemble, "ntk_variance")
    s = ensemble.stats
    cov = jackknife(lambda hh, h: hh - _outer(h, h), s["HH"], s["H"])
    if ensemble.net.widths[-1] < 2:
        return NTKVariance(cov=cov, cross_cov=None, offdiag=None)
    cross = jackknife(lambda hh, h: hh - _outer(h, h), s["H_H"], s["H"])
    off = mean_and_stderr(s["HoffHoff"].transpose(0, 1, 3, 2, 4))
    return NTKVariance(cov=cov, cross_cov=cross, offdiag=off)


def ntk_preactivation(ensemble: Ensemble) -> NTKPreactivation:
    """Output-layer cross-correlations of the NTK with z^(L) at the sampled width: cov (D + F + F)/n,
    cross_cov D/n, offdiag F/n (:class:`NTKPreactivation`; no factor n applied)."""
    _require(ensemble, "ntk_preactivation")
    s = ensemble.stats
    zzL = s["zz"][:, -1]
    cov = jackknife(lambda hzz, h, zz: hzz - _outer(h, zz), s["Hzz"], s["H"], zzL)
    if ensemble.net.widths[-1] < 2:
        return NTKPreactivation(cov=cov, cross_cov=None, offdiag=None)
    cross = jackknife(lambda hzz, h, zz: hzz - _outer(h, zz), s["H_zz"], s["H"], zzL)
    off = mean_and_stderr(s["Hoff_zz"].transpose(0, 1, 3, 2, 4))
    return NTKPreactivation(cov=cov, cross_cov=cross, offdiag=off)
