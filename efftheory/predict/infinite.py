r"""Infinite-width predictions of trained networks: gradient descent with the frozen NTK, and exact
Bayesian inference with the NNGP kernel (leading order in 1/n).

Notation: D = the N_D training inputs (targets y, shape (N_D, k)), x = the N_T test inputs; K and Theta
are the last layer's NNGP kernel and NTK of :func:`efftheory.infinite_width` evaluated on the training
and test inputs together (:func:`train_test_kernels`), with blocks K_DD, K_xD = K_Dx^T, K_xx (likewise
Theta).  At initialization the outputs z_{i;a} are, for each output neuron i independently, a Gaussian
process with mean 0 and covariance K (docs/theory.md, "Infinite width").

Gradient descent (:func:`gradient_descent`)
-------------------------------------------
Full-batch GD on L = 1/2 sum_{a in D, i} (z_{i;a} - y_{i;a})^2 with the learning-rate tensor of
docs/theory.md and global learning rate eta moves the outputs by the NTK; at infinite width the NTK is frozen
at Theta and the outputs are linear in the parameters over the whole trajectory, so the discrete-time
recursion (PDLT ch. 10)

    z_{t+1}(D) = z_t(D) - eta Theta_DD (z_t(D) - y),      z_{t+1}(x) = z_t(x) - eta Theta_xD (z_t(D) - y)

is exact.  Solving it with U_t = (1 - eta Theta_DD)^t and
F_t = eta sum_{s<t} (1 - eta Theta_DD)^s = Theta_DD^{-1} (1 - U_t):

    z_t(D) = y + U_t (z_0(D) - y),           z_t(x) = z_0(x) + P_t (y - z_0(D)),   P_t = Theta_xD F_t.

The prediction is linear in the Gaussian initial outputs z_0, so over the ensemble of initializations
it is Gaussian, independently for every output neuron, with (per output component)

    mean        E[z_t(x)]  = P_t y
    covariance  Cov_t(x,x') = K_xx' - P_t K_Dx' - K_xD P_t^T + P_t K_DD P_t^T
    training    E[z_t(D)] = (1 - U_t) y,     Cov_t(D, D) = U_t K_DD U_t^T
    loss        E[L_t] = 1/2 ||(1 - U_t) y - y||^2 + (k/2) tr(U_t K_DD U_t^T).

At t = 0 this is the prior (mean 0, covariance K_xx).  A mode of Theta_DD with eigenvalue lambda
decays like (1 - eta lambda)^t, so the recursion converges iff eta < 2/lambda_max(Theta_DD) (the
stability bound; a larger eta raises ValueError).  As t -> inf, F_t -> Theta_DD^{-1} and

    mean  = Theta_xD Theta_DD^{-1} y       (kernel regression with the NTK)
    cov   = K_xx - Theta_xD Theta_DD^{-1} K_Dx - K_xD Theta_DD^{-1} Theta_Dx
            + Theta_xD Theta_DD^{-1} K_DD Theta_DD^{-1} Theta_Dx,

the discrete-time twin of the continuous-time ensemble of Lee et al. 2019 (arXiv:1902.06720, eqs.
(14)-(16)) and neural-tangents' ``gradient_descent_mse_ensemble``.  Null directions of Theta_DD
(duplicated training inputs) are never moved: there U_t = 1 and F_t is taken as 0 (for a
positive-semidefinite joint Theta, Theta_xD annihilates them, so the test predictions do not depend on
that choice).

Bayesian inference (:func:`gp_posterior`)
-----------------------------------------
With the NNGP prior z ~ GP(0, K) per output neuron and Gaussian observation noise of variance
sigma^2 (PDLT ch. 6 at leading order; Rasmussen & Williams eqs. (2.23)-(2.24)):

    mean = K_xD (K_DD + sigma^2)^{-1} y,        cov = K_xx - K_xD (K_DD + sigma^2)^{-1} K_Dx.

The two meet when only the last layer trains: with lambda = 0 in layers 1..L-1 and lambda^(L) = C^(L)
(:func:`last_layer_net`), Theta = K and the t -> inf ensemble above is the zero-noise posterior.  At
any width the last layer's training is then exactly Matheron's rule, z_inf(x) = z_0(x) + K^_xD K^_DD^{-1}
(y - z_0(D)) with the network's own feature kernel K^ = C_b + (C_W/n) sigma(z^(L-1)) . sigma(z^(L-1)):
each trained network is a sample of the exact Bayesian posterior of its last layer, and the ensemble
converges to :func:`gp_posterior` as K^ -> K.

All arithmetic is float64 (numpy); results are frozen pytree dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .._pytree import result
from ..network import MLP

__all__ = ["TrainTestKernels", "GradientDescentPrediction", "GPPosterior", "train_test_kernels", "gradient_descent",
           "gp_posterior", "stability_bound", "last_layer_net"]


# ------------------------------------------------------------------------------------------ results
@result(meta=("n_train",))
class TrainTestKernels:
    """The last layer's K and Theta on the training inputs followed by the test inputs.

    Attributes:
      K, Theta: (N, N) float64, N = N_D + N_T, training inputs first.
      n_train: N_D.
    Blocks: ``K_train`` (N_D, N_D), ``K_cross`` (N_T, N_D) = K_xD, ``K_test`` (N_T, N_T); likewise Theta.
    """

    K: np.ndarray
    Theta: np.ndarray
    n_train: int

    @property
    def n_test(self) -> int:
        return int(self.K.shape[0]) - self.n_train

    def _blocks(self, A):
        d = self.n_train
        return A[:d, :d], A[d:, :d], A[d:, d:]

    @property
    def K_train(self) -> np.ndarray:
        return self._blocks(self.K)[0]

    @property
    def K_cross(self) -> np.ndarray:
        return self._blocks(self.K)[1]

    @property
    def K_test(self) -> np.ndarray:
        return self._blocks(self.K)[2]

    @property
    def Theta_train(self) -> np.ndarray:
        return self._blocks(self.Theta)[0]

    @property
    def Theta_cross(self) -> np.ndarray:
        return self._blocks(self.Theta)[1]

    @property
    def Theta_test(self) -> np.ndarray:
        return self._blocks(self.Theta)[2]


@result(meta=("learning_rate", "bound"))
class GradientDescentPrediction:
    """The infinite-width ensemble of networks trained by gradient descent (module docstring).

    Attributes (R = number of requested steps, k = output components):
      steps: (R,) float64 steps t (``inf`` for convergence).
      mean: (R, N_T, k) E[z_t(x)];  cov: (R, N_T, N_T) Cov_t(x, x') (the same for every output component,
        which are independent).
      train_mean: (R, N_D, k);  train_cov: (R, N_D, N_D).
      loss: (R,) E[L_t] = E[1/2 sum (z_t(D) - y)^2].
      P: (R, N_T, N_D) the gain P_t = Theta_xD F_t: every network of the infinite-width ensemble ends at
        z_t(x) = z_0(x) + P_t (y - z_0(D)), whatever its initial outputs z_0.
      learning_rate: eta;  bound: the stability bound 2/lambda_max(Theta_DD).
    """

    steps: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    train_mean: np.ndarray
    train_cov: np.ndarray
    loss: np.ndarray
    P: np.ndarray
    learning_rate: float
    bound: float

    @property
    def variance(self) -> np.ndarray:
        """(R, N_T) Var z_t(x) per output component."""
        return np.diagonal(self.cov, axis1=-2, axis2=-1).copy()


@result(meta=("noise",))
class GPPosterior:
    """The NNGP posterior on the test inputs: mean (N_T, k), cov (N_T, N_T) per output component,
    for observation-noise variance ``noise``."""

    mean: np.ndarray
    cov: np.ndarray
    noise: float

    @property
    def variance(self) -> np.ndarray:
        return np.diagonal(self.cov).copy()


# ------------------------------------------------------------------------------------------ inputs
def train_test_kernels(net: MLP, x_train: ArrayLike, x_test: ArrayLike) -> TrainTestKernels:
    """K and Theta of ``net``'s last layer on x_train (N_D, n_0) and x_test (N_T, n_0) together, float64."""
    from ..theory.infinite import check_net, infinite_width

    check_net(net)
    xd = _validate.inputs("x_train", x_train)
    xt = _validate.inputs("x_test", x_test)
    if xt.shape[1] != xd.shape[1]:
        raise ValueError(f"x_test: expected inputs of dimension n_0 = {xd.shape[1]} like x_train, got shape {xt.shape}")
    inf = infinite_width(net, np.concatenate([xd, xt]))
    return TrainTestKernels(K=np.asarray(inf.K[-1], np.float64), Theta=np.asarray(inf.Theta[-1], np.float64),
                            n_train=int(xd.shape[0]))


