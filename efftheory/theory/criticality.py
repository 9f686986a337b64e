r"""Criticality: susceptibilities, fixed points, critical initialization, universality classes.

Single-input recursion K -> C_b + C_W <sigma^2>_K (docs/theory.md).  Its susceptibilities are

    chi_parallel(K) = C_W d<sigma^2>_K / dK = (C_W / K) <sigma(z) sigma'(z) z>_K     (PDLT 5.9)
    chi_perp(K)     = C_W <sigma'(z)^2>_K                                           (PDLT 5.10)

(the middle form is rewritten with one derivative of sigma only, z = sqrt(K) u).  At K = 0 both
are the limits K -> 0+: C_W [sigma'(0)^2 + sigma(0) sigma''(0)] and C_W sigma'(0)^2, with sigma'
and sigma'' averaged over the two sides of z = 0 (a kink at 0 has two one-sided slopes).
Criticality: chi_parallel = chi_perp = 1 at a fixed point K* = C_b + C_W <sigma^2>_{K*} (PDLT ch. 5).

Residual MLPs (docs/theory.md, "Residual MLPs"; keywords ``skip`` = xi, ``branch`` = gamma, defaults 0 and 1)
iterate K -> xi^2 K + gamma^2 (C_b + C_W <sigma^2>_K), whose susceptibilities and fixed points are

    chi_parallel = xi^2 + gamma^2 C_W d<sigma^2>_K/dK,    chi_perp = xi^2 + gamma^2 C_W <sigma'^2>_K,
    (1 - xi^2) K* = gamma^2 (C_b + C_W <sigma^2>_{K*}).

For xi^2 < 1 that is the plain map's fixed-point equation at (C_b, C_W) gamma^2 / (1 - xi^2), and the
residual chi - 1 is (1 - xi^2) times the plain one's there: the same fixed points, kinds and flow
direction.  Hence the residual critical initialization is the plain one scaled by (1 - xi^2) / gamma^2
(the same K*), and on the family xi^2 + gamma^2 = 1 it equals the plain one.  For xi^2 >= 1 the map grows
without bound (chi >= 1 + gamma^2 C_W <sigma'^2> > 1): no fixed point K* > 0 and no critical initialization.

Universality classes (how :func:`critical_init` decides, in this order):

* ``scale-invariant``: sigma(lam z) = lam sigma(z) for lam > 0, i.e. sigma(z) = c+ z above 0 and
  c- z below (relu: c- = 0; leaky_relu(a): c- = a; abs: c- = -1; linear: c- = 1).  In closed form,
  for every K >= 0 (K = 0 as the limit from above),

      <sigma^2>_K = m K,   chi_parallel = chi_perp = C_W m,   m = (c+^2 + c-^2) / 2,

  with c+ = sigma(1), c- = -sigma(-1).  The critical line is C_b = 0, C_W = 1/m exactly (relu 2,
  leaky_relu(a) 2/(1 + a^2), abs and linear 1); on it the map is the identity, every K is a fixed
  point: ``K_star`` is None and ``marginal_line`` is True.
* ``K*=0``: sigma(0) = 0, sigma'(0) != 0 and C_W <sigma^2>_K = K + a_1 K^2 + ... with a_1 < 0
  at C_W = 1/sigma'(0)^2 (tanh, erf, sin; a_1 = -2 for tanh).  C_b = 0, K* = 0.
* ``half-stable``: a root K* > 0 of chi_parallel(K) = chi_perp(K) (i.e. <sigma sigma''>_K = 0) with
  C_W = 1/<sigma'^2>_{K*} and C_b = K* - C_W <sigma^2>_{K*} >= 0 (silu/swish, gelu).
* ``none``: no critical initialization exists (sigmoid, softplus); C_b, C_W, K* are NaN.

Quadrature.  The scale-invariant class is in closed form.  Other activations use the trapezoid rule
of :mod:`efftheory.gaussian` while its node count stays below its cap (K up to ~3.4e3 for smooth
sigma); beyond, its step no longer resolves sigma's own scale (|z| ~ 1), and a sinh-mapped trapezoid
rule is used instead (:func:`_sinh_moments`: z = A sinh t, dense where sigma bends, sparse in the
Gaussian's bulk; 512 nodes at K = 2e10, 1e-15 against adaptive quadrature for tanh, gelu, silu,
softplus and sigmoid from K = 1e-8 to 2e10).  Its own error estimate (halving the step) decides: where it is above 1e-12
(oscillating sigma such as sin, kinked user callables), the capped rule is kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq, minimize_scalar

from .. import _validate
from .._pytree import result
from ..activations import Activation, get_activation
from ..gaussian import derivative, expect1, nodes_for, rule_size

__all__ = ["Criticality", "FixedPoint", "chi_parallel", "chi_perp", "fixed_point", "critical_init",
           "universality_class"]

#: |chi - 1| below this counts as chi = 1 for the scale-invariant class (absorbs the rounding of C_W).
MARGINAL_TOL = 1e-14
#: The flow's scan of K stops here: a flow still growing at K = 1e300 is reported as K* = inf.
K_TOP = 1e300
_H = 0.1            # step of the sinh-mapped rule in t
_SINH_RTOL = 1e-12  # accepted error estimate of the sinh-mapped rule
_EPS0 = 1e-20       # one-sided offsets for the K -> 0+ limits


def _variance(name, K):
    K = _validate.real_array(name, K, what="a variance or an array of variances K >= 0", finite=False)
    if K.size == 0:
        raise ValueError(f"{name}: expected at least one variance, got an empty array of shape {K.shape}")
    if not np.all(np.isfinite(K)) or np.any(K < 0):
        raise ValueError(f"{name}: expected finite variance(s) K >= 0, got {K}")
    return K


# ------------------------------------------------------------------------------------------ moments
@functools.lru_cache(maxsize=256)
def _homogeneous_m(fn) -> float:
    """m = (c+^2 + c-^2)/2 = (sigma(1)^2 + sigma(-1)^2)/2 of a positively homogeneous sigma."""
    s = np.asarray(fn(jnp.asarray([1.0, -1.0], dtype=jnp.float64)), dtype=np.float64)
    return float((s[0] * s[0] + s[1] * s[1]) / 2)


def _limits0(fn):
    """K -> 0+ limits of (d<sigma^2>/dK, <sigma'^2>): sigma', sigma'' averaged over z = +-1e-20."""
    ds = derivative(fn)
    dds = derivative(ds)
    e = jnp.asarray([_EPS0, -_EPS0], dtype=jnp.float64)
    d1, d2 = ds(e), dds(e)
    dd0 = jnp.mean(d1 * d1)
    return dd0 + fn(jnp.zeros((), jnp.float64)) * jnp.mean(d2), dd0


@functools.partial(jax.jit, static_argnums=(0, 2))
def _moments_jit(fn, K, order):
    """(<sigma^2>_K, d<sigma^2>_K/dK, <sigma'^2>_K) for an array of variances K >= 0 (efftheory.gaussian._rules)."""
    ds = derivative(fn)
    sig2 = expect1(lambda z: fn(z) ** 2, K, order=order)
    dsig2 = expect1(lambda z: fn(z) * ds(z) * z, K, order=order) / jnp.where(K > 0, K, 1.0)
    dd = expect1(lambda z: ds(z) ** 2, K, order=order)
    lim, dd0 = _limits0(fn)
    return sig2, jnp.where(K > 0, dsig2, lim), jnp.where(K > 0, dd, dd0)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _sinh_jit(fn, K, n, h, a0):
    r"""The three moments by a sinh-mapped trapezoid rule, for an array of variances K > 0.

    z = A sinh t on t_j = (j - n/2 + 1/2) h, A = min(sqrt K, a0): the z-spacing is ~A h near z = 0
    (sigma's own scale a0) and ~|z| h in the Gaussian's bulk, so a few hundred nodes serve any K.
    Weights exp(-z^2/2K) dz/dt, normalised to sum to one (in logarithms: no overflow at K = 1e300).
    The integrand is analytic in |Im t| < pi/4 when sigma is analytic in a strip |Im z| < a0 and does
    not grow faster than the Gaussian decays there: error ~ exp(-2 pi (pi/4) / h).
    """
    ds = derivative(fn)
    t = (jnp.arange(n) - n / 2 + 0.5) * h
    sq = jnp.sqrt(K)[:, None]
    A = jnp.minimum(sq, a0)
    at = jnp.abs(t)
    # log sinh|t| and log cosh t, stable for |t| up to ~700
    log_sinh = at + jnp.log(-jnp.expm1(-2 * at)) - math.log(2.0)
    log_cosh = at + jnp.log1p(jnp.exp(-2 * at)) - math.log(2.0)
    log_u = jnp.log(A / sq) + log_sinh                      # |z| / sqrt(K)
    logw = -0.5 * jnp.exp(2 * log_u) + log_cosh
    logw = logw - jnp.max(logw, axis=-1, keepdims=True)
    w = jnp.exp(logw)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    z = jnp.sign(t) * jnp.exp(jnp.log(A) + log_sinh)
    live = w > 0
    zs = jnp.where(live, z, 0.0)                            # no inf * 0 where sigma overflows

    def avg(f):
        return jnp.sum(jnp.where(live, f(zs), 0.0) * w, axis=-1)

    sig2 = avg(lambda u: fn(u) ** 2)
    dsig2 = avg(lambda u: fn(u) * ds(u) * u) / K
    dd = avg(lambda u: ds(u) ** 2)
    return sig2, dsig2, dd


_SINH_LADDER = (128, 256, 512, 1024, 2048, 4096, 8192)


def _builtin(act) -> bool:
    try:
        return get_activation(act.name) is act
    except ValueError:
        return False


def _sinh_moments(act, K):
    """The three moments by :func:`_sinh_jit` at steps h and h/2, with the relative difference."""
    a0 = 1.0 if _builtin(act) else min(1.0, float(act.strip))  # built-ins: strip pi/2 (activations.py)
    T = math.asinh(10.0 * max(1.0, math.sqrt(float(np.max(K))) / a0)) + 1.0
    n = 2 * math.ceil(T / _H)
    n = next((m for m in _SINH_LADDER if m >= n), n)
    Kj = jnp.asarray(_padded(K), dtype=jnp.float64)
    coarse = _sinh_jit(act.fn, Kj, n, _H, a0)
    fine = _sinh_jit(act.fn, Kj, 2 * n, _H / 2, a0)
    err = np.zeros(np.shape(K))
    fine = [np.asarray(f)[:len(K)] for f in fine]
    for c, f in zip(coarse, fine):
        c = np.asarray(c)[:len(K)]
        with np.errstate(invalid="ignore", divide="ignore"):
            e = np.abs(c - f) / np.maximum(np.abs(f), 1e-300)
        err = np.maximum(err, np.where(np.isfinite(e), e, np.inf))
    return tuple(fine), err


def _padded(K):
    """K (1-d) padded with its last value to a power-of-two length: the jitted rules compile per shape."""
    n = 1 << max(0, (len(K) - 1).bit_length())
    return np.concatenate([K, np.full(n - len(K), K[-1])])


def _moments(act, K):
    """(<sigma^2>_K, d<sigma^2>_K/dK, <sigma'^2>_K) on variances K >= 0 (any shape), as float64 arrays."""
    K = np.asarray(K, dtype=np.float64)
    if act.homogeneous:
        m = _homogeneous_m(act.fn)
        return m * K, np.full(K.shape, m), np.full(K.shape, m)
    flat = K.reshape(-1)
    out = [np.empty(flat.shape) for _ in range(3)]
    capped = np.array([act.smooth and k > 0 and nodes_for(k, cap=1 << 40) > nodes_for(k) for k in flat], bool)
    plain = ~capped
    if capped.any():
        vals, err = _sinh_moments(act, flat[capped])
        ok = err <= _SINH_RTOL
        idx = np.nonzero(capped)[0]
        for o, v in zip(out, vals):
            o[idx[ok]] = v[ok]
        plain[idx[~ok]] = True
    if plain.any():
        Kp = flat[plain]
        vals = _moments_jit(act.fn, jnp.asarray(_padded(Kp)), rule_size(act, float(np.max(Kp))))
        for o, v in zip(out, vals):
            o[plain] = np.asarray(v)[:len(Kp)]
    return tuple(o.reshape(K.shape) for o in out)


def _dsig2_dK(act, K):
    return _moments(act, K)[1]


def _residual_args(skip, branch):
    """Validated (xi, gamma) and whether they are the plain MLP's (0, 1) as numbers."""
    xi = _validate.real("skip", skip)
    gamma = _validate.real("branch", branch, positive=True)
    plain = not (_validate._tracer(xi) or _validate._tracer(gamma)) and xi == 0.0 and gamma == 1.0
    return xi, gamma, plain


def _residual_chi(chi, xi, gamma):
    """xi^2 + gamma^2 chi: a residual layer's susceptibility from the plain one's at C_W."""
    return xi * xi + gamma * gamma * chi


def chi_parallel(activation: str | Activation | Callable, K: ArrayLike, C_W: ArrayLike = 1.0, *,
                 skip: ArrayLike = 0.0, branch: ArrayLike = 1.0) -> jax.Array:
    """Parallel susceptibility C_W d<sigma^2>_K/dK at variance(s) K (PDLT eq. 5.9).

    With ``skip`` = xi and ``branch`` = gamma, that of a residual layer: xi^2 + gamma^2 C_W d<sigma^2>_K/dK
    (docs/theory.md, "Residual MLPs"; the defaults 0 and 1 give the plain value).
    K = 0 gives the limit K -> 0+ (for relu, C_W/2: the value at every K > 0).
    A JAX function of K, C_W, skip and branch: under jax.jit / vmap / grad (traced values) it runs the fixed
    rule of :func:`efftheory.theory._traced.chi` (closed form for the scale-invariant class; 4096
    trapezoid nodes otherwise, 1e-13 for smooth sigma up to K ~ 3000) and checks shapes only.
    """
    from . import _traced

    act = _traced.activation(activation)
    xi, gamma, plain = _residual_args(skip, branch)
    if _traced.traced(K, C_W, xi, gamma):
        chi = _traced.chi_checked("chi_parallel", act, K, C_W, "parallel")
        return chi if plain else _residual_chi(chi, xi, gamma)
    K = _variance("K", K)
    C_W = _validate.real("C_W", C_W, positive=True)
    chi = np.asarray(C_W * _dsig2_dK(act, K))
    return chi if plain else np.asarray(_residual_chi(chi, xi, gamma))


def chi_perp(activation: str | Activation | Callable, K: ArrayLike, C_W: ArrayLike = 1.0, *,
             skip: ArrayLike = 0.0, branch: ArrayLike = 1.0) -> jax.Array:
    """Perpendicular susceptibility C_W <sigma'(z)^2>_K (PDLT eq. 5.10); K = 0 gives the limit K -> 0+.

    With ``skip`` = xi and ``branch`` = gamma: xi^2 + gamma^2 C_W <sigma'^2>_K (a residual layer).
    A JAX function of K, C_W, skip and branch under jax.jit / vmap / grad, as :func:`chi_parallel`."""
    from . import _traced

    act = _traced.activation(activation)
    xi, gamma, plain = _residual_args(skip, branch)
    if _traced.traced(K, C_W, xi, gamma):
        chi = _traced.chi_checked("chi_perp", act, K, C_W, "perp")
        return chi if plain else _residual_chi(chi, xi, gamma)
    K = _variance("K", K)
    C_W = _validate.real("C_W", C_W, positive=True)
    chi = np.asarray(C_W * _moments(act, K)[2])
    return chi if plain else np.asarray(_residual_chi(chi, xi, gamma))


def _sig2(act, K):
    return float(_moments(act, float(K))[0])


# ------------------------------------------------------------------------------------------ fixed points
class FixedPoint(float):
    """A fixed point K* of K -> C_b + C_W <sigma^2>_K: a float (K* itself), with what kind it is.

    Attributes:
      kind: ``"trivial"`` (K* = 0: the flow decays to zero; at chi_parallel = 1, tanh at C_W = 1, the
        approach is a power law), ``"stable"`` (0 < K* < inf, chi_parallel(K*) < 1: the flow converges
        to it exponentially), ``"marginal"`` (chi_parallel(K*) = 1: the scale-invariant class on its
        critical line, where every K is a fixed point and K* is the starting K0, or a half-stable
        point such as gelu's at its critical initialization), ``"unstable"`` (K0 itself is a fixed
        point with chi_parallel > 1: the flow stays there only unperturbed), ``"divergent"`` (K* =
        inf: the flow grows without bound).
      chi_parallel, chi_perp: the susceptibilities at K* (K = 0: the limit from above; for the
        scale-invariant class the K-independent value C_W (c+^2 + c-^2)/2 even when K* = inf; NaN at
        K* = inf otherwise).
      marginal_line: True when every K is a fixed point (scale-invariant class, C_b = 0, chi = 1).

    Arithmetic, comparisons, ``float()``, ``str()`` and JSON see the number only.
    """

    KINDS = ("trivial", "stable", "marginal", "unstable", "divergent")

    def __new__(cls, K_star, kind, chi_parallel, chi_perp, marginal_line=False):
        if kind not in cls.KINDS:
            raise ValueError(f"kind: expected one of {', '.join(cls.KINDS)}, got {kind!r}")
        self = super().__new__(cls, K_star)
        self.kind = kind
        self.chi_parallel = float(chi_parallel)
        self.chi_perp = float(chi_perp)
        self.marginal_line = bool(marginal_line)
        return self

    @property
    def K_star(self) -> float:
        return float(self)

    def __reduce__(self):
        return (FixedPoint, (float(self), self.kind, self.chi_parallel, self.chi_perp, self.marginal_line))

    def __repr__(self):
        line = ", marginal_line=True" if self.marginal_line else ""
        return (f"FixedPoint(K_star={float(self)!r}, kind={self.kind!r}, chi_parallel={self.chi_parallel:.6g}, "
                f"chi_perp={self.chi_perp:.6g}{line})")

    __str__ = float.__repr__


#: chi_parallel within this of 1 at a root found by the scan counts as marginal (half-stable point).
HALF_STABLE_TOL = 1e-8
#: A minimum of |g| below this times max(K, C_b) where g does not change sign is a tangency: a
#: half-stable fixed point (g = C_b + C_W <sigma^2>_K - K; the quadrature's error is ~1e-14 K).
TOUCH_RTOL = 1e-12
#: |g(K0)| below this times max(K0, C_b): the starting K0 is itself a fixed point.
START_RTOL = 1e-14
_CHUNK = 200  # grid points per evaluation of the scan: 10 decades
_REFINE = 100  # points of the finer walk through a bracket of the coarse grid


def _walk(chunks, v, prev):
    """Walk the flow's grid (arrays of K in flow order) with v(K) = |g| oriented (> 0 until g changes sign).

    A resumable generator of events: ("touch", prev2, here, next) at a local minimum of v (a candidate
    tangency: a half-stable fixed point), then ("cross", (K, v) before, (K, v) after) at the first sign
    change, or ("inf",) where g stops being finite.  ``prev``: the (K, v) points already walked, last last.
    """
    prev = list(prev)
    for grid in chunks:
        vs = v(grid)
        for K, vK in zip(np.asarray(grid, dtype=np.float64).tolist(), np.asarray(vs).tolist()):
            if K == prev[-1][0]:
                continue
            if not math.isfinite(vK):
                yield ("inf",)
                return
            if vK <= 0:
                yield ("cross", prev[-1], (K, vK))
                return
            if len(prev) >= 2 and prev[-1][1] < prev[-2][1] and prev[-1][1] <= vK:
                yield ("touch", prev[-2], prev[-1], (K, vK))
            prev = [prev[-1], (K, vK)]


def _locate(events, v, tol, depth=0):
    """Resolve the events of :func:`_walk`: (K, how) with how "cross" (a root of g), "touch" (a tangency
    within ``tol``), "inf" (g not finite) or None (the grid ended first)."""
    for ev in events:
        if ev[0] == "inf":
            return math.inf, "inf"
        if ev[0] == "touch":
            lo, hi = sorted((ev[1][0], ev[3][0]))
            res = minimize_scalar(lambda k: float(v(np.asarray([k]))[0]), bounds=(lo, hi), method="bounded",
                                  options={"xatol": 1e-10 * hi})
            Kt = float(res.x)
            vt = float(v(np.asarray([Kt]))[0])
            if abs(vt) <= tol(Kt):
                return Kt, "touch"
            if vt < 0:  # a crossing that the grid stepped over, between the walk's last point and Kt
                return _root(v, ev[1][0], Kt), "cross"
            continue  # no: the flow passes (slowly) and goes on
        (a, va), (b, vb) = ev[1], ev[2]
        if vb == 0:
            return b, "cross"
        if depth < 2:  # walk the bracket on a finer grid: a tangency may sit just before the crossing
            fine = np.geomspace(a, b, _REFINE + 1)[1:]
            return _locate(_walk([fine], v, [(a, va)]), v, tol, depth + 1)
        return _root(v, a, b), "cross"
    return None, None


def _root(v, a, b):
    lo, hi = sorted((a, b))
    return brentq(lambda k: float(v(np.asarray([k]))[0]), lo, hi, xtol=max(1e-300, 1e-15 * lo), rtol=1e-14,
                  maxiter=500)


def fixed_point(activation: str | Activation | Callable, C_W: float, C_b: float, *, K0: float = 1.0,
                skip: float = 0.0, branch: float = 1.0) -> FixedPoint:
    """The fixed point K* = C_b + C_W <sigma^2>_{K*} that the recursion reaches from K0 (PDLT ch. 5).

    Returns a :class:`FixedPoint`: a float K* that says what kind of fixed point it is.

    Residual layers (``skip`` = xi, ``branch`` = gamma; docs/theory.md, "Residual MLPs"): the fixed point of
    K -> xi^2 K + gamma^2 (C_b + C_W <sigma^2>_K), (1 - xi^2) K* = gamma^2 (C_b + C_W <sigma^2>_{K*}).  For
    xi^2 < 1 it is the plain fixed point at (C_b, C_W) gamma^2 / (1 - xi^2) (module docstring: same K*, kind
    and flow), with chi_parallel, chi_perp the residual ones xi^2 + gamma^2 chi; for xi^2 >= 1 the flow
    grows without bound (``"divergent"``, K* = inf).

    * Scale-invariant class (<sigma^2>_K = m K): in closed form with chi = C_W m.  C_b = 0: K* = 0
      (``"trivial"``) for chi < 1, inf (``"divergent"``; 0 is then an unstable fixed point) for chi > 1,
      and for chi = 1 (within 1e-14, the rounding of C_W) every K is a fixed point: K* = K0,
      ``"marginal"``, ``marginal_line=True``.  C_b > 0: K* = C_b / (1 - chi) (``"stable"``) for chi < 1,
      inf otherwise.
    * Otherwise g(K) = C_b + C_W <sigma^2>_K - K is scanned on a logarithmic grid (20 points per
      decade over 10 decades from K0, then one per 10 decades; each bracket walked again on 100 finer
      points, twice): from K0 the flow goes up while
      g > 0 and down while g < 0, so K* is the first sign change of g in that direction, refined by
      Brent's method (``"stable"``; ``"marginal"`` where |chi_parallel(K*) - 1| < 1e-8), or a
      tangency before it: a local minimum of |g| below 1e-12 max(K, C_b), where the flow stops with a
      power-law approach (``"marginal"``, chi_parallel = 1: gelu and silu at their critical
      initialization, refined as the root of chi_parallel - 1).  Upwards the scan runs to K = 1e300
      and returns inf (``"divergent"``) when g is still positive there, or stops being finite.
      Downwards it runs to the first sign change when g(0) = C_b + C_W sigma(0)^2 > 0 (then K* > 0
      exists), and otherwise to K0 1e-12 and returns 0.0 (``"trivial"``: e.g. tanh at C_b = 0,
      C_W <= 1; at C_W = 1 the approach is a power law, K^(l) ~ 1/(2 l)).  When K0 is itself a fixed
      point (|g(K0)| <= 1e-14 max(K0, C_b)) it is returned, ``"stable"``, ``"marginal"`` or
      ``"unstable"`` by chi_parallel(K0): the only way to get an unstable K*, since the flow leaves
      those (e.g. K = 0 for tanh at C_W > 1, or gelu's lower root at C_b slightly above critical).

    tanh at C_b = 0, C_W = 1.5 starting anywhere above 0: K* = 0.2869 ``"stable"`` (K = 0 is an
    unstable fixed point the flow leaves).  Large K* are found wherever they are (tanh at C_W = 2e10:
    K* = 1.99999e10, from K = C_W (1 - <sech^2>_K)).
    """
    act = get_activation(activation)
    C_W = _validate.real("C_W", C_W, positive=True)
    C_b = _validate.real("C_b", C_b, nonnegative=True)
    K0 = _validate.real("K0", K0, positive=True)
    xi, gamma, plain = _residual_args(skip, branch)
    if not plain:
        if xi * xi >= 1.0:
            chi = C_W * _homogeneous_m(act.fn) if act.homogeneous else math.nan
            return FixedPoint(math.inf, "divergent", _residual_chi(chi, xi, gamma), _residual_chi(chi, xi, gamma))
        s = gamma * gamma / (1.0 - xi * xi)
        fp = fixed_point(act, s * C_W, s * C_b, K0=K0)
        # chi' = s chi(C_W) there: the residual chi = xi^2 + gamma^2 chi = xi^2 + (1 - xi^2) chi'
        res = [xi * xi + (1.0 - xi * xi) * c for c in (fp.chi_parallel, fp.chi_perp)]
        return FixedPoint(float(fp), fp.kind, res[0], res[1], fp.marginal_line)

    if act.homogeneous:
        chi = C_W * _homogeneous_m(act.fn)
        if abs(chi - 1.0) <= MARGINAL_TOL:
            if C_b == 0.0:
                return FixedPoint(K0, "marginal", chi, chi, marginal_line=True)
            return FixedPoint(math.inf, "divergent", chi, chi)
        if chi < 1.0:
            return FixedPoint(C_b / (1.0 - chi), "stable" if C_b > 0 else "trivial", chi, chi)
        return FixedPoint(math.inf, "divergent", chi, chi)

    def g(K):
        return C_b + C_W * _moments(act, K)[0] - np.asarray(K, dtype=np.float64)

    def at(K, kind=None):
        _, d, dd = _moments(act, K)
        chi_par, chi_per = C_W * float(d), C_W * float(dd)
        if kind is None:
            if abs(chi_par - 1.0) < HALF_STABLE_TOL:
                kind = "marginal"
            else:
                kind = "stable" if chi_par < 1.0 else "unstable"
        return FixedPoint(K, kind, chi_par, chi_per)

    g0 = float(g(K0))
    if not math.isfinite(g0):
        return FixedPoint(math.inf, "divergent", math.nan, math.nan)
    if abs(g0) <= START_RTOL * max(K0, C_b):  # K0 is a fixed point (within the quadrature's error)
        return at(K0)
    up = g0 > 0
    if up:
        limit = max(K_TOP, K0)
    else:
        s0 = float(act.fn(jnp.zeros((), jnp.float64)))
        positive_root = C_b + C_W * s0 * s0 > 0  # g(0) > 0: a root K* > 0 below K0
        limit = 1e-300 if positive_root else K0 * 1e-12
    sign = 1.0 if up else -1.0

    def v(K):
        return sign * g(K)

    def chunks():
        # 20 points per decade over the first 10 decades, then one per 10 decades (a bracket is walked
        # again on finer grids); fixed shapes, so that the jitted rules compile once
        lg, lim = math.log10(K0), math.log10(limit)
        for steps in (np.arange(1, _CHUNK + 1) / 20.0, 10.0 * np.arange(1, 33, dtype=np.float64)):
            while (lg < lim) if up else (lg > lim):
                grid = np.minimum(lg + steps, lim) if up else np.maximum(lg - steps, lim)
                yield 10.0 ** grid
                lg = float(grid[-1])
                if steps.size == _CHUNK:
                    break

    K, how = _locate(_walk(chunks(), v, [(K0, abs(g0))]), v, lambda k: TOUCH_RTOL * max(k, C_b))
    if how == "touch":  # g' = 0 there: chi_parallel = 1 locates it better than the flat minimum of |g|
        def dg(k):
            return C_W * float(_moments(act, k)[1]) - 1.0
        lo, hi = K * (1 - 1e-4), K * (1 + 1e-4)
        if dg(lo) * dg(hi) < 0:
            Kr = brentq(dg, lo, hi, xtol=1e-15 * K, rtol=1e-14)
            if abs(float(g(Kr))) <= TOUCH_RTOL * max(Kr, C_b):
                K = Kr
    if how is None:
        return FixedPoint(math.inf, "divergent", math.nan, math.nan) if up else at(0.0, "trivial")
    if how == "inf":
        return FixedPoint(math.inf, "divergent", math.nan, math.nan)
    return at(K, "marginal" if how == "touch" else None)


# ------------------------------------------------------------------------------------------ criticality
@result(meta=("activation", "universality_class", "skip", "branch"))
class Criticality:
    """Critical initialization of an activation (of residual layers with ``skip`` xi, ``branch`` gamma).

    Unpacks as ``C_b, C_W = critical_init(...)``.  ``K_star`` is None for the scale-invariant
    class (every K is a fixed point: ``marginal_line`` is True) and NaN together with C_b, C_W for
    class ``none``.
    """

    C_b: float
    C_W: float
    K_star: float | None
    activation: str
    universality_class: str
    skip: float = 0.0
    branch: float = 1.0

    def __iter__(self):
        return iter((self.C_b, self.C_W))

    @property
    def marginal_line(self) -> bool:
        """True when every K is a fixed point at this (C_b, C_W) (the scale-invariant class)."""
        return self.universality_class == "scale-invariant"

    def chi_parallel(self, K: ArrayLike) -> jax.Array:
        return chi_parallel(self.activation, K, self.C_W, skip=self.skip, branch=self.branch)

    def chi_perp(self, K: ArrayLike) -> jax.Array:
        return chi_perp(self.activation, K, self.C_W, skip=self.skip, branch=self.branch)


def critical_init(activation: str | Activation | Callable, *, skip: float = 0.0, branch: float = 1.0) -> Criticality:
    """(C_b, C_W) at criticality for any activation, with its universality class (PDLT ch. 5).

    Closed values: scale-invariant (0, 2/(c+^2 + c-^2)) exactly (relu 2, leaky_relu(a) 2/(1 + a^2),
    abs and linear 1), the K*=0 class (0, 1/sigma'(0)^2) (tanh 1); half-stable ones are found
    numerically (see module docstring).

    Residual layers (``skip`` = xi with xi^2 < 1, ``branch`` = gamma; docs/theory.md, "Residual MLPs"):
    chi_parallel = chi_perp = xi^2 + gamma^2 chi_plain = 1 at (1 - xi^2) K* = gamma^2 (C_b + C_W <sigma^2>_{K*})
    is the plain critical (C_b, C_W) times (1 - xi^2) / gamma^2, at the same K* (relu: C_W = 2 (1 - xi^2) /
    gamma^2; tanh: (1 - xi^2) / gamma^2).  On the family xi^2 + gamma^2 = 1 it is the plain (C_b, C_W).
    |xi| >= 1 has none (chi > 1 for every C_W > 0): ValueError naming ``skip``.
    """
    xi, gamma, plain = _residual_args(skip, branch)
    if not plain:
        if xi * xi >= 1.0:
            raise ValueError(f"skip: a critical initialization needs |skip| < 1 (chi = skip^2 + branch^2 C_W <sigma'^2> "
                             f"exceeds 1 for every C_W > 0 otherwise), got skip={xi!r}")
        crit = critical_init(activation)
        s = (1.0 - xi * xi) / (gamma * gamma)
        return Criticality(crit.C_b * s, crit.C_W * s, crit.K_star, crit.activation, crit.universality_class,
                           xi, gamma)
    act = get_activation(activation)
    name = activation if isinstance(activation, str) else act
    s, ds = act.fn, derivative(act.fn)
    if act.homogeneous:
        C_W = 1.0 / _homogeneous_m(act.fn)
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


def universality_class(activation: str | Activation | Callable) -> str:
    """The universality class name of :func:`critical_init` for ``activation``."""
    return critical_init(activation).universality_class
