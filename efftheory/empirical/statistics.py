r"""Estimators of the first-order statistics of docs/theory.md, with standard errors over networks.

Every estimator starts from the per-network arrays of :mod:`.moments` (one number per network per
entry, already averaged over that network's neurons) and never treats neurons as independent:

* linear statistics: mean over the M networks and stderr = std(ddof=1)/sqrt(M) (:func:`mean_and_stderr`);
* statistics that are nonlinear in ensemble means (connected correlators subtract E[zz] E[zz]):
  the delete-one jackknife over networks (:func:`jackknife`).  Its value is bias-corrected, which
  removes the O(1/M) bias of the plug-in estimate: for a product of two means it is exactly the
  unbiased U-statistic (1/(M(M-1))) sum_{m != m'} u_m v_m'.  Without the correction the plug-in
  V_hat would be low by n Cov(zz_m)/M = O(1/M).

Index conventions (docs/theory.md, first order; layer l at index l-1; n = n_{l-1}, the fan-in):

* metric:      E[z_{i;a1} z_{i;a2}]                                            -> [l, a1, a2]
* four_point:  V_{(a1a2)(a3a4)} ~ n (E[z_{i;a1} z_{i;a2} z_{j;a3} z_{j;a4}] - E[zz]_{a1a2} E[zz]_{a3a4}), i != j
                                                                                -> [l, a1, a2, a3, a4]
* four_point_same_neuron:  n (E[z_{i;a1} z_{i;a2} z_{i;a3} z_{i;a4}] - E[zz]_{a1a2}E[zz]_{a3a4} - 2 pairings)
                          = V_{(a1a2)(a3a4)} + V_{(a1a3)(a2a4)} + V_{(a1a4)(a2a3)} + O(1/n)
* output-layer NTK (n = n_{L-1}; H = H^(L); i != j output neurons):
    ntk_mean:  E[H_{ii;a1a2}]                                                  -> [a1, a2]
    A_{(a1a2)(a3a4)} = n Cov(H_{ii;a1a2}, H_{jj;a3a4})                         -> A[a1, a2, a3, a4]
    B_{(a1a3)(a2a4)} = n E[H_{ij;a1a2} H_{ij;a3a4}]                            -> B[a1, a3, a2, a4]
    combined         = n Cov(H_{ii;a1a2}, H_{ii;a3a4}) = A_{(a1a2)(a3a4)} + B_{(a1a3)(a2a4)} + B_{(a1a4)(a2a3)}
    D_{a1a2a3a4}     = n (E[H_{ii;a1a2} z_{j;a3} z_{j;a4}] - E[H_{ii;a1a2}] E[z_{j;a3} z_{j;a4}])  -> D[a1, a2, a3, a4]
    F_{a1a3a2a4}     = n E[H_{ij;a1a2} z_{i;a3} z_{j;a4}]                      -> F[a1, a3, a2, a4]
    combined         = n (E[H_{ii;a1a2} z_{i;a3} z_{i;a4}] - E[H] E[zz]) = D_{a1a2a3a4} + F_{a1a3a2a4} + F_{a1a4a2a3}

The output layer's law is invariant under rotations of its n_L neurons, so E[H_{ij}] = 0 for i != j
and the two "combined" identities hold exactly in expectation at any width, while A, B, D, F read
this way carry the O(1/n) corrections of the theory's first-order tensors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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

    def pull(self, prediction):
        """(value - prediction) / stderr: how many standard errors the estimate sits from a prediction."""
        return (np.asarray(self.value) - np.asarray(prediction)) / np.asarray(self.stderr)

    def agrees(self, prediction, nsigma: float = 3.0):
        """|value - prediction| <= nsigma * stderr, elementwise."""
        return np.abs(self.pull(prediction)) <= nsigma


@result
class NTKVariance:
    """Output-layer NTK fluctuations (module docstring): A, B (None when n_L = 1) and A + B + B (always)."""

    A: Estimate | None
    B: Estimate | None
    combined: Estimate


@result
class NTKPreactivation:
    """Output-layer NTK-preactivation cross-correlations: D, F (None when n_L = 1) and D + F + F (always)."""

    D: Estimate | None
    F: Estimate | None
    combined: Estimate


def _per_network(values, name: str) -> np.ndarray:
    """Per-network values as float64 (M, ...).  NaN entries are legitimate (a statistic undefined for
    some layer, e.g. the cross-neuron moments of a one-neuron layer) and propagate to those entries."""
    arr = _validate.real_array(name, values, what="per-network values (M, ...)", finite=False)
    if arr.ndim < 1 or arr.shape[0] < 1:
        raise ValueError(f"{name}: expected per-network values with a leading axis of M >= 1 networks, "
                         f"got shape {arr.shape}")
    return arr


def mean_and_stderr(per_network_values) -> Estimate:
    """Mean over networks (axis 0) and its standard error std(ddof=1)/sqrt(M) (NaN when M = 1)."""
    v = _per_network(per_network_values, "per_network_values")
    M = v.shape[0]
    se = v.std(0, ddof=1) / np.sqrt(M) if M > 1 else np.full(v.shape[1:], np.nan)
    return Estimate(value=v.mean(0), stderr=se)


def jackknife(f, *per_network_values) -> Estimate:
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


def _fan_in(ensemble: Ensemble, ndim: int):
    return np.asarray(ensemble.fan_in, np.float64).reshape((-1,) + (1,) * ndim)


def four_point(ensemble: Ensemble) -> Estimate:
    """V_hat_{(a1a2)(a3a4)} = n_{l-1} (cross-neuron E[z_i z_i z_j z_j] - E[zz] E[zz]): value (L, N, N, N, N).

    Estimates V^(l) of docs/theory.md up to O(1/n) (a 1/n^2 connected term over the 1/n prefactor); use a
    width sweep for V itself.  Layers with n_l = 1 have no distinct neuron pairs: NaN there.
    """
    _require(ensemble, "four_point")
    n = _fan_in(ensemble, 4)
    return jackknife(lambda cross, zz: n * (cross - _outer(zz, zz)), ensemble.stats["zz_zz"], ensemble.stats["zz"])


def _pairings(zz):
    return (_outer(zz, zz) + jnp.einsum("...ac,...bd->...abcd", zz, zz) + jnp.einsum("...ad,...bc->...abcd", zz, zz))


def four_point_same_neuron(ensemble: Ensemble) -> Estimate:
    """n_{l-1} (E[z_{i;a1} z_{i;a2} z_{i;a3} z_{i;a4}] - three pairings of E[zz]): value (L, N, N, N, N).

    = V_{(a1a2)(a3a4)} + V_{(a1a3)(a2a4)} + V_{(a1a4)(a2a3)} + O(1/n); defined for every layer.
    """
    _require(ensemble, "four_point")
    n = _fan_in(ensemble, 4)
    return jackknife(lambda q, zz: n * (q - _pairings(zz)), ensemble.stats["zzzz"], ensemble.stats["zz"])


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
    """Output-layer NTK variance tensors A, B and A + B + B (module docstring for the index order)."""
    _require(ensemble, "ntk_variance")
    s, n = ensemble.stats, float(ensemble.fan_in[-1])
    combined = jackknife(lambda hh, h: n * (hh - _outer(h, h)), s["HH"], s["H"])
    if ensemble.net.widths[-1] < 2:
        return NTKVariance(A=None, B=None, combined=combined)
    A = jackknife(lambda hh, h: n * (hh - _outer(h, h)), s["H_H"], s["H"])
    B = mean_and_stderr(n * s["HoffHoff"].transpose(0, 1, 3, 2, 4))
    return NTKVariance(A=A, B=B, combined=combined)


def ntk_preactivation(ensemble: Ensemble) -> NTKPreactivation:
    """Output-layer cross-correlations D, F of the NTK with z^(L) and D + F + F (module docstring)."""
    _require(ensemble, "ntk_preactivation")
    s, n = ensemble.stats, float(ensemble.fan_in[-1])
    zzL = s["zz"][:, -1]
    combined = jackknife(lambda hzz, h, zz: n * (hzz - _outer(h, zz)), s["Hzz"], s["H"], zzL)
    if ensemble.net.widths[-1] < 2:
        return NTKPreactivation(D=None, F=None, combined=combined)
    D = jackknife(lambda hzz, h, zz: n * (hzz - _outer(h, zz)), s["H_zz"], s["H"], zzL)
    F = mean_and_stderr(n * s["Hoff_zz"].transpose(0, 1, 3, 2, 4))
    return NTKPreactivation(D=D, F=F, combined=combined)
