r"""Infinite-width kernels: the NNGP kernel K and the NTK Theta, layer by layer (docs/theory.md).

    K^(1)_{a b}     = C_b^(1) + C_W^(1) (1/n_0) sum_j x_{j;a} x_{j;b}
    K^(l+1)         = C_b^(l+1) + C_W^(l+1) <sigma_a sigma_b>_{K^(l)}
    Theta^(1)_{a b} = lambda_b^(1) + lambda_W^(1) (1/n_0) sum_j x_{j;a} x_{j;b}
    Theta^(l+1)     = lambda_b^(l+1) + lambda_W^(l+1) <sigma_a sigma_b>_{K^(l)}
                      + C_W^(l+1) <sigma'_a sigma'_b>_{K^(l)} Theta^(l)

A residual layer (skip xi, branch gamma; docs/theory.md, "Residual MLPs") mixes that plain step with the
previous layer:

    K^(l+1)     = xi^2 K^(l)     + gamma^2 [ C_b + C_W <sigma_a sigma_b>_{K^(l)} ]
    Theta^(l+1) = xi^2 Theta^(l) + gamma^2 [ lambda_b + lambda_W <sigma_a sigma_b>_{K^(l)}
                                             + C_W <sigma'_a sigma'_b>_{K^(l)} Theta^(l) ]

Shapes: x is (N, n_0); K and Theta are (L, N, N) with index 0 = layer 1.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from .. import _validate
from .._pytree import result
from ..gaussian import pair_kernel, pair_moments_mehler
from ..gaussian._mehler import HOST_N as MEHLER_HOST_N
from ..network import MLP
from . import _traced

__all__ = ["InfiniteWidth", "KernelOverflowError", "infinite_width", "input_gram", "check_net", "kernel_fn"]


@result(meta=("net", "layers"))
class InfiniteWidth:
    """Leading-order kernels of an MLP on N inputs.

    Attributes:
      K: (L', N, N) NNGP kernel, K[i] = E[z^(l)_a z^(l)_b] at infinite width for layer l = layers[i];
        with every layer kept (the default) L' = L and K[l-1] is layer l.
      Theta: (L', N, N) frozen NTK of the same layers' preactivations.
      net: the MLP they describe.
      layers: the layer numbers l (1..L) kept, increasing; None means all of them.

    Both float64, leading order (no 1/n terms).  ``save(path)`` / ``InfiniteWidth.load(path)``
    write and read one .npz without pickle (:mod:`efftheory._io`).
    """

    K: jax.Array
    Theta: jax.Array
    net: MLP
    layers: tuple | None = None

    def save(self, path: str | os.PathLike) -> str:
        """Write to ``path`` (.npz: K, Theta; the net, layers and efftheory version as JSON); returns it."""
        from .. import _io

        return _io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InfiniteWidth":
        """Read a :meth:`save` file: arrays bitwise as saved."""
        from .. import _io

        return _io.load(path, cls)

    @property
    def depth(self) -> int:
        """Number of layers stored (L unless ``layers`` selected fewer)."""
        return self.K.shape[0]

    @property
    def n_inputs(self) -> int:
        return self.K.shape[1]


def check_net(net: Any) -> MLP:
    if not isinstance(net, MLP):
        raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
    return net


@jax.jit
def _gram(x):
    return x @ x.T / x.shape[1]


def input_gram(x: ArrayLike) -> jax.Array:
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
# with M = N/2: half the entries, so half the arithmetic and memory traffic of a layer.  K and Theta of a
# layer travel together as one complex array Z_K + i Z_Theta: XLA then computes a layer in one fused
# pass (with two real outputs it materialises the shared intermediates -- asin(rho), the square roots --
# in five passes over memory; measured 5x slower).  Folding needs no transpose; unfolding (for the
# layers returned) does.


def _fold(K):
    """(N, N) symmetric with N even -> Z (_folded_rows(N), N/2) (layout above)."""
    N = K.shape[0]
    M = N // 2
    i, j = jnp.arange(M + 1)[:, None], jnp.arange(M)[None, :]
    top = jnp.pad(K[:M, :M], ((0, 1), (0, 0)))
    bottom = jnp.pad(K[M:, M:], ((1, 0), (0, 0)))
    Z = jnp.concatenate([K[:M, M:], jnp.where(i <= j, top, bottom)])
    return jnp.pad(Z, ((0, _folded_rows(N) - (N + 1)), (0, 0)))


def _folded_rows(N: int) -> int:
    """Rows of a folded Z: N + 1 rounded up to a multiple of 8 (zero rows, computed on and ignored).
    With N + 1 rows XLA's CPU runtime (jax 0.10) was measured to move the last bit of a few relu
    entries from run to run (its parallel split of the odd-sized loop); with whole blocks of 8 rows
    the results are bitwise reproducible."""
    return -(-(N + 1) // 8) * 8


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
    """Folded Z -> the full matrix, written into ``out`` (N, N) with numpy."""
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
    """Layer 1 from the input Gram matrix, folded and packed as Z_K + i Z_Theta."""
    if N % 2:
        G = jnp.pad(G, ((0, 1), (0, 1)))
    Z = _fold(G)
    return jax.lax.complex(C_b + C_W * Z, lam_b + lam_W * Z)


@functools.partial(jax.jit, static_argnums=0)
def _closed_form_step(kernel, C, C_W, C_b, lam_W, lam_b):
    """Layer l+1 from layer l for a closed-form activation (docs/theory.md, "Infinite width"), folded.

    ``C`` = Z_K + i Z_Theta of layer l; ``kernel`` is the activation's
    :class:`efftheory.gaussian._fastmath.PairKernel`, its per-input quantities (rows and columns) and the
    diagonal mask laid out as the folded layout says.
    """
    Z, T = jnp.real(C), jnp.imag(C)
    R, M = Z.shape
    per_input = kernel.prep(_folded_diagonal(Z))  # tuple of (N,) vectors
    pad = jnp.zeros(R - 2 * M, Z.dtype)  # row 2M and the padding rows below it
    # row r holds input r (r < M); row M + i input i left of and on the diagonal (i <= j), M + i - 1 right of it
    rows_upper = [jnp.concatenate([jnp.zeros(M, Z.dtype), v[:M], pad]) for v in per_input]
    rows_lower = [jnp.concatenate([v[:M], pad[:1], v[M:], pad[1:]]) for v in per_input]
    r, j = jnp.arange(R)[:, None], jnp.arange(M)[None, :]
    upper = (r >= M) & (r - M <= j)
    a = tuple(jnp.where(upper, u[:, None], w[:, None]) for u, w in zip(rows_upper, rows_lower))
    b = tuple(jnp.where(upper, v[None, :M], v[None, M:]) for v in per_input)
    eye = (r >= M) & ((r - M == j) | (r - M - 1 == j))
    S, dS = kernel.fn(Z, a, b, eye)
    return jax.lax.complex(C_b + C_W * S, lam_b + lam_W * S + C_W * dS * T)


@functools.partial(jax.jit, static_argnums=0)
def _closed_form_step_full(kernel, C, C_W, C_b, lam_W, lam_b):
    """The same step on full (N, N) matrices, C = K + i Theta (for results that keep many layers)."""
    K, T = jnp.real(C), jnp.imag(C)
    N = K.shape[0]
    per_input = kernel.prep(jnp.diagonal(K))
    eye = jnp.arange(N)[:, None] == jnp.arange(N)[None, :]
    S, dS = kernel.fn(K, tuple(v[:, None] for v in per_input), tuple(v[None, :] for v in per_input), eye)
    return jax.lax.complex(C_b + C_W * S, lam_b + lam_W * S + C_W * dS * T)


def _mehler_host(net: MLP, G, layers, hp, keep) -> InfiniteWidth:
    """The Mehler recursion of :func:`infinite_width` for few inputs (N <= MEHLER_HOST_N), in numpy:
    the same layer maps and pair moments (:func:`efftheory.gaussian.pair_moments_mehler` with
    ``host=True``), to rounding the compiled path's values, without its compiled programs (a fresh
    process compiled 39 of them at N = 64, depth 10, for a user callable)."""
    first, update, residual = (f.__wrapped__ for f in (_first_layer, _update, _residual))  # the same maps, unjitted
    K, Theta = first(np.asarray(G), *hp[0])
    Ks, Ts = ([K], [Theta]) if 1 in keep else ([], [])
    for l in range(1, net.depth):
        if not np.all(np.isfinite(np.diagonal(K))):
            raise KernelOverflowError(_OVERFLOW)
        S, dS = pair_moments_mehler(net.sigma, K, host=True)
        if layers[l].residual:
            xi, gamma = float(layers[l].skip), float(layers[l].branch)
            K1, T1 = update(S, dS, Theta, *hp[l])
            K, Theta = residual(K, K1, xi, gamma), residual(Theta, T1, xi, gamma)
        else:
            K, Theta = update(S, dS, Theta, *hp[l])
        if l + 1 in keep:
            Ks.append(K)
            Ts.append(Theta)
    Ks, Ts = np.stack(Ks), np.stack(Ts)
    if not (np.all(np.isfinite(Ks)) and np.all(np.isfinite(Ts))):
        raise KernelOverflowError(_OVERFLOW)
    return InfiniteWidth(K=jnp.asarray(Ks), Theta=jnp.asarray(Ts), net=net,
                         layers=None if len(keep) == net.depth else keep)


@jax.jit
def _packed_first_layer(G, C_W, C_b, lam_W, lam_b):
    return jax.lax.complex(C_b + C_W * G, lam_b + lam_W * G)


@jax.jit
def _first_layer(G, C_W, C_b, lam_W, lam_b):
    """Layer 1 from the input Gram matrix (the Mehler path, full matrices).  (Not symmetrised: every
    later step is symmetric in a <-> b, so a symmetric G, which XLA's x x^T is in practice, gives
    bitwise symmetric kernels.)"""
    return C_b + C_W * G, lam_b + lam_W * G


@jax.jit
def _update(S, dS, T, C_W, C_b, lam_W, lam_b):
    return C_b + C_W * S, lam_b + lam_W * S + C_W * dS * T


@jax.jit
def _residual(prev, plain, xi, gamma):
    """A residual layer from the plain step: xi^2 (layer l) + gamma^2 (plain layer l+1), for K and Theta at
    once (packed K + i Theta, folded or full: the map is linear entrywise) or for one of them."""
    return (xi * xi) * prev + (gamma * gamma) * plain


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


def _host_array(count: int, N: int, dtype) -> np.ndarray:
    """An uninitialised (count, N, N) numpy array, 64-byte aligned (device_put then wraps it)."""
    n = count * N * N
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + 64 // itemsize, dtype=dtype)
    off = (-raw.ctypes.data % 64) // itemsize
    return raw[off:off + n].reshape(count, N, N)


class _PackedLayers:
    """Collects the kept layers of the closed-form recursion (K + i Theta, folded or full) as two
    (L', N, N) arrays.  On the CPU backend each layer is unfolded or split with numpy straight into
    64-byte aligned host arrays (see :class:`_Layers` for why), while XLA computes the next layer;
    elsewhere on the device."""

    def __init__(self, count: int, N: int, like: jax.Array, folded: bool):
        self.N, self.folded = N, folded
        self.device = next(iter(like.devices()))
        self.count = 0
        if self.device.platform == "cpu":
            self.K, self.T = _host_array(count, N, np.float64), _host_array(count, N, np.float64)
        else:
            self.K, self.T = [], []

    def append(self, C: jax.Array) -> None:
        if isinstance(self.K, list):
            K, T = jnp.real(C), jnp.imag(C)
            self.K.append(_unfold(K, self.N) if self.folded else K)
            self.T.append(_unfold(T, self.N) if self.folded else T)
        elif self.folded:
            c = np.asarray(C)
            _unfold_host(c.real, self.K[self.count])
            _unfold_host(c.imag, self.T[self.count])
        else:
            c = np.asarray(C)
            np.copyto(self.K[self.count], c.real)
            np.copyto(self.T[self.count], c.imag)
        self.count += 1

    def stacked(self) -> tuple[jax.Array, jax.Array]:
        if isinstance(self.K, list):
            return jnp.stack(self.K), jnp.stack(self.T)
        return jax.device_put(self.K, self.device), jax.device_put(self.T, self.device)


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


def infinite_width(net: MLP, x: ArrayLike, *, layers: Sequence[int] | None = None) -> InfiniteWidth:
    """NNGP kernel and NTK of every layer of ``net`` on inputs ``x`` of shape (N, n_0), float64.

    Closed-form activations: one compiled step per layer (:mod:`efftheory.gaussian._fastmath` for relu, abs
    and erf).  Any other activation goes through the Mehler series of :mod:`efftheory.gaussian._mehler` (N
    one-dimensional rules and a power series in the correlation per layer, the two-dimensional rule
    only for the pairs where the series' error bound fails); for at most ``MEHLER_HOST_N`` (64) inputs
    that recursion runs in numpy (the same sums, to rounding; sigma through one compiled evaluator), so a
    fresh process compiles a fixed handful of programs whatever N and depth.

    ``layers`` keeps only some layers (1-based numbers, or "last"): the result then holds
    len(layers) N^2 numbers per kernel instead of L N^2 (all layers are still computed).
    Identical, collinear and zero inputs are legitimate (kernels stay finite).

    JAX transformations: a pure function of ``x`` and of ``net``'s hyperparameters, which may be
    tracers (``jax.jit``, ``jax.vmap``, ``jax.grad``; MLP(C_W=traced scalar or (L,) array, ...)).
    Under a trace (any traced argument) only shapes are checked and the recursion runs as one
    ``lax.scan`` (:mod:`efftheory.theory._traced`): closed forms exactly as here, other activations
    with fixed trapezoid rules (``_traced.NODES_1D`` nodes on the diagonal, ``_traced.NODES_2D`` per
    direction for pairs: 1e-13 relative for smooth sigma up to K ~ 50, degrading gradually beyond) instead of the Mehler
    series,
    whose length and fallback pairs are chosen on the host.  No overflow check under a trace.
    The result's ``net`` then holds NaN in place of traced hyperparameters (no tracer outlives the
    trace when the whole result is returned from the transformed function).
    The traced call needs JAX's 64-bit mode (efftheory._precision.X64Error otherwise).
    """
    net = check_net(net)
    keep = _check_layers(layers, net.depth)
    if _traced.traced(net, x):
        K, Theta = _traced.kernels(net, x, keep)
        return InfiniteWidth(K=K, Theta=Theta, net=_traced.static_net(net),
                             layers=None if len(keep) == net.depth else keep)
    G = input_gram(x)
    layers = net.layers(int(np.shape(x)[1]))
    hp = [_hyperparameters(layer) for layer in layers]
    if net.sigma.has_closed_form:
        return _closed_form(net, G, layers, hp, keep)
    if G.shape[0] <= MEHLER_HOST_N:
        return _mehler_host(net, G, layers, hp, keep)
    K, Theta = _first_layer(G, *hp[0])
    Ks, Ts = _Layers(len(keep), K), _Layers(len(keep), Theta)
    if 1 in keep:
        Ks.append(K)
        Ts.append(Theta)
    for l in range(1, net.depth):
        _check_diagonal(K)
        S, dS = pair_moments_mehler(net.sigma, K)
        if layers[l].residual:
            xi, gamma = float(layers[l].skip), float(layers[l].branch)
            K1, T1 = _update(S, dS, Theta, *hp[l])
            K, Theta = _residual(K, K1, xi, gamma), _residual(Theta, T1, xi, gamma)
        else:
            K, Theta = _update(S, dS, Theta, *hp[l])
        if l + 1 in keep:
            Ks.append(K)
            Ts.append(Theta)
    out = InfiniteWidth(K=Ks.stacked(), Theta=Ts.stacked(), net=net,
                        layers=None if len(keep) == net.depth else keep)
    return _checked(out, K, Theta)


def kernel_fn(net: MLP) -> Callable[..., dict[str, jax.Array]]:
    """A neural-tangents-style kernel function of ``net``'s last layer:

        fn = kernel_fn(net)
        K12, Theta12 = fn(x1, x2, ("nngp", "ntk"))     # (N1, N2) blocks, like NT's kernel_fn
        Theta11 = fn(x1, None, "ntk")                   # x2=None: x1 against itself (N1, N1)

    Computed by :func:`infinite_width` on the stacked inputs [x1; x2] (each entry of the recursion
    needs both inputs' own variances), keeping the last layer only, and returned as the x1-by-x2
    block.  ``get`` is "nngp", "ntk" or a tuple of them (a tuple gives a tuple).  float64, and like
    infinite_width a JAX function: jit, vmap and grad go through it (x1, x2, and the MLP's
    hyperparameters when the MLP is built inside the transformed function).
    """
    net = check_net(net)
    from .._precision import x64

    @x64
    def fn(x1, x2=None, get=("nngp", "ntk")):
        names = (get,) if isinstance(get, str) else tuple(get)
        if not names or any(g not in ("nngp", "ntk") for g in names):
            raise ValueError(f"get: expected 'nngp', 'ntk' or a tuple of them, got {get!r}")
        n1 = int(np.shape(x1)[0]) if np.ndim(x1) == 2 else None
        if x2 is None:
            res = infinite_width(net, x1, layers="last")
            blocks = {"nngp": res.K[0], "ntk": res.Theta[0]}
        else:
            if np.ndim(x1) != 2 or np.ndim(x2) != 2 or np.shape(x1)[1] != np.shape(x2)[1]:
                raise ValueError(f"x2: expected an array (N2, n_0) with the n_0 of x1, got shapes {np.shape(x1)} "
                                 f"and {np.shape(x2)}")
            res = infinite_width(net, jnp.concatenate([jnp.asarray(x1, jnp.float64), jnp.asarray(x2, jnp.float64)]),
                                 layers="last")
            blocks = {"nngp": res.K[0, :n1, n1:], "ntk": res.Theta[0, :n1, n1:]}
        out = tuple(blocks[g] for g in names)
        return out[0] if isinstance(get, str) else out

    return fn


def _hyperparameters(layer) -> tuple[float, float, float, float]:
    """(C_W, C_b, lambda_W, lambda_b) of one layer as Python floats (the arguments of the jitted steps)."""
    return (float(layer.C_W), float(layer.C_b), float(layer.lambda_W), float(layer.lambda_b))


def _closed_form(net: MLP, G, layer_list, hp, keep) -> InfiniteWidth:
    """The packed recursion, one dispatched step per layer; each kept layer is unfolded or split (on
    the host) while the next one computes (dispatch is asynchronous).

    Folded when few layers are kept: a folded step costs half a full one, but unfolding a kept layer
    (transposes) costs about four folded steps, against one and a half for splitting a full layer
    (measured at N = 1024 on the project's 2-core Xeon): folded wins while 5 len(layers) <= 2 L.
    """
    N = G.shape[0]
    kernel = pair_kernel(net.sigma)
    folded = 5 * len(keep) <= 2 * net.depth
    if folded:
        C = _folded_first_layer(N, G, *hp[0])
        step = _closed_form_step
    else:
        C = _packed_first_layer(G, *hp[0])
        step = _closed_form_step_full
    layers = _PackedLayers(len(keep), N, C, folded)
    pending = C if 1 in keep else None
    for l in range(1, net.depth):
        if layer_list[l].residual:  # the folded layout is linear, so the residual mix applies to it as it is
            C = _residual(C, step(kernel, C, *hp[l]), float(layer_list[l].skip), float(layer_list[l].branch))
        else:
            C = step(kernel, C, *hp[l])
        if pending is not None:
            layers.append(pending)
        pending = C if l + 1 in keep else None
    if pending is not None:
        layers.append(pending)
    K, Theta = layers.stacked()
    out = InfiniteWidth(K=K, Theta=Theta, net=net, layers=None if len(keep) == net.depth else keep)
    return _checked(out, C, C)  # the last layer computed, packed (isfinite of a complex: both parts)


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
