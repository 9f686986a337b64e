"""Joint width-sweep fits: every entry of a tensor at once, with the full covariance between entries.

Entries of one tensor are measured on the same networks, so their errors are correlated, and a
quadrature error in a prediction moves several entries at once.  Per-entry pulls miss such errors
(a 1% error in ReLU's three-input NTK covariance passed every per-entry 3-sigma test and failed a
joint chi^2 over its 21 entries at 283/21).  This module gives

* :func:`jackknife_covariance`: the delete-one jackknife over networks of f(mean_1, mean_2, ...),
  with the full covariance between the entries of f (bias-corrected value, as
  :func:`efftheory.empirical.jackknife`);
* :func:`joint_width_fit`: the generalised least-squares fit m_e(n) = a_e + c1_e / n + c2_e / n^2 of
  all entries e together, widths independent, each width with its own covariance between entries,
  and the chi^2 of the fitted c1 vector against a prediction with the covariance of the fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import chi2 as _chi2

__all__ = ["JointFit", "jackknife_covariance", "joint_width_fit"]


def jackknife_covariance(f: Callable[..., ArrayLike], *per_network_values: ArrayLike,
                         block: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Value and covariance of f(mean_1, mean_2, ...) by the (block) delete-one jackknife over networks.

    Args:
      f: maps per-network means (arrays with a leading axis of leave-out samples) to a statistic of
        shape (..., E) or any shape, flattened to E entries; must broadcast over a leading axis.
      per_network_values: arrays with a common leading axis M (networks).
      block: networks left out together (M is cut to a multiple of it); 1 is the delete-one jackknife.

    Returns:
      (value (E,), cov (E, E)): the bias-corrected estimate f_all - (G - 1)(mean f_-g - f_all) and
      cov = (G - 1)/G sum_g (f_-g - mean)(f_-g - mean)^T over the G leave-out groups.
    """
    arrs = [np.asarray(a, dtype=np.float64) for a in per_network_values]
    if not arrs:
        raise ValueError("per_network_values: expected at least one array")
    M = arrs[0].shape[0]
    if any(a.shape[0] != M for a in arrs):
        raise ValueError("per_network_values: expected a common number of networks (leading axis)")
    block = int(block)
    if block < 1:
        raise ValueError(f"block: expected a positive number of networks, got {block}")
    G = M // block
    if G < 2:
        raise ValueError(f"per_network_values: need at least two groups of {block} networks, got {M} networks")
    arrs = [a[:G * block] for a in arrs]
    sums = [a.reshape((G, block) + a.shape[1:]).sum(1) for a in arrs]
    totals = [s.sum(0) for s in sums]
    full = np.asarray(f(*[t[None] / (G * block) for t in totals]), dtype=np.float64).reshape(-1)
    loo = np.asarray(f(*[(t[None] - s) / ((G - 1) * block) for t, s in zip(totals, sums)]),
                     dtype=np.float64).reshape(G, -1)
    mean = loo.mean(0)
    d = loo - mean
    cov = (G - 1) / G * d.T @ d
    return full - (G - 1) * (mean - full), cov


@dataclasses.dataclass(frozen=True)
class JointFit:
    """Result of :func:`joint_width_fit` (E entries).

    Attributes:
      a, c1, c2: (E,) fitted coefficients of a + c1/n + c2/n^2.
      cov: (3E, 3E) covariance of (a, c1, c2) stacked in that order.
      chi2_c1: chi^2 of c1 against the prediction with the covariance of the fitted c1 (None without
        a prediction); dof: its degrees of freedom (E, or the combinations kept by ``rcond``).
      p_c1: the chi^2 tail probability of chi2_c1.
      chi2_fit: goodness of fit of the model itself (residuals over all widths and entries), with
        dof_fit = dof (W - 3) degrees of freedom.
    """

    a: np.ndarray
    c1: np.ndarray
    c2: np.ndarray
    cov: np.ndarray
    chi2_c1: float | None
    dof: int
    p_c1: float | None
    chi2_fit: float
    dof_fit: int

    @property
    def c1_cov(self) -> np.ndarray:
        E = self.c1.size
        return self.cov[E:2 * E, E:2 * E]


