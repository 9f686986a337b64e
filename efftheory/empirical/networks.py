r"""Finite MLPs: parameters drawn from the PDLT initialization and the forward pass (docs/theory.md, "The network").

    z^(1)_{i;a}   = b^(1)_i   + sum_j W^(1)_{ij} x_{j;a}
    z^(l+1)_{i;a} = b^(l+1)_i + sum_j W^(l+1)_{ij} sigma(z^(l)_{j;a})
    b^(l)_i ~ N(0, C_b^(l)),   W^(l)_{ij} ~ N(0, C_W^(l) / n_{l-1})

and in a residual MLP (skip xi, branch gamma: docs/theory.md, "Residual MLPs") a residual layer computes

    z^(l+1)_{i;a} = xi^(l+1) z^(l)_{i;a} + gamma^(l+1) [ b^(l+1)_i + sum_j W^(l+1)_{ij} sigma(z^(l)_{j;a}) ]

with the same W and b (:meth:`efftheory.MLP.layers` says which layers are residual).

Parameters are a tuple with one dict per layer, ``params[l-1] = {"W": (n_l, n_{l-1}), "b": (n_l,)}``.
Inputs ``x`` have shape (N, n_0) (one row per input x_a); preactivations of layer l have shape (N, n_l).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from .. import _validate
from ..network import MLP

__all__ = ["init_params", "apply", "apply_all", "forward", "conditional_forward", "learning_rates", "check_dtype", "check_x",
           "check_params", "check_net"]

_DTYPES = {np.dtype(np.float32): jnp.float32, np.dtype(np.float64): jnp.float64}


def check_net(net: Any) -> MLP:
    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    return net


def check_dtype(dtype: DTypeLike, name: str = "dtype") -> Any:
    """Return jnp.float32 or jnp.float64, or raise ValueError naming ``name``."""
    if dtype is None:  # np.dtype(None) would be float64: say it
        raise ValueError(f"{name}: expected float32 or float64, got None")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected float32 or float64, got {dtype!r}") from None
    if dt not in _DTYPES:
        raise ValueError(f"{name}: expected float32 or float64, got {dt}")
    return _DTYPES[dt]


def check_x(x: ArrayLike, name: str = "x") -> ArrayLike:
    """Check inputs of shape (N, n_0): rank 2, non-empty, finite.  Tracers are checked for rank only."""
    if isinstance(x, jax.core.Tracer):
        if x.ndim != 2:
            raise ValueError(f"{name}: expected an array of rank 2 (N inputs, n_0 features), got shape {x.shape}")
        return x
    return _validate.inputs(name, x)


def check_key(key: jax.Array, name: str = "key") -> jax.Array:
    """A single jax PRNG key: a typed key (jax.random.key) or a raw uint32 key (jax.random.PRNGKey)."""
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.ndim == 0:
            return key
    elif dtype is not None and np.dtype(dtype) == np.uint32 and shape == (2,):
        return key
    raise ValueError(f"{name}: expected a single jax PRNG key (jax.random.key(s) or jax.random.PRNGKey(s)), "
                     f"got {type(key).__name__} with dtype {dtype} and shape {shape}")


def check_params(net: MLP, params: Any, input_dim: int | None = None, name: str = "params") -> Any:
    """Check that ``params`` is a tuple of ``net.depth`` dicts {"W", "b"} with consistent shapes."""
    if not isinstance(params, (tuple, list)) or len(params) != net.depth:
        got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"{name}: expected a tuple of depth = {net.depth} layer dicts, got {got}")
    n_in = input_dim
    for l, (layer, n_out) in enumerate(zip(params, net.widths)):
        if not isinstance(layer, dict) or set(layer) != {"W", "b"}:
            raise ValueError(f"{name}[{l}]: expected a dict with keys 'W' and 'b'")
        W, b = layer["W"], layer["b"]
        if jnp.ndim(W) != 2 or jnp.shape(W)[0] != n_out or (n_in is not None and jnp.shape(W)[1] != n_in):
            raise ValueError(f"{name}[{l}]['W']: expected shape ({n_out}, {n_in if n_in is not None else 'n_in'}), "
                             f"got {jnp.shape(W)}")
        if jnp.shape(b) != (n_out,):
            raise ValueError(f"{name}[{l}]['b']: expected shape ({n_out},), got {jnp.shape(b)}")
        n_in = n_out
    return params


def init_params(net: MLP, key: jax.Array, input_dim: int, dtype: DTypeLike = jnp.float64) -> tuple[dict, ...]:
    """Draw one network's parameters: W^(l) ~ N(0, C_W^(l)/n_{l-1}), b^(l) ~ N(0, C_b^(l)).

    All numbers come from one standard-normal draw ``jax.random.normal(key, (P,), dtype)``, P the
    number of parameters, cut in the order W^(1), b^(1), W^(2), b^(2), ... (row-major) and scaled.

    Args:
      net: the MLP spec.
      key: a jax PRNG key.
      input_dim: n_0.
      dtype: float32 or float64 (the draws are made in this dtype).

    Returns:
      A tuple of L dicts ``{"W": (n_l, n_{l-1}), "b": (n_l,)}``.
    """
    check_net(net)
    key = check_key(key)
    n0 = _validate.positive_int("input_dim", input_dim, maximum=_validate.MAX_WIDTH)
    dt = check_dtype(dtype)
    sizes = (n0,) + net.widths
    _validate.memory("net", sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) * np.dtype(dt).itemsize,
                     f"the parameters of one network of widths {sizes} (inputs first)")
    return _init_jit(net, key, n0, np.dtype(dt).name)


def init_layers(net: MLP, key: jax.Array, n0: int, dtype: DTypeLike) -> tuple[dict, ...]:
    sizes = (n0,) + net.widths
    shapes = [((n_out, n_in), (n_out,)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    xi = _standard_normals(key, shapes, dtype)
    return tuple({"W": jnp.sqrt(jnp.asarray(net.C_Ws[l] / sizes[l], dtype)) * W,
                  "b": jnp.sqrt(jnp.asarray(net.C_bs[l], dtype)) * b} for l, (W, b) in enumerate(xi))


_init_jit = jax.jit(init_layers, static_argnums=(0, 2, 3))


def _standard_normals(key, shapes, dtype):
    """One ``jax.random.normal`` draw of all the numbers, cut in order into the nested ``shapes``.

    A single draw (rather than one per array) keeps compile time low: each distinct
    ``jax.random.normal`` costs seconds of XLA compilation on a CPU.
    """
    flat, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda s: isinstance(s, tuple) and
                                               all(isinstance(d, int) for d in s))
    counts = [int(np.prod(s)) for s in flat]
    xi = jax.random.normal(key, (sum(counts),), dtype)
    offsets = np.cumsum([0] + counts)
    parts = [xi[o:o + c].reshape(s) for o, c, s in zip(offsets[:-1], counts, flat)]
    return jax.tree_util.tree_unflatten(treedef, parts)


def forward(net: MLP, params: Any, x: ArrayLike) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Unchecked forward pass: (layer inputs a_0..a_{L-1}, preactivations z^(1)..z^(L)).

    a_0 = x (N, n_0), z^(l) = a_{l-1} W^(l)T + b^(l) (N, n_l), a_l = sigma(z^(l)); a residual layer
    z^(l) = xi^(l) z^(l-1) + gamma^(l) (a_{l-1} W^(l)T + b^(l)).
    """
    a = jnp.asarray(x, params[0]["W"].dtype)
    inputs, zs = [], []
    layers = net.layers(a.shape[1])
    for l, layer in enumerate(params):
        inputs.append(a)
        z = a @ layer["W"].T + layer["b"]
        if layers[l].residual:
            z = layers[l].skip * zs[-1] + layers[l].branch * z
        zs.append(z)
        if l + 1 < len(params):
            a = net.sigma(z)
    return tuple(inputs), tuple(zs)


