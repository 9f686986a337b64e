r"""Activation registry: name -> sigma, with closed-form Gaussian expectations where they exist.

For a bivariate Gaussian (z_1, z_2) ~ N(0, [[k11, k12], [k12, k22]]) an activation may carry

    nngp(k11, k22, k12)  = <sigma(z_1) sigma(z_2)>          (arc-cosine / arcsine kernels)
    dnngp(k11, k22, k12) = <sigma'(z_1) sigma'(z_2)>        (their derivative kernels)

in closed form.  Write s = sqrt(k11 k22), rho = k12 / s and theta = arccos(rho):

    linear      z          nngp = k12                                   dnngp = 1
    relu        max(0, z)  nngp = s (sin t + (pi - t) cos t) / (2 pi)   dnngp = (pi - t) / (2 pi)
    abs         |z|        nngp = 2 s (sin t + (pi/2 - t) cos t) / pi   dnngp = (2/pi) arcsin rho
    leaky_relu  max(z, az) ((1+a)/2)^2 linear + ((1-a)/2)^2 abs (the cross terms vanish by parity)
    erf         erf(z)     nngp = (2/pi) arcsin(2 k12 / sqrt((1+2k11)(1+2k22)))
                           dnngp = (4/pi) / sqrt((1+2k11)(1+2k22) - 4 k12^2)
    sin         sin(z)     nngp = exp(-(k11+k22)/2) sinh k12         dnngp = exp(-(k11+k22)/2) cosh k12

Everything else (tanh, sigmoid, gelu, silu/swish, softplus, any user callable) goes through the
quadrature rules of :mod:`efftheory.gaussian`; the closed forms are tested against that generic path.
All closed forms stay finite at rho = +-1 and at s = 0 (a zero input with C_b = 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
from jax.typing import ArrayLike

from . import _validate
from ._precision import enable_x64 as _enable_x64

__all__ = ["Activation", "get_activation", "registered", "leaky_relu"]

Kernel2 = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Activation:
    """A pointwise nonlinearity sigma and what is known about it in closed form.

    Attributes:
      name: registry name (or the callable's ``__name__``).
      fn: sigma, a JAX-traceable elementwise function.
      nngp: closed form of <sigma(z1) sigma(z2)> as a function of (k11, k22, k12), or None.
      dnngp: closed form of <sigma'(z1) sigma'(z2)>, or None.
      smooth: True when sigma is infinitely differentiable (Gauss-Hermite rules converge
        exponentially); False for kinks, where closed forms or finer rules are needed.
    """

    name: str
    fn: Callable[[jax.Array], jax.Array]
    nngp: Kernel2 | None = None
    dnngp: Kernel2 | None = None
    smooth: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ValueError(f"name: expected a string, got {type(self.name).__name__}")
        if not callable(self.fn):
            raise ValueError(f"fn: expected a JAX-traceable callable sigma(z), got {type(self.fn).__name__}")
        for field in ("nngp", "dnngp"):
            v = getattr(self, field)
            if v is not None and not callable(v):
                raise ValueError(f"{field}: expected None or a callable of (k11, k22, k12), got {type(v).__name__}")
        if not isinstance(self.smooth, bool):
            raise ValueError(f"smooth: expected True or False, got {type(self.smooth).__name__}")

    def __call__(self, z: ArrayLike) -> jax.Array:
        return self.fn(z)

    @property
    def derivative(self) -> Callable[[jax.Array], jax.Array]:
        """sigma' elementwise by forward-mode differentiation (a step function for kinked activations)."""
        from .gaussian import derivative

        return derivative(self.fn)

    @property
    def has_closed_form(self) -> bool:
        return self.nngp is not None and self.dnngp is not None

    @property
    def homogeneous(self) -> bool:
        """True when sigma(lam z) = lam sigma(z) for lam > 0 (relu, leaky_relu, abs, linear).

        Checked numerically once per activation; such activations are integrated exactly in
        polar coordinates (see :func:`efftheory.gaussian.hermite_moments2`).
        """
        return _is_homogeneous(self.fn)

    @property
    def kinked(self) -> bool:
        """True when sigma or sigma' jumps: ``smooth=False``, or found numerically for a callable.

        A callable is assumed smooth when it is built (``smooth=True``), but ``jnp.maximum(z, 0)``,
        ``jnp.clip`` or ``jnp.where`` make kinks that automatic differentiation does not see (the
        derivative of a step is zero almost everywhere).  :func:`_has_kink` compares, on 96001 points of
        [-12, 12], each step of sigma and of sigma' with the trapezoid integral of its autodiff
        derivative; a jump larger than 1e-3 of the function's scale is a kink.  Smooth but sharp
        functions (softplus(beta z)/beta) count as smooth up to beta ~ 10^3.
        """
        return not self.smooth or _has_kink(self.fn)

    @property
    def strip(self) -> float:
        """Half-width d0 of the strip |Im z| < d0 in which sigma is taken to be analytic, for the rules
        whose step follows from it: pi/2 (tanh's, the narrowest of the built-ins) unless sigma is
        much sharper (:func:`_strip`; softplus(beta z)/beta: about 0.8 pi/beta)."""
        return _strip(self.fn) if self.smooth else math.pi / 2

    @property
    def symmetric(self) -> bool:
        """True when sigma is odd or even (tanh, erf, sin, abs, ...).

        Checked numerically once per activation; every source pattern of the finite-width integrals
        (an even number of sigma factors, and of sigma' factors) is then invariant under z -> -z, so
        the rules of :mod:`efftheory.gaussian._sources` need only half of a symmetric grid.
        """
        return _has_parity(self.fn)


@functools.lru_cache(maxsize=256)
def _has_parity(fn) -> bool:
    import numpy as np

    z = np.random.default_rng(1).normal(size=64) * 4.0
    try:
        with _enable_x64(True):  # cached per function: decided in float64 whatever the caller's mode
            a = np.asarray(fn(jnp.asarray(z, jnp.float64)), dtype=np.float64)
            b = np.asarray(fn(jnp.asarray(-z, jnp.float64)), dtype=np.float64)
    except Exception:  # noqa: BLE001 - treat an unusual callable as having no parity
        return False
    if a.shape != z.shape or not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        return False
    scale = 1e-14 * np.maximum(1.0, np.abs(a))
    return bool(np.all(np.abs(a + b) <= scale) or np.all(np.abs(a - b) <= scale))


def _check_real(fn, name: str) -> None:
    """sigma must map real arrays to real, finite arrays of the same shape: probed on [-20, 20]."""
    import numpy as np

    with _enable_x64(True):
        z = jnp.linspace(-20.0, 20.0, 401, dtype=jnp.float64)
        try:
            out = fn(z)
        except Exception as e:  # noqa: BLE001 - any failure of the user's callable is reported as such
            raise ValueError(f"{name}: calling sigma on an array failed ({type(e).__name__}: {e}); expected a "
                             "JAX-traceable elementwise function of a real array") from None
        dtype = getattr(out, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(f"{name}: sigma returned complex values (dtype {dtype}); expected a real-valued "
                             "function")
        out = np.asarray(out)
    if out.shape != z.shape:
        raise ValueError(f"{name}: sigma returned shape {out.shape} for an input of shape {z.shape}; expected "
                         "an elementwise function")
    if out.dtype.kind not in "biuf":
        raise ValueError(f"{name}: sigma returned dtype {out.dtype}; expected real numbers")
    bad = ~np.isfinite(out.astype(np.float64))
    if bad.any():
        z0 = float(np.asarray(z)[np.argmax(bad)])
        raise ValueError(f"{name}: sigma returned {out[np.argmax(bad)]} at z = {z0:g}; expected a function finite "
                         "on the real line")


@functools.lru_cache(maxsize=256)
def _has_kink(fn) -> bool:
    """A jump of sigma or sigma' on [-12, 12] that autodiff's derivative does not integrate to
    (:attr:`Activation.kinked`)."""
    import numpy as np

    from .gaussian import derivative

    d1 = derivative(fn)
    d2 = derivative(d1)
    with _enable_x64(True):
        z = jnp.linspace(-12.0, 12.0, 96001, dtype=jnp.float64)
        try:
            vals = [np.asarray(f(z), dtype=np.float64) for f in (fn, d1, d2)]
        except Exception:  # noqa: BLE001 - not differentiable by JAX at all: treat as kinked
            return True
    h = 24.0 / 96000
    for f, df in ((vals[0], vals[1]), (vals[1], vals[2])):
        if not (np.all(np.isfinite(f)) and np.all(np.isfinite(df))):
            return True
        step = np.diff(f) - 0.5 * h * (df[1:] + df[:-1])
        if np.max(np.abs(step)) > 1e-3 * max(1.0, float(np.max(np.abs(f)))):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _strip(fn) -> float:
    """An estimate of sigma's strip of analyticity, calibrated on tanh (whose strip is pi/2).

    For sigma analytic in |Im z| < d, sup |sigma^(k+1)| / sup |sigma^(k)| grows like (k + 1)/d; the
    ratio at k = 3 and at k = 5 (sup over [-12, 12]), relative to tanh's, gives two estimates, and the
    smaller is taken (exact for tanh(a z), the logistic function and their integrals up to a few
    percent, below the true strip for softplus(beta z)/beta: 0.82 pi/beta at k = 3).  Activations whose
    estimate is above 0.8 pi/2 (every built-in smooth one: gelu 1.55, erf, silu, sin, exp above pi/2)
    keep pi/2, so the rules of the built-ins do not depend on this estimate.
    """
    import numpy as np

    from .gaussian import derivative

    def sups(f):
        ds = [f]
        for _ in range(6):
            ds.append(derivative(ds[-1]))
        with _enable_x64(True):
            z = jnp.linspace(-12.0, 12.0, 24001, dtype=jnp.float64)
            return [float(np.max(np.abs(np.asarray(d(z), dtype=np.float64)))) for d in ds]

    try:
        m, t = sups(fn), sups(jnp.tanh)
    except Exception:  # noqa: BLE001 - not differentiable six times by JAX: keep the default
        return math.pi / 2
    est = [(math.pi / 2) * (m[k] / m[k + 1]) / (t[k] / t[k + 1]) for k in (3, 5)
           if m[k + 1] > 0 and math.isfinite(m[k + 1]) and math.isfinite(m[k])]
    d = min(est) if est else math.inf
    return d if d < 0.8 * math.pi / 2 else math.pi / 2


@functools.lru_cache(maxsize=256)
def _is_homogeneous(fn) -> bool:
    import numpy as np

    try:
        with _enable_x64(True):  # cached per function: decided in float64 whatever the caller's mode
            z = jnp.asarray(np.random.default_rng(0).normal(size=64) * 3, jnp.float64)
            base = fn(z)
            return all(bool(jnp.allclose(fn(lam * z), lam * base, rtol=1e-12, atol=1e-12)) for lam in (0.37, 2.9))
    except Exception:  # noqa: BLE001 - a callable that cannot take arrays is simply not homogeneous
        return False


def _angle(k11, k22, k12):
    s = jnp.sqrt(jnp.maximum(k11 * k22, 0.0))
    safe = jnp.where(s > 0, s, 1.0)
    rho = jnp.where(s > 0, jnp.clip(k12 / safe, -1.0, 1.0), 1.0)
    return s, rho, jnp.arccos(rho)


def relu_nngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    s, rho, t = _angle(k11, k22, k12)
    return s * (jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0)) + (jnp.pi - t) * rho) / (2 * jnp.pi)


