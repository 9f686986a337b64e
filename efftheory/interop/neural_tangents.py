r"""neural-tangents (NT) interop: the NT ``stax`` network equivalent to an :class:`~efftheory.MLP`.

NT is an oracle and an interop target, never a core dependency: it pins jax < 0.6 and pulls in
TensorFlow, so it lives in its own environment (``.ci/nt_env.sh``, or ``pip install
'efftheory[nt]'`` into a fresh virtualenv).  Importing this module without NT raises ImportError.

Equivalence (docs/theory.md, "The network"): the PDLT layer

    z^(l) = b^(l) + W^(l) sigma(z^(l-1)),   b ~ N(0, C_b),  W_ij ~ N(0, C_W / n_{l-1})

is NT's ``stax.Dense(n_l, W_std=sqrt(C_W), b_std=sqrt(C_b))`` in the default "ntk"
parameterization (z = b_std b + W_std / sqrt(n_{l-1}) W^T sigma, W, b ~ N(0, 1)).  The NNGP
kernels agree for any learning-rate tensor; the NTKs agree only when lambda_W = C_W and
lambda_b = C_b, because NT's "ntk" parameterization trains every parameter at unit rate.
:func:`stax_mlp` therefore refuses any other lambda.

A residual layer (skip xi, branch gamma; docs/theory.md, "Residual MLPs"),
z^(l) = xi z^(l-1) + gamma [b^(l) + W^(l) sigma(z^(l-1))], is the block

    stax.serial(stax.FanOut(2),
                stax.parallel(stax.DotGeneral(rhs=xi),
                              stax.serial(act, Dense(n_l, W_std=sqrt(C_W), b_std=sqrt(C_b)), stax.DotGeneral(rhs=gamma))),
                stax.FanInSum())

``DotGeneral(rhs=c)`` multiplies by the constant c (no parameters): its kernels are c^2 times its
input's.  NT's FanInSum adds the kernels of its branches, i.e. treats them as uncorrelated, which the
two branches here are at infinite width (b and W have mean zero and are independent of z^(l-1)):
K^(l) = xi^2 K^(l-1) + gamma^2 [C_b + C_W <sigma sigma>], and likewise Theta, the recursion of
:func:`efftheory.infinite_width`.

Activations map by registry name to NT's closed-form layers

    relu -> Relu()   erf -> Erf()   gelu -> Gelu(approximate=False)   abs -> Abs()
    leaky_relu(a) -> LeakyRelu(a)   sin -> Sin()   linear -> Identity()

after checking on a probe grid that ``net.sigma.fn`` really is that function (a user callable
that happens to be called ``relu`` is not trusted by name).  Everything else -- tanh, sigmoid,
silu, softplus, any user callable -- goes through ``stax.ElementwiseNumerical(fn, deg)``,
NT's bivariate Gauss-Hermite rule with deg**2 nodes; its memory is O(deg**2 N**2) per layer.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from ..activations import Activation
    from ..network import MLP

_INSTALL_HINT = (
    "neural-tangents is not installed; install the pinned extra: see .ci/nt_env.sh / "
    "pip install 'efftheory[nt]' in its own environment (needs jax<0.6)"
)

try:
    import neural_tangents as nt  # noqa: F401 - imported first to fail early with the install hint
    from neural_tangents import stax
except ModuleNotFoundError as e:  # NT absent
    raise ImportError(_INSTALL_HINT) from e
except Exception as e:  # NT present but broken, typically under a jax >= 0.6
    raise ImportError(f"{_INSTALL_HINT}. Importing it failed with {type(e).__name__}: {e}") from e

import jax  # noqa: E402 - after the neural-tangents check, which must run first
import jax.numpy as jnp  # noqa: E402 - as above
import jax.scipy.special as jsp  # noqa: E402 - as above

__all__ = ["stax_mlp", "kernels", "activation_layer", "NTKernels", "DEFAULT_DEG"]

#: Gauss-Hermite degree (per dimension) of ``stax.ElementwiseNumerical`` for activations without
#: a closed-form NT layer; cost and memory grow like deg**2 N**2 per layer.  NT's rule converges
#: slowly once the variance K grows (measured against efftheory's rule, relative error of one tanh
#: layer): deg 25: 3e-4 at K=1; deg 64: 1e-7 at K=1, 4e-5 at K=2, 6e-3 at K=5; deg 160: 5e-9 at
#: K=2, 3e-5 at K=5; deg 400: 4e-9 at K=5, 6e-6 at K=10.  silu: deg 64 gives 2e-11 at K=2,
#: 5e-7 at K=5.  Raise ``deg`` for an oracle at large K (NT itself suggests 25 to start).
DEFAULT_DEG = 64

_PROBE = np.concatenate([np.linspace(-4.0, 4.0, 33), [-1e-3, 1e-3, 7.5, -7.5]])
_LEAKY = re.compile(r"^leaky_relu\(\s*([-+0-9.eE]+)\s*\)$")

# name -> (reference sigma on the probe grid, NT layer factory)
_CLOSED_FORM = {
    "relu": (lambda z: jnp.maximum(z, 0.0), lambda: stax.Relu()),
    "erf": (jsp.erf, lambda: stax.Erf()),
    "gelu": (lambda z: 0.5 * z * (1.0 + jsp.erf(z / math.sqrt(2.0))), lambda: stax.Gelu(approximate=False)),
    "abs": (jnp.abs, lambda: stax.Abs()),
    "sin": (jnp.sin, lambda: stax.Sin()),
    "linear": (lambda z: z, lambda: stax.Identity()),
}


class NTKernels(NamedTuple):
    """Per-layer NT kernels: ``nngp`` and ``ntk``, each a float64 array of shape (L, N, N).

    Index 0 is layer 1 (the first Dense), index L-1 the output layer.
    """

    nngp: np.ndarray
    ntk: np.ndarray


def _same_function(fn, ref) -> bool:
    z = jnp.asarray(_PROBE)
    try:
        a = np.asarray(fn(z), dtype=np.float64)
    except Exception:  # not vectorised or not traceable: cannot be the registry function
        return False
    b = np.asarray(ref(z), dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-6)


def activation_layer(sigma: Activation | Callable, *, deg: int = DEFAULT_DEG) -> tuple[Any, Any, Any]:
    """The NT stax layer computing ``sigma`` (an :class:`~efftheory.Activation`).

    Closed-form NT layers are used when ``sigma.name`` names one and ``sigma.fn`` agrees with it on
    a probe grid; otherwise ``stax.ElementwiseNumerical(sigma.fn, deg)`` with the derivative by
    autodiff.  Quadrature on a kinked activation (``sigma.smooth`` False) converges slowly, so
    that case warns.
    """
    name = str(getattr(sigma, "name", "")).strip().lower()
    fn = sigma.fn if hasattr(sigma, "fn") else sigma
    if name in _CLOSED_FORM:
        ref, make = _CLOSED_FORM[name]
        if _same_function(fn, ref):
            return make()
    m = _LEAKY.match(name)
    if m:
        a = float(m.group(1))
        if _same_function(fn, lambda z: jnp.where(z > 0, z, a * z)):
            return stax.LeakyRelu(a)
    deg = int(deg)
    if deg < 1:
        raise ValueError(f"deg: the Gauss-Hermite degree must be >= 1, got {deg}")
    if getattr(sigma, "smooth", True) is False:
        warnings.warn(
            f"activation {name!r} is not smooth and has no closed-form NT layer: "
            f"stax.ElementwiseNumerical(deg={deg}) converges slowly on kinks",
            stacklevel=3,
        )
    df = jnp.vectorize(jax.grad(fn))
    with warnings.catch_warnings():  # NT warns on every construction that quadrature is numerical
        warnings.simplefilter("ignore", UserWarning)
        return stax.ElementwiseNumerical(fn, deg=deg, df=df)


def _check_lambda(net) -> None:
    def same(a, b):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0) for x, y in zip(a, b))

    bad = []
    if not same(net.lambda_Ws, net.C_Ws):
        bad.append(f"lambda_W={tuple(net.lambda_Ws)} (C_W={tuple(net.C_Ws)})")
    if not same(net.lambda_bs, net.C_bs):
        bad.append(f"lambda_b={tuple(net.lambda_bs)} (C_b={tuple(net.C_bs)})")
    if bad:
        raise ValueError(
            "neural-tangents' NTK ('ntk' parameterization) equals the PDLT NTK only for "
            "lambda_W = C_W and lambda_b = C_b; got " + ", ".join(bad)
            + ". Use net.replace(lambda_W=None, lambda_b=None), or compare NNGP kernels only."
        )


def _blocks(net, deg: int) -> list[list]:
    """One list of stax layers per MLP layer l = 1..L (module docstring): [Dense] for layer 1, [act, Dense]
    for a plain layer, [residual block] for a residual one."""
    _check_lambda(net)
    widths = tuple(net.hidden_widths) + (int(net.output_width),)
    act = activation_layer(net.sigma, deg=deg)
    blocks = []
    for layer in net.layers(1):  # n_0 does not enter the stax layers
        l = layer.index - 1
        dense = stax.Dense(int(widths[l]), W_std=math.sqrt(layer.C_W), b_std=math.sqrt(layer.C_b))
        if l == 0:
            blocks.append([dense])
        elif layer.residual:
            xi, gamma = float(layer.skip), float(layer.branch)
            branch = stax.serial(act, dense, stax.DotGeneral(rhs=gamma))
            blocks.append([stax.serial(stax.FanOut(2), stax.parallel(stax.DotGeneral(rhs=xi), branch), stax.FanInSum())])
        else:
            blocks.append([act, dense])
    return blocks


def _layers(net, deg: int) -> list:
    return [layer for block in _blocks(net, deg) for layer in block]


def stax_mlp(net: MLP, *, deg: int = DEFAULT_DEG) -> tuple[Any, Any, Any]:
    """The NT network equal to ``net`` (docs/theory.md, "The network"): ``(init_fn, apply_fn, kernel_fn)``.

    ``stax.serial(Dense(n_1), act, Dense(n_2), act, ..., Dense(n_L))`` with
    ``Dense(n_l, W_std=sqrt(C_W^(l)), b_std=sqrt(C_b^(l)))`` in NT's "ntk" parameterization; a residual
    layer's ``act, Dense`` is the FanOut / parallel / FanInSum block of the module docstring.
    ``kernel_fn(x, None, ('nngp', 'ntk'))`` gives layer L's K and Theta; NT's own ``init_fn``
    draws the standard-normal parameters that ``apply_fn`` scales.

    Args:
      net: an :class:`~efftheory.MLP` with lambda_W = C_W and lambda_b = C_b.
      deg: Gauss-Hermite degree for activations without a closed-form NT layer.

    Raises:
      ValueError: lambda_W != C_W or lambda_b != C_b (NT has no learning-rate tensor).
    """
    return stax.serial(*_layers(net, deg))


def kernels(net: MLP, x: ArrayLike, *, deg: int = DEFAULT_DEG) -> NTKernels:
    """NT's per-layer NNGP and NTK of ``net`` on inputs ``x`` of shape (N, n_0).

    Layer l's kernels are those of the prefix network ending at its Dense layer, so
    ``kernels(net, x).nngp[l-1]`` is K^(l) and ``.ntk[l-1]`` is Theta^(l) (docs/theory.md, "Infinite
    width").  Computed in the current jax precision (efftheory turns on float64).

    Returns:
      :class:`NTKernels` of two numpy arrays, each (L, N, N).
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (N, n_0), got {x.shape}")
    blocks = _blocks(net, deg)
    nngp, ntk = [], []
    for l in range(net.depth):
        _, _, kernel_fn = stax.serial(*[layer for block in blocks[: l + 1] for layer in block])
        with warnings.catch_warnings():  # FanInSum's branches are uncorrelated here (module docstring)
            warnings.filterwarnings("ignore", message="`FanIn` layers assume independent inputs")
            k = kernel_fn(x, None, ("nngp", "ntk"))
        nngp.append(np.asarray(k.nngp))
        ntk.append(np.asarray(k.ntk))
    return NTKernels(np.stack(nngp), np.stack(ntk))