_forward_jit = jax.jit(forward, static_argnums=0)


def apply_all(net: MLP, params: Any, x: ArrayLike) -> tuple[jax.Array, ...]:
    """Every layer's preactivations: a tuple of L arrays z^(l) of shape (N, n_l) (index 0 = layer 1)."""
    check_net(net)
    x = check_x(x)
    check_params(net, params, x.shape[1])
    return _forward_jit(net, params, x)[1]


def apply(net: MLP, params: Any, x: ArrayLike) -> jax.Array:
    """The network output z^(L), shape (N, n_L)."""
    return apply_all(net, params, x)[-1]


def learning_rates(net: MLP, input_dim: int) -> tuple[dict, ...]:
    """The learning-rate tensor as a params-shaped tree of scalars: {"W": lambda_W^(l)/n_{l-1}, "b": lambda_b^(l)}.

    Contracting parameter Jacobians with this tree gives the NTK of docs/theory.md.
    """
    check_net(net)
    sizes = net.layer_widths(input_dim)
    return tuple({"W": net.lambda_Ws[l] / sizes[l], "b": net.lambda_bs[l]} for l in range(net.depth))


def householder_r(A: jax.Array) -> jax.Array:
    """The triangular factor R (min(m, N), N) of the thin QR factorization A = Q R of A (m, N).

    LAPACK's geqrf convention (reflector v with v_k = 1, R_kk = -sign(A_kk) |column|, no reflection
    where the column below the diagonal is already zero), so R equals ``jnp.linalg.qr(A, mode="r")``
    to rounding, and R^T R = A^T A for any rank (zero and repeated columns included).  Written with
    plain array operations instead of a LAPACK call because a batched LAPACK call in a program that
    runs on several CPU devices at once can deadlock XLA:CPU (jax 0.10.2; efftheory/__init__.py).
    """
    m, N = A.shape
    rows = jnp.arange(m)

    def reflect(k, A):
        x = A[:, k]
        alpha = x[k]
        below = jnp.where(rows > k, x, 0)
        sigma2 = jnp.sum(below * below)
        trivial = sigma2 == 0
        beta = -jnp.copysign(jnp.sqrt(alpha * alpha + sigma2), alpha)
        v = (below / jnp.where(trivial, 1, alpha - beta)).at[k].set(1)
        tau = jnp.where(trivial, 0, (beta - alpha) / jnp.where(trivial, 1, beta))
        return A - jnp.outer(tau * v, v @ A)

    r = min(m, N)
    return jnp.triu(jax.lax.fori_loop(0, r, reflect, A)[:r])