def last_layer_net(net: MLP) -> MLP:
    """``net`` with only its last layer trained: lambda_W = lambda_b = 0 in layers 1..L-1 and
    lambda^(L) = C^(L), so that its NTK is the last layer's NNGP kernel (Theta^(L) = K^(L))."""
    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    L = net.depth
    return net.replace(lambda_W=(0.0,) * (L - 1) + (net.C_Ws[-1],), lambda_b=(0.0,) * (L - 1) + (net.C_bs[-1],))


def _check_kernels(kernels) -> TrainTestKernels:
    if not isinstance(kernels, TrainTestKernels):
        raise ValueError(f"kernels: expected an efftheory.predict.TrainTestKernels (train_test_kernels(net, x_train, "
                         f"x_test)), got {type(kernels).__name__}")
    K, T = np.asarray(kernels.K, np.float64), np.asarray(kernels.Theta, np.float64)
    d = kernels.n_train
    for name, A in (("kernels.K", K), ("kernels.Theta", T)):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"{name}: expected a square (N, N) matrix, got shape {A.shape}")
        if not np.all(np.isfinite(A)):
            raise ValueError(f"{name}: contains NaN or infinite entries")
        if not np.allclose(A, A.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(A).max()))):
            raise ValueError(f"{name}: expected a symmetric matrix")
    if K.shape != T.shape:
        raise ValueError(f"kernels: K has shape {K.shape} but Theta has shape {T.shape}")
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d < K.shape[0]:
        raise ValueError(f"kernels.n_train: expected an integer in [1, {K.shape[0] - 1}] (at least one training and "
                         f"one test input), got {d!r}")
    return TrainTestKernels(K=(K + K.T) / 2, Theta=(T + T.T) / 2, n_train=int(d))


