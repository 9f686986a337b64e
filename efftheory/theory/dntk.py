r"""The dNTK and ddNTKs at first order in 1/n (PDLT ch. 11): P, Q, R, S, T, U for N inputs.

Definitions (docs/dntk.md; lambda the learning-rate tensor of docs/theory.md, every statistic of layer l
carries 1/n_{l-1}):

    dH_{i0i1i2;d0d1d2}   = sum lambda_mu lambda_nu (d_mu d_nu z_{i0;d0}) (d_mu z_{i1;d1}) (d_nu z_{i2;d2})
    ddH^I_{i0..i3;d0..d3}  = sum lambda^3 (d_mu d_nu d_rho z_{i0;d0}) (d_mu z_{i1;d1}) (d_nu z_{i2;d2})
                                          (d_rho z_{i3;d3})
    ddH^II_{i1..i4;d1..d4} = sum lambda^3 (d_mu d_nu z_{i1;d1}) (d_mu d_rho z_{i2;d2}) (d_nu z_{i3;d3})
                                          (d_rho z_{i4;d4})

    E[dH_{i0i1i2;d0d1d2} z_{i3;d3}] = (1/n)[d_{i0i1}d_{i2i3} P_{d0d1d2d3} + d_{i0i2}d_{i1i3} P_{d0d2d1d3}
                                           + d_{i0i3}d_{i1i2} Q_{d0d1d2d3}]
    E[ddH^I_{i0i1i2i3;d0d1d2d3}]    = (1/n)[d_{i0i1}d_{i2i3} R_{d0d1d2d3} + d_{i0i2}d_{i1i3} R_{d0d2d1d3}
                                           + d_{i0i3}d_{i1i2} R_{d0d3d1d2}]
    E[ddH^II_{i1i2i3i4;d1d2d3d4}]   = (1/n)[d_{i1i2}d_{i3i4} S_{d1d2d3d4} + d_{i1i3}d_{i2i4} T_{d1d2d3d4}
                                           + d_{i1i4}d_{i2i3} U_{d1d2d3d4}]

Storage: P[l, a, b, c, d] = P^(l+1)_{abcd} with the indices exactly as above (no permutation for any of
the six); index 0 is layer 1, where all vanish.

Recursions from layer l to l+1 (K, Theta, B, F and P..U at layer l; <.> = <.>_{K^(l)}; C_W, lambda_W of
layer l+1; r = n_l/n_{l-1}; E_kl[a,b] = <s^(k)_a s^(l)_b>;
g_ab = lambda_W s'_a s_b + C_W Theta_ab s''_a s'_b, gt_ab = lambda_W s''_a s_b + C_W Theta_ab s'''_a s'_b,
h_ab = lambda_W s'_a s'_b + C_W Theta_ab s''_a s''_b, u_ab = s'_a s_b; for a two-input function phi,
Dphi[a, b, g] = d_{ga} <d_1 phi> + d_{gb} <d_2 phi> = <d phi / d z_g>):

    P'_0123 = C_W Th_02 <g_01 s'_2 s_3> + r C_W [sum F_{0g2h} Dg[0,1,g] Du[2,3,h] + C_W E11_01 sum_h P_{012h} Du[2,3,h]]
    Q'_0123 = C_W^2 Th_01 Th_02 <s''_0 s'_1 s'_2 s_3> + r C_W^2 E11_12 [B_{(00)(12)} E20_03 + sum_g Q_{012g} Du[0,3,g]]
    R'_0123 = C_W Th_02 Th_03 <gt_01 s'_2 s'_3>
              + r C_W E11_23 [B_{(00)(23)} <gt_01> + sum_g Q_{023g} Dg[0,1,g] + C_W E11_01 R_0123]
    S'_1234 = C_W Th_13 Th_24 <h_12 s'_3 s'_4> + r C_W E11_34 [B_{(12)(34)} <h_12> + C_W E11_12 S_1234]
    T'_1234 = Th_12 <g_13 g_24> + r [sum F_{1g2h} Dg[1,3,g] Dg[2,4,h]
              + C_W (E11_24 sum_g P_{241g} Dg[1,3,g] + E11_13 sum_g P_{132g} Dg[2,4,g]) + C_W^2 E11_13 E11_24 T_1234]
    U'_1234 = C_W^2 Th_12 Th_13 Th_24 <s''_1 s''_2 s'_3 s'_4> + r C_W^2 E11_14 E11_23 U_1234

The recursions read the NTK-variance and NTK-preactivation tensors B and F of layer l (docs/theory.md,
:mod:`efftheory.theory.finite`); they are carried along here from the same moments (E11, E20 and the
patterns 1111, 1010 below), which avoids the three- and four-input machinery of finite_width:

    B'_{(ab)(cd)} = C_W^2 Th_ac Th_bd <s'_a s'_b s'_c s'_d> + r C_W^2 E11_ab E11_cd B_{(ab)(cd)}
    F'_abcd       = C_W^2 Th_ac <s'_a s_b s'_c s_d> + r C_W^2 sum_{g h} Du[a,b,g] Du[c,d,h] F_{a g c h}

Derivation (docs/dntk.md): condition layer l+1 on layer l, differentiate z' = b + W sigma(z) up to three
times, average W^(l+1) by Wick's theorem; same-neuron terms are the sources (Gaussian integrals over at
most four inputs at K), cross-neuron terms read the O(1/n) correlations of layer l (B, F, P, Q and the
means R, S, T, U).  Smooth activations only: sigma''' enters as a function.

Numerics: per set of at most four distinct inputs, a tensor midpoint rule in the range of the marginal
covariance (eigendecomposition, zero directions dropped: identical or collinear inputs give no NaN) on
[-7.5, 7.5], the step of each direction chosen from how fast z moves along it and ``tol`` (the strip bound
of :func:`efftheory.gaussian.nodes_for`): :func:`efftheory.gaussian.derivative_moments`.  Cost ~ C(N, 4) x
(product of the node counts).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .._pytree import result
from ..gaussian import DERIVATIVE_PAIRS, derivative_moments
from ..network import MLP
from .finite import p_transform
from .infinite import check_net, infinite_width

__all__ = ["DNTKStatistics", "dntk_statistics", "dntk_step", "bf_step"]



@result(meta=("net",))
class DNTKStatistics:
    """First-order dNTK and ddNTK statistics of every layer (module docstring).

    Attributes: K, Theta (L, N, N) infinite-width kernels; P, Q, R, S, T, U (L, N, N, N, N) float64,
    index 0 = layer 1 (all zero there); net: the MLP.
    """

    K: jax.Array
    Theta: jax.Array
    P: jax.Array
    Q: jax.Array
    R: jax.Array
    S: jax.Array
    T: jax.Array
    U: jax.Array
    net: MLP


def _slot_derivative(first, second):
    """D[a, b, g] = d_{ga} first[a, b] + d_{gb} second[a, b] (chain rule onto inputs)."""
    N = first.shape[0]
    eye = np.eye(N)
    return first[:, :, None] * eye[:, None, :] + second[:, :, None] * eye[None, :, :]


def bf_step(C_W: float, r: float, Theta: np.ndarray, B: np.ndarray, F: np.ndarray, M4: Mapping[str, np.ndarray],
            E2: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One step l -> l+1 of B and F (module docstring; the recursions of finite.py)."""
    C, Th, E11 = C_W, Theta, E2["11"]
    B_new = C**2 * Th[:, None, :, None] * Th[None, :, None, :] * M4["1111"] \
        + r * C**2 * E11[:, :, None, None] * E11[None, None, :, :] * B
    # sum_{g h} Du[a,b,g] Du[c,d,h] F_{a g c h}, Du on the pair's own inputs: (E20, E11) per pair
    F_new = C**2 * Th[:, None, :, None] * M4["1010"] + r * C**2 * p_transform(np.stack([E2["20"], E11], -1), F)
    return B_new, F_new


