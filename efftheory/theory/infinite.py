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


@jax.jit
def _gram(x):
    return x @ x.T / x.shape[1]


def input_gram(x) -> jax.Array:
    """(1/n_0) x x^T for inputs x of shape (N, n_0), validated.

    Overflow is checked on the host from the diagonal (1/n_0)|x_a|^2: |G_ab| <= sqrt(G_aa G_bb), so a
    finite diagonal means a finite G, without waiting for the device.
    """
    x = np.asarray(_validate.inputs("x", x), dtype=np.float64)
    with np.errstate(over="ignore"):
        diag = np.einsum("ij,ij->i", x, x) / x.shape[1]
    if not np.all(np.isfinite(diag)):
        raise ValueError("x: entries too large, (1/n_0) x x^T overflows float64")
    return _gram(jnp.asarray(x))


# ------------------------------------------------------------------------------------------ folded layout
# K and Theta are symmetric, and for a closed form each entry of the next layer depends only on the same
# entry and the diagonal.  The closed-form recursion therefore runs on one triangle, stored without
# gaps in an (N + 1) x N/2 array Z (N even; an odd N gets a zero-variance dummy input):
#
#     Z[r, j]     = K[r, M + j]                 r < M                  (the off-diagonal block, full)
#     Z[M + i, j] = K[i, j]                     i <= j                 (upper triangle of the top-left block)
#     Z[M + i, j] = K[M + i - 1, M + j]         i > j                  (lower triangle of the bottom-right)
#
# with M = N/2: half the entries, so half the arithmetic and memory traffic of a layer.  Folding needs
# no transpose; unfolding (for the layers returned) does.  Rows past N + 1 (whole row blocks) are zeros.

_ROW_BLOCK = 128  # rows per block of the closed-form step: XLA temporaries stay in cache (measured 2x on jax 0.5)


