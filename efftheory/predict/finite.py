r"""The ensemble mean of trained finite networks to first order in 1/n (PDLT ch. infinity).

docs/trained_first_order.md has the derivation; this docstring states the result once.

Setting (:mod:`efftheory.predict`): full-batch gradient descent with global learning rate eta on
L = 1/2 sum_{i, a in D} (z_{i;a} - y_{i;a})^2, run to convergence, from the ensemble of initializations.
Notation: N_D training inputs D, N_T test inputs x, k = n_L outputs; capital indices I = (i, a) run
over outputs and inputs together; Theta, K, H1, A, B of the last layer (``finite_width``), P, Q, R, S,
T, U of the last layer (``efftheory.theory.dntk.dntk_statistics``, docs/dntk.md), all at n_{L-1} = n;
Pi = Theta_xD Theta_DD^{-1}, g = Theta_DD^{-1} y, and for any matrix M over inputs the residual row
(E M)_{x.} = M_{x.} - Pi M_{D.}.  With u_p = 1 - eta lambda_p for the eigenpairs (lambda_p, e_p) of
Theta_DD (one set per output component), e~ = e_p . (z_0(D) - y) the initial residual in that basis,

    E[z_inf(x)] = Pi y + (1/n) [ m_H1 + m_AB + m_dNTK + m_ddNTK ] + O(1/n^2)

    m_H1   = (E H1) g                                                   (NTK mean shift)
    m_AB   = - sum E[(E dH)_{x G} (Theta_DD^{-1})_{G G'} dH_{G' B}] g_B    (NTK fluctuation;
             n E[dH_I1I2 dH_I3I4] = d12 d34 A + d13 d24 B_(13)(24) + d14 d23 B_(14)(23))
    m_dNTK = E-projected sum over eigenmodes of
               eta^2 (dH_{d b a} + dH_{b d a}) u_b / ((1 - u_b)(1 - u_a u_b))  e~_a e~_b
             + (eta^2/2) dH_{d a b} / (1 - u_a u_b)                          e~_a e~_b
    m_ddNTK = E-projected sum over eigenmodes of
             - (eta^3/2) Qd_{d b a c} u_b / ((1 - u_b)(1 - u_a u_b u_c))                    e~_a e~_b e~_c
             - eta^3 (W_{d b c a} + W_{b d c a}) u_b^2 u_c / ((1-u_b)(1-u_b u_c)(1-u_a u_b u_c))  e~ e~ e~
             - (eta^3/2) W_{d b c a} u_b u_c / ((1 - u_b u_c)(1 - u_a u_b u_c))            e~ e~ e~
             - (eta^3/6) ddI_{d a b c} / (1 - u_a u_b u_c)                                  e~ e~ e~

with Qd_{IJ..} = ddI_{IJ..} + ddI_{JI..} + 2 ddII_{IJ..} and W_{I0I1I2J} = ddI_{I0I1I2J} + ddII_{I0I1I2J} +
ddII_{I0I2I1J}; the slot after the free index d is the residual at the latest time, and the expectations
are taken at first order: E[dH_{..} e~_a e~_b] = -(E[dH z]_{.. a} y~_b + E[dH z]_{.. b} y~_a) (P, Q) and
E[ddX e~ e~ e~] = E[ddX] (-(y~ y~ y~ + K~ y~ + 2 perms)) (R, S, T, U; K~ = K_DD in the eigenbasis).
The NTK-preactivation tensors D, F do not enter the mean at this order (every term they could
multiply is odd under the sign flip of the last layer), nor do G1, V or the dNTK variance (O(1/n^2)).
The frozen-NTK parts m_H1, m_AB do not depend on eta; m_dNTK and m_ddNTK do ("algorithm dependence"),
and tend to finite gradient-flow limits as eta -> 0.

All arithmetic is float64 numpy; results are frozen pytree dataclasses.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .._pytree import result
from ..network import MLP

__all__ = ["TrainedMeanFirstOrder", "trained_mean_first_order", "frozen_ntk_parts", "ntk_motion_parts",
           "dntk_moment_tensor", "ddntk_mean_tensors", "ntk_covariance_tensor"]


# ------------------------------------------------------------------------------------------ result
@result(meta=("learning_rate", "width", "complete"))
class TrainedMeanFirstOrder:
    """E[z_inf(x)] = mean_infinite + total / n + O(1/n^2) (module docstring), arrays of shape (N_T, k).

    Attributes:
      mean_infinite: Pi y, the frozen-NTK (infinite-width) mean of :func:`efftheory.predict.gradient_descent`.
      ntk_mean_shift: m_H1;  ntk_fluctuation: m_AB (A, B; D and F give exactly zero at this order).
      dntk: m_dNTK;  ddntk: m_ddNTK (None when not computed, ``complete`` is then False).
      learning_rate: eta;  width: the network's n_{L-1} (inf for depth 1).
    """

    mean_infinite: np.ndarray
    ntk_mean_shift: np.ndarray
    ntk_fluctuation: np.ndarray
    dntk: np.ndarray | None
    ddntk: np.ndarray | None
    learning_rate: float
    width: float
    complete: bool

    @property
    def frozen(self) -> np.ndarray:
        """m_H1 + m_AB: the 1/n coefficient of E[Theta^_xD Theta^_DD^{-1}] y (the NTK frozen at its initial value)."""
        return self.ntk_mean_shift + self.ntk_fluctuation

    @property
    def motion(self) -> np.ndarray | None:
        """m_dNTK + m_ddNTK: the 1/n coefficient of the NTK's motion during training (None if not computed)."""
        return None if self.dntk is None else self.dntk + self.ddntk

    @property
    def total(self) -> np.ndarray:
        """The 1/n coefficient of the computed parts (all four when ``complete``)."""
        return self.frozen if self.motion is None else self.frozen + self.motion

    def at_width(self, n: float | None = None) -> np.ndarray:
        """mean_infinite + total / n at n_{L-1} = n (default: the network's own)."""
        n = self.width if n is None else _validate.real("n", n, positive=True)
        return self.mean_infinite + self.total / n


