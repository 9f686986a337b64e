r"""First order in 1/n at initialization (PDLT ch. 4, 5, 8): G1, V, H1, A, B, D, F for N inputs.

Definitions (docs/theory.md; every statistic of layer l carries 1/n_{l-1}):

    E[z_{i1;a1} z_{i2;a2}]             = d_{i1i2} (K + G1/n)_{a1a2}
    E[z z z z]_connected               = (1/n)[d d V_{(a1a2)(a3a4)} + 2 pairings]
    E[H_{i1i2;a1a2}]                   = d_{i1i2} (Theta + H1/n)_{a1a2}
    E[dH_{i1i2;a1a2} dH_{i3i4;a3a4}]   = (1/n)[d_{i1i2}d_{i3i4} A_{(a1a2)(a3a4)}
                                               + d_{i1i3}d_{i2i4} B_{(a1a3)(a2a4)} + d_{i1i4}d_{i2i3} B_{(a1a4)(a2a3)}]
    E[dH_{i1i2;a1a2} z_{i3;a3} z_{i4;a4}]_conn = (1/n)[d_{i1i2}d_{i3i4} D_{a1a2a3a4}
                                               + d_{i1i3}d_{i2i4} F_{a1a3a2a4} + d_{i1i4}d_{i2i3} F_{a1a4a2a3}]

Storage: V[l, a1, a2, a3, a4] = V_{(a1a2)(a3a4)}, A likewise, B[l, a, b, c, d] = B_{(ab)(cd)},
D[l, a1, a2, a3, a4] = D_{a1a2a3a4} (NTK inputs a1 a2, preactivation inputs a3 a4) and
F[l, a, b, c, d] = F_{abcd} (NTK inputs a, c; preactivation inputs b, d).  Index 0 is layer 1,
where all corrections vanish.

Operators, evaluated at K = K^(l) for every pair p = (a1, a2) (docs/theory.md):

    R_{p,(g1g2)}  = (C_W/2) <d_g1 d_g2 (sigma_a1 sigma_a2)>        R' : the same with sigma'
    T_{p,(g1..g4)} =         <d^4 (sigma_a1 sigma_a2)>                T' : the same with sigma'
    P_{(a b), g}   =         <d_g (sigma'_a sigma_b)>
    Z_{ab} = C_W <sigma'_a sigma'_b>,   Q = (lambda_W / C_W) R + Theta (.) R'   (rows scaled by Theta_p)

all from Hermite moments in whitened coordinates (:mod:`efftheory.gaussian._hermite`).  With r = n_l/n_{l-1},
the recursions from layer l to l+1 (hyperparameters of layer l+1) are

    V'  = C_W^2 cov[ss, ss] + r R V R^T                                               (docs/theory.md)
    G1' = r [R G1 + (C_W/8) T.V]                                                      (docs/theory.md)
    B'_{(ab)(cd)} = C_W^2 Theta_ac Theta_bd <s'_a s'_b s'_c s'_d> + r Z_ab Z_cd B_{(ab)(cd)}
    F'_{a b c d}  = C_W^2 Theta_ac <s'_a s'_c s_b s_d>
                    + r C_W^2 sum_{g h} P_{(ab),g} P_{(cd),h} F_{a g c h}
    D'  = lambda_W C_W cov[ss, ss] + C_W^2 Theta_12 cov[s's', ss] + r [Q V R^T + (Z.D) R^T]
    A'  = cov[f, f] + r [Q V Q^T + (Z.D) Q^T + Q (Z.D)^T + Z_12 Z_34 A]
          with f_12 = lambda_W s_1 s_2 + C_W Theta_12 s'_1 s'_2
    H1' = r [(lambda_W/C_W)(R G1 + (C_W/8) T.V) + Theta (.) (R' G1 + (C_W/8) T'.V) + Z (.) H1
             + R'.(D + F + F^T)]      with (R'.M)_{12} = sum_g R'_{12,g} (D_{12 g} + F_{1 g1 2 g2} + F_{1 g2 2 g1})

Derivation (docs/finite_width.md has it in full): condition layer l+1 on layer l and average
W^(l+1) ~ N(0, C_W/n_l) by Wick's theorem; the same-neuron terms give the sources (4-d Gaussian
integrals at K), the cross-neuron terms couple to layer l's V, A, B, D, F through the cumulant
expansion E[X g(z)] = (1/2) sum kappa(X, z_g1, z_g2) <d_g1 d_g2 g> (sigma never differentiated
twice: IBP), and the single-neuron marginal's 1/n shift E[f(z)] = <f> + (1/n)[G1.<dd f>/2 + V.<d^4 f>/8]
gives G1 and H1.  (cov[f, g] is the single-neuron covariance <f g> - <f><g> over K.)
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from .._pytree import result
from ..activations import Activation
from ..distributed import Part
from ..gaussian import HOST_SETS, SET_BLOCK, derivative, hermite_moments2, rule_size, source_moments, whiten2
from ..network import MLP
from . import _schedule
from .infinite import check_net, infinite_width

__all__ = ["FiniteWidth", "FiniteWidthDiagonal", "Prediction", "finite_width", "finite_width_diagonal", "layer_step",
           "layer_sources"]


@result
class Prediction:
    """Statistics predicted at a finite width, to first order in 1/n (:meth:`FiniteWidth.at_width`):
    already divided by the width, unlike FiniteWidth's coefficients.  All float64.

    Same name, same quantity: the empirical estimators of :mod:`efftheory.empirical` return these
    statistics in this normalisation (no factor n), so ``empirical.metric(ens).value``,
    ``four_point(ens).value``, ``ntk_mean(ens).value``, ``ntk_variance(ens).cov.value`` and
    ``ntk_variance(ens).cross_cov.value`` compare entry by entry with ``metric``, ``four_point``
    (layers 2..L), ``ntk_mean[-1]``, ``ntk_cov[-1]`` and ``ntk_cross_cov[-1]`` of ``at_width(n)``
    (docs/theory.md, "Normalisation of returned tensors").

    Attributes (index 0 = layer 1; ``n`` holds n_{l-1} for each layer l, inf for l = 1):
      metric: (L, N, N) E[z_a z_b] = K + G1/n.
      four_point: (L, N, N, N, N) connected E[z_i z_i z_j z_j] for i != j: V/n.
      ntk_mean: (L, N, N) E[H_ii] = Theta + H1/n.
      ntk_cov: (L, N, N, N, N) Cov(H_ii;a1a2, H_ii;a3a4) = (A_(12)(34) + B_(13)(24) + B_(14)(23))/n.
      ntk_cross_cov: (L, N, N, N, N) Cov(H_ii;a1a2, H_jj;a3a4), i != j: A/n.
      n: (L,) the widths n_{l-1} used.
    """

    metric: jax.Array
    four_point: jax.Array
    ntk_mean: jax.Array
    ntk_cov: jax.Array
    ntk_cross_cov: jax.Array
    n: jax.Array


@result(meta=("net", "tol"))
class FiniteWidth:
    """First-order finite-width statistics of every layer of ``net`` on N inputs (docs/theory.md,
    "Normalisation of returned tensors").

    Index 0 is layer 1 (l = 1..L, L = ``net.depth``).  K and Theta are the infinite-width values;
    G1, V, H1, A, B, D, F are the *coefficients* of 1/n_{l-1}, not yet divided by a width (zero at
    layer 1): the statistics of a network at width n are K + G1/n, V/n, ... -- :meth:`at_width`
    returns them (:class:`Prediction`).  All float64 (V, A, B, D, F are read-only memory maps when
    :func:`finite_width` was given ``store``).

    Attributes:
      K: (L, N, N) NNGP kernel, E[z_a z_b] at infinite width.
      Theta: (L, N, N) frozen NTK at infinite width.
      G1: (L, N, N) metric correction, E[z_{i;a} z_{i;b}] = K + G1/n.
      V: (L, N, N, N, N) four-point vertex, V[l, a1, a2, a3, a4] = V_{(a1a2)(a3a4)}.
      H1: (L, N, N) NTK mean correction, E[H_{ii;ab}] = Theta + H1/n.
      A, B: (L, N, N, N, N) NTK covariance tensors, B[l, a, b, c, d] = B_{(ab)(cd)}.
      D, F: (L, N, N, N, N) NTK-preactivation cross-correlations: D_{a1a2a3a4} (NTK inputs a1 a2),
        F[l, a, b, c, d] = F_{abcd} (NTK inputs a, c).
      net: the :class:`~efftheory.MLP` (its hidden widths give the ratios r_l = n_l/n_{l-1}).
      tol: the integration tolerance ``finite_width`` ran with (None when not recorded).

    ``save(path)`` / ``FiniteWidth.load(path)`` write and read one .npz without pickle
    (:mod:`efftheory._io`); the activation must be a registry one.
    """

    K: jax.Array
    Theta: jax.Array
    G1: jax.Array
    V: jax.Array
    H1: jax.Array
    A: jax.Array
    B: jax.Array
    D: jax.Array
    F: jax.Array
    net: MLP
    tol: float | None = None

    @property
    def n_inputs(self) -> int:
        return int(self.K.shape[1])

    def save(self, path: str | os.PathLike) -> str:
        """Write to ``path`` (.npz: arrays, and the net, tol and efftheory version as JSON); returns it."""
        from .. import _io

        return _io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FiniteWidth":
        """Read a :meth:`save` file: arrays bitwise as saved (K, Theta, ... as jax arrays)."""
        from .. import _io

        return _io.load(path, cls)

    def at_width(self, n: float | None = None) -> Prediction:
        """Predictions at the network's own widths (n=None) or with hidden widths rescaled so
        that n_1 = n (uniform networks: every hidden layer has width n)."""
        ws = np.asarray(self.net.hidden_widths, dtype=np.float64)
        if n is not None:
            from .. import _validate

            n = _validate.real("n", n, positive=True)
            ws = ws * (n / ws[0]) if ws.size else ws
        nprev = np.concatenate([[np.inf], ws])[: self.K.shape[0]]
        inv = jnp.asarray(1.0 / nprev)
        i2, i4 = inv[:, None, None], inv[:, None, None, None, None]
        B = self.B
        ntk_cov = self.A + B.transpose(0, 1, 3, 2, 4) + B.transpose(0, 1, 3, 4, 2)
        return Prediction(
            metric=self.K + self.G1 * i2,
            four_point=self.V * i4,
            ntk_mean=self.Theta + self.H1 * i2,
            ntk_cov=ntk_cov * i4,
            ntk_cross_cov=self.A * i4,
            n=jnp.asarray(nprev),
        )


# ---------------------------------------------------------------------------------------------
# pair operators


def pair_index(N: int) -> np.ndarray:
    a1, a2 = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    return np.stack([a1, a2], -1)  # (N, N, 2): the inputs (a1, a2) of pair p


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _pair_operators(sig, dsig, homogeneous, order, rtol, K):
    """Per-pair moments and derivative coefficients at kernel K (N, N); one compile per shape.

    Returns S, dS (N, N); R2, Rp2 (N, N, 2, 2) without the C_W/2; T4, Tp4 (N, N, 2, 2, 2, 2);
    P1 (N, N, 2); and for residual layers U1, Up1 (N, N, 2) = <d_g (s_a1 s_a2)>, <d_g (s'_a1 s'_a2)>,
    W3, Wp3 (N, N, 2, 2, 2) = <d^3 (s_a1 s_a2)>, <d^3 (s'_a1 s'_a2)> and Sds (N, N) = <s'_a1 s_a2>:
    the coefficients of R, R', T, T', P, U, U', W, W' on the pair's own two inputs.
    """
    N = K.shape[0]
    d = jnp.diagonal(K)
    L, Lp = whiten2(d[:, None] + 0 * K, d[None, :] + 0 * K, K, rtol=rtol)
    L = L.reshape(-1, 2, 2)

    def moments(g1, g2, degree):
        H = hermite_moments2(g1, g2, L, degree=degree if homogeneous else None, order=order)
        return H.reshape(N, N, 5, 5)

    Hss, Hdd, Hds = moments(sig, sig, 2), moments(dsig, dsig, 0), moments(dsig, sig, 1)
    return (Hss[..., 0, 0], Hdd[..., 0, 0], _second(Hss, Lp), _second(Hdd, Lp), _fourth(Hss, Lp),
            _fourth(Hdd, Lp), _first(Hds, Lp), _first(Hss, Lp), _first(Hdd, Lp), _third(Hss, Lp), _third(Hdd, Lp),
            Hds[..., 0, 0])


def _pair_operators_host(sig, homogeneous, order, rtol, K):
    """:func:`_pair_operators` in numpy (small N): the same rules, sigma through
    :func:`efftheory.gaussian._sources.sd_values`, no compiled program per shape."""
    from ..gaussian import hermite_from_monomials_np, polar_monomials_np, sd_values, trapezoid_monomials_np, whiten2_np

    N = K.shape[0]
    d = np.diagonal(K)
    L, Lp = whiten2_np(d[:, None] + 0 * K, d[None, :] + 0 * K, K, rtol=rtol)
    L = L.reshape(-1, 2, 2)
    step = max(1, (1 << 17) // (120 if homogeneous else order * order))  # pairs at once: ~1 MB arrays

    def moments(i1, i2, degree):  # g = sigma (0) or sigma' (1)
        def f(z1, z2):
            a, b = sd_values(sig, z1), sd_values(sig, z2)
            return a[i1] * b[i2]

        def mono(Lc):
            return polar_monomials_np(f, Lc, degree) if homogeneous else trapezoid_monomials_np(f, Lc, order)

        parts = [mono(L[i:i + step]) for i in range(0, L.shape[0], step)]
        return hermite_from_monomials_np(np.concatenate(parts)).reshape(N, N, 5, 5)

    Hss, Hdd, Hds = moments(0, 0, 2), moments(1, 1, 0), moments(1, 0, 1)
    return (Hss[..., 0, 0], Hdd[..., 0, 0], _second(Hss, Lp, np), _second(Hdd, Lp, np), _fourth(Hss, Lp, np),
            _fourth(Hdd, Lp, np), _first(Hds, Lp, np), _first(Hss, Lp, np), _first(Hdd, Lp, np), _third(Hss, Lp, np),
            _third(Hdd, Lp, np), Hds[..., 0, 0])


def _second(H, Lp, xp=jnp):
    """C[p, a, b] = sum_ij Lp[p,i,a] Lp[p,j,b] <d_wi d_wj F>."""
    H2 = xp.stack([xp.stack([H[..., 2, 0], H[..., 1, 1]], -1), xp.stack([H[..., 1, 1], H[..., 0, 2]], -1)], -2)
    return xp.einsum("...ia,...jb,...ij->...ab", Lp, Lp, H2)


def _fourth(H, Lp, xp=jnp):
    counts = np.zeros((2, 2, 2, 2), dtype=np.int64)
    for idx in np.ndindex(2, 2, 2, 2):
        counts[idx] = sum(idx)  # number of v's
    H4 = H[..., 4 - counts, counts]  # (..., 2, 2, 2, 2)
    return xp.einsum("...ia,...jb,...kc,...ld,...ijkl->...abcd", Lp, Lp, Lp, Lp, H4)


def _third(H, Lp, xp=jnp):
    counts = np.zeros((2, 2, 2), dtype=np.int64)
    for idx in np.ndindex(2, 2, 2):
        counts[idx] = sum(idx)  # number of v's
    H3 = H[..., 3 - counts, counts]  # (..., 2, 2, 2)
    return xp.einsum("...ia,...jb,...kc,...ijk->...abc", Lp, Lp, Lp, H3)


def _first(H, Lp, xp=jnp):
    H1 = xp.stack([H[..., 1, 0], H[..., 0, 1]], -1)
    return xp.einsum("...ia,...i->...a", Lp, H1)


def _apply(C2, X):
    """(C X) for the (N^2, N^2) operator C with per-pair 2x2 coefficients C2 (N, N, 2, 2) and X (N^2, M),
    without forming C (it has at most four entries per row): row p = (a1, a2) of C X is
    sum_{ab} C2[p, a, b] X[(g_a, g_b)] with g = (a1, a2), the pair's own inputs."""
    N = C2.shape[0]
    P = pair_index(N).reshape(-1, 2)
    out = None
    for a in range(2):
        for b in range(2):
            term = C2[..., a, b].reshape(-1, 1) * X[P[:, a] * N + P[:, b]]
            out = term if out is None else out.__iadd__(term)
    return out


