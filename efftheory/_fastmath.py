r"""Fast float64 elementwise kernels for the closed-form activations of the infinite-width recursion.

XLA's CPU lowering of float64 ``arccos``/``arcsin``/``atan2`` costs ~20 ns an element (measured on
the 2-core Xeon of this project: 23 ms for 1024^2 arccos, against 1.5 ms for a multiply-add pass),
which made them the whole cost of ``infinite_width`` for relu and erf.  :func:`asin` below is
built from multiplies, adds, one square root and selects only, so it fuses and vectorises with the
rest of a layer:

    |x| <= 1/2:  asin(x) = x + x t P(t),                     t = x^2
    |x| >  1/2:  asin(x) = sign(x) [pi/2 - 2 asin(y)],        y = sqrt((1 - |x|)/2),  t = y^2 <= 1/4

(the half-angle identity), with P the degree-12 polynomial interpolating
g(t) = (asin(sqrt t) - sqrt t) / t^{3/2} = sum_{n>=1} binom(2n, n) t^{n-1} / (4^n (2n+1)) at 400 Chebyshev
points of [0, 1/4] (least squares in the Chebyshev basis, then converted to powers of t).  Measured:
at most 3 ulp from numpy's arcsin over [-1, 1], including 1 - 1e-17 .. 1.  1 - |x| is exact
(Sterbenz) for |x| >= 1/2, so the result near +-1 is as accurate as the argument.

Pair kernels (module :mod:`efftheory.activations` has the formulas; rho = K_ab / sqrt(K_aa K_bb)):

    relu:  S  = sqrt(K_aa K_bb) [sqrt(1 - rho^2) + rho (pi/2 + asin rho)] / (2 pi)
           dS = 1/4 + asin(rho) / (2 pi)                                   ((pi - arccos rho)/(2 pi))
    abs:   S  = 2 sqrt(K_aa K_bb) [sqrt(1 - rho^2) + rho asin rho] / pi,    dS = 2 asin(rho) / pi
    erf:   s = 2 K_ab / sqrt((1 + 2 K_aa)(1 + 2 K_bb)),   S = (2/pi) asin(s),
           dS = (4/pi) / sqrt(1 + 2 (K_aa + K_bb) + 4 (K_aa K_bb - K_ab^2))   (no cancellation at large K)

rho is K_ab / sqrt(K_aa K_bb) as in :mod:`efftheory.activations`, so identical inputs get rho = 1
exactly (an ulp off would move dS by ~1e-8 through the sqrt(1 - rho) singularity), and the diagonal
is set to 1.  A zero-variance input (a zero input with C_b = 0) gets rho = 1 against everything, as
in :mod:`efftheory.activations`.  Every expression is symmetric in a <-> b, so a symmetric K gives
bitwise symmetric S and dS.
"""

from __future__ import annotations

import functools
from math import comb

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import Polynomial
from numpy.polynomial import chebyshev as cheb

__all__ = ["asin", "pair_kernel"]


@functools.lru_cache(maxsize=1)
def _asin_coefficients() -> tuple[float, ...]:
    c = np.array([comb(2 * n, n) / 4.0**n / (2 * n + 1) for n in range(1, 90)])
    s = np.cos(np.pi * (np.arange(400) + 0.5) / 400)     # Chebyshev points of [-1, 1]
    t = (s + 1.0) / 8.0                                     # ... of [0, 1/4]
    g = np.zeros_like(t)
    for cn in c[::-1]:                                      # Taylor series, converges like 4^-n here
        g = g * t + cn
    in_s = Polynomial(cheb.cheb2poly(cheb.chebfit(s, g, 12)))
    return tuple(float(v) for v in in_s(Polynomial([-1.0, 8.0])).coef)  # s = 8 t - 1


def asin(x):
    """arcsin for float64 arrays in [-1, 1] (module docstring): <= 3 ulp, fusible, no transcendentals."""
    coef = _asin_coefficients()
    a = jnp.abs(x)
    big = a > 0.5
    t = jnp.where(big, 0.5 * (1.0 - a), a * a)
    y = jnp.where(big, jnp.sqrt(t), a)
    p = coef[-1]
    for c in coef[-2::-1]:
        p = p * t + c
    r = y + y * t * p
    r = jnp.where(big, np.pi / 2 - 2.0 * r, r)
    return jnp.copysign(r, x)


def _rho(K, d_a, d_b, eye):
    """(rho, s): s = sqrt(K_aa K_bb) and rho = K_ab / s, exactly 1 on the diagonal and against a
    zero-variance input.  sqrt(fl(d d)) = d exactly, so identical inputs (and inputs scaled by a power
    of two) also get rho = +-1 exactly, as with the closed forms of :mod:`efftheory.activations`."""
    s = jnp.sqrt(d_a * d_b)
    pos = s > 0
    rho = jnp.clip(K / jnp.where(pos, s, 1.0), -1.0, 1.0)
    return jnp.where(eye | ~pos, 1.0, rho), s


def _relu(K, d_a, d_b, eye):
    rho, sab = _rho(K, d_a, d_b, eye)
    a = jnp.abs(rho)
    s = asin(rho)
    S = sab * (jnp.sqrt((1.0 - a) * (1.0 + a)) + rho * (0.5 * np.pi + s)) * (0.5 / np.pi)
    return S, 0.25 + s * (0.5 / np.pi)


def _abs(K, d_a, d_b, eye):
    rho, sab = _rho(K, d_a, d_b, eye)
    a = jnp.abs(rho)
    s = asin(rho)
    S = sab * (jnp.sqrt((1.0 - a) * (1.0 + a)) + rho * s) * (2.0 / np.pi)
    return S, s * (2.0 / np.pi)


def _erf(K, d_a, d_b, eye):
    del eye
    den = jnp.sqrt((1.0 + 2.0 * d_a) * (1.0 + 2.0 * d_b))
    s = jnp.clip(2.0 * K / den, -1.0, 1.0)
    # (1 + 2 k11)(1 + 2 k22) - 4 k12^2 written without the cancellation of its two O(K^2) terms
    # (exact on the diagonal, where k11 k22 - k12^2 = 0): matters once K >> 1e4.
    det = 1.0 + 2.0 * (d_a + d_b) + 4.0 * jnp.maximum(d_a * d_b - K * K, 0.0)
    return asin(s) * (2.0 / np.pi), (4.0 / np.pi) / jnp.sqrt(det)


def pair_kernel(act):
    """A function (K, d_a, d_b, eye) -> (S, dS) for the activation's closed forms.

    d_a, d_b broadcast the diagonal of K along rows and columns; eye marks the diagonal.  The fast kernels above for relu, abs and erf
    (recognised by their closed-form functions, not by name); the activation's own ``nngp`` and
    ``dnngp`` otherwise.
    """
    from . import activations as A

    fast = {A._relu_nngp: _relu, A._abs_nngp: _abs, A._erf_nngp: _erf}
    dfast = {A._relu_nngp: A._relu_dnngp, A._abs_nngp: A._abs_dnngp, A._erf_nngp: A._erf_dnngp}
    if act.nngp in fast and dfast[act.nngp] is act.dnngp:
        return fast[act.nngp]
    return _generic(act)


@functools.lru_cache(maxsize=64)
def _generic(act):
    def kernel(K, d_a, d_b, eye):
        del eye
        k11, k22 = jnp.broadcast_to(d_a, K.shape), jnp.broadcast_to(d_b, K.shape)
        return act.nngp(k11, k22, K), act.dnngp(k11, k22, K)

    return kernel
