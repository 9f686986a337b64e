r"""The dNTK and ddNTKs of sampled finite networks, and estimators of their first-order statistics
(docs/dntk.md; PDLT ch. 11).

For one network with parameters theta, outputs z_c = z^(L)_{i;d} (c = (i, d), M = n_L N of them) and
the learning-rate tensor lambda (docs/theory.md), write v_c = lambda (.) grad_theta z_c (M parameter-space
directions) and g(t) = z(theta + sum_a t_a v_a) for t in R^M.  Then

    dH_{c0 c1 c2}        = sum_{mu nu} lambda_mu lambda_nu d_mu d_nu z_c0 d_mu z_c1 d_nu z_c2 = d^2 g_c0 / dt_c1 dt_c2
    ddH^I_{c0 c1 c2 c3}  = d^3 g_c0 / dt_c1 dt_c2 dt_c3
    ddH^II_{c1 c2 c3 c4} = sum_mu lambda_mu (d_mu u_{c1 c3}) (d_mu u_{c2 c4}),   u_{c a}(theta) = <grad z_c(theta), v_a>

with the directions v held fixed when differentiating u.  Only M-dimensional Hessians and
third-derivative tensors of g and the Jacobian of the M^2 directional derivatives u are formed
(forward-over-forward and reverse-over-forward compositions): the parameter Hessian never is.

Estimators (n = n_{L-1}, the fan-in of the output layer; i != k output neurons, averaged over all
ordered pairs, then over networks with standard errors over networks):

    P_{d0d1d2d3} ~ n dH_{i i k; d0d1d2} z_{k;d3}       Q_{d0d1d2d3} ~ n dH_{i k k; d0d1d2} z_{i;d3}
    R_{d0d1d2d3} ~ n ddH^I_{i i k k}
    S ~ n ddH^II_{i i k k},   T ~ n ddH^II_{i k i k},   U ~ n ddH^II_{i k k i}

and, for any n_L (one output neuron i = k), the combinations

    dntk     ~ n dH_{iii} z_i  = P_{0123} + P_{0213} + Q_{0123}
    ddntk_I  ~ n ddH^I_{iiii}  = R_{0123} + R_{0213} + R_{0312}
    ddntk_II ~ n ddH^II_{iiii} = S + T + U

each equal to its first-order value plus O(1/n) (so a width sweep of these fits a + c1/n with a the
prediction of :func:`efftheory.theory.dntk.dntk_statistics`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .. import _validate
from .._pytree import result
from ..network import MLP
from .networks import check_dtype, check_net, check_params, check_x, forward, init_layers, learning_rates
from .statistics import Estimate, mean_and_stderr

__all__ = ["NetworkDNTK", "DNTKEstimates", "network_dntk", "dntk_estimates", "pattern_values"]


@result
class NetworkDNTK:
    """The exact dNTK and ddNTKs of one network at inputs x (N inputs, n_L outputs).

    Attributes (output neuron and input indices interleaved, as in the definitions):
      z: (n_L, N) outputs z_{i;d}.
      dH: (n_L, N, n_L, N, n_L, N)  dH[i0, d0, i1, d1, i2, d2].
      ddH_I: (n_L, N) * 4  ddH^I[i0, d0, i1, d1, i2, d2, i3, d3].
      ddH_II: (n_L, N) * 4  ddH^II[i1, d1, i2, d2, i3, d3, i4, d4].
    """

    z: jax.Array
    dH: jax.Array
    ddH_I: jax.Array
    ddH_II: jax.Array


@result(meta=("fan_in", "n_networks"))
class DNTKEstimates:
    """Estimates of P, Q, R, S, T, U (each (N, N, N, N); None when n_L = 1) and the combinations
    dntk, ddntk_I, ddntk_II (always), all multiplied by the output layer's fan-in n_{L-1}
    (module docstring).  ``per_network`` holds the per-network values (M, N, N, N, N) by name."""

    P: Estimate | None
    Q: Estimate | None
    R: Estimate | None
    S: Estimate | None
    T: Estimate | None
    U: Estimate | None
    dntk: Estimate
    ddntk_I: Estimate
    ddntk_II: Estimate
    per_network: dict
    fan_in: int
    n_networks: int


def _outputs(net, params, x):
    """Outputs flattened to (n_L N,) in the order c = i N + d."""
    return forward(net, params, x)[1][-1].T.reshape(-1)


def _tensors(net, params, x, lr):
    nL, N = net.widths[-1], x.shape[0]
    M = nL * N
    f = functools.partial(_outputs, net, x=x)
    J = jax.jacrev(lambda p: f(p))(params)  # leaves (M, *shape)
    V = jax.tree.map(lambda j, l: j * l, J, lr)  # v_a = lambda (.) grad z_a

    def g(t):
        p = jax.tree.map(lambda w, v: w + jnp.tensordot(t, v, axes=1), params, V)
        return f(p)

    def h2(t):
        H = jax.jacfwd(jax.jacfwd(g))(t)
        return H, H

    t0 = jnp.zeros((M,), x.dtype)
    H3, H2 = jax.jacfwd(h2, has_aux=True)(t0)  # H3[c0, c1, c2, c3], H2[c0, c1, c2]

    def u(p):  # u[c, a] = <grad z_c(p), v_a> with v fixed
        return jax.vmap(lambda v: jax.jvp(f, (p,), (v,))[1], out_axes=1)(V)

    G = jax.jacrev(u)(params)  # leaves (M, M, *shape)
    ddII = 0.0
    for gl, l in zip(jax.tree.leaves(G), jax.tree.leaves(lr)):
        gf = gl.reshape(M, M, -1)
        ddII = ddII + l * jnp.einsum("cam,dbm->cdab", gf, gf)
    z = f(params)
    shp = (nL, N)
    return NetworkDNTK(z=z.reshape(shp), dH=H2.reshape(shp * 3), ddH_I=H3.reshape(shp * 4),
                       ddH_II=ddII.reshape(shp * 4))


def network_dntk(net: MLP, params: Sequence[dict[str, jax.Array]], x: ArrayLike) -> NetworkDNTK:
    """Exact dNTK and ddNTKs of one network (module docstring), by autodiff; no parameter Hessian."""
    net = check_net(net)
    x = check_x(x)
    check_params(net, params, x.shape[1])
    dtype = params[0]["W"].dtype
    lr = learning_rates(net, x.shape[1])
    return _tensors_jit(net, params, jnp.asarray(x, dtype), lr)


_tensors_jit = jax.jit(_tensors, static_argnums=0)


def _interleave(a, k):
    """(n_L, N) * k -> (n_L,) * k + (N,) * k."""
    return a.transpose(tuple(range(0, 2 * k, 2)) + tuple(range(1, 2 * k, 2)))


def _pattern_values(t: NetworkDNTK) -> dict:
    """Per-network pattern averages (before the fan-in factor), each (N, N, N, N):

    P: dH_{iik} z_k, Q: dH_{ikk} z_i, R: ddH^I_{iikk}, S: ddH^II_{iikk}, T: ddH^II_{ikik},
    U: ddH^II_{ikki}, averaged over ordered pairs i != k (absent when n_L = 1); dntk: dH_{iii} z_i,
    ddntk_I: ddH^I_{iiii}, ddntk_II: ddH^II_{iiii}, averaged over i.  Works under vmap.
    """
    nL = t.z.shape[0]
    ar = np.arange(nL)
    I, K = ar[:, None], ar[None, :]
    dH, d1, d2 = _interleave(t.dH, 3), _interleave(t.ddH_I, 4), _interleave(t.ddH_II, 4)
    zz = t.z
    pats = {
        "P": jnp.einsum("ikabc,kd->ikabcd", dH[I, I, K], zz),
        "Q": jnp.einsum("ikabc,id->ikabcd", dH[I, K, K], zz),
        "R": d1[I, I, K, K],
        "S": d2[I, I, K, K],
        "T": d2[I, K, I, K],
        "U": d2[I, K, K, I],
    }
    diag = {"dntk": pats["P"][ar, ar], "ddntk_I": pats["R"][ar, ar], "ddntk_II": pats["S"][ar, ar]}
    out = {k: v.mean(0) for k, v in diag.items()}
    if nL > 1:
        off = np.asarray(I != K)
        for k, v in pats.items():
            out[k] = jnp.sum(v * off.reshape(off.shape + (1,) * 4), axis=(0, 1)) / (nL * (nL - 1))
    return out


pattern_values = jax.jit(_pattern_values)
pattern_values.__doc__ = _pattern_values.__doc__


@functools.partial(jax.jit, static_argnums=(0, 4))
def _chunk(net, base_key, start, x, size, lr):
    def one(m):
        params = init_layers(net, jax.random.fold_in(base_key, m), x.shape[1], x.dtype)
        return _pattern_values(_tensors(net, params, x, lr))

    return jax.lax.map(one, start + jnp.arange(size, dtype=jnp.uint32))


def dntk_estimates(net: MLP, x: ArrayLike, n_networks: int, seed: int, *, chunk: int = 8,
                   dtype: DTypeLike = jnp.float64) -> DNTKEstimates:
    """Sample ``n_networks`` networks (init_params draws, network m from ``fold_in(key(seed), m)``,
    so results do not depend on ``chunk``) and estimate P..U and the combinations at the output layer.

    Every value is multiplied by the output layer's fan-in n_{L-1} (n_0 for depth 1), so it
    estimates the first-order tensor itself up to O(1/n).  Standard errors are over networks.
    Compute cost per network ~ (n_L N)^3 forward passes; memory ~ (n_L N)^2 x parameters.
    """
    net = check_net(net)
    x = check_x(x)
    M = _validate.positive_int("n_networks", n_networks, minimum=2, maximum=_validate.MAX_NETWORKS)
    seed = _validate.seed("seed", seed)
    chunk = _validate.positive_int("chunk", chunk)
    dt = check_dtype(dtype)
    xj = jnp.asarray(x, dt)
    lr = learning_rates(net, x.shape[1])
    base = jax.random.key(seed)
    chunk = min(chunk, M)
    parts = []
    for lo in range(0, M, chunk):  # every call has the same size (one compile): the last one runs past M
        out = _chunk(net, base, jnp.uint32(lo), xj, chunk, lr)
        parts.append({k: np.asarray(v, np.float64) for k, v in out.items()})
    fan_in = net.layer_widths(x.shape[1])[-2]
    per = {k: np.concatenate([p[k] for p in parts])[:M] * fan_in for k in parts[0]}
    est = {k: mean_and_stderr(v) for k, v in per.items()}
    g = lambda k: est.get(k)
    return DNTKEstimates(P=g("P"), Q=g("Q"), R=g("R"), S=g("S"), T=g("T"), U=g("U"), dntk=est["dntk"],
                         ddntk_I=est["ddntk_I"], ddntk_II=est["ddntk_II"], per_network=per, fan_in=int(fan_in),
                         n_networks=M)