def relu_dnngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    _, _, t = _angle(k11, k22, k12)
    return (jnp.pi - t) / (2 * jnp.pi)


def abs_nngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    s, rho, t = _angle(k11, k22, k12)
    return 2 * s * (jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0)) + (jnp.pi / 2 - t) * rho) / jnp.pi


def abs_dnngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    _, rho, _ = _angle(k11, k22, k12)
    return 2 * jnp.arcsin(rho) / jnp.pi


def erf_nngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    d = jnp.sqrt((1 + 2 * k11) * (1 + 2 * k22))
    return 2 * jnp.arcsin(jnp.clip(2 * k12 / d, -1.0, 1.0)) / jnp.pi


def erf_dnngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    det = 1 + 2 * (k11 + k22) + 4 * (k11 * k22 - k12**2)  # exact on the diagonal, no cancellation at K ~ 1e12
    return 4 / (jnp.pi * jnp.sqrt(det))


def sin_nngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    return jnp.exp(-(k11 + k22) / 2) * jnp.sinh(k12)


def sin_dnngp(k11: ArrayLike, k22: ArrayLike, k12: ArrayLike) -> jax.Array:
    return jnp.exp(-(k11 + k22) / 2) * jnp.cosh(k12)


def leaky_relu(a: float = 0.01) -> Activation:
    """max(z, a z) with its closed-form kernels; ``a`` is the negative slope (|a| < 1 not required)."""
    a = _validate.real("a", a)
    p, m = (1 + a) / 2, (1 - a) / 2
    return Activation(
        name=f"leaky_relu({a:g})",
        fn=lambda z: jnp.where(z > 0, z, a * z),
        nngp=lambda k11, k22, k12: p**2 * k12 + m**2 * abs_nngp(k11, k22, k12),
        dnngp=lambda k11, k22, k12: p**2 + m**2 * abs_dnngp(k11, k22, k12),
        smooth=False,
    )


