r"""Per-network estimators of the parts of the trained ensemble's mean at first order in 1/n.

:func:`efftheory.predict_finite.trained_mean_first_order` predicts E[z_inf(x)] = Pi y + (frozen + motion)/n with
Pi = Theta_xD Theta_DD^{-1} (docs/trained_first_order.md).  For one network with initial NTK H (training inputs
first), initial outputs z_0 and final test outputs z_T:

    frozen = H_xD H_DD^{-1} y - Pi y                              -> (m_H1 + m_AB)/n        (NTK frozen at H)
    motion = z_T(x) - [z_0(x) + H_xD H_DD^{-1} (y - z_0(D))]      -> (m_dNTK + m_ddNTK)/n   (the NTK's motion)
    total  = frozen + motion                                      -> E[z_T(x)] - Pi y

Each is unbiased for its target: the dropped term z_0(x) - H_xD H_DD^{-1} z_0(D) is odd under the sign flip of the
last layer, so its mean is exactly zero, and leaving it out removes the O(1) spread of z_0.  What remains
fluctuates by O(n^{-1/2}) (frozen: the NTK's fluctuations at initialization) and O(1/n) (motion).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .training import Training

__all__ = ["frozen_ntk_estimator", "trained_mean_estimators"]


def _gain(H, n_train: int) -> np.ndarray:
    """(M, N_T, N_D) H_xD H_DD^{-1} per network."""
    d = n_train
    return np.einsum("mxd,mde->mxe", H[:, d:, :d], np.linalg.inv(H[:, :d, :d]))


def _check_pi(Pi, n_test: int, n_train: int) -> np.ndarray:
    Pi = _validate.real_array("Pi", Pi)
    if Pi.shape != (n_test, n_train):
        raise ValueError(f"Pi: expected shape (N_test, N_train) = ({n_test}, {n_train}), got {Pi.shape}")
    return Pi


def frozen_ntk_estimator(H: ArrayLike, Pi: ArrayLike, y: ArrayLike) -> np.ndarray:
    """(M, N_T) frozen = H_xD H_DD^{-1} y - Pi y from initial NTKs H (M, N, N), training inputs first.

    Args:
      H: one output component's NTK per network on the N = N_D + N_T inputs.
      Pi: (N_T, N_D) the infinite-width gain Theta_xD Theta_DD^{-1}.
      y: (N_D,) that component's targets.
    """
    H = _validate.real_array("H", H)
    y = _validate.real_array("y", y)
    if H.ndim != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H: expected shape (M, N, N), got {H.shape}")
    if y.ndim != 1 or not 0 < y.size < H.shape[1]:
        raise ValueError(f"y: expected shape (N_train,) with 0 < N_train < N = {H.shape[1]}, got {y.shape}")
    Pi = _check_pi(Pi, H.shape[1] - y.size, y.size)
    return _gain(H, y.size) @ y - Pi @ y


def trained_mean_estimators(training: Training, Pi: ArrayLike, *, component: int = 0) -> np.ndarray:
    """(M, 3, N_T) frozen, motion and total per network (module docstring) for one output component.

    Args:
      training: an :class:`efftheory.empirical.Training` run to convergence (its first and last records are
        z_0 and z_T).
      Pi: (N_T, N_D) the infinite-width gain Theta_xD Theta_DD^{-1} (e.g. from
        :func:`efftheory.predict.train_test_kernels`).
      component: the output component i (its NTK H_ii and targets y_i).
    """
    if not isinstance(training, Training):
        raise TypeError(f"training: expected an efftheory.empirical.Training (from train), got {type(training).__name__}")
    k = training.y_train.shape[1]
    if not isinstance(component, (int, np.integer)) or not 0 <= component < k:
        raise ValueError(f"component: expected an int in [0, {k}), got {component!r}")
    d = training.n_train
    H = training.ntk_start[:, component, component]
    G = _gain(H, d)
    y = training.y_train[:, component]
    Pi = _check_pi(Pi, H.shape[1] - d, d)
    z0D, z0x = training.f_train[:, 0, :, component], training.f_test[:, 0, :, component]
    zT = training.f_test[:, -1, :, component]
    frozen = G @ y - Pi @ y
    motion = zT - (z0x + np.einsum("mxd,md->mx", G, y[None] - z0D))
    return np.stack([frozen, motion, frozen + motion], axis=1)