# ------------------------------------------------------------------------------------------ tensors
def ntk_covariance_tensor(A: ArrayLike, B: ArrayLike, k: int) -> np.ndarray:
    """n E[dH_{I1 I2} dH_{I3 I4}] over I = (i, a) flattened as i N + a, from A, B (N, N, N, N) of finite_width."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    e = np.eye(k)
    t = (np.einsum("ij,kl,abcd->iajbkcld", e, e, A)
         + np.einsum("ik,jl,acbd->iajbkcld", e, e, B)
         + np.einsum("il,jk,adbc->iajbkcld", e, e, B))
    m = k * A.shape[0]
    return t.reshape(m, m, m, m)


def dntk_moment_tensor(P: ArrayLike, Q: ArrayLike, k: int) -> np.ndarray:
    """n E[dH_{I0 I1 I2} z_{I3}] flattened (docs/dntk.md: P for d01 d23 and d02 d13, Q for d03 d12)."""
    P, Q = np.asarray(P, np.float64), np.asarray(Q, np.float64)
    e = np.eye(k)
    t = (np.einsum("ij,kl,abcd->iajbkcld", e, e, P)
         + np.einsum("ik,jl,acbd->iajbkcld", e, e, P)
         + np.einsum("il,jk,abcd->iajbkcld", e, e, Q))
    m = k * P.shape[0]
    return t.reshape(m, m, m, m)


def ddntk_mean_tensors(R: ArrayLike, S: ArrayLike, T: ArrayLike, U: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """n E[ddH^I_{I0..I3}] and n E[ddH^II_{I1..I4}] flattened (docs/dntk.md layout)."""
    R, S, T, U = (np.asarray(a, np.float64) for a in (R, S, T, U))
    e = np.eye(k)
    ddI = (np.einsum("ij,kl,abcd->iajbkcld", e, e, R)
           + np.einsum("ik,jl,acbd->iajbkcld", e, e, R)
           + np.einsum("il,jk,adbc->iajbkcld", e, e, R))
    ddII = (np.einsum("ij,kl,abcd->iajbkcld", e, e, S)
            + np.einsum("ik,jl,abcd->iajbkcld", e, e, T)
            + np.einsum("il,jk,abcd->iajbkcld", e, e, U))
    m = k * R.shape[0]
    return ddI.reshape((m,) * 4), ddII.reshape((m,) * 4)


# ------------------------------------------------------------------------------------------ the parts
def _flat(y: np.ndarray) -> np.ndarray:
    """(N_D, k) -> combined index i N_D + a."""
    return np.ascontiguousarray(y.T).reshape(-1)


def _check_train_kernel(Theta_DD: np.ndarray):
    lam, Qv = np.linalg.eigh(Theta_DD)
    if not lam[0] > 1e-10 * max(lam[-1], np.finfo(np.float64).tiny):
        raise ValueError(f"x_train: the NTK on the training inputs is singular (eigenvalues {lam}): identical or "
                         "collinear training inputs leave directions that gradient descent never fits, and the "
                         "first-order correction is undefined there; remove the duplicated training inputs")
    return lam, Qv


def frozen_ntk_parts(Theta: ArrayLike, H1: ArrayLike, cov: ArrayLike, y: np.ndarray,
                     n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(m_H1, m_AB), each (N_T, k): the 1/n coefficients of E[H_xD H_DD^{-1}] y for a frozen random NTK
    H = Theta + (H1 + sqrt(n) dH)/n with n E[dH dH] = ``cov`` (:func:`ntk_covariance_tensor`, combined indices)."""
    Theta, H1 = np.asarray(Theta, np.float64), np.asarray(H1, np.float64)
    N, d = Theta.shape[0], n_train
    k = y.shape[1]
    _check_train_kernel(Theta[:d, :d])
    Tinv = np.linalg.inv(Theta[:d, :d])
    Pi = Theta[d:, :d] @ Tinv
    g = Tinv @ y                                                       # (N_D, k)
    m_h1 = (H1[d:, :d] - Pi @ H1[:d, :d]) @ g
    C = np.asarray(cov, np.float64).reshape((k, N) * 4)
    Cx = C[:, d:] - np.einsum("xe,iejbkcld->ixjbkcld", Pi, C[:, :d])   # E-projected first slot
    # - sum_{j gamma, j' gamma', l beta} C[(i x), (j g), (j' g'), (l b)] Tinv[(j g),(j' g')] g[(l b)], Tinv = delta_jj' Tinv
    m_ab = -np.einsum("ixjgjhlb,gh,bl->xi", Cx[:, :, :, :d, :, :d, :, :d], Tinv, g)
    return m_h1, m_ab