def _contract4(T4, X):
    """(T.X)_p = sum_abcd T4[p,a,b,c,d] X[g_a, g_b, g_c, g_d] with g = (a1, a2) of pair p."""
    T4 = np.asarray(T4)
    N = T4.shape[0]
    P = pair_index(N)
    first, second = (P[..., i][:, :, None, None, None, None] for i in range(2))
    slot = np.indices((2, 2, 2, 2))[:, None, None]  # which member of the pair each slot takes
    gath = [np.where(slot[k] == 0, first, second) for k in range(4)]
    return np.einsum("pqabcd,pqabcd->pq", T4, X[gath[0], gath[1], gath[2], gath[3]])


def _pair_gather(X, N):
    """G[a1, a2, a, b] = X[a1, a2, g_a, g_b] for X (N, N, N, N) and g = (a1, a2)."""
    P = pair_index(N)
    a1 = P[..., 0][:, :, None, None]
    a2 = P[..., 1][:, :, None, None]
    ga = P[:, :, :, None]
    gb = P[:, :, None, :]
    return X[a1, a2, np.broadcast_to(ga, (N, N, 2, 2)), np.broadcast_to(gb, (N, N, 2, 2))]


def p_transform(P1: np.ndarray, F: np.ndarray) -> np.ndarray:
    """sum_{g h} P_{(ab),g} P_{(cd),h} F_{a g c h}: slot g of pair (a, b) is input a (g = 0) or b (g = 1),
    so the four terms read F on its diagonals F_aacc, F_aacd, F_abcc and F itself (no gathered copies)."""
    p0, p1 = P1[..., 0], P1[..., 1]
    out = p1[:, :, None, None] * p1[None, None] * F
    out += p0[:, :, None, None] * p0[None, None] * np.einsum("aacc->ac", F)[:, None, :, None]
    out += p0[:, :, None, None] * p1[None, None] * np.einsum("aacd->acd", F)[:, None]
    out += p1[:, :, None, None] * p0[None, None] * np.einsum("abcc->abc", F)[..., None]
    return out


