r"""Criticality: susceptibilities, fixed points, critical initialization, universality classes.

Single-input recursion K -> C_b + C_W <sigma^2>_K (docs/theory.md).  Its susceptibilities are

    chi_parallel(K) = C_W d<sigma^2>_K / dK = (C_W / K) <sigma(z) sigma'(z) z>_K     (PDLT 5.9)
    chi_perp(K)     = C_W <sigma'(z)^2>_K                                           (PDLT 5.10)

(the middle form is rewritten with one derivative of sigma only, z = sqrt(K) u; at K = 0 the
limit C_W [sigma'(0)^2 + sigma(0) sigma''(0)] is used).  Criticality: chi_parallel = chi_perp = 1
at a fixed point K* = C_b + C_W <sigma^2>_{K*} (PDLT ch. 5).

Universality classes (how :func:`critical_init` decides, in this order):

* ``scale-invariant``: sigma(lam z) = lam sigma(z) for lam > 0 (relu, leaky_relu, abs, linear).
  chi's do not depend on K; C_b = 0, C_W = 1 / <sigma'^2>; every K is a fixed point (K* = None).
* ``K*=0``: sigma(0) = 0, sigma'(0) != 0 and C_W <sigma^2>_K = K + a_1 K^2 + ... with a_1 < 0
  at C_W = 1/sigma'(0)^2 (tanh, erf, sin; a_1 = -2 for tanh).  C_b = 0, K* = 0.
* ``half-stable``: a root K* > 0 of chi_parallel(K) = chi_perp(K) (i.e. <sigma sigma''>_K = 0) with
  C_W = 1/<sigma'^2>_{K*} and C_b = K* - C_W <sigma^2>_{K*} >= 0 (silu/swish, gelu).
* ``none``: no critical initialization exists (sigmoid, softplus); C_b, C_W, K* are NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import brentq

from .. import _validate
from .._pytree import result
from ..activations import get_activation
from ..gaussian import derivative, expect1, rule_size

__all__ = ["Criticality", "chi_parallel", "chi_perp", "fixed_point", "critical_init",
           "universality_class"]



def _variance(name, K):
    K = _validate.real_array(name, K, what="a variance or an array of variances K >= 0", finite=False)
    if K.size == 0:
        raise ValueError(f"{name}: expected at least one variance, got an empty array of shape {K.shape}")
    if not np.all(np.isfinite(K)) or np.any(K < 0):
        raise ValueError(f"{name}: expected finite variance(s) K >= 0, got {K}")
    return K


@functools.partial(jax.jit, static_argnums=(0, 2))
def _moments_jit(fn, K, order):
    """(<sigma^2>_K, d<sigma^2>_K/dK, <sigma'^2>_K) for an array of variances K > 0."""
    ds = derivative(fn)
    sig2 = expect1(lambda z: fn(z) ** 2, K, order=order)
    dsig2 = expect1(lambda z: fn(z) * ds(z) * z, K, order=order) / jnp.where(K > 0, K, 1.0)
    dd = expect1(lambda z: ds(z) ** 2, K, order=order)
    z0 = jnp.zeros(())
    lim = ds(z0) ** 2 + fn(z0) * jax.grad(jax.grad(fn))(z0)  # K -> 0 limit of d<sigma^2>/dK
    return sig2, jnp.where(K > 0, dsig2, lim), dd


def _moments(act, K):
    K = jnp.asarray(K, dtype=jnp.float64)
    return _moments_jit(act.fn, K, rule_size(act, float(jnp.max(K))))


def _dsig2_dK(act, K):
    return _moments(act, K)[1]


def chi_parallel(activation, K, C_W=1.0):
    """Parallel susceptibility C_W d<sigma^2>_K/dK at variance(s) K (PDLT eq. 5.9)."""
    act = get_activation(activation)
    K = _variance("K", K)
    C_W = _validate.real("C_W", C_W, positive=True)
    return np.asarray(C_W * _dsig2_dK(act, K))


def chi_perp(activation, K, C_W=1.0):
    """Perpendicular susceptibility C_W <sigma'(z)^2>_K (PDLT eq. 5.10)."""
    act = get_activation(activation)
    K = _variance("K", K)
    C_W = _validate.real("C_W", C_W, positive=True)
    return np.asarray(C_W * _moments(act, K)[2])


def _sig2(act, K):
    return float(_moments(act, float(K))[0])


def fixed_point(activation, C_W, C_b, *, K0=1.0):
    """The fixed point K* = C_b + C_W <sigma^2>_{K*} that the recursion flows to from K0.

    g(K) = C_b + C_W <sigma^2>_K - K is scanned on a logarithmic grid: from K0 the flow goes up
    while g > 0 and down while g < 0, so K* is the first sign change of g in that direction,
    refined by Brent's method.  Returns ``inf`` when the flow grows without bound and 0 when it
    decays to K* = 0 (for the K*=0 class at criticality the approach is a power law).
    """
    act = get_activation(activation)
    C_W = _validate.real("C_W", C_W, positive=True)
    C_b = _validate.real("C_b", C_b, nonnegative=True)
    K0 = _validate.real("K0", K0, positive=True)

    def g(K):
        return C_b + C_W * _sig2(act, K) - K

    g0 = g(K0)
    if g0 == 0.0:
        return K0
    if g0 > 0:
        grid = K0 * np.geomspace(1.0, 1e10, 201)[1:]
    else:
        grid = K0 * np.geomspace(1.0, 1e-12, 241)[1:]
    prev = K0
    for K in grid:
        gK = g(K)
        if not math.isfinite(gK):
            return math.inf
        if np.sign(gK) != np.sign(g0):
            lo, hi = sorted((prev, K))
            return brentq(g, lo, hi, xtol=1e-15, rtol=1e-14)
        prev = K
    return math.inf if g0 > 0 else 0.0


@result(meta=("activation", "universality_class"))
class Criticality:
    """Critical initialization of an activation.

    Unpacks as ``C_b, C_W = critical_init(...)``.  ``K_star`` is None for the scale-invariant
    class (every K is a fixed point) and NaN together with C_b, C_W for class ``none``.
    """

    C_b: float
    C_W: float
    K_star: float | None
    activation: str
    universality_class: str

    def __iter__(self):
        return iter((self.C_b, self.C_W))

    def chi_parallel(self, K):
        return chi_parallel(self.activation, K, self.C_W)

    def chi_perp(self, K):
        return chi_perp(self.activation, K, self.C_W)


def critical_init(activation) -> Criticality:
    """(C_b, C_W) at criticality for any activation, with its universality class (PDLT ch. 5).

    Closed values: relu (0, 2), tanh (0, 1); others are found numerically (see module docstring).
    """
    act = get_activation(activation)
    name = activation if isinstance(activation, str) else act
    s, ds = act.fn, derivative(act.fn)
    if act.homogeneous:
        C_W = 1.0 / float(chi_perp(act, 1.0, 1.0))
        return Criticality(0.0, C_W, None, name, "scale-invariant")
    z0 = jnp.zeros(())
    s0, d0 = float(s(z0)), float(ds(z0))
    if abs(s0) < 1e-12 and abs(d0) > 1e-12:
        C_W = 1.0 / d0**2
        d4 = float(jax.grad(jax.grad(jax.grad(jax.grad(lambda z: act.fn(z) ** 2))))(z0))
        a1 = C_W * d4 / 8.0  # C_W <sigma^2>_K = K + a1 K^2 + O(K^3)
        if a1 < 0:
            return Criticality(0.0, C_W, 0.0, name, "K*=0")
    # half-stable: roots of chi_parallel(K) = chi_perp(K) at K > 0 with C_b >= 0
    grid = np.geomspace(1e-3, 1e3, 241)
    _, d_par, d_perp = _moments(act, grid)
    h = np.asarray(d_par - d_perp)
    for i in range(len(grid) - 1):
        if np.sign(h[i]) != np.sign(h[i + 1]) and np.isfinite(h[i]) and np.isfinite(h[i + 1]):
            def g(K):
                _, a, b = _moments(act, K)
                return float(a - b)
            K_star = brentq(g, grid[i], grid[i + 1], xtol=1e-14, rtol=1e-14)
            C_W = 1.0 / float(chi_perp(act, K_star, 1.0))
            C_b = K_star - C_W * _sig2(act, K_star)
            if C_b >= -1e-12:
                return Criticality(max(C_b, 0.0), C_W, K_star, name, "half-stable")
    nan = float("nan")
    return Criticality(nan, nan, nan, name, "none")


def universality_class(activation) -> str:
    """The universality class name of :func:`critical_init` for ``activation``."""
    return critical_init(activation).universality_class