def _relu(z):
    return jnp.maximum(z, 0.0)


def _gelu(z):
    return 0.5 * z * (1 + jsp.erf(z / jnp.sqrt(2.0)))


def _silu(z):
    return z * jax.nn.sigmoid(z)


REGISTRY: dict[str, Activation] = {
    "linear": Activation("linear", lambda z: z, lambda a, b, c: c, lambda a, b, c: jnp.ones_like(c)),
    "relu": Activation("relu", _relu, relu_nngp, relu_dnngp, smooth=False),
    "abs": Activation("abs", jnp.abs, abs_nngp, abs_dnngp, smooth=False),
    "erf": Activation("erf", jsp.erf, erf_nngp, erf_dnngp),
    "sin": Activation("sin", jnp.sin, sin_nngp, sin_dnngp),
    "tanh": Activation("tanh", jnp.tanh),
    "sigmoid": Activation("sigmoid", jax.nn.sigmoid),
    "gelu": Activation("gelu", _gelu),
    "silu": Activation("silu", _silu),
    "softplus": Activation("softplus", jax.nn.softplus),
}
_ALIASES = {"identity": "linear", "swish": "silu"}
_LEAKY = re.compile(r"^leaky_relu(?:\(\s*([-+0-9.eE]+)\s*\))?$")