def _folded_rows(N: int) -> int:
    """Rows of the stored Z: N + 1, rounded up to whole row blocks when the step works in blocks
    (the extra rows are zeros, computed on and ignored, so the blocks need no padding copies)."""
    R = N + 1
    return R if R < 2 * _ROW_BLOCK else -(-R // _ROW_BLOCK) * _ROW_BLOCK


def _fold(K):
    """(N, N) symmetric with N even -> Z (_folded_rows(N), N/2) (layout above)."""
    N = K.shape[0]
    M = N // 2
    i, j = jnp.arange(M + 1)[:, None], jnp.arange(M)[None, :]
    top = jnp.pad(K[:M, :M], ((0, 1), (0, 0)))
    bottom = jnp.pad(K[M:, M:], ((1, 0), (0, 0)))
    Z = jnp.concatenate([K[:M, M:], jnp.where(i <= j, top, bottom)])
    return jnp.pad(Z, ((0, _folded_rows(N) - (N + 1)), (0, 0)))


def _folded_diagonal(Z):
    """The diagonal K_aa, a = 0..N-1, of a folded Z."""
    M = Z.shape[1]
    return jnp.concatenate([jnp.diagonal(Z[M:2 * M]), jnp.diagonal(Z[M + 1:2 * M + 1])])


@functools.partial(jax.jit, static_argnums=1)
def _unfold(Z, N: int):
    """Folded Z -> the full (N, N) matrix (on the device)."""
    M = Z.shape[1]
    i, j = jnp.arange(M)[:, None], jnp.arange(M)[None, :]
    X, Y0, Y1 = Z[:M], Z[M:2 * M], Z[M + 1:2 * M + 1]
    A = jnp.where(i <= j, Y0, Y0.T)
    B = jnp.where(i >= j, Y1, Y1.T)
    return jnp.block([[A, X], [X.T, B]])[:N, :N]


@functools.lru_cache(maxsize=8)
def _strict_lower(M: int) -> np.ndarray:
    return np.tril(np.ones((M, M), dtype=bool), -1)


def _unfold_host(Z: np.ndarray, out: np.ndarray) -> None:
    """Folded Z -> full matrix written into ``out`` (N, N), with numpy (3 ms for N = 1024, against 4-6 ms
    for the same transposes in XLA here)."""
    N, M = out.shape[0], Z.shape[1]
    full = out if N == 2 * M else np.empty((2 * M, 2 * M), Z.dtype)
    X, Y0, Y1 = Z[:M], Z[M:2 * M], Z[M + 1:2 * M + 1]
    lower = _strict_lower(M)
    full[:M, M:] = X
    full[M:, :M] = X.T
    full[:M, :M] = Y0
    np.copyto(full[:M, :M], Y0.T, where=lower)
    full[M:, M:] = Y1
    np.copyto(full[M:, M:], Y1.T, where=lower.T)
    if full is not out:
        out[...] = full[:N, :N]


@functools.partial(jax.jit, static_argnums=0)
def _folded_first_layer(N: int, G, C_W, C_b, lam_W, lam_b):
    """Layer 1 from the input Gram matrix, folded (an odd N padded with a zero-variance input)."""
    if N % 2:
        G = jnp.pad(G, ((0, 1), (0, 1)))
    Z = _fold(G)
    return C_b + C_W * Z, lam_b + lam_W * Z


@functools.partial(jax.jit, static_argnums=0)
def _closed_form_step(kernel, Z, T, C_W, C_b, lam_W, lam_b):
    """Layer l+1 from layer l for a closed-form activation (THEORY.md, "Infinite width"), folded.

    ``kernel`` is the activation's :class:`efftheory._fastmath.PairKernel`, evaluated on blocks of rows
    of Z so that its elementwise temporaries stay small; its per-input quantities (rows and columns)
    and the diagonal mask follow the folded layout.
    """
    R, M = Z.shape
    per_input = kernel.prep(_folded_diagonal(Z))  # tuple of (N,) vectors
    pad = jnp.zeros(R - 2 * M, Z.dtype)  # row 2M and the block padding below it
    # row vectors: rows M + i with i <= j hold input i; rows r < M input r; rows M + i with i > j input M + i - 1
    rows_upper = [jnp.concatenate([jnp.zeros(M, Z.dtype), v[:M], pad]) for v in per_input]
    rows_lower = [jnp.concatenate([v[:M], pad[:1], v[M:], pad[1:]]) for v in per_input]
    j = jnp.arange(M)[None, :]

    def rows(Zb, Tb, r):
        rr = r[:, None]
        upper = (rr >= M) & (rr - M <= j)
        a = tuple(jnp.where(upper, u[r][:, None], w[r][:, None]) for u, w in zip(rows_upper, rows_lower))
        b = tuple(jnp.where(upper, v[None, :M], v[None, M:]) for v in per_input)
        eye = (rr >= M) & ((rr - M == j) | (rr - M - 1 == j))
        S, dS = kernel.fn(Zb, a, b, eye)
        return C_b + C_W * S, lam_b + lam_W * S + C_W * dS * Tb

    if R % _ROW_BLOCK or R < 2 * _ROW_BLOCK:
        return rows(Z, T, jnp.arange(R))
    nb = R // _ROW_BLOCK
    Zo, To = jax.lax.map(lambda a: rows(*a), (Z.reshape(nb, _ROW_BLOCK, M), T.reshape(nb, _ROW_BLOCK, M),
                                              jnp.arange(R).reshape(nb, _ROW_BLOCK)))
    return Zo.reshape(R, M), To.reshape(R, M)


@jax.jit
def _first_layer(G, C_W, C_b, lam_W, lam_b):
    """Layer 1 from the input Gram matrix (the Mehler path, full matrices)."""
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
    (GPU, small results) it is jnp.stack.  Same values either way.  Folded layers (see above) are
    unfolded on the way: on CPU always with numpy into the host array (3.6 ms for N = 1024 against 5 ms
    for XLA's transposes), elsewhere on the device.
    """

    def __init__(self, count: int, N: int, like: jax.Array, folded: bool = False):
        self.items: list = []
        self.host = None
        self.N = N
        self.device = next(iter(like.devices()))
        big = count * N * N * like.dtype.itemsize >= _HOST_STACK_BYTES
        if self.device.platform == "cpu" and (big or folded):
            n = count * N * N
            raw = np.empty(n + 64 // like.dtype.itemsize, dtype=like.dtype)
            off = (-raw.ctypes.data % 64) // raw.itemsize
            self.host = raw[off:off + n].reshape(count, N, N)

    def append(self, a: jax.Array, folded: bool = False) -> None:
        if self.host is None:
            self.items.append(_unfold(a, self.N) if folded else a)
        else:
            if folded:
                _unfold_host(np.asarray(a), self.host[len(self.items)])
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
    N = G.shape[0]
    kernel = pair_kernel(net.sigma) if net.sigma.has_closed_form else None
    if kernel is not None:  # folded layout: one triangle of every layer
        K, Theta = _folded_first_layer(N, G, *(v[0] for v in hp))
    else:
        K, Theta = _first_layer(G, *(v[0] for v in hp))
    folded = kernel is not None
    Ks, Ts = _Layers(len(keep), N, K, folded), _Layers(len(keep), N, Theta, folded)
    pending = [(K, Theta)] if 1 in keep else []
    for l in range(1, net.depth):
        if kernel is not None:
            K, Theta = _closed_form_step(kernel, K, Theta, *(v[l] for v in hp))
        else:
            _check_diagonal(K)
            S, dS = mehler.pair_moments(net.sigma, K)
            K, Theta = _update(S, dS, Theta, *(v[l] for v in hp))
        for Kp, Tp in pending:  # while layer l+1 computes (dispatch is asynchronous), store layer l
            Ks.append(Kp, folded=kernel is not None)
            Ts.append(Tp, folded=kernel is not None)
        pending = [(K, Theta)] if l + 1 in keep else []
    for Kp, Tp in pending:
        Ks.append(Kp, folded=kernel is not None)
        Ts.append(Tp, folded=kernel is not None)
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