def joint_width_fit(widths: ArrayLike, values: ArrayLike, covariances: ArrayLike, *, first_order: ArrayLike | None = None,
                    rcond: float = 1e-12) -> JointFit:
    """Fit m_e(n) = a_e + c1_e/n + c2_e/n^2 to all entries e at once (generalised least squares).

    Args:
      widths: (W,) widths n, W >= 4 (three coefficients and at least one degree of freedom).
      values: (W, E) measured entries at each width.
      covariances: (W, E, E) covariance of each width's measurement (widths independent), e.g. from
        :func:`jackknife_covariance`.
      first_order: (E,) predicted c1, or None.
      rcond: combinations of entries whose variance (in the covariances pooled over widths, each
        normalised by its trace) is below rcond times the largest are fixed by identities of the
        sampled data (duplicate entries of a symmetric tensor, rounding-level relations); they are
        projected out before the fit, the same projection at every width.

    Returns:
      A :class:`JointFit` (a, c1, c2 and cov in the kept basis mapped back to the entries); with
      ``first_order``, chi2_c1 = (c1 - c1_pred)^T Cov(c1)^-1 (c1 - c1_pred) on the kept
      combinations, ``dof`` of them, and its tail probability p_c1.
    """
    n = np.asarray(widths, dtype=np.float64).reshape(-1)
    y = np.asarray(values, dtype=np.float64)
    C = np.asarray(covariances, dtype=np.float64)
    if n.size < 4 or np.any(~np.isfinite(n)) or np.any(n <= 0):
        raise ValueError(f"widths: expected at least four positive widths, got {np.asarray(widths).tolist()}")
    if y.ndim != 2 or y.shape[0] != n.size:
        raise ValueError(f"values: expected shape (W, E) with W = {n.size}, got {y.shape}")
    E = y.shape[1]
    if C.shape != (n.size, E, E):
        raise ValueError(f"covariances: expected shape {(n.size, E, E)}, got {C.shape}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(C))):
        raise ValueError("values, covariances: expected finite numbers")
    if first_order is not None:
        first_order = np.asarray(first_order, dtype=np.float64).reshape(-1)
        if first_order.size != E:
            raise ValueError(f"first_order: expected {E} entries, got {first_order.size}")
    traces = np.trace(C, axis1=1, axis2=2)
    if np.any(traces <= 0):
        raise ValueError("covariances: every width needs a positive variance")
    lam, Q = np.linalg.eigh(np.sum(C / traces[:, None, None], axis=0))
    U = Q[:, lam > rcond * lam[-1]]  # (E, E') kept combinations
    k = U.shape[1]
    yk = y @ U
    Ck = np.einsum("ei,wef,fj->wij", U, C, U)
    eye = np.eye(k)
    F = np.zeros((3 * k, 3 * k))
    g = np.zeros(3 * k)
    Xs, Ps = [], []
    for w in range(n.size):
        P = np.linalg.inv(Ck[w])
        X = np.concatenate([eye, eye / n[w], eye / n[w] ** 2], 1)  # (k, 3k)
        F += X.T @ P @ X
        g += X.T @ P @ yk[w]
        Xs.append(X)
        Ps.append(P)
    covk = np.linalg.inv(F)
    theta = covk @ g
    chi2_fit = 0.0
    for w in range(n.size):
        r = yk[w] - Xs[w] @ theta
        chi2_fit += float(r @ Ps[w] @ r)
    Z = np.zeros((E, k))
    Ub = np.block([[U, Z, Z], [Z, U, Z], [Z, Z, U]])  # (3E, 3k)
    cov = Ub @ covk @ Ub.T
    a, c1, c2 = U @ theta[:k], U @ theta[k:2 * k], U @ theta[2 * k:]
    chi2_c1 = p = None
    if first_order is not None:
        d = theta[k:2 * k] - U.T @ first_order
        chi2_c1 = float(d @ np.linalg.solve(covk[k:2 * k, k:2 * k], d))
        p = float(_chi2.sf(chi2_c1, k))
    return JointFit(a=a, c1=c1, c2=c2, cov=cov, chi2_c1=chi2_c1, dof=k, p_c1=p,
                    chi2_fit=chi2_fit, dof_fit=k * (n.size - 3))