def registered() -> tuple[str, ...]:
    """Names accepted by :func:`get_activation` (``leaky_relu(a)`` takes any slope a)."""
    return tuple(sorted(REGISTRY)) + ("leaky_relu", "swish", "identity")


def get_activation(activation: str | Activation | Callable, name: str = "activation") -> Activation:
    """Resolve a registry name, an :class:`Activation`, or a JAX-traceable callable.

    Raises ValueError naming ``name`` for an unknown string or a non-callable.
    """
    if isinstance(activation, Activation):
        return _with_homogeneous_kernels(activation)
    if isinstance(activation, str):
        key = activation.strip().lower()
        key = _ALIASES.get(key, key)
        if key in REGISTRY:
            return REGISTRY[key]
        m = _LEAKY.match(key)
        if m:
            try:
                slope = float(m.group(1)) if m.group(1) else 0.01
            except ValueError:
                slope = float("nan")
            if not math.isfinite(slope):
                raise ValueError(f"{name}: leaky_relu(a) needs a finite number a, got {activation!r}")
            return leaky_relu(slope)
        raise ValueError(
            f"{name}: unknown activation {activation!r}; expected one of {', '.join(registered())}, "
            "or a JAX-traceable callable"
        )
    if callable(activation):
        label = getattr(activation, "__name__", None)
        _check_real(activation, name)
        act = Activation(label if isinstance(label, str) else type(activation).__name__, activation, smooth=True)
        return _with_homogeneous_kernels(act)
    raise ValueError(f"{name}: expected an activation name or a callable, got {activation!r}")


@functools.lru_cache(maxsize=256)
def _with_homogeneous_kernels(act: Activation) -> Activation:
    """A positively homogeneous sigma without closed forms (a user's relu, leaky relu or abs as a
    callable) gets the exact kernels of its class: sigma(z) = p z + m |z| with p = (c+ + c-)/2,
    m = (c+ - c-)/2, c+ = sigma(1), c- = -sigma(-1), so <sigma sigma> = p^2 K_ab + m^2 <|z_a| |z_b|> and
    <sigma' sigma'> = p^2 + m^2 <sign z_a sign z_b> (the odd cross terms vanish), and it is marked
    kinked.  Same activation object for the same input (cached), so MLP equality is unaffected."""
    if act.has_closed_form or not act.homogeneous:
        return act
    with _enable_x64(True):
        c_plus = float(act.fn(jnp.asarray(1.0, jnp.float64)))
        c_minus = -float(act.fn(jnp.asarray(-1.0, jnp.float64)))
    nngp, dnngp = _homogeneous_kernels((c_plus + c_minus) / 2, (c_plus - c_minus) / 2)
    return dataclasses.replace(act, nngp=nngp, dnngp=dnngp, smooth=False)


@functools.lru_cache(maxsize=256)
def _homogeneous_kernels(p: float, m: float):
    def nngp(k11, k22, k12):
        return p**2 * k12 + m**2 * abs_nngp(k11, k22, k12)

    def dnngp(k11, k22, k12):
        return p**2 + m**2 * abs_dnngp(k11, k22, k12)

    return nngp, dnngp
