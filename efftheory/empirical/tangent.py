r"""The exact neural tangent kernel of one finite network (docs/theory.md, "The network"); module ``tangent``
(not ``ntk``, so that ``efftheory.empirical.ntk`` is unambiguously the function).

    H_{i1 i2; a1 a2} = sum_l [ lambda_b^(l) sum_k dz_{i1;a1}/db_k^(l) dz_{i2;a2}/db_k^(l)
                               + (lambda_W^(l)/n_{l-1}) sum_{jk} dz_{i1;a1}/dW_{kj}^(l) dz_{i2;a2}/dW_{kj}^(l) ]

For an MLP the parameter derivatives factor through the layer structure.  With the backward vectors
g^(l)_{i;a,k} = dz^(L)_{i;a} / dz^(l)_{k;a} (the chain rule g^(l) = (g^(l+1) W^(l+1)) * sigma'(z^(l)),
g^(L)_{i;a,k} = delta_{ik}) and the layer inputs a_{l-1} (a_0 = x, a_l = sigma(z^(l))),

    dz_{i;a}/db_k^(l) = g^(l)_{i;a,k},     dz_{i;a}/dW_{kj}^(l) = g^(l)_{i;a,k} a_{l-1;a,j},

so that

    H_{i1 i2; a1 a2} = sum_l (g^(l)_{i1;a1} . g^(l)_{i2;a2})
                       [ lambda_b^(l) + (lambda_W^(l)/n_{l-1}) (a_{l-1;a1} . a_{l-1;a2}) ].

In a residual MLP (docs/theory.md, "Residual MLPs") layer l+1 computes
z^(l+1) = xi^(l+1) z^(l) + gamma^(l+1) [b^(l+1) + W^(l+1) sigma(z^(l))], so the chain rule gains the skip path
and every parameter derivative of layer l carries gamma^(l):

    g^(l) = xi^(l+1) g^(l+1) + gamma^(l+1) (g^(l+1) W^(l+1)) * sigma'(z^(l)),
    H_{i1 i2; a1 a2} = sum_l (gamma^(l))^2 (g^(l)_{i1;a1} . g^(l)_{i2;a2})
                       [ lambda_b^(l) + (lambda_W^(l)/n_{l-1}) (a_{l-1;a1} . a_{l-1;a2}) ].

That is a handful of matmuls per layer; no Jacobian is materialized.  :func:`ntk_autodiff` is the
generic (and much slower) path for any ``apply_fn``: it contracts ``jax.jacrev`` Jacobians with a
learning-rate tree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ..network import MLP
from ..network import _is_residual as _residual
from .networks import check_net, check_params, check_x, forward

__all__ = ["ntk", "ntk_full", "ntk_autodiff"]


def _sigma_prime(sigma, z):
    """sigma'(z) elementwise, by a forward-mode derivative of the activation (any elementwise callable)."""
    return jax.jvp(sigma, (z,), (jnp.ones_like(z),))[1]


def backward_vectors(net: MLP, params: Any, zs: tuple[jax.Array, ...], outputs: jax.Array) -> tuple[jax.Array, ...]:
    """g^(l)_{i;a,k} = dz^(L)_{outputs[i];a} / dz^(l)_{k;a}: a tuple of L arrays (len(outputs), N, n_l)."""
    N = zs[-1].shape[0]
    gL = jnp.broadcast_to(jax.nn.one_hot(outputs, net.widths[-1], dtype=zs[-1].dtype)[:, None, :],
                          (outputs.shape[0], N, net.widths[-1]))
    gs = [gL]
    skips, branches = net.skips, net.branches
    for l in range(net.depth - 2, -1, -1):
        g = (gs[-1] @ params[l + 1]["W"]) * _sigma_prime(net.sigma, zs[l])
        if _residual(skips[l + 1], branches[l + 1]):  # layer l+2 (1-based) is residual
            g = skips[l + 1] * gs[-1] + branches[l + 1] * g
        gs.append(g)
    return tuple(reversed(gs))


def ntk_from_layers(net: MLP, inputs: tuple[jax.Array, ...], gs: tuple[jax.Array, ...]) -> jax.Array:
    """H_{i1 i2; a1 a2} (k, k, N, N) from layer inputs a_{l-1} (N, n_{l-1}) and backward vectors (k, N, n_l)."""
    H = 0.0
    for l, (a, g) in enumerate(zip(inputs, gs)):
        gg = jnp.einsum("iac,jbc->ijab", g, g)
        if _residual(net.skips[l], net.branches[l]):  # d z / d theta^(l) carries gamma^(l)
            gg = (net.branches[l] * net.branches[l]) * gg
        H = H + gg * (net.lambda_bs[l] + (net.lambda_Ws[l] / a.shape[1]) * (a @ a.T))
    return H