def ntk_motion_parts(Theta: ArrayLike, n_train: int, k: int, learning_rate: float, m2: ArrayLike, ddI: ArrayLike,
                     ddII: ArrayLike, e3: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(m_dNTK, m_ddNTK), each (N_T, k): the first-order change of z_inf(x) from the NTK's motion.

    Inputs on combined indices I = (i, a) flattened as i N + a (N = N_D + N_T, training inputs first),
    residual indices A = (i, a in D) flattened as i N_D + a:
      m2: (kN, kN, kN, kN_D, kN_D) E[dH_{I0 I1 I2} eps_A eps_B], eps = z_0(D) - y;
      ddI, ddII: (kN,)*4 the ddNTKs (their means);  e3: (kN_D,)*3 E[eps_A eps_B eps_C].
    For one network (deterministic dH, ddH, eps) this is the exact first-order response of its
    gradient-descent trajectory; for the ensemble the inputs are the first-order expectations.
    """
    Theta = np.asarray(Theta, np.float64)
    N, d = Theta.shape[0], n_train
    eta = float(learning_rate)
    lam, Qv = _check_train_kernel(Theta[:d, :d])
    u = np.tile(1.0 - eta * lam, k)                                   # per label p = (i, eigenmode)
    Lb = k * d
    Qd = np.kron(np.eye(k), Qv)                                        # (kN_D, kN_D): residual -> labels
    Qf = np.zeros((k * N, Lb))                                         # combined slot -> labels (test rows 0)
    for i in range(k):
        Qf[i * N:i * N + d, i * d:(i + 1) * d] = Qv
    one = 1.0 - u
    # dNTK: X[I, p, q] = sum m2[I, b, J, A, B] Qf[b, p] Qf[J, q] Qd[A, p] Qd[B, q]
    m2 = np.asarray(m2, np.float64)
    X1 = np.einsum("IbJAB,bp,Jq,Ap,Bq->Ipq", m2, Qf, Qf, Qd, Qd, optimize=True)
    X2 = np.einsum("bIJAB,bp,Jq,Ap,Bq->Ipq", m2, Qf, Qf, Qd, Qd, optimize=True)
    up, uq = u[:, None], u[None, :]
    w1 = up / (one[:, None] * (1.0 - up * uq))                         # [p = beta at t, q = J at s < t]
    w2 = 1.0 / (1.0 - up * uq)
    s_dntk = eta ** 2 * np.einsum("Ipq,pq->I", X1 + X2, w1) + 0.5 * eta ** 2 * np.einsum("Ipq,pq->I", X1, w2)
    # ddNTK
    ddI, ddII = np.asarray(ddI, np.float64), np.asarray(ddII, np.float64)
    E3 = np.einsum("ABC,Ap,Bq,Cr->pqr", np.asarray(e3, np.float64), Qd, Qd, Qd)

    def proj(t4, first_free=True):
        return np.einsum("Ibcd,bp,cq,dr->Ipqr", t4, Qf, Qf, Qf, optimize=True) if first_free else \
            np.einsum("bIcd,bp,cq,dr->Ipqr", t4, Qf, Qf, Qf, optimize=True)

    W = ddI + ddII + ddII.transpose(0, 2, 1, 3)
    Qd4 = proj(ddI) + proj(ddI, False) + 2 * proj(ddII)               # slots (beta, J, J')
    Wd = proj(W)                                                       # slots (I1, I2, J)
    Wb = proj(W, False)
    DI = proj(ddI)
    ua, ub, uc = u[:, None, None], u[None, :, None], u[None, None, :]
    # T3: Qd[d, b, a, c] with b = beta at t, a, c = J, J' at s < t
    w3 = u[:, None, None] / (one[:, None, None] * (1.0 - u[:, None, None] * u[None, :, None] * u[None, None, :]))
    t3 = -0.5 * eta ** 3 * np.einsum("Ibac,bac,bac->I", Qd4, w3, E3)
    # T4: (W[d, b, c, a] + W[b, d, c, a]) with a at r < c at s < b at t
    w4 = ua ** 2 * ub / (one[:, None, None] * (1 - ua * ub) * (1 - ua * ub * uc))  # axes (b, c, a)
    t4 = -eta ** 3 * np.einsum("Ibca,bca,bca->I", Wd + Wb, w4, E3)
    # T5: W[d, b, c, a], b, c at t, a at r < t
    w5 = ua * ub / ((1 - ua * ub) * (1 - ua * ub * uc))                # axes (b, c, a)
    t5 = -0.5 * eta ** 3 * np.einsum("Ibca,bca,bca->I", Wd, w5, E3)
    t6 = -(eta ** 3 / 6) * np.einsum("Iabc,abc,abc->I", DI, 1.0 / (1 - ua * ub * uc), E3)
    s_dd = t3 + t4 + t5 + t6
    Pi = Theta[d:, :d] @ np.linalg.inv(Theta[:d, :d])

    def residual(s):
        s = s.reshape(k, N)
        return (s[:, d:] - s[:, :d] @ Pi.T).T                         # (N_T, k)

    return residual(s_dntk), residual(s_dd)


# ------------------------------------------------------------------------------------------ entry point
def _dntk_module():
    try:
        return importlib.import_module("efftheory.theory.dntk")
    except ImportError:
        return None


def trained_mean_first_order(net: MLP, x_train: ArrayLike, y_train: ArrayLike, x_test: ArrayLike, *, learning_rate: float,
                             motion: bool | None = None, tol: float = 1e-9) -> TrainedMeanFirstOrder:
    """The first-order ensemble mean of ``net`` trained by gradient descent to convergence (module docstring).

    Args:
      net: the MLP (its hidden widths fix the width ratios; the coefficients are per 1/n_{L-1}).
      x_train: (N_D, n_0) distinct training inputs; y_train: (N_D,) or (N_D, k) targets, k = net.output_width.
      x_test: (N_T, n_0) test inputs.
      learning_rate: eta, below the infinite-width stability bound 2/lambda_max(Theta_DD).
      motion: include the dNTK and ddNTK parts (needs ``efftheory.theory.dntk``): True requires them,
        False skips them, None (default) includes them when that module exists and ``net`` is smooth.
      tol: accuracy target of the Gaussian integrals (``finite_width``, ``dntk_statistics``).

    Every tensor enters with at most one test index, so the statistics are computed once per test input on
    the N_D + 1 inputs (x_train, x_t): the cost is N_T times that of N_D + 1 inputs (dntk_statistics on four
    inputs takes minutes at tol 1e-6).
    """
    from ..theory.finite import finite_width
    from .infinite import stability_bound, train_test_kernels

    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    kern = train_test_kernels(net, x_train, x_test)
    d, k = kern.n_train, net.output_width
    try:
        y = np.asarray(y_train, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"y_train: expected a real array of shape (N_train,) or (N_train, {k})") from None
    if y.ndim == 1 and k == 1:
        y = y[:, None]
    if y.shape != (d, k):
        raise ValueError(f"y_train: expected shape ({d}, {k}) (N_train, output_width), got {np.shape(y_train)}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y_train: contains NaN or infinite entries")
    eta = _validate.real("learning_rate", learning_rate, positive=True)
    bound = stability_bound(kern)
    if eta >= bound:
        raise ValueError(f"learning_rate: {eta:.6g} is at or above the stability bound 2/lambda_max(Theta_train) = "
                         f"{bound:.6g}; gradient descent does not converge")
    if motion is not None and not isinstance(motion, bool):
        raise ValueError(f"motion: expected True, False or None, got {motion!r}")
    Theta = kern.Theta
    _check_train_kernel(Theta[:d, :d])
    Pi = Theta[d:, :d] @ np.linalg.inv(Theta[:d, :d])
    mean_inf = Pi @ y
    width = float(net.hidden_widths[-1]) if net.depth > 1 else math.inf
    if net.depth == 1:                     # no hidden layer: the network is linear in its parameters, exact
        z = np.zeros_like(mean_inf)
        return TrainedMeanFirstOrder(mean_infinite=mean_inf, ntk_mean_shift=z, ntk_fluctuation=z, dntk=z, ddntk=z,
                                     learning_rate=eta, width=width, complete=True)
    xd, xt = _validate.inputs("x_train", x_train), _validate.inputs("x_test", x_test)
    mod = _dntk_module()
    want = motion if motion is not None else (mod is not None and net.sigma.smooth)
    if want and mod is None:
        raise ValueError("motion: True needs efftheory.theory.dntk (dntk_statistics), which is not available")
    # every tensor enters with at most one test index: one computation per test input on N_D + 1 inputs
    parts = [[], [], [], []]
    for t in range(xt.shape[0]):
        x_all = np.concatenate([xd, xt[t:t + 1]])
        fw = finite_width(net, x_all, tol=tol)
        Th, K_ = np.asarray(fw.Theta[-1], np.float64), np.asarray(fw.K[-1], np.float64)
        H1, A, B = (np.asarray(a[-1], np.float64) for a in (fw.H1, fw.A, fw.B))
        m_h1, m_ab = frozen_ntk_parts(Th, H1, ntk_covariance_tensor(A, B, k), y, d)
        parts[0].append(m_h1)
        parts[1].append(m_ab)
        if want:
            st = mod.dntk_statistics(net, x_all, tol=tol)
            P, Q, R, S, T, U = (np.asarray(getattr(st, f)[-1], np.float64) for f in "PQRSTU")
            ddI, ddII = ddntk_mean_tensors(R, S, T, U, k)
            m2, e3 = _ensemble_moments(dntk_moment_tensor(P, Q, k), K_, y, d, k)
            m_d, m_dd = ntk_motion_parts(Th, d, k, eta, m2, ddI, ddII, e3)
            parts[2].append(m_d)
            parts[3].append(m_dd)
    m_h1, m_ab = np.concatenate(parts[0]), np.concatenate(parts[1])
    m_d, m_dd = (np.concatenate(p) if want else None for p in parts[2:])
    return TrainedMeanFirstOrder(mean_infinite=mean_inf, ntk_mean_shift=m_h1, ntk_fluctuation=m_ab, dntk=m_d,
                                 ddntk=m_dd, learning_rate=eta, width=width, complete=bool(want))


def _ensemble_moments(Mz, K, y, d: int, k: int):
    """First-order E[dH eps eps] = -(E[dH z_A] y_B + E[dH z_B] y_A) and leading E[eps eps eps]
    = -(y y y + K y + 2 perms), eps = z_0(D) - y (E[z_0] = E[z_0^3] = 0 by parity, E[z_0 z_0] = K)."""
    N = K.shape[0]
    m = k * N
    Mz = np.asarray(Mz).reshape(m, m, m, k, N)[..., :d].reshape(m, m, m, k * d)
    yf = _flat(y)
    m2 = -(np.einsum("IJLA,B->IJLAB", Mz, yf) + np.einsum("IJLB,A->IJLAB", Mz, yf))
    Kf = np.kron(np.eye(k), np.asarray(K, np.float64)[:d, :d])
    e3 = -(np.einsum("A,B,C->ABC", yf, yf, yf) + np.einsum("AB,C->ABC", Kf, yf) + np.einsum("AC,B->ABC", Kf, yf)
           + np.einsum("BC,A->ABC", Kf, yf))
    return m2, e3
