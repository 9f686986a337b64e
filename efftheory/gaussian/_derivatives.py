r"""Moments of sigma and its first three derivatives over sets of up to four inputs: the sources of
the dNTK and ddNTK recursions (:mod:`efftheory.theory.dntk`).

For a kernel K (N, N) and z ~ N(0, K), :func:`derivative_moments` returns

    M4[p][a, b, c, d] = <s^(k0)_a s^(k1)_b s^(k2)_c s^(k3)_d>    for the patterns p = "k0k1k2k3" of PATTERNS
    E2[p][a, b]       = <s^(k)_a s^(l)_b>                      for the pairs p = "kl" of PAIRS

(s^(k) = d^k sigma / dz^k, sigma differentiated by autodiff: smooth activations only).

Numerics: per set of at most four distinct inputs, a tensor midpoint rule in the range of the marginal
covariance (eigendecomposition via :func:`._rules.range_factor`, zero directions dropped: identical or
collinear inputs give no NaN) on [-FIXED_TAIL, FIXED_TAIL] = [-7.5, 7.5] (:mod:`._constants`), the step of
each direction chosen from how fast z moves along it and ``tol`` (the strip bound of
:func:`._rules.nodes_for`, see ``_nodes``).  Cost ~ C(N, 4) x (product of the node counts).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ._constants import FIXED_TAIL, SOURCE_TOL
from ._rules import derivative, range_factor

__all__ = ["derivative_moments", "PATTERNS", "PAIRS"]

PATTERNS = ("1010", "2110", "2011", "3111", "1111", "2211", "1100", "1201")  # derivative orders k0k1k2k3
PAIRS = ("11", "20", "22", "31")  # derivative orders kl of the two-input moments
_CHUNK = 2048  # nodes per step of the moment kernel (its working set stays in cache)
_BLOCK = 32    # steps per call


@functools.lru_cache(maxsize=64)
def _moment_kernel(fn):
    """jitted (U (_BLOCK, _CHUNK, 4) nodes in the range directions, W (_BLOCK, _CHUNK), L (4, 4)) ->
    (acc4 (patterns, 16, 16), acc2 (pairs, 4, 4)): sum_n W_n of the products of derivative_moments for
    four members z = L u (unused members and directions zero).  One compiled program per sigma."""
    ders = _derivatives_raw(fn)

    def run(U, W, L):
        def step(acc, uw):
            Uc, Wc = uw
            D = ders(Uc @ L.T)  # sigma and its first three derivatives at the chunk's nodes, (chunk, 4) each
            two = {}
            for q in {p[:2] for p in PATTERNS} | {p[2:] for p in PATTERNS}:
                two[q] = (D[int(q[0])][:, :, None] * D[int(q[1])][:, None, :]).reshape(-1, 16)
            a4 = jnp.stack([(two[p[:2]] * Wc[:, None]).T @ two[p[2:]] for p in PATTERNS])
            a2 = jnp.stack([(D[int(p[0])] * Wc[:, None]).T @ D[int(p[1])] for p in PAIRS])
            return (acc[0] + a4, acc[1] + a2), None

        zero = (jnp.zeros((len(PATTERNS), 16, 16), U.dtype), jnp.zeros((len(PAIRS), 4, 4), U.dtype))
        return jax.lax.scan(step, zero, (U, W))[0]

    return jax.jit(run)


def _derivatives_raw(fn):
    d1 = derivative(fn)
    d2 = derivative(d1)
    d3 = derivative(d2)
    return lambda z: (fn(z), d1(z), d2(z), d3(z))


def _nodes(scale: float, tol: float, strip: float = np.pi / 2) -> int:
    """Midpoint nodes on [-FIXED_TAIL, FIXED_TAIL] for a direction u along which z moves by at most ``scale`` per
    unit of u: the strip bound of gaussian.nodes_for (poles of sigma at distance ``strip`` in z, so
    strip/scale in u: pi/2 for tanh, :attr:`efftheory.activations.Activation.strip` for sharper
    callables), with +30 instead of +8 in the logarithm: products like tanh''^2 tanh'^2 (poles of
    order 12) were measured to lose 4e-5 relative at the +8 step (K = 0.7, 38 nodes); +30 reaches
    1e-11 there."""
    h = min(0.5, 2.0 * np.pi * strip / (max(scale, 1e-300) * (np.log(2.0 / tol) + 30.0)))
    return 2 * int(np.ceil(FIXED_TAIL / h))


@functools.lru_cache(maxsize=64)
def _rule(m: int):
    u = -FIXED_TAIL + (np.arange(m) + 0.5) * (2 * FIXED_TAIL / m)
    w = np.exp(-0.5 * u * u)
    return u, w / w.sum()


def derivative_moments(fn, K, *, tol: float = SOURCE_TOL, strip: float = np.pi / 2):
    """Four-input and two-input moments of sigma and its first three derivatives at z ~ N(0, K).

    Returns (M4, E2): M4[p] (N, N, N, N) = <s^(k0)_a s^(k1)_b s^(k2)_c s^(k3)_d> for each pattern
    p = "k0k1k2k3" of ``PATTERNS``; E2[p] (N, N) = <s^(k)_a s^(l)_b> for p = "kl" of ``PAIRS``.
    """
    K = np.asarray(K, np.float64)
    N = K.shape[0]
    M4 = {p: np.zeros((N,) * 4) for p in PATTERNS}
    E2 = {p: np.zeros((N, N)) for p in PAIRS}
    subsets = [tuple(range(N))] if N <= 4 else list(itertools.combinations(range(N), 4))
    for S in subsets:
        S = np.asarray(S)
        s = len(S)
        L = range_factor(K[np.ix_(S, S)])
        L = L[:, np.any(L != 0, axis=0)]
        # per direction of the range, the step its own strip allows (small eigen-directions need few nodes)
        rules = sorted((_rule(_nodes(float(np.max(np.abs(L[:, i]))), tol, strip)) + (i,) for i in range(L.shape[1])),
                       key=lambda t: len(t[0]))
        L = L[:, [t[2] for t in rules]]  # directions by increasing node count
        r = L.shape[1]
        # every node of the tensor grid, in blocks of _BLOCK x _CHUNK nodes through one compiled
        # program of fixed shapes (directions and members padded to 4): no program per grid size
        sizes = [len(t[0]) for t in rules]
        total = int(np.prod(sizes)) if r else 1
        Lp = np.zeros((4, 4))
        Lp[:s, :r] = L
        acc4 = {p: np.zeros((16, 16)) for p in PATTERNS}
        acc2 = {p: np.zeros((4, 4)) for p in PAIRS}
        kernel = _moment_kernel(fn)
        per_call = _BLOCK * _CHUNK
        for lo in range(0, total, per_call):
            flat = np.arange(lo, min(lo + per_call, total))
            U = np.zeros((per_call, 4))
            Wt = np.zeros(per_call)
            Wt[:flat.size] = 1.0
            for d, idx in enumerate(np.unravel_index(flat, sizes) if r else ()):
                U[:flat.size, d] = rules[d][0][idx]
                Wt[:flat.size] *= rules[d][1][idx]
            a4, a2 = kernel(U.reshape(_BLOCK, _CHUNK, 4), Wt.reshape(_BLOCK, _CHUNK), Lp)
            a4, a2 = np.asarray(a4), np.asarray(a2)
            for n, p in enumerate(PATTERNS):
                acc4[p] += a4[n]
            for n, p in enumerate(PAIRS):
                acc2[p] += a2[n]
        keep = (np.arange(4)[:, None] * 4 + np.arange(4)[None, :])[:s, :s].reshape(-1)
        acc4 = {p: v[np.ix_(keep, keep)] for p, v in acc4.items()}
        acc2 = {p: v[:s, :s] for p, v in acc2.items()}
        for p in PATTERNS:
            M4[p][np.ix_(S, S, S, S)] = acc4[p].reshape(s, s, s, s)
        for p in PAIRS:
            E2[p][np.ix_(S, S)] = acc2[p]
    return M4, E2
