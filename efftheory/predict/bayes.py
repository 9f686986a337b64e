r"""Bayesian inference with a finite-width MLP prior, to first order in 1/n (PDLT ch. 6).

Setup.  Training inputs D (N_D of them, targets y_{i;d}, i = 1..k output components, k = n_L), test
inputs T (N_T); all N = N_D + N_T inputs are indexed training first.  The likelihood is Gaussian with
observation-noise variance sigma^2 = ``noise`` on every training output,

    p(y | z) ~ exp( - sum_{i, d in D} (y_{i;d} - z_{i;d})^2 / (2 sigma^2) ).

The prior over the outputs z_{i;a} of a network of last hidden width n = n_{L-1} is nearly Gaussian
(docs/theory.md, "First order in 1/n"; K, G1, V of the last layer, :func:`efftheory.finite_width`):

    E[z_{i;a} z_{j;b}]    = d_ij Kt_ab,       Kt = K + G1/n
    kappa_{(ia)(jb)(kc)(ld)} = (1/n) [d_ij d_kl V_(ab)(cd) + d_ik d_jl V_(ac)(bd) + d_il d_jk V_(ad)(bc)].

Infinite width (the NNGP posterior, :func:`efftheory.predict.gp_posterior`), with A = K_DD + sigma^2:

    beta = A^-1 y   (N_D, k),     mean_{i;t} = (K_TD beta)_{t i},     cov_tt' = K_TT - K_TD A^-1 K_DT   (d_ij).

First order.  Pad to all N inputs: mu = [beta; 0] (N, k), M = [[-A^-1, 0], [0, 0]] (N, N),
Y = mu mu^T (N, N, summed over components), and the gain Lg = [-K_TD A^-1, 1_T] (N_T, N).  Then

    E[z_{i;t}]  = mean_{i;t} + mean1_{i;t}/n,
    mean1_{i;t} = (Lg G1 mu)_{t i} + (1/2) sum_e Lg_te u_{e i},
    u_{e i}     = sum_bcd V_(eb)(cd) mu_{b i} Y_cd + 2 sum_bcd V_(eb)(cd) M_bc mu_{d i}
                  + k sum_bcd V_(ed)(bc) M_bc mu_{d i},

    Cov(z_{i;t}, z_{j;t'}) = d_ij cov_tt' + cov1_{(t i)(t' j)}/n,
    cov1_{(t i)(t' j)} = d_ij (Lg G1 Lg^T)_tt'
                  + (1/2) sum_ef Lg_te Lg_t'f [ d_ij sum_cd V_(ef)(cd) (Y_cd + k M_cd)
                                               + 2 sum_cd V_(ec)(fd) (mu_{c i} mu_{d j} + d_ij M_cd) ].

The output components are coupled at O(1/n): cov1 is not proportional to d_ij (targets of one
component move the posterior of the others through mu_{c i} mu_{d j} and Y), and mean1 depends on k.

Derivation (docs/bayes.md in full).  First-order Edgeworth form of the prior,
E_p[f] = E_G[f] + (1/24) kappa_abcd E_G[d^4 f], G Gaussian with covariance Sigma = Kt (x) 1_k.  Gaussian
integration by parts, E_G[d^4 f] = E_G[f H_abcd(w)] with w = Sigma^-1 z and the Hermite polynomial
H_abcd = w_a w_b w_c w_d - (Sigma^-1_ab w_c w_d + 5) + (Sigma^-1_ab Sigma^-1_cd + 2), turns the
likelihood-weighted prior averages into averages over the Gaussian posterior of the metric Kt
(mean m, covariance C; there w has mean mu and covariance Sigma^-1 C Sigma^-1 = Sigma^-1 + M):

    E_post[f] = E_0[f] + (1/24) kappa_abcd Cov_0(f, H_abcd) + O(1/n^2).

Stein's identities Cov_0(z_t, g(w)) = Lg_te E_0[d_e g] and Cov_0((z-m)_t (z-m)_t', g) = Lg_te Lg_t'f
E_0[d_e d_f g] (Lg = Cov_0(z_T, w) = C Sigma^-1 restricted to the test rows) and Wick's theorem,
E_0[H_bcd] = mu_b mu_c mu_d + (M_bc mu_d + 2), E_0[H_cd] = mu_c mu_d + M_cd, give

    mean correction  (1/6) Lg_te kappa_ebcd (mu_b mu_c mu_d + 3 M_bc mu_d),
    cov  correction  (1/2) Lg_te Lg_t'f kappa_efcd (mu_c mu_d + M_cd),

and the d_ij structure of kappa gives the formulas above; the G1 terms are the first-order change of
the Gaussian posterior when K -> K + G1/n.

Widths.  The statistics of the last layer carry 1/n_{L-1} (docs/theory.md), so ``mean1`` and ``cov1``
multiply 1/n_{L-1}.  :meth:`FiniteWidthPosterior.at_width` follows
:meth:`efftheory.FiniteWidth.at_width`: n=None uses the network's own widths, n rescales the hidden
widths so that n_1 = n (then n_{L-1} = n n_{L-1}/n_1).  Depth 1 has no hidden layer: the prior is
exactly Gaussian and the corrections vanish.

Noise.  noise > 0 is the physical case.  noise = 0 (interpolation) is the limit sigma -> 0 of the same
formulas and is allowed when K_DD is positive definite; a singular K_DD (duplicated or, for C_b = 0 ReLU,
collinear training inputs) raises ValueError then.  The expansion parameter is V/n measured in units
of A = K_DD + sigma^2: the coefficients grow like |y|^3/lambda_min(A)^3, so the 1/n expansion is
uniform only while n >> V/lambda_min(A)^2 (with |y| ~ sqrt(K)); a noise comparable to the small
eigenvalues of K_DD keeps it so.  All arithmetic is float64 (numpy).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .._pytree import result
from ..network import MLP

__all__ = ["FiniteWidthPosterior", "PosteriorAtWidth", "posterior", "posterior_from_statistics"]


@result(meta=("n",))
class PosteriorAtWidth:
    """The posterior on the test inputs at one width, to first order in 1/n.

    Attributes:
      mean: (N_T, k) E[z_{i;t} | y].
      cov: (N_T, k, N_T, k) Cov(z_{i;t}, z_{j;t'} | y).
      n: the fan-in n_{L-1} of the last layer used (inf: infinite width).
    """

    mean: np.ndarray
    cov: np.ndarray
    n: float

    @property
    def variance(self) -> np.ndarray:
        """(N_T, k) Var(z_{i;t} | y)."""
        return np.einsum("titi->ti", self.cov).copy()


@result(meta=("noise", "fan_in", "width_ratio"))
class FiniteWidthPosterior:
    """Posterior of the test outputs: infinite-width values and first-order coefficients (module docstring).

    Attributes:
      mean: (N_T, k) infinite-width posterior mean K_TD (K_DD + sigma^2)^-1 y.
      cov: (N_T, N_T) infinite-width posterior covariance (the same for each output component).
      mean1: (N_T, k) coefficient of 1/n_{L-1} in the posterior mean.
      cov1: (N_T, k, N_T, k) coefficient of 1/n_{L-1} in Cov(z_{i;t}, z_{j;t'} | y).
      noise: sigma^2.
      fan_in: n_{L-1} of the network (None for :func:`posterior_from_statistics`; inf for depth 1).
      width_ratio: n_{L-1}/n_1 (1 for uniform widths and for statistics given directly).
    """

    mean: np.ndarray
    cov: np.ndarray
    mean1: np.ndarray
    cov1: np.ndarray
    noise: float
    fan_in: float | None = None
    width_ratio: float = 1.0

    def at_width(self, n: float | None = None) -> PosteriorAtWidth:
        """Posterior at the network's own widths (n=None) or with hidden widths rescaled so that n_1 = n.

        For :func:`posterior_from_statistics` results, n is the n of the statistics (K + G1/n, V/n)
        and must be given.
        """
        if n is None:
            if self.fan_in is None:
                raise ValueError("n: expected a width (these statistics came without a network, so there is no "
                                 "width of its own)")
            nL = float(self.fan_in)
        else:
            n = _validate.real("n", n, positive=True)
            nL = n * self.width_ratio
        inv = 0.0 if math.isinf(nL) else 1.0 / nL
        NT, k = self.mean.shape
        cov0 = np.einsum("tu,ij->tiuj", self.cov, np.eye(k))
        return PosteriorAtWidth(mean=self.mean + inv * self.mean1, cov=cov0 + inv * self.cov1, n=nL)


# ------------------------------------------------------------------------------------------ checks
def _square(name, A, N):
    A = _validate.real_array(name, A, what=f"a real array of shape ({N}, {N})")
    if A.shape != (N, N):
        raise ValueError(f"{name}: expected shape ({N}, {N}), got {A.shape}")
    if not np.allclose(A, A.T, rtol=1e-9, atol=1e-12 * max(1.0, float(np.abs(A).max()))):
        raise ValueError(f"{name}: expected a symmetric matrix")
    return (A + A.T) / 2


def _targets(y_train, n_train: int, k: int | None) -> np.ndarray:
    y = _validate.real_array("y_train", y_train, what="a real array of shape (N_train,) or (N_train, n_out)")
    if y.ndim == 1:
        y = y[:, None]
    want = "n_out" if k is None else str(k)
    if y.ndim != 2 or y.shape[0] != n_train or y.shape[1] < 1 or (k is not None and y.shape[1] != k):
        raise ValueError(f"y_train: expected shape (N_train, {want}) with N_train = {n_train}"
                         + ("" if k is None else f" and n_out = net.output_width = {k}")
                         + (" (or (N_train,) when n_out = 1)" if k in (None, 1) else "")
                         + f", got {np.shape(y_train)}")
    return y


def _inverse(A: np.ndarray, noise: float) -> np.ndarray:
    """(K_DD + sigma^2)^-1 for a symmetric PSD K_DD; with noise = 0 K_DD must be positive definite."""
    lam, Q = np.linalg.eigh(A)
    scale = max(float(np.max(np.abs(lam))), np.finfo(np.float64).tiny)
    if lam[0] <= scale * A.shape[0] * 1e-10:
        if noise == 0:
            raise ValueError(f"noise: 0 needs a positive-definite training kernel, but K_train has eigenvalue "
                             f"{lam[0]:.3g} (largest {lam[-1]:.3g}): duplicated or collinear training inputs make "
                             f"the interpolating posterior singular; use noise > 0")
        raise ValueError(f"noise: K_train + noise is numerically singular (smallest eigenvalue {lam[0]:.3g}, largest "
                         f"{lam[-1]:.3g}); use a larger noise (and check that K_train is positive semi-definite)")
    return (Q / lam) @ Q.T


# ------------------------------------------------------------------------------------------ core
def _first_order(K, G1, V, y, noise, n_train):
    """Closed forms of the module docstring; K, G1 (N, N), V (N, N, N, N), y (N_D, k)."""
    N, d = K.shape[0], n_train
    k = y.shape[1]
    Ainv = _inverse(K[:d, :d] + noise * np.eye(d), noise)
    K_TD = K[d:, :d]
    beta = Ainv @ y
    mean = K_TD @ beta
    cov = K[d:, d:] - K_TD @ Ainv @ K_TD.T
    mu = np.zeros((N, k))
    mu[:d] = beta
    M = np.zeros((N, N))
    M[:d, :d] = -Ainv
    Lg = np.concatenate([-K_TD @ Ainv, np.eye(N - d)], axis=1)
    Y = mu @ mu.T
    u = (np.einsum("ebcd,bi,cd->ei", V, mu, Y) + 2 * np.einsum("ebcd,bc,di->ei", V, M, mu)
         + k * np.einsum("edbc,bc,di->ei", V, M, mu))
    mean1 = Lg @ G1 @ mu + 0.5 * Lg @ u
    eye = np.eye(k)
    inner_same = np.einsum("efcd,cd->ef", V, Y + k * M)       # d_ij part
    inner_m = np.einsum("ecfd,cd->ef", V, M)                  # d_ij part of the second pairing
    inner_mu = np.einsum("ecfd,ci,dj->eifj", V, mu, mu)       # couples components
    same = Lg @ (G1 + 0.5 * inner_same + inner_m) @ Lg.T
    cross = np.einsum("te,eifj,uf->tiuj", Lg, inner_mu, Lg)
    cov1 = np.einsum("tu,ij->tiuj", same, eye) + cross
    cov1 = 0.5 * (cov1 + cov1.transpose(2, 3, 0, 1))
    return mean, 0.5 * (cov + cov.T), mean1, cov1


def posterior_from_statistics(K: ArrayLike, G1: ArrayLike, V: ArrayLike, y_train: ArrayLike, *,
                              noise: float) -> FiniteWidthPosterior:
    """First-order posterior for a nearly-Gaussian prior given by its statistics (module docstring).

    Args:
      K, G1: (N, N) metric K + G1/n over the training inputs (first N_D) and then the test inputs.
      V: (N, N, N, N) the four-point tensor, V[a, b, c, d] = V_(ab)(cd) (symmetric within and between
        pairs), connected four-point function (V_(ab)(cd) d_ij d_kl + 2 pairings)/n.
      y_train: (N_D, k) targets (or (N_D,) for k = 1); N_D = len(y_train) < N.
      noise: sigma^2 >= 0.

    Returns:
      A :class:`FiniteWidthPosterior` whose first-order coefficients multiply 1/n.
    """
    K = _validate.real_array("K", K, what="a real array of shape (N, N)")
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 2:
        raise ValueError(f"K: expected a square array of shape (N, N) with N >= 2, got shape {K.shape}")
    N = K.shape[0]
    K = _square("K", K, N)
    G1 = _square("G1", G1, N)
    V = _validate.real_array("V", V, what=f"a real array of shape ({N}, {N}, {N}, {N})")
    if V.shape != (N,) * 4:
        raise ValueError(f"V: expected shape {(N,) * 4}, got {V.shape}")
    y_arr = np.asarray(y_train) if not isinstance(y_train, (str, bytes)) else None
    n_train = y_arr.shape[0] if y_arr is not None and y_arr.ndim >= 1 else -1
    if not 1 <= n_train < N:
        raise ValueError(f"y_train: expected 1 <= N_train < N = {N} targets (training inputs first, at least one "
                         f"test input), got shape {np.shape(y_train)}")
    y = _targets(y_train, n_train, None)
    s2 = _validate.real("noise", noise, nonnegative=True)
    mean, cov, mean1, cov1 = _first_order(K, G1, V, y, s2, n_train)
    return FiniteWidthPosterior(mean=mean, cov=cov, mean1=mean1, cov1=cov1, noise=s2, fan_in=None, width_ratio=1.0)


def posterior(net: MLP, x_train: ArrayLike, y_train: ArrayLike, x_test: ArrayLike, *, noise: float,
              tol: float = 1e-9) -> FiniteWidthPosterior:
    """Posterior of ``net``'s outputs on x_test given targets y_train on x_train, to first order in 1/n.

    Args:
      net: the MLP (its hidden widths set n_{L-1} and n_{L-1}/n_1; its output width is k).
      x_train: (N_D, n_0) training inputs;  x_test: (N_T, n_0) test inputs.
      y_train: (N_D, k) targets, k = net.output_width ((N_D,) when k = 1).
      noise: observation-noise variance sigma^2 >= 0 (module docstring for 0).
      tol: accuracy of the Gaussian integrals of :func:`efftheory.finite_width`.

    Returns:
      A :class:`FiniteWidthPosterior`; ``.at_width(n)`` evaluates it at a width.
    """
    from ..theory.finite import finite_width
    from ..theory.infinite import check_net

    net = check_net(net)
    xd = _validate.inputs("x_train", x_train)
    xt = _validate.inputs("x_test", x_test)
    if xt.shape[1] != xd.shape[1]:
        raise ValueError(f"x_test: expected inputs of dimension n_0 = {xd.shape[1]} like x_train, got shape {xt.shape}")
    y = _targets(y_train, xd.shape[0], net.output_width)
    s2 = _validate.real("noise", noise, nonnegative=True)
    fw = finite_width(net, np.concatenate([xd, xt]), tol=tol)
    K, G1, V = (np.asarray(a[-1], np.float64) for a in (fw.K, fw.G1, fw.V))
    K, G1 = (K + K.T) / 2, (G1 + G1.T) / 2
    mean, cov, mean1, cov1 = _first_order(K, G1, V, y, s2, xd.shape[0])
    ws = net.hidden_widths
    fan_in, ratio = (float(ws[-1]), ws[-1] / ws[0]) if ws else (math.inf, 1.0)
    return FiniteWidthPosterior(mean=mean, cov=cov, mean1=mean1, cov1=cov1, noise=s2, fan_in=fan_in,
                                width_ratio=float(ratio))