def conditional_forward(net: MLP, key: jax.Array, x: ArrayLike, dtype: DTypeLike) -> tuple[jax.Array, ...]:
    r"""Preactivations z^(1)..z^(L) at the N inputs drawn layer by layer from their exact conditional law.

    Given the layer inputs a_{l-1} (N, n_{l-1}), the rows z^(l)_i = b_i + W_i a_{l-1}^T are independent
    Gaussians with covariance C_b + (C_W/n_{l-1}) a_{l-1} a_{l-1}^T.  With the thin QR factorization
    a_{l-1}^T = Q R (:func:`householder_r`), W Q has i.i.d. N(0, C_W/n_{l-1}) entries (Q has orthonormal columns), so

        z^(l) = b^(l) + sqrt(C_W/n_{l-1}) (xi R)^T,   xi ~ N(0, 1) of shape (n_l, min(N, n_{l-1})),

    which has exactly the law of a network with Gaussian weights at these inputs, at O(N n) cost
    per layer instead of O(n^2).  The numbers come from one draw ``jax.random.normal(key, (P,))`` cut
    in the order xi^(1), b^(1), xi^(2), ...: other numbers than :func:`init_params` draws, so its
    networks are equal in law to those, not realization by realization.
    No weights exist, so NTK statistics cannot be taken this way.  A residual layer adds its skip path:
    z^(l) = xi z^(l-1) + gamma [b^(l) + sqrt(C_W/n_{l-1}) (xi R)^T] (given z^(l-1) the branch is the
    same Gaussian).
    """
    a = jnp.asarray(x, dtype)
    layers = net.layers(a.shape[1])
    sizes = (a.shape[1],) + net.widths
    ranks = [min(a.shape[0], n_in) for n_in in sizes[:-1]]
    xis = _standard_normals(key, [((n_out, r), (n_out,)) for n_out, r in zip(net.widths, ranks)], dtype)
    zs = []
    for l, (xi, xb) in enumerate(xis):
        R = householder_r(a.T)
        z = jnp.sqrt(jnp.asarray(net.C_Ws[l] / sizes[l], dtype)) * (xi @ R).T \
            + jnp.sqrt(jnp.asarray(net.C_bs[l], dtype)) * xb
        if layers[l].residual:
            z = layers[l].skip * zs[-1] + layers[l].branch * z
        zs.append(z)
        if l + 1 < net.depth:
            a = net.sigma(z)
    return tuple(zs)
