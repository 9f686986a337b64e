r"""Infinite-width kernels: the NNGP kernel K and the NTK Theta, layer by layer (THEORY.md).

    K^(1)_{a b}     = C_b^(1) + C_W^(1) (1/n_0) sum_j x_{j;a} x_{j;b}
    K^(l+1)         = C_b^(l+1) + C_W^(l+1) <sigma_a sigma_b>_{K^(l)}
    Theta^(1)_{a b} = lambda_b^(1) + lambda_W^(1) (1/n_0) sum_j x_{j;a} x_{j;b}
    Theta^(l+1)     = lambda_b^(l+1) + lambda_W^(l+1) <sigma_a sigma_b>_{K^(l)}
                      + C_W^(l+1) <sigma'_a sigma'_b>_{K^(l)} Theta^(l)

Shapes: x is (N, n_0); K and Theta are (L, N, N) with index 0 = layer 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _validate
from .._pytree import result
from ..gaussian import pair_moments, rule_size
from ..network import MLP

__all__ = ["InfiniteWidth", "KernelOverflowError", "infinite_width", "input_gram", "check_net"]


@result(meta=("net",))
class InfiniteWidth:
    """Leading-order kernels of an MLP on N inputs.

    Attributes:
      K: (L, N, N) NNGP kernel, K[l-1] = E[z^(l)_a z^(l)_b] at infinite width.
      Theta: (L, N, N) frozen NTK of layer l's preactivations.
      net: the MLP they describe.
    """

    K: jax.Array
    Theta: jax.Array
    net: MLP

    @property
    def depth(self) -> int:
        return self.K.shape[0]

    @property
    def n_inputs(self) -> int:
        return self.K.shape[1]


def check_net(net) -> MLP:
    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    return net


def input_gram(x) -> jax.Array:
    """(1/n_0) x x^T for inputs x of shape (N, n_0), validated."""
    x = _validate.inputs("x", x)
    xj = jnp.asarray(x, dtype=jnp.float64)
    G = xj @ xj.T / x.shape[1]
    if not bool(jnp.all(jnp.isfinite(G))):
        raise ValueError("x: entries too large, (1/n_0) x x^T overflows float64")
    return G


def _step(act, order, C_W, C_b, lam_W, lam_b, K, Theta):
    S, dS = pair_moments(act, K, order=order)
    K_next = C_b + C_W * S
    Theta_next = lam_b + lam_W * S + C_W * dS * Theta
    return K_next, Theta_next


_step_jit = jax.jit(_step, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0)
def _closed_form_recursion(act, G, C_Ws, C_bs, lam_Ws, lam_bs):
    """All layers in one compiled scan (closed-form activations need no data-dependent rule)."""
    K0 = C_bs[0] + C_Ws[0] * G
    T0 = lam_bs[0] + lam_Ws[0] * G

    def body(carry, hp):
        K, T = _step(act, None, *hp, *carry)
        return (K, T), (K, T)

    _, (Ks, Ts) = jax.lax.scan(body, (K0, T0), (C_Ws[1:], C_bs[1:], lam_Ws[1:], lam_bs[1:]))
    return jnp.concatenate([K0[None], Ks]), jnp.concatenate([T0[None], Ts])


def infinite_width(net: MLP, x) -> InfiniteWidth:
    """NNGP kernel and NTK of every layer of ``net`` on inputs ``x`` of shape (N, n_0), float64.

    Identical, collinear and zero inputs are legitimate (kernels stay finite).
    """
    net = check_net(net)
    G = input_gram(x)
    if net.sigma.has_closed_form:
        hp = [jnp.asarray(v, dtype=jnp.float64) for v in (net.C_Ws, net.C_bs, net.lambda_Ws, net.lambda_bs)]
        K, Theta = _closed_form_recursion(net.sigma, G, *hp)
        return _checked(InfiniteWidth(K=K, Theta=Theta, net=net))
    K = net.C_bs[0] + net.C_Ws[0] * G
    Theta = net.lambda_bs[0] + net.lambda_Ws[0] * G
    Ks, Ts = [K], [Theta]
    for l in range(1, net.depth):
        order = None if net.sigma.has_closed_form else rule_size(net.sigma, float(jnp.max(jnp.diagonal(K))))
        K, Theta = _step_jit(net.sigma, order, net.C_Ws[l], net.C_bs[l], net.lambda_Ws[l], net.lambda_bs[l],
                             K, Theta)
        Ks.append(K)
        Ts.append(Theta)
    return _checked(InfiniteWidth(K=jnp.stack(Ks), Theta=jnp.stack(Ts), net=net))


class KernelOverflowError(ValueError, FloatingPointError):
    """The kernel recursion left float64 for these hyperparameters (a ValueError naming ``net``)."""


def _checked(out: InfiniteWidth) -> InfiniteWidth:
    if not bool(jnp.all(jnp.isfinite(out.K)) and jnp.all(jnp.isfinite(out.Theta))):
        raise KernelOverflowError(
            "net: the kernel recursion overflowed (non-finite K or Theta); "
            "the network is far in the ordered/chaotic phase for this depth, reduce C_W or depth"
        )
    return out
