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

from . import _validate

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

    def __call__(self, z):
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
    def symmetric(self) -> bool:
        """True when sigma is odd or even (tanh, erf, sin, abs, ...).

        Checked numerically once per activation; every source pattern of the finite-width integrals
        (an even number of sigma factors, and of sigma' factors) is then invariant under z -> -z, so
        the rules of :mod:`efftheory.products` need only half of a symmetric grid.
        """
        return _has_parity(self.fn)


@functools.lru_cache(maxsize=256)
def _has_parity(fn) -> bool:
    import numpy as np

    z = np.random.default_rng(1).normal(size=64) * 4.0
    try:
        a = np.asarray(fn(jnp.asarray(z)), dtype=np.float64)
        b = np.asarray(fn(jnp.asarray(-z)), dtype=np.float64)
    except Exception:  # noqa: BLE001 - treat an unusual callable as having no parity
        return False
    if a.shape != z.shape or not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        return False
    scale = 1e-14 * np.maximum(1.0, np.abs(a))
    return bool(np.all(np.abs(a + b) <= scale) or np.all(np.abs(a - b) <= scale))


@functools.lru_cache(maxsize=256)
def _is_homogeneous(fn) -> bool:
    import numpy as np

    z = jnp.asarray(np.random.default_rng(0).normal(size=64) * 3)
    try:
        base = fn(z)
        return all(bool(jnp.allclose(fn(lam * z), lam * base, rtol=1e-12, atol=1e-12)) for lam in (0.37, 2.9))
    except Exception:  # noqa: BLE001 - a callable that cannot take arrays is simply not homogeneous
        return False


def _angle(k11, k22, k12):
    s = jnp.sqrt(jnp.maximum(k11 * k22, 0.0))
    safe = jnp.where(s > 0, s, 1.0)
    rho = jnp.where(s > 0, jnp.clip(k12 / safe, -1.0, 1.0), 1.0)
    return s, rho, jnp.arccos(rho)


def _relu_nngp(k11, k22, k12):
    s, rho, t = _angle(k11, k22, k12)
    return s * (jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0)) + (jnp.pi - t) * rho) / (2 * jnp.pi)


def _relu_dnngp(k11, k22, k12):
    _, _, t = _angle(k11, k22, k12)
    return (jnp.pi - t) / (2 * jnp.pi)


def _abs_nngp(k11, k22, k12):
    s, rho, t = _angle(k11, k22, k12)
    return 2 * s * (jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0)) + (jnp.pi / 2 - t) * rho) / jnp.pi


def _abs_dnngp(k11, k22, k12):
    _, rho, _ = _angle(k11, k22, k12)
    return 2 * jnp.arcsin(rho) / jnp.pi


def _erf_nngp(k11, k22, k12):
    d = jnp.sqrt((1 + 2 * k11) * (1 + 2 * k22))
    return 2 * jnp.arcsin(jnp.clip(2 * k12 / d, -1.0, 1.0)) / jnp.pi


def _erf_dnngp(k11, k22, k12):
    det = 1 + 2 * (k11 + k22) + 4 * (k11 * k22 - k12**2)  # exact on the diagonal, no cancellation at K ~ 1e12
    return 4 / (jnp.pi * jnp.sqrt(det))


def _sin_nngp(k11, k22, k12):
    return jnp.exp(-(k11 + k22) / 2) * jnp.sinh(k12)


def _sin_dnngp(k11, k22, k12):
    return jnp.exp(-(k11 + k22) / 2) * jnp.cosh(k12)


def leaky_relu(a: float = 0.01) -> Activation:
    """max(z, a z) with its closed-form kernels; ``a`` is the negative slope (|a| < 1 not required)."""
    a = _validate.real("a", a)
    p, m = (1 + a) / 2, (1 - a) / 2
    return Activation(
        name=f"leaky_relu({a:g})",
        fn=lambda z: jnp.where(z > 0, z, a * z),
        nngp=lambda k11, k22, k12: p**2 * k12 + m**2 * _abs_nngp(k11, k22, k12),
        dnngp=lambda k11, k22, k12: p**2 + m**2 * _abs_dnngp(k11, k22, k12),
        smooth=False,
    )


def _relu(z):
    return jnp.maximum(z, 0.0)


def _gelu(z):
    return 0.5 * z * (1 + jsp.erf(z / jnp.sqrt(2.0)))


def _silu(z):
    return z * jax.nn.sigmoid(z)


_REGISTRY: dict[str, Activation] = {
    "linear": Activation("linear", lambda z: z, lambda a, b, c: c, lambda a, b, c: jnp.ones_like(c)),
    "relu": Activation("relu", _relu, _relu_nngp, _relu_dnngp, smooth=False),
    "abs": Activation("abs", jnp.abs, _abs_nngp, _abs_dnngp, smooth=False),
    "erf": Activation("erf", jsp.erf, _erf_nngp, _erf_dnngp),
    "sin": Activation("sin", jnp.sin, _sin_nngp, _sin_dnngp),
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
    return tuple(sorted(_REGISTRY)) + ("leaky_relu", "swish", "identity")


def get_activation(activation, name: str = "activation") -> Activation:
    """Resolve a registry name, an :class:`Activation`, or a JAX-traceable callable.

    Raises ValueError naming ``name`` for an unknown string or a non-callable.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.strip().lower()
        key = _ALIASES.get(key, key)
        if key in _REGISTRY:
            return _REGISTRY[key]
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
        return Activation(label if isinstance(label, str) else type(activation).__name__, activation, smooth=True)
    raise ValueError(f"{name}: expected an activation name or a callable, got {activation!r}")