@functools.partial(jax.jit, static_argnums=(0,))
def _ntk_outputs(net, params, x, outputs):
    inputs, zs = forward(net, params, x)
    return ntk_from_layers(net, inputs, backward_vectors(net, params, zs, outputs))


def _check_output(net, output):
    if isinstance(output, bool) or not isinstance(output, int) or not 0 <= output < net.widths[-1]:
        raise ValueError(f"output: expected an output neuron index in [0, {net.widths[-1]}), got {output!r}")
    return output


def ntk(net: MLP, params: Any, x: ArrayLike, *, output: int = 0) -> jax.Array:
    """Exact NTK H_{ii; a1 a2} of one finite network for output neuron i = ``output``, shape (N, N).

    Uses the learning-rate tensor lambda_b^(l), lambda_W^(l)/n_{l-1} of ``net`` (docs/theory.md) and the
    layer structure (module docstring); jitted, a few matmuls per layer.
    """
    check_net(net)
    x = check_x(x)
    check_params(net, params, x.shape[1])
    _check_output(net, output)
    return _ntk_outputs(net, params, x, jnp.asarray([output]))[0, 0]


def ntk_full(net: MLP, params: Any, x: ArrayLike) -> jax.Array:
    """Exact NTK for every pair of output neurons: H_{i1 i2; a1 a2}, shape (n_L, n_L, N, N)."""
    check_net(net)
    x = check_x(x)
    check_params(net, params, x.shape[1])
    return _ntk_outputs(net, params, x, jnp.arange(net.widths[-1]))


def ntk_autodiff(apply_fn: Callable, params: Any, x: ArrayLike, *, learning_rates: Any = None,
                 output: int | None = 0) -> jax.Array:
    """NTK of any model by autodiff: H = sum_leaves lambda_leaf J_leaf J_leaf^T with J = jax.jacrev.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, k)`` outputs.
      params: any pytree of arrays.
      x: inputs (N, n_0).
      learning_rates: a pytree with the structure of ``params`` and one scalar per leaf (for an MLP,
        :func:`efftheory.empirical.learning_rates`); None means 1 for every parameter.
      output: an output index (returns (N, N)) or None for all pairs (returns (k, k, N, N)).

    Memory is N * (number of parameters) per output: use it to check, not to scale.
    """
    if not callable(apply_fn):
        raise ValueError(f"apply_fn: expected a callable apply_fn(params, x), got {type(apply_fn).__name__}")
    x = check_x(x)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        raise ValueError("params: expected a non-empty pytree of arrays")
    if learning_rates is None:
        lrs = [1.0] * len(leaves)
    else:
        lrs, lr_def = jax.tree_util.tree_flatten(learning_rates)
        if lr_def != treedef:
            raise ValueError("learning_rates: expected a pytree with the same structure as params")
    if output is not None and (isinstance(output, bool) or not isinstance(output, int) or output < 0):
        raise ValueError(f"output: expected a non-negative int or None, got {output!r}")
    xd = jnp.asarray(x, leaves[0].dtype)
    shape = jax.eval_shape(apply_fn, params, xd).shape
    if len(shape) != 2 or shape[0] != x.shape[0]:
        raise ValueError(f"apply_fn: expected outputs of shape (N, k) = ({x.shape[0]}, k), got {shape}")
    if output is not None and output >= shape[1]:
        raise ValueError(f"output: expected an output index below k = {shape[1]}, got {output}")
    full = output is None
    return _autodiff(apply_fn, full, params, xd, lrs, 0 if full else output)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _autodiff(apply_fn, full, params, x, lrs, output):
    def f(p):
        out = apply_fn(p, x)
        return out if full else out[:, output]

    jac = jax.tree_util.tree_leaves(jax.jacrev(f)(params))
    H = 0.0
    for lr, J in zip(lrs, jac):
        if not full:
            J = J.reshape(J.shape[0], -1)
            H = H + lr * (J @ J.T)
        else:
            J = J.reshape(J.shape[:2] + (-1,))
            H = H + lr * jnp.einsum("aip,bjp->ijab", J, J)
    return H
