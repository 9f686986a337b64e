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
import numpy as np

from .. import _validate, mehler
from .._fastmath import pair_kernel
from .._pytree import result
from ..network import MLP

__all__ = ["InfiniteWidth", "KernelOverflowError", "infinite_width", "input_gram", "check_net"]


@result(meta=("net", "layers"))
class InfiniteWidth:
    """Leading-order kernels of an MLP on N inputs.

    Attributes:
      K: (L', N, N) NNGP kernel, K[i] = E[z^(l)_a z^(l)_b] at infinite width for layer l = layers[i];
        with every layer kept (the default) L' = L and K[l-1] is layer l.
      Theta: (L', N, N) frozen NTK of the same layers' preactivations.
      net: the MLP they describe.
      layers: the layer numbers l (1..L) kept, increasing; None means all of them.
    """

    K: jax.Array
    Theta: jax.Array
    net: MLP
    layers: tuple | None = None

    @property
    def depth(self) -> int:
        """Number of layers stored (L unless ``layers`` selected fewer)."""
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


_ROW_BLOCK = 128  # rows per block of the closed-form step: XLA temporaries stay in cache (measured 2x on jax 0.5)


@functools.partial(jax.jit, static_argnums=0)
def _closed_form_step(kernel, K, T, C_W, C_b, lam_W, lam_b):
    """Layer l+1 from layer l for a closed-form activation (THEORY.md, "Infinite width").

    ``kernel(K, d_a, d_b, eye) -> (S, dS)`` is :func:`efftheory._fastmath.pair_kernel`; evaluated on
    blocks of rows so that its elementwise temporaries never take N^2 memory.
    """
    N = K.shape[0]
    d = jnp.diagonal(K)

    def rows(Kb, Tb, db, i0):
        eye = (i0 + jnp.arange(Kb.shape[0]))[:, None] == jnp.arange(N)[None, :]
        S, dS = kernel(Kb, db[:, None], d[None, :], eye)
        return C_b + C_W * S, lam_b + lam_W * S + C_W * dS * Tb

    if N < 2 * _ROW_BLOCK:
        return rows(K, T, d, 0)
    nb = -(-N // _ROW_BLOCK)
    pad = nb * _ROW_BLOCK - N

    def blocks(A, fill=0.0):
        return jnp.pad(A, ((0, pad),) + ((0, 0),) * (A.ndim - 1), constant_values=fill).reshape(
            (nb, _ROW_BLOCK) + A.shape[1:])

    Ko, To = jax.lax.map(lambda a: rows(*a), (blocks(K), blocks(T), blocks(d, 1.0),
                                              jnp.arange(0, nb * _ROW_BLOCK, _ROW_BLOCK)))
    return Ko.reshape(-1, N)[:N], To.reshape(-1, N)[:N]


@jax.jit
def _first_layer(G, C_W, C_b, lam_W, lam_b):
    """Layer 1 from the input Gram matrix.  (Not symmetrised: an XLA transpose of a 1024^2 matrix costs
    17 ms here, as much as a whole layer; every later step is symmetric in a <-> b, so a symmetric G,
    which XLA's x x^T is in practice, gives bitwise symmetric kernels.)"""
    return C_b + C_W * G, lam_b + lam_W * G


@jax.jit
def _update(S, dS, T, C_W, C_b, lam_W, lam_b):
    return C_b + C_W * S, lam_b + lam_W * S + C_W * dS * T


_HOST_STACK_BYTES = 32 * 2**20


class _Layers:
    """Collects the kept layers of one kernel into an (L', N, N) array.

    On the CPU backend a result above 32 MiB is written layer by layer into a 64-byte aligned numpy
    array and handed to jax with device_put, which wraps aligned host memory without a copy.  A fresh
    XLA CPU buffer that large (above glibc's mmap threshold) is faulted in 4 KiB pages on every call:
    measured here at 104 ms for 80 MB, against 32 ms for numpy, whose large allocations use
    transparent huge pages, and more than the whole relu recursion at N = 1024, depth 10.  Elsewhere
    (GPU, small results) it is jnp.stack.  Same values either way.
    """

    def __init__(self, count: int, like: jax.Array):
        self.items: list = []
        self.host = None
        nbytes = count * like.size * like.dtype.itemsize
        self.device = next(iter(like.devices()))
        if nbytes >= _HOST_STACK_BYTES and self.device.platform == "cpu":
            n = count * like.size
            raw = np.empty(n + 64 // like.dtype.itemsize, dtype=like.dtype)
            off = (-raw.ctypes.data % 64) // raw.itemsize
            self.host = raw[off:off + n].reshape((count,) + like.shape)

    def append(self, a: jax.Array) -> None:
        if self.host is None:
            self.items.append(a)
        else:
            self.host[len(self.items)] = np.asarray(a)
            self.items.append(None)

    def stacked(self) -> jax.Array:
        if self.host is None:
            return jnp.stack(self.items)
        return jax.device_put(self.host, self.device)


def _check_layers(layers, L: int) -> tuple[int, ...]:
    """None -> all layers 1..L; "last" -> (L,); an int or a sequence of ints in 1..L -> sorted, unique."""
    if layers is None:
        return tuple(range(1, L + 1))
    if isinstance(layers, str) and layers == "last":
        return (L,)
    items = [layers] if isinstance(layers, (int, np.integer)) else layers
    try:
        items = list(items)
    except TypeError:
        items = [None]
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= L
                        for v in items):
        raise ValueError(f"layers: expected None (all), 'last', or layer numbers in 1..{L}, got {layers!r}")
    return tuple(sorted({int(v) for v in items}))


def infinite_width(net: MLP, x, *, layers=None) -> InfiniteWidth:
    """NNGP kernel and NTK of every layer of ``net`` on inputs ``x`` of shape (N, n_0), float64.

    Closed-form activations: one compiled step per layer (:mod:`efftheory._fastmath` for relu, abs
    and erf).  Any other activation goes through the Mehler series of :mod:`efftheory.mehler` (N
    one-dimensional rules and a power series in the correlation per layer, the two-dimensional rule
    only for the pairs where the series' error bound fails).

    ``layers`` keeps only some layers (1-based numbers, or "last"): the result then holds
    len(layers) N^2 numbers per kernel instead of L N^2 (all layers are still computed).
    Identical, collinear and zero inputs are legitimate (kernels stay finite).
    """
    net = check_net(net)
    keep = _check_layers(layers, net.depth)
    G = input_gram(x)
    hp = [[float(v) for v in vs] for vs in (net.C_Ws, net.C_bs, net.lambda_Ws, net.lambda_bs)]
    K, Theta = _first_layer(G, *(v[0] for v in hp))
    Ks, Ts = _Layers(len(keep), K), _Layers(len(keep), Theta)
    if 1 in keep:
        Ks.append(K)
        Ts.append(Theta)
    kernel = pair_kernel(net.sigma) if net.sigma.has_closed_form else None
    for l in range(1, net.depth):
        if kernel is not None:
            K, Theta = _closed_form_step(kernel, K, Theta, *(v[l] for v in hp))
        else:
            _check_diagonal(K)
            S, dS = mehler.pair_moments(net.sigma, K)
            K, Theta = _update(S, dS, Theta, *(v[l] for v in hp))
        if l + 1 in keep:
            Ks.append(K)
            Ts.append(Theta)
    out = InfiniteWidth(K=Ks.stacked(), Theta=Ts.stacked(), net=net,
                        layers=None if len(keep) == net.depth else keep)
    return _checked(out, K, Theta)


class KernelOverflowError(ValueError, FloatingPointError):
    """The kernel recursion left float64 for these hyperparameters (a ValueError naming ``net``)."""


_OVERFLOW = ("net: the kernel recursion overflowed (non-finite K or Theta); "
             "the network is far in the ordered/chaotic phase for this depth, reduce C_W or depth")


@jax.jit
def _all_finite(K, T, K_last, T_last):
    """Every diagonal entry of every stored layer, and the last layer in full.

    K and Theta are positive semi-definite (|K_ab| <= sqrt(K_aa K_bb)), so with finite diagonals an
    off-diagonal entry can only be NaN, and NaN propagates through every later layer's kernel (all
    closed forms and the Mehler series are arithmetic in the entry): checking the last layer in full
    finds it without reading all L N^2 numbers again.
    """
    diag = jnp.diagonal(K, axis1=1, axis2=2), jnp.diagonal(T, axis1=1, axis2=2)
    return (jnp.all(jnp.isfinite(diag[0])) & jnp.all(jnp.isfinite(diag[1]))
            & jnp.all(jnp.isfinite(K_last)) & jnp.all(jnp.isfinite(T_last)))


def _check_diagonal(K) -> None:
    if not bool(jnp.all(jnp.isfinite(jnp.diagonal(K)))):
        raise KernelOverflowError(_OVERFLOW)


def _checked(out: InfiniteWidth, K_last, T_last) -> InfiniteWidth:
    if not bool(_all_finite(out.K, out.Theta, K_last, T_last)):
        raise KernelOverflowError(_OVERFLOW)
    return out