def dntk_step(C_W: float, lam_W: float, r: float, K: np.ndarray, Theta: np.ndarray, B: np.ndarray, F: np.ndarray,
              P: np.ndarray, Q: np.ndarray, R: np.ndarray, S: np.ndarray, T: np.ndarray, U: np.ndarray,
              M4: Mapping[str, np.ndarray], E2: Mapping[str, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step l -> l+1 of the six recursions (module docstring); numpy float64 in and out."""
    C, lam, Th = C_W, lam_W, Theta
    E11, E20, E22, E31 = (E2[p] for p in DERIVATIVE_PAIRS)
    Th01 = Th[:, :, None, None]  # Th_ab for slots (a, b, c, d)
    Th02 = Th[:, None, :, None]  # Th_ac
    Th03 = Th[:, None, None, :]  # Th_ad
    Th13 = Th[None, :, None, :]  # Th_bd
    gt = lam * E20 + C * Th * E31  # <gt_ab> = <d_1 g_ab>
    hh = lam * E11 + C * Th * E22  # <h_ab>  = <d_2 g_ab>
    Dg = _slot_derivative(gt, hh)
    Du = _slot_derivative(E20, E11)
    Bd = np.einsum("aabc->abc", B)  # B_{(aa)(bc)}
    e_ab, e_cd = E11[:, :, None, None], E11[None, None, :, :]
    e_bc, e_ac, e_bd, e_ad = E11[None, :, :, None], E11[:, None, :, None], E11[None, :, None, :], E11[:, None, None, :]

    P_new = C * Th02 * (lam * M4["1010"] + C * Th01 * M4["2110"]) \
        + r * C * (np.einsum("agch,abg,cdh->abcd", F, Dg, Du) + C * e_ab * np.einsum("abch,cdh->abcd", P, Du))
    Q_new = C**2 * Th01 * Th02 * M4["2110"] \
        + r * C**2 * e_bc * (Bd[:, :, :, None] * E20[:, None, None, :] + np.einsum("abcg,adg->abcd", Q, Du))
    R_new = C * Th02 * Th03 * (lam * M4["2011"] + C * Th01 * M4["3111"]) \
        + r * C * e_cd * (Bd[:, None, :, :] * gt[:, :, None, None] + np.einsum("acdg,abg->abcd", Q, Dg)
                          + C * e_ab * R)
    S_new = C * Th02 * Th13 * (lam * M4["1111"] + C * Th01 * M4["2211"]) \
        + r * C * e_cd * (B * hh[:, :, None, None] + C * e_ab * S)
    T_new = Th01 * (lam**2 * M4["1100"] + lam * C * Th13 * M4["1201"] + lam * C * Th02 * M4["2110"]
                    + C**2 * Th02 * Th13 * M4["2211"]) \
        + r * (np.einsum("agbh,acg,bdh->abcd", F, Dg, Dg)
               + C * (e_bd * np.einsum("bdag,acg->abcd", P, Dg) + e_ac * np.einsum("acbg,bdg->abcd", P, Dg))
               + C**2 * e_ac * e_bd * T)
    U_new = C**2 * Th01 * Th02 * Th13 * M4["2211"] + r * C**2 * e_ad * e_bc * U
    return P_new, Q_new, R_new, S_new, T_new, U_new


def dntk_statistics(net: MLP, x: ArrayLike, *, tol: float = 1e-9) -> DNTKStatistics:
    """P, Q, R, S, T, U (L, N, N, N, N) of every layer of ``net`` on inputs x (N, n_0), float64.

    Width ratios r_l = n_l/n_{l-1} come from ``net``'s hidden widths; a statistic of layer l is the
    coefficient of 1/n_{l-1}.  Needs a smooth activation (sigma''' is integrated as a function).

    Args:
      tol: target accuracy of the Gaussian integrals (the step of the midpoint rule, module docstring).
    """
    net = check_net(net).require_plain("dntk_statistics")
    tol = _validate.real("tol", tol, positive=True)
    if not tol < 1e-2:
        raise ValueError(f"tol: expected a target accuracy below 1e-2, got {tol}")
    if net.sigma.kinked:
        why = "smooth=False" if not net.sigma.smooth else "sigma or sigma' jumps, which autodiff does not see"
        raise ValueError(f"net: the dNTK/ddNTK recursions need a smooth activation (they integrate sigma''' "
                         f"as a function); {net.sigma.name!r} has a kink ({why}). Use e.g. tanh, gelu, "
                         f"erf, silu, softplus")
    inf = infinite_width(net, x)
    Ks, Ts = np.asarray(inf.K, np.float64), np.asarray(inf.Theta, np.float64)
    L, N = Ks.shape[0], Ks.shape[1]
    z4 = np.zeros((N,) * 4)
    B, F = z4, z4
    state = (z4,) * 6
    out = [state]
    ratios = net.width_ratios()
    for l in range(1, L):
        M4, E2 = derivative_moments(net.sigma.fn, Ks[l - 1], tol=tol, strip=net.sigma.strip)
        C_W, r = net.C_Ws[l], ratios[l - 1]
        state = dntk_step(C_W, net.lambda_Ws[l], r, Ks[l - 1], Ts[l - 1], B, F, *state, M4, E2)
        B, F = bf_step(C_W, r, Ts[l - 1], B, F, M4, E2)
        out.append(state)
    P, Q, R, S, T, U = (jnp.asarray(np.stack([s[i] for s in out])) for i in range(6))
    return DNTKStatistics(K=inf.K, Theta=inf.Theta, P=P, Q=Q, R=R, S=S, T=T, U=U, net=net)