# ---------------------------------------------------------------------------------------------
# one layer


def _pair_order(act, K):
    """Nodes per direction of the 2-input trapezoid rule at kernel K (None: the exact polar rule)."""
    return None if act.homogeneous else rule_size(act, float(np.max(np.diag(K))))


def _pair_ops(act: Activation, K: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`_pair_operators` at kernel K as numpy arrays, by the host rule for small work (numpy, no
    compiled program per (N, rule)) and the compiled one above it."""
    order, rtol = _pair_order(act, K), (1e-12 if act.smooth else 1e-9)
    if K.shape[0] ** 2 <= HOST_SETS:
        ops = _pair_operators_host(act.fn, act.homogeneous, order, rtol, np.asarray(K, np.float64))
    else:
        ops = _pair_operators(act.fn, derivative(act.fn), act.homogeneous, order, rtol, jnp.asarray(K))
    return tuple(np.asarray(o) for o in ops)


def layer_sources(act: Activation, K: ArrayLike, *, tol: float = 1e-9, block: int = SET_BLOCK,
                  part: Part | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The single-neuron moments Mss, Mds, Mdd of :func:`efftheory.gaussian._sources.source_moments` that
    :func:`layer_step` at kernel K needs (each (N,)*4; its 2-input rule as layer_step's).  ``part``
    (several processes, :class:`efftheory.distributed.Part`): this process computes its share of the
    sets of three and four inputs and every process returns the whole result."""
    return source_moments(act, K, tol=tol, order2=_pair_order(act, K), block=block, part=part)


def layer_step(act: Activation, C_W: float, lam_W: float, r: float, K: np.ndarray, Theta: np.ndarray, G1: np.ndarray,
               V: np.ndarray, H1: np.ndarray, A: np.ndarray, B: np.ndarray, D: np.ndarray, F: np.ndarray, *,
               tol: float = 1e-9, block: int = SET_BLOCK,
               sources: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, skip: float = 0.0,
               branch: float = 1.0, odd: tuple[np.ndarray, ...] | None = None,
               history: tuple = ()) -> tuple[np.ndarray, ...]:
    """One step l -> l+1 of every first-order recursion (module docstring); numpy float64 in/out.
    ``block``: sets of three or four inputs integrated at once (:func:`efftheory.gaussian._sources.source_moments`).
    ``sources``: :func:`layer_sources` (act, K) computed beforehand (overwritten here), or None.
    ``skip``, ``branch``, ``odd``: a residual layer l+1 (xi, gamma) and layer l's three-point tensors
    (P, Oa, Ob), each (N, N, N) (:func:`residual_step`); the state returned then has P', Oa', Ob' appended.
    ``history``: :func:`neuron_history` at this step (residual networks: the earlier layers' single weights
    whose squares correlate B's chain terms with sigma'; :func:`history_correction`)."""
    N = K.shape[0]
    S, dS, R2, Rp2, T4, Tp4, P1, U1, Up1, W3, Wp3, Sds = _pair_ops(act, K)
    Z = C_W * dS
    R2, Rp2 = C_W / 2 * R2, C_W / 2 * Rp2
    Q2 = (lam_W / C_W) * R2 + Theta[:, :, None, None] * Rp2  # Q = (lambda_W / C_W) R + diag(Theta) R'
    n2 = N * N

    # single-neuron four-point moments, turned into covariances in place once B and F have used them
    # (the N^4 arrays are the memory of this step: finite_width's budget counts _STEP_TENSORS of them)
    Mss, Mds, Mdd = sources if sources is not None else layer_sources(act, K, tol=tol, block=block)
    m = lambda X: X.reshape(n2, n2)
    t = lambda X: X.reshape(N, N, N, N)
    T12 = Theta[:, :, None, None]
    T34 = Theta[None, None, :, :]
    zf = Z.reshape(-1)
    B_new = r * Z[:, :, None, None] * Z[None, None, :, :] * B
    B_new += C_W**2 * Theta[:, None, :, None] * Theta[None, :, None, :] * Mdd
    corr = history_correction(act, C_W, K, dS, history, tol=tol, block=block) if history else None
    if corr is not None:  # the chain term r Z_ab Z_cd B, with the neuron histories correlated to sigma'
        B_new += r * (Z[None, None] * corr + Z[:, :, None, None] * corr.transpose(2, 3, 0, 1))
    F_new = r * C_W**2 * p_transform(P1, F)
    F_new += C_W**2 * Theta[:, None, :, None] * Mds.transpose(0, 2, 1, 3)
    cov_ss, cov_ds, cov_dd = Mss, Mds, Mdd
    cov_ss -= S[:, :, None, None] * S[None, None]
    cov_ds -= dS[:, :, None, None] * S[None, None]
    cov_dd -= dS[:, :, None, None] * dS[None, None]
    cov_sd = cov_ds.transpose(2, 3, 0, 1)

    Vm = m(V)
    V_new = t(_apply(R2, _apply(R2, Vm).T).T)  # R V R^T
    V_new *= r
    V_new += C_W**2 * cov_ss
    TV = _contract4(T4, V)
    G1_bracket = _apply(R2, G1.reshape(-1, 1)).reshape(N, N) + C_W / 8 * TV
    G1_new = r * G1_bracket
    QV = _apply(Q2, Vm)
    ZD = zf[:, None] * m(D)
    D_new = t(_apply(R2, (QV + ZD).T).T)  # (Q V + Z D) R^T
    D_new *= r
    D_new += lam_W * C_W * cov_ss
    D_new += C_W**2 * T12 * cov_ds
    A_new = t(_apply(Q2, QV.T).T)  # Q V Q^T
    del QV
    QZD = _apply(Q2, ZD.T)  # Q (Z D)^T
    del ZD
    A_new += t(QZD)
    A_new += t(QZD.T)
    del QZD
    A_new += t(zf[:, None] * m(A) * zf[None, :])
    A_new *= r
    A_new += lam_W**2 * cov_ss
    A_new += lam_W * C_W * (T34 * cov_sd)
    A_new += lam_W * C_W * (T12 * cov_ds)
    A_new += C_W**2 * T12 * T34 * cov_dd
    del Mss, Mds, Mdd, cov_ss, cov_ds, cov_sd, cov_dd
    # H1
    TpV = _contract4(Tp4, V)
    Mx = D + F.transpose(0, 2, 1, 3) + F.transpose(0, 2, 3, 1)  # Mx[a1,a2,g1,g2] = D + F_{1 g1 2 g2} + F_{1 g2 2 g1}
    RpM = np.einsum("pqab,pqab->pq", Rp2, _pair_gather(Mx, N))
    H1_new = r * ((lam_W / C_W) * G1_bracket
                  + Theta * (_apply(Rp2, G1.reshape(-1, 1)).reshape(N, N) + C_W / 8 * TpV)
                  + Z * H1 + RpM)
    if odd is None and skip == 0.0 and branch == 1.0:
        return G1_new, V_new, H1_new, A_new, B_new, D_new, F_new
    plain = (G1_new, V_new, H1_new, A_new, B_new, D_new, F_new)
    ops = dict(R2=R2, Q2=Q2, Z=Z, P1=P1, U=C_W * U1, Up=C_W * Up1, W3=W3, Wp3=Wp3, Sds=Sds)
    z3 = np.zeros((N,) * 3)
    xi, gamma = float(skip), float(branch)
    out = residual_step(plain, ops, C_W, lam_W, r, xi, gamma, K, Theta, G1, V, H1, A, B, D, F,
                        *((z3, z3, z3) if odd is None else odd))
    if corr is not None:  # the chain terms xi^2 gamma^2 r (Z_ab + Z_cd) B likewise
        out[4][...] += r * xi**2 * gamma**2 * (corr + corr.transpose(2, 3, 0, 1))
    return out


def _pair_cols(N: int) -> tuple[np.ndarray, np.ndarray]:
    """The two inputs (a1, a2) of every pair p, each (N, N)."""
    P = pair_index(N)
    return P[..., 0], P[..., 1]


def residual_step(plain, ops, C_W, lam_W, r, xi, gamma, K, Theta, G1, V, H1, A, B, D, F, P, Oa, Ob):
    """A residual layer l+1, z' = xi z + gamma y with y the plain layer's output (docs/finite_width.md,
    "Residual layers"), from the plain step's results ``plain`` (G1, V, H1, A, B, D, F of y) and the pair
    operators ``ops``.  Matrices over pairs as in the module docstring; X_(12)(34) = C_W cov(z_1 z_2, s_3 s_4)
    = 2 sum_bc K_1b K_2c R_(34)(bc), X^H_(12)(34) = 2 sum_bc K_3b K_4c Q_(12)(bc), U_(12),g = C_W <d_g (s_1 s_2)>,
    U^f = (lambda_W/C_W) U + Theta U' (U' with s'), W = <d^3 (s s)>, W' = <d^3 (s' s')>, Y_bcd = <z_b s'_c s_d>,
    S_ab = <s'_a s_b>, and the three-point functions of layer l (zero for odd sigma), as (N^2, N) matrices:

        P_(bc),a  = n E[z_{i;a} z_{k;b} z_{k;c}]          Oa_(12),3 = n E[dH_{ii;12} z_{k;3}]
        Ob_(12),3 = n E[H_{ik;12} z_{i;3}]                 (i != k; Ot = Oa + Ob_(12) + Ob_(21) for i = k)

        G1' = r xi^2 G1 + gamma^2 [G1_y + r (C_W/2) W.P]
        V'  = r xi^4 V + xi^2 gamma^2 [X + X^T + r (V R^T + R V + P U^T + U P^T)]
              + gamma^4 [V_y + r (R P U^T + U P^T R^T)]
        H1' = r xi^2 H1 + gamma^2 [H1_y + r ((lambda_W/2) W.P + Theta (C_W/2) W'.P + U'.Ot)]
        A'  = r xi^4 A + r xi^2 gamma^2 [D Q^T + Q D^T + Oa U^fT + U^f Oa^T + (Z_12 + Z_34) A]
              + gamma^4 [A_y + r (Q P U^fT + U^f P^T Q^T + Z Oa U^fT + U^f Oa^T Z)]
        B'  = r xi^4 B + xi^2 gamma^2 (Z_ab + Z_cd) [Theta_ac Theta_bd + r B] + gamma^4 B_y
        D'  = r xi^4 D + xi^2 gamma^2 [X^H + r (D R^T + Oa U^T + Q V + U^f P^T + Z D)]
              + gamma^4 [D_y + r (Q P U^T + U^f P^T R^T + Z Oa U^T)]
        F'  = r xi^4 F + xi^2 gamma^2 C_W [Theta_ac (Y_bcd + Y_dab) + r (F.P_cd + P_ab.F + Ob_ac;b S_cd + Ob_ca;d S_ab)]
              + gamma^4 [F_y + r C_W^2 (S_cd sum_g Ob_ac;g P_(ab),g + S_ab sum_g Ob_ca;g P_(cd),g)]
        P'  = r xi^3 P + xi gamma^2 [U K + r R P]
        Oa' = r xi^3 Oa + xi gamma^2 [U^f K + r (Q P + Z Oa)]
        Ob'_(12),3 = r xi^3 Ob + xi gamma^2 C_W [Theta_12 S_13 + r sum_g Ob_(12),g P_(13),g]
    """
    G1_y, V_y, H1_y, A_y, B_y, D_y, F_y = plain
    R2, Q2, Z, P1, U1, Up1, W3, Wp3, Sds = (ops[k] for k in ("R2", "Q2", "Z", "P1", "U", "Up", "W3", "Wp3", "Sds"))
    N = K.shape[0]
    x2, g2 = xi * xi, gamma * gamma
    m = lambda X: X.reshape(N * N, -1)
    t = lambda X: X.reshape(N, N, N, N)
    c1, c2 = _pair_cols(N)
    Kp = np.stack([K[:, c1], K[:, c2]], -1)                             # Kp[k, a1, a2, b] = K[k, (a1, a2)_b]
    as_mat = lambda T: m(T.transpose(1, 2, 0)) if T is P else m(T)      # P[a, b, c] = P_{a;bc}; Oa, Ob [1, 2, 3]
    from_mat = lambda M: M.reshape(N, N, N)

    def wide(C1):  # (N, N, 2) coefficients on the pair's inputs -> (N^2, N)
        out = np.zeros((N, N, N))
        np.add.at(out, (c1, c2, c1), C1[..., 0])
        np.add.at(out, (c1, c2, c2), C1[..., 1])
        return m(out)

    Um, Upm = wide(U1), wide(Up1)
    Ufm = (lam_W / C_W) * Um + Theta.reshape(-1, 1) * Upm
    Pm, Oam = as_mat(P), as_mat(Oa)
    Zc = Z.reshape(-1, 1)
    RP, QP = _apply(R2, Pm), _apply(Q2, Pm)                              # (N^2, N)
    gath = _triple_gather(N)
    Ot = Oa + Ob + Ob.transpose(1, 0, 2)
    # G1, V
    W3P = np.einsum("pqbcd,pqbcd->pq", W3, P[gath])
    G1_new = r * x2 * G1 + g2 * (G1_y + r * C_W / 2 * W3P)
    X = 2 * np.einsum("kijb,lijc,ijbc->klij", Kp, Kp, R2)                 # X[(12), (34)]
    Vm = m(V)
    VR = _apply(R2, Vm.T).T
    PU = Pm @ Um.T
    RPU = RP @ Um.T
    V_new = (r * x2 * x2 * V + x2 * g2 * t(m(X) + m(X).T + r * (VR + VR.T + PU + PU.T))
             + g2 * g2 * (V_y + r * t(RPU + RPU.T)))
    # H1
    WpP = np.einsum("pqbcd,pqbcd->pq", Wp3, P[gath])
    UpOt = Up1[..., 0] * Ot[c1, c2, c1] + Up1[..., 1] * Ot[c1, c2, c2]
    H1_new = r * x2 * H1 + g2 * (H1_y + r * (lam_W / 2 * W3P + Theta * C_W / 2 * WpP + UpOt))
    # A
    Dm = m(D)
    DQ = _apply(Q2, Dm.T).T                                             # D Q^T
    OU = Oam @ Ufm.T                                                    # Oa U^fT
    Zs = Z[:, :, None, None] + Z[None, None, :, :]
    QPU = QP @ Ufm.T + Zc * OU                                          # Q P U^fT + Z Oa U^fT
    A_new = (r * x2 * x2 * A + r * x2 * g2 * (t(DQ + DQ.T + OU + OU.T) + Zs * A)
             + g2 * g2 * (A_y + r * t(QPU + QPU.T)))
    # B
    B_new = (r * x2 * x2 * B + x2 * g2 * Zs * (Theta[:, None, :, None] * Theta[None, :, None, :] + r * B)
             + g2 * g2 * B_y)
    # D
    XH = 2 * np.einsum("ijbc,kijb,lijc->ijkl", Q2, Kp, Kp)
    DR = _apply(R2, Dm.T).T
    QV = _apply(Q2, Vm)
    D_res = DR + Oam @ Um.T + QV + Ufm @ Pm.T + Zc * Dm
    D_br = QP @ Um.T + _apply(R2, (Ufm @ Pm.T).T).T + Zc * (Oam @ Um.T)
    D_new = r * x2 * x2 * D + x2 * g2 * (XH + r * t(D_res)) + g2 * g2 * (D_y + r * t(D_br))
    # F
    Y = np.einsum("kijb,ijb->kij", Kp, P1)                              # Y[b, c, d] = <z_b s'_c s_d>
    F_src = Theta[:, None, :, None] * (np.broadcast_to(Y[None], (N,) * 4)
                                       + np.broadcast_to(Y.transpose(1, 2, 0)[:, :, None, :], (N,) * 4))
    p0, p1 = P1[..., 0], P1[..., 1]
    FP = (p0[None, None] * np.einsum("abcc->abc", F)[..., None] + p1[None, None] * F
          + p0[:, :, None, None] * np.einsum("aacd->acd", F)[:, None] + p1[:, :, None, None] * F)
    # Ob_{ac;b} S_cd + Ob_{ca;d} S_ab  at [a, b, c, d]
    ObS = Ob.transpose(0, 2, 1)[:, :, :, None] * Sds[None, None] + Sds[:, :, None, None] * Ob.transpose(1, 0, 2)[:, None]
    # sum_g Ob_{ac;g} P_(ab),g: g = a or b
    # sum_g Ob_{ac;g} P_(ab),g (g = a or b) as [a, b, c]; the same array gives sum_g Ob_{ca;g} P_(cd),g as [c, d, a]
    ObPab = p0[:, :, None] * np.einsum("aca->ac", Ob)[:, None, :] + p1[:, :, None] * Ob.transpose(0, 2, 1)
    F_br = ObPab[:, :, :, None] * Sds[None, None] + Sds[:, :, None, None] * ObPab.transpose(2, 0, 1)[:, None]
    F_new = (r * x2 * x2 * F + x2 * g2 * C_W * (F_src + r * (FP + ObS))
             + g2 * g2 * (F_y + r * C_W**2 * F_br))
    # three-point functions
    P_new = r * x2 * xi * P + xi * g2 * from_mat(Um @ K + r * RP).transpose(2, 0, 1)
    Oa_new = r * x2 * xi * Oa + xi * g2 * from_mat(Ufm @ K + r * (QP + Zc * Oam))
    # sum_g Ob_{12;g} P_(13),g, g = input 1 (slot 0) or input 3 (slot 1): [1, 2, 3]
    Ob_diag = np.einsum("aba->ab", Ob)                                   # Ob_{12;1}
    ObP = Ob_diag[:, :, None] * p0[:, None, :] + Ob * p1[:, None, :]
    Ob_new = r * x2 * xi * Ob + xi * g2 * C_W * (Theta[:, :, None] * Sds[:, None, :] + r * ObP)
    return G1_new, V_new, H1_new, A_new, B_new, D_new, F_new, P_new, Oa_new, Ob_new


def sigma_prime_pairs(act: Activation, K: np.ndarray) -> np.ndarray:
    """<sigma'_a sigma'_b> (N, N) at kernel K, by layer_step's pair rule."""
    return _pair_ops(act, np.asarray(K, np.float64))[1]


def neuron_history(C_Ws, skips, branches, Ks, Ts, Dds, l: int) -> list[tuple]:
    r"""The neuron histories seen by the step into layer l (0-based; from K^(l-1)) of a residual MLP.

    A residual layer u (skip xi_u, branch gamma_u) adds to the off-diagonal NTK H_{ik;ac} of two
    neurons the single-weight term xi_u gamma_u W^(u)_{ki} sigma'(z^(u-1)_{i;c}) Theta^(u-1)_{ac}, which the
    skip path carries to every later layer.  Its square is a function of neuron i's own earlier
    preactivation, so n E[H_{ik;ac} H_{ik;bd} | z_i] holds, besides B, the terms

        sum_s h_s[a, b, c, d] sigma'(z^(s)_{i;c}) sigma'(z^(s)_{i;d}),
        h_s = xi_u^2 gamma_u^2 C_W^(u) Theta^(s)_ac Theta^(s)_bd  (s = u - 1) at injection,
        h_s <- (xi^4 + xi^2 gamma^2 Z_cd) h_s                     at every later layer,

    (Z = C_W <sigma' sigma'>): the same propagation as B's own xi^4 and xi^2 gamma^2 Z_cd B terms.
    Returns (K^(s), <s's'>^(s), Xi, h_s) for each s with E[z^(l-1) z^(s)] = Xi K^(s) (Xi: the product of
    the skips in between); empty for a plain MLP.  Infinite-width quantities only: cheap to rebuild.
    """
    hist = []
    for u in range(1, l):
        xi, g = float(skips[u]), float(branches[u])
        Z = C_Ws[u] * Dds[u - 1]
        hist = [(Ks_, D_, X * xi, h * (xi**4 + xi**2 * g**2 * Z[None, None])) for Ks_, D_, X, h in hist if xi != 0.0]
        if xi != 0.0:
            T = np.asarray(Ts[u - 1], np.float64)
            hist.append((np.asarray(Ks[u - 1], np.float64), Dds[u - 1], xi,
                         xi**2 * g**2 * C_Ws[u] * T[:, None, :, None] * T[None, :, None, :]))
    return hist


def history_correction(act: Activation, C_W: float, K: np.ndarray, Dd: np.ndarray, history, *, tol: float = 1e-9,
                       block: int = SET_BLOCK) -> np.ndarray:
    r"""C_W sum_s h_s[a,b,c,d] (<s'_a s'_b s'^(s)_c s'^(s)_d> - <s'_a s'_b> <s'_c s'_d>^(s)), (N,)*4: what the
    chain terms of B miss when they factor E[sigma'_a sigma'_b n H H] as Z_ab B (:func:`neuron_history`).
    The joint moment is over the 2N preactivations (z^(l), z^(s)), covariance [[K, Xi K_s], [Xi K_s, K_s]]:
    the four-input sources of :func:`efftheory.gaussian._sources.source_moments` on that kernel."""
    N = K.shape[0]
    corr = np.zeros((N,) * 4)
    for K_s, Dd_s, Xi, h in history:
        C = Xi * K_s
        Kb = np.block([[np.asarray(K, np.float64), C], [C.T, K_s]])
        Mdd = source_moments(act, Kb, tol=tol, order2=_pair_order(act, Kb), block=block)[2]
        corr += h * (Mdd[:N, :N, N:, N:] - Dd[:, :, None, None] * Dd_s[None, None])
    return C_W * corr


def _triple_gather(N: int):
    """Index arrays giving G[a1, a2, b, c, d] = P[g_b, g_c, g_d] with g = (a1, a2)."""
    c1, c2 = _pair_cols(N)
    pair = np.stack([c1, c2], -1)                                        # (N, N, 2)
    gb = np.broadcast_to(pair[:, :, :, None, None], (N, N, 2, 2, 2))
    gc = np.broadcast_to(pair[:, :, None, :, None], (N, N, 2, 2, 2))
    gd = np.broadcast_to(pair[:, :, None, None, :], (N, N, 2, 2, 2))
    return gb, gc, gd


def finite_width(net: MLP, x: ArrayLike, *, tol: float = 1e-9, progress: bool = False, memory: float | None = None,
                 store: str | os.PathLike | None = None) -> FiniteWidth:
    """First-order finite-width statistics of every layer of ``net`` on inputs x (N, n_0).

    Returns a :class:`FiniteWidth` with K, Theta, G1, H1 (L, N, N) and V, A, B, D, F
    (L, N, N, N, N), float64.  Width ratios r_l = n_l/n_{l-1} come from ``net``'s hidden widths;
    use :meth:`FiniteWidth.at_width` for predictions at a width.

    Args:
      tol: target absolute accuracy of the three- and four-input Gaussian integrals (the sources
        of V, A, B, D, F) for smooth activations; see :mod:`efftheory.gaussian._sources`.  Their cost
        grows like log(1/tol)^(number of wide directions); one- and two-input integrals are
        always at ~1e-13.  Kinked homogeneous activations (relu, leaky_relu, abs) are exact; other kinked ones
        use fixed rules (~1e-4 relative in four dimensions); sets that miss tol are named in an
        :class:`efftheory.gaussian.AccuracyWarning`.
      progress: show a progress bar over layers (tqdm).
      memory: a budget in bytes for the arrays this call allocates (None: no limit).  The Gaussian
        integrals then run in blocks of sets small enough for it; a budget below what the returned
        tensors (5 L N^4 float64, unless ``store`` keeps them on disk) and one layer step
        (~20 N^4 float64, and 6 more for the next two layers' sources, computed meanwhile in
        threads) need raises ValueError.  JAX's runtime and compiled kernels come on
        top (0.5-1.5 GB measured, growing with the number of kernel shapes, not with N^4).
      store: a directory for the results: each finished layer is written to disk (:mod:`._store`),
        and V, A, B, D, F come back as read-only memory maps (L, N, N, N, N) that read only the
        slices used.  A run interrupted for any reason resumes from its last finished layer when
        called again with the same store and arguments; a finished store is returned without
        recomputing.  A store written for another computation raises ValueError.

    JAX transformations (``jax.jit``, ``jax.vmap``, ``jax.grad`` with x or the MLP's hyperparameters
    traced): one input (x of shape (1, n_0)) runs the closed one-input recursions for any activation,
    two inputs layer_step's recursions in jnp for smooth activations, with fixed rules
    (:mod:`efftheory.theory._traced`; ``tol``, ``memory``, ``progress`` do not apply, ``store`` raises).
    Three or more inputs, and two with a kinked or scale-invariant activation, raise a ValueError
    naming the transformation: their sources choose rules and input sets on the host.
    """
    from .. import _validate
    from . import _traced

    net = check_net(net)
    tol = _validate.real("tol", tol, positive=True)
    if not tol < 1e-2:
        raise ValueError(f"tol: expected a target accuracy below 1e-2, got {tol}")
    if _traced.traced(net, x):  # jax.jit / vmap / grad: one or two inputs, traced end to end
        return _finite_width_traced(net, x, tol, store)
    if memory is not None:
        memory = _validate.real("memory", memory, positive=True)
    store = _validate.optional_path("store", store)
    inf = infinite_width(net, x)
    out = _schedule.run_layers(net, np.asarray(x, np.float64), inf, tol=tol, memory=memory, store=store,
                               progress=progress, step=layer_step, sources=layer_sources)
    for name in ("P", "Oa", "Ob"):
        out.pop(name, None)
    return FiniteWidth(K=inf.K, Theta=inf.Theta, net=net, tol=tol, **out)


def _finite_width_traced(net: MLP, x, tol: float, store) -> FiniteWidth:
    """finite_width under jax.jit / vmap / grad (x or hyperparameters traced): N = 1 by the closed
    one-input recursions (:func:`efftheory.theory._traced.finite_single`), N = 2 by layer_step's
    recursions in jnp for smooth activations (:func:`efftheory.theory._traced.finite_two`); N >= 3,
    and N = 2 with a kinked or scale-invariant sigma, raise."""
    from . import _traced

    shape = getattr(x, "shape", None) or np.shape(x)
    if store is not None:
        raise ValueError(f"store: not available under {_traced.transform_name(net, x)} (a traced computation "
                         "cannot be written to disk); call finite_width outside the transformation")
    if len(shape) == 2 and shape[0] == 2:
        _traced.check_two_inputs(net, x)
        out = _traced.finite_two(net, x)
        two = {n: out[n] for n in ("K", "Theta", "G1", "H1")}
        four = {n: out[n] for n in ("V", "A", "B", "D", "F")}
        return FiniteWidth(net=_traced.static_net(net), tol=tol, **two, **four)
    if len(shape) == 2 and shape[0] != 1:
        raise _traced.single_input_error("finite_width", shape[0], net, x)
    out = _traced.finite_single(net, x)
    two = {n: out[n][:, None, None] for n in ("K", "Theta", "G1", "H1")}
    four = {n: out[n][:, None, None, None, None] for n in ("V", "A", "B", "D", "F")}
    return FiniteWidth(net=_traced.static_net(net), tol=tol, **two, **four)


@result(meta=("net",))
class FiniteWidthDiagonal:
    """Single-input statistics of each input separately: every array field is (L, N) float64, entry
    [l, a] the (a, a, ..., a) component of the corresponding tensor of :class:`FiniteWidth` (index 0
    = layer 1).  K, Theta are infinite-width values; G1, V, H1, A, B, D, F are coefficients of
    1/n_{l-1}, not divided by a width (see :class:`FiniteWidth`).  ``save``/``load`` as there.
    """

    K: jax.Array
    Theta: jax.Array
    G1: jax.Array
    V: jax.Array
    H1: jax.Array
    A: jax.Array
    B: jax.Array
    D: jax.Array
    F: jax.Array
    net: MLP

    def save(self, path: str | os.PathLike) -> str:
        """Write to ``path`` (.npz with JSON metadata, no pickle); returns it."""
        from .. import _io

        return _io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FiniteWidthDiagonal":
        from .. import _io

        return _io.load(path, cls)


def finite_width_diagonal(net: MLP, x: ArrayLike) -> FiniteWidthDiagonal:
    """Single-input first-order statistics for each row of x (N, n_0), without any N^4 tensor.

    Each input runs the recursions of :func:`finite_width` on its own 1x1 kernel, so memory and
    time grow linearly in N.  Under jax.jit / vmap / grad (x or hyperparameters traced) each row
    goes through the traced one-input recursions (:func:`efftheory.theory._traced.finite_single`).
    """
    from . import _traced
    from .infinite import input_gram  # validated x

    net = check_net(net).require_plain("finite_width_diagonal")
    if _traced.traced(net, x):
        _traced.input_gram(x)  # shape checks
        per = [_traced.finite_single(net, x[a:a + 1]) for a in range(x.shape[0])]
        return FiniteWidthDiagonal(net=_traced.static_net(net),
                                   **{n: jnp.stack([p[n] for p in per], axis=1) for n in per[0]})
    input_gram(x)
    x = np.asarray(x, dtype=np.float64)
    per = [finite_width(net, x[a:a + 1]) for a in range(x.shape[0])]
    take2 = lambda name: jnp.stack([getattr(p, name)[:, 0, 0] for p in per], axis=1)
    take4 = lambda name: jnp.stack([getattr(p, name)[:, 0, 0, 0, 0] for p in per], axis=1)
    return FiniteWidthDiagonal(K=take2("K"), Theta=take2("Theta"), G1=take2("G1"), V=take4("V"), H1=take2("H1"),
                               A=take4("A"), B=take4("B"), D=take4("D"), F=take4("F"), net=net)