def _check_targets(y_train, n_train: int) -> np.ndarray:
    try:
        y = np.asarray(y_train, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"y_train: expected a real array of shape (N_train,) or (N_train, k), got "
                         f"{type(y_train).__name__}") from None
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n_train or y.shape[1] < 1:
        raise ValueError(f"y_train: expected shape (N_train,) or (N_train, k) with N_train = {n_train}, got "
                         f"{np.shape(y_train)}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y_train: contains NaN or infinite entries")
    return y


def _check_steps(steps) -> np.ndarray:
    vals = list(np.asarray(steps, dtype=object).reshape(-1)) if isinstance(steps, (Sequence, np.ndarray)) \
        and not isinstance(steps, str) else [steps]
    if not vals:
        raise ValueError("steps: expected a non-negative integer, math.inf, or a non-empty sequence of them")
    out = []
    for v in vals:
        if isinstance(v, bool):
            raise ValueError(f"steps: expected non-negative integers or math.inf, got {v!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"steps: expected non-negative integers or math.inf, got {v!r}") from None
        if math.isnan(f) or f < 0 or (math.isfinite(f) and f != math.floor(f)):
            raise ValueError(f"steps: expected non-negative integers or math.inf, got {v!r}")
        out.append(f)
    return np.asarray(out, np.float64)


def _eig(A: np.ndarray):
    """Eigen-decomposition of a symmetric PSD matrix; eigenvalues below N eps lambda_max count as zero."""
    lam, Q = np.linalg.eigh(A)
    tol = max(float(np.max(np.abs(lam))), np.finfo(np.float64).tiny) * A.shape[0] * 64 * np.finfo(np.float64).eps
    return lam, Q, lam > tol


# ------------------------------------------------------------------------------------------ predictions
def stability_bound(kernels: TrainTestKernels) -> float:
    """2 / lambda_max(Theta_DD): gradient descent with the frozen NTK converges iff eta is below it."""
    kern = _check_kernels(kernels)
    lam_max = float(_eig(kern.Theta_train)[0][-1])
    return 2.0 / lam_max if lam_max > 0 else math.inf


def gradient_descent(kernels: TrainTestKernels, y_train: ArrayLike, *, learning_rate: float,
                     steps: float | Sequence[int] = math.inf) -> GradientDescentPrediction:
    """The infinite-width ensemble after ``steps`` steps of gradient descent (module docstring).

    Args:
      kernels: :func:`train_test_kernels` of the network on (x_train, x_test).
      y_train: (N_D,) or (N_D, k) targets.
      learning_rate: eta, 0 < eta < 2/lambda_max(Theta_DD) (else ValueError naming the bound).
      steps: a step count t >= 0, ``math.inf`` (convergence, the default), or a sequence of them.

    Returns:
      A :class:`GradientDescentPrediction` with one entry per requested step.
    """
    kern = _check_kernels(kernels)
    y = _check_targets(y_train, kern.n_train)
    eta = _validate.real("learning_rate", learning_rate, positive=True)
    ts = _check_steps(steps)
    lam, Q, live = _eig(kern.Theta_train)
    bound = 2.0 / lam[-1] if lam[-1] > 0 else math.inf
    if eta >= bound:
        raise ValueError(f"learning_rate: {eta:.6g} is at or above the stability bound 2/lambda_max(Theta_train) = "
                         f"{bound:.6g} (lambda_max = {lam[-1]:.6g}): the mode of the largest NTK eigenvalue is "
                         f"multiplied by 1 - eta lambda_max <= -1 every step, so gradient descent does not converge; use "
                         f"learning_rate < {bound:.6g}")
    K_DD, K_xD, K_xx, T_xD = kern.K_train, kern.K_cross, kern.K_test, kern.Theta_cross
    k = y.shape[1]
    lam_live = np.where(live, lam, 1.0)
    out = {n: [] for n in ("mean", "cov", "train_mean", "train_cov", "loss", "P")}
    for t in ts:
        one_minus_u = _one_minus_decay(eta * lam_live, t)
        f = np.where(live, one_minus_u / lam_live, 0.0)     # F_t eigenvalues; 0 on null modes
        u = np.where(live, 1.0 - one_minus_u, 1.0)          # U_t eigenvalues; 1 on null modes
        F = (Q * f) @ Q.T
        U = (Q * u) @ Q.T
        P = T_xD @ F
        PK = P @ K_xD.T
        cov = K_xx - PK - PK.T + P @ K_DD @ P.T
        tcov = U @ K_DD @ U.T
        tmean = y - U @ y
        out["mean"].append(P @ y)
        out["cov"].append((cov + cov.T) / 2)
        out["train_mean"].append(tmean)
        out["train_cov"].append((tcov + tcov.T) / 2)
        out["loss"].append(0.5 * float(np.sum((tmean - y) ** 2)) + 0.5 * k * float(np.trace(tcov)))
        out["P"].append(P)
    return GradientDescentPrediction(steps=ts, mean=np.stack(out["mean"]), cov=np.stack(out["cov"]),
                                     train_mean=np.stack(out["train_mean"]), train_cov=np.stack(out["train_cov"]),
                                     loss=np.asarray(out["loss"]), P=np.stack(out["P"]), learning_rate=eta,
                                     bound=float(bound))


def _one_minus_decay(a: np.ndarray, t: float) -> np.ndarray:
    """1 - (1 - a)^t elementwise for a = eta lambda in [0, 2), t >= 0 an integer or inf (accurate for small a)."""
    if math.isinf(t):
        return np.ones_like(a)
    pos = a < 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = -np.expm1(t * np.log1p(-np.where(pos, a, 0.0)))
        oscillating = 1.0 - np.power(1.0 - np.where(pos, 1.0, a), t)
    return np.where(pos, smooth, oscillating)


def gp_posterior(kernels: TrainTestKernels, y_train: ArrayLike, *, noise: float = 0.0) -> GPPosterior:
    """Exact Bayesian inference with the NNGP kernel K and observation-noise variance ``noise`` >= 0
    (module docstring).  With noise = 0 the inverse is the pseudo-inverse on K_DD's range (duplicated
    training inputs are fine when their targets agree)."""
    kern = _check_kernels(kernels)
    y = _check_targets(y_train, kern.n_train)
    s2 = _validate.real("noise", noise, nonnegative=True)
    A = kern.K_train + s2 * np.eye(kern.n_train)
    lam, Q, live = _eig(A)
    inv = np.where(live, 1.0 / np.where(live, lam, 1.0), 0.0)
    Ainv = (Q * inv) @ Q.T
    G = kern.K_cross @ Ainv
    cov = kern.K_test - G @ kern.K_cross.T
    return GPPosterior(mean=G @ y, cov=(cov + cov.T) / 2, noise=s2)
