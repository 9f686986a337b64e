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

Pair kernels (module :mod:`efftheory.activations` has the formulas), from K_ab and per-input quantities
(taken N times, not once per entry):

    rho = K_ab r_a r_b,   r_a = 1/sqrt(K_aa)   (0 for a zero-variance input),   set to +-1 within 2^-49 of +-1
    relu:  S  = sqrt(K_aa) sqrt(K_bb) [sqrt(1 - rho^2) + rho (pi/2 + asin rho)] / (2 pi)
           dS = 1/4 + asin(rho) / (2 pi)                                   ((pi - arccos rho)/(2 pi))
    abs:   S  = 2 sqrt(K_aa) sqrt(K_bb) [sqrt(1 - rho^2) + rho asin rho] / pi,    dS = 2 asin(rho) / pi
    erf:   s = 2 K_ab q_a q_b,   q_a = 1/sqrt(1 + 2 K_aa),   S = (2/pi) asin(s),
           dS = (4/pi) / sqrt(1 + 2 (K_aa + K_bb) + 4 (K_aa K_bb - K_ab^2))   (no cancellation at large K)

rho is computed with a multiply, not a division (one divide and one square root fewer per entry).
Identical, collinear and antiparallel inputs give |rho| within a few ulp of 1, and an ulp below 1 would
move dS by ~1e-8 through the sqrt(1 - rho) singularity, so |rho| >= 1 - 2^-49 is set to +-1 exactly
(moving a true correlation that close to 1 changes dS by at most ~1e-8, the same order as the rounding
of K itself there), and the diagonal to 1.  A zero-variance input (a zero input with C_b = 0) gets
rho = 1 against everything, as in :mod:`efftheory.activations`.  Every expression is symmetric in
a <-> b, so a symmetric K gives bitwise symmetric S and dS.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from math import comb

import jax.numpy as jnp
import numpy as np
from numpy.polynomial import Polynomial
from numpy.polynomial import chebyshev as cheb

__all__ = ["asin", "pair_kernel", "PairKernel"]


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
    y = jnp.where(big, jnp.sqrt(jnp.where(big, t, 1.0)), a)  # (inner select: finite reverse-mode gradients at x = 0)
    p = coef[-1]
    for c in coef[-2::-1]:
        p = p * t + c
    r = y + y * t * p
    r = jnp.where(big, np.pi / 2 - 2.0 * r, r)
    return jnp.copysign(r, x)


# rho computed as K_ab r_a r_b (r = 1/sqrt(K_aa), per input) is within a few ulp of +-1 for identical,
# collinear and antiparallel inputs; entries within _SNAP of +-1 are set to +-1 exactly.
_SNAP = 1.0 - 2.0**-49


def _sqrt_prep(d):
    """Per input: (sqrt(K_aa), 1/sqrt(K_aa)), the latter 0 for a zero-variance input."""
    sq = jnp.sqrt(d)
    return sq, jnp.where(d > 0, 1.0 / jnp.where(d > 0, sq, 1.0), 0.0)


def _rho(K, a, b, eye):
    """(rho, s): s = sqrt(K_aa K_bb) and rho = K_ab / s, exactly 1 on the diagonal and against a
    zero-variance input, exactly +-1 for identical, collinear and antiparallel inputs."""
    (sq_a, r_a), (sq_b, r_b) = a, b
    rr = r_a * r_b
    rho = K * rr
    # (selects rather than clip and sign: XLA's CPU sign does not vectorise; measured 2x on the whole step)
    rho = jnp.where(rho >= _SNAP, 1.0, jnp.where(rho <= -_SNAP, -1.0, rho))
    return jnp.where(eye | (rr == 0.0), 1.0, rho), sq_a * sq_b


def _relu(K, a, b, eye):
    rho, sab = _rho(K, a, b, eye)
    r = jnp.abs(rho)
    s = asin(rho)
    S = sab * (jnp.sqrt((1.0 - r) * (1.0 + r)) + rho * (0.5 * np.pi + s)) * (0.5 / np.pi)
    return S, 0.25 + s * (0.5 / np.pi)


def _abs(K, a, b, eye):
    rho, sab = _rho(K, a, b, eye)
    r = jnp.abs(rho)
    s = asin(rho)
    S = sab * (jnp.sqrt((1.0 - r) * (1.0 + r)) + rho * s) * (2.0 / np.pi)
    return S, s * (2.0 / np.pi)


def _erf_prep(d):
    """Per input: (K_aa, 1/sqrt(1 + 2 K_aa))."""
    return d, 1.0 / jnp.sqrt(1.0 + 2.0 * d)


def _erf(K, a, b, eye):
    del eye
    (d_a, q_a), (d_b, q_b) = a, b
    s = jnp.clip(2.0 * K * (q_a * q_b), -1.0, 1.0)
    # (1 + 2 k11)(1 + 2 k22) - 4 k12^2 written without the cancellation of its two O(K^2) terms
    # (exact on the diagonal, where k11 k22 - k12^2 = 0): matters once K >> 1e4.
    det = 1.0 + 2.0 * (d_a + d_b) + 4.0 * jnp.maximum(d_a * d_b - K * K, 0.0)
    return asin(s) * (2.0 / np.pi), (4.0 / np.pi) / jnp.sqrt(det)


def _diagonal_only(d):
    return (d,)


@dataclasses.dataclass(frozen=True)
class PairKernel:
    """(S, dS) of a closed form from K and per-input quantities.

    ``prep(d)`` maps the diagonal (N,) to a tuple of per-input arrays (square roots and the like, taken
    N times rather than once per entry); ``fn(K, a, b, eye)`` takes them broadcast along rows (a) and
    columns (b), and eye marks the diagonal.  Calling the kernel with (K, d_a, d_b, eye) applies prep
    to the broadcast diagonals itself.
    """

    fn: Callable
    prep: Callable = _diagonal_only

    def __call__(self, K, d_a, d_b, eye):
        return self.fn(K, self.prep(d_a), self.prep(d_b), eye)


def pair_kernel(act) -> PairKernel:
    """The :class:`PairKernel` of an activation with closed forms: the fast kernels above for relu, abs
    and erf (recognised by their closed-form functions, not by name), the activation's own ``nngp``
    and ``dnngp`` otherwise."""
    from .. import activations as A

    fast = {A.relu_nngp: (_relu, _sqrt_prep), A.abs_nngp: (_abs, _sqrt_prep), A.erf_nngp: (_erf, _erf_prep)}
    dfast = {A.relu_nngp: A.relu_dnngp, A.abs_nngp: A.abs_dnngp, A.erf_nngp: A.erf_dnngp}
    if act.nngp in fast and dfast[act.nngp] is act.dnngp:
        return PairKernel(*fast[act.nngp])
    return _generic(act)


@functools.lru_cache(maxsize=64)
def _generic(act) -> PairKernel:
    def kernel(K, a, b, eye):
        del eye
        k11, k22 = jnp.broadcast_to(a[0], K.shape), jnp.broadcast_to(b[0], K.shape)
        return act.nngp(k11, k22, K), act.dnngp(k11, k22, K)

    return PairKernel(kernel)
