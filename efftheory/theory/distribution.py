r"""The whole preactivation distribution of one layer at width n, to first order in 1/n (docs/distribution.md).

PDLT ch. 4: at width n the preactivations z_{i;a} of layer l (fan-in n = n_{l-1}) are nearly Gaussian.
Their covariance is delta_{ij} Sigma with Sigma = K + G1/n, and their only O(1/n) connected correlator is
the fourth cumulant

    kappa(z_{i1 a1}, z_{i2 a2}, z_{i3 a3}, z_{i4 a4})
        = (1/n) [ d_{i1i2} d_{i3i4} V_{(a1a2)(a3a4)} + d_{i1i3} d_{i2i4} V_{(a1a3)(a2a4)}
                  + d_{i1i4} d_{i2i3} V_{(a1a4)(a2a3)} ].

The first-order (Edgeworth) density of the D = k N numbers z (k neurons on N inputs) is

    p(z) = N(z; Sigma) [ 1 + (1/24) kappa_{IJKL} He^{IJKL}(z) ],
    He^{IJKL}(z) = u_I u_J u_K u_L - (S_{IJ} u_K u_L + 5 perms) + (S_{IJ} S_{KL} + 2 perms),   u = S z,

with S = (1_k (x) Sigma)^{-1} and He N = d^4 N / dz_I dz_J dz_K dz_L (the multivariate Hermite
polynomials of the covariance).  Because the correction is a total fourth derivative of the Gaussian,
it integrates to zero against 1, z_I and z_I z_J, and against z_I z_J z_K z_L it gives kappa_{IJKL}
exactly: the density integrates to 1, has covariance Sigma and fourth cumulant kappa, for any n.

Everything here is float64 and the density functions are pure jnp functions of arrays (jit-able).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from numpy.typing import ArrayLike

from .. import _validate
from .._pytree import result
from ..network import MLP
from .finite import FiniteWidth, finite_width

__all__ = ["OutputDistribution", "output_distribution", "edgeworth_logpdf", "edgeworth_factor",
           "joint_cumulant", "same_neuron_cumulant"]

_LOG2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# pure functions


def same_neuron_cumulant(V: ArrayLike, n: ArrayLike) -> jax.Array:
    """kappa_{abcd} = (V_(ab)(cd) + V_(ac)(bd) + V_(ad)(bc)) / n: the connected E[z_a z_b z_c z_d] of one neuron."""
    V = jnp.asarray(V)
    return (V + V.transpose(0, 2, 1, 3) + V.transpose(0, 2, 3, 1)) / n  # [a,b,c,d]: V_(ab)(cd), V_(ac)(bd), V_(ad)(bc)


def joint_cumulant(V: ArrayLike, n: ArrayLike, k: int) -> jax.Array:
    """The fourth cumulant of k neurons as a (kN)^4 tensor over the flattened index I = i N + a.

    kappa(z_{i a}, z_{j b}, z_{k c}, z_{l d}) = (1/n) [d_ij d_kl V_(ab)(cd) + d_ik d_jl V_(ac)(bd) + d_il d_jk V_(ad)(bc)].
    """
    V = jnp.asarray(V) / n
    N = V.shape[0]
    e = jnp.eye(k, dtype=V.dtype)
    t1 = jnp.einsum("ij,kl,abcd->iajbkcld", e, e, V)
    t2 = jnp.einsum("ik,jl,acbd->iajbkcld", e, e, V)
    t3 = jnp.einsum("il,jk,adbc->iajbkcld", e, e, V)
    D = k * N
    return (t1 + t2 + t3).reshape(D, D, D, D)


def _contractions(cov, kappa):
    """(L, S, M2, c0): Cholesky factor and inverse of cov, kappa_{IJKL} S_{IJ} and its trace with S."""
    Lc = jnp.linalg.cholesky(cov)
    S = jax.scipy.linalg.cho_solve((Lc, True), jnp.eye(cov.shape[0], dtype=cov.dtype))
    S = (S + S.T) / 2
    M2 = jnp.einsum("ijkl,ij->kl", kappa, S)
    c0 = jnp.einsum("kl,kl->", M2, S)
    return Lc, S, M2, c0


def _correction_from(z, S, M2, c0, kappa):
    u = z @ S
    quartic = jnp.einsum("ijkl,...i,...j,...k,...l->...", kappa, u, u, u, u)
    quadratic = jnp.einsum("kl,...k,...l->...", M2, u, u)
    return (quartic - 6.0 * quadratic + 3.0 * c0) / 24.0


def edgeworth_factor(z: ArrayLike, cov: jax.Array | np.ndarray, kappa: ArrayLike) -> jax.Array:
    """(1/24) kappa_{IJKL} He^{IJKL}(z): the first-order relative correction, for z of shape (..., D)."""
    z = jnp.asarray(z, jnp.float64)
    _, S, M2, c0 = _contractions(cov, kappa)
    return _correction_from(z, S, M2, c0, kappa)


def _gauss_logpdf(z, Lc):
    w = jax.scipy.linalg.solve_triangular(Lc, jnp.moveaxis(z, -1, 0), lower=True)
    D = Lc.shape[0]
    return -0.5 * jnp.sum(w * w, axis=0) - jnp.sum(jnp.log(jnp.diag(Lc))) - 0.5 * D * _LOG2PI


def edgeworth_logpdf(z: ArrayLike, cov: jax.Array | np.ndarray, kappa: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """(log N(z; cov), correction c(z)) for z of shape (..., D): p = exp(log N) (1 + c)."""
    z = jnp.asarray(z, jnp.float64)
    Lc, S, M2, c0 = _contractions(cov, kappa)
    return _gauss_logpdf(z, Lc), _correction_from(z, S, M2, c0, kappa)


@jax.jit
def _pdf_parts(z, cov, kappa):
    return edgeworth_logpdf(z, cov, kappa)


@jax.jit
def _gauss_only(z, cov):
    return _gauss_logpdf(z, jnp.linalg.cholesky(cov))


def _he3(u):
    return u * u * u - 3.0 * u


def _he4(u):
    u2 = u * u
    return u2 * u2 - 6.0 * u2 + 3.0


@jax.jit
def _cdf1(z, s2, k4):
    s = jnp.sqrt(s2)
    u = z / s
    gamma = k4 / (s2 * s2)
    phi = jnp.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    return ndtr(u) - gamma / 24.0 * _he3(u) * phi


def _bisect(f, target, lo, hi, iters=200):
    lo = jnp.broadcast_to(lo, target.shape)
    hi = jnp.broadcast_to(hi, target.shape)

    def body(_, lh):
        lo, hi = lh
        mid = 0.5 * (lo + hi)
        below = f(mid) < target
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# the result object


@result(meta=("neurons", "layer"))
class OutputDistribution:
    """The first-order distribution of k neurons of layer ``layer`` on N inputs at fan-in n (docs/distribution.md).

    Attributes (float64):
      K: (N, N) infinite-width kernel.
      G1: (N, N) metric correction coefficient (E[zz] = K + G1/n).
      V: (N, N, N, N) four-point vertex coefficient, V[a, b, c, d] = V_(ab)(cd).
      n: () the fan-in n_{l-1} the coefficients are divided by (inf for layer 1: exactly Gaussian).
      neurons: k, the number of neurons the joint density is over (z of shape (..., k, N) when k > 1,
        (..., N) when k = 1).
      layer: l (1-based).

    Densities: :meth:`pdf`, :meth:`logpdf` (first order), :meth:`gaussian_pdf` (K or K + G1/n).  One
    input and one neuron (:meth:`marginal`): :meth:`cdf`, :meth:`quantile`, :meth:`interval`.
    """

    K: jax.Array
    G1: jax.Array
    V: jax.Array
    n: jax.Array
    neurons: int = 1
    layer: int = 1

    # ----------------------------------------------------------------- moments
    @property
    def n_inputs(self) -> int:
        return int(self.K.shape[0])

    @property
    def dim(self) -> int:
        """D = k N, the number of jointly distributed numbers."""
        return self.neurons * self.n_inputs

    @property
    def covariance(self) -> jax.Array:
        """(N, N) E[z_{i a} z_{i b}] = K + G1/n (the second moment; neurons are uncorrelated)."""
        return self.K + self.G1 / self.n

    @property
    def connected_fourth(self) -> jax.Array:
        """(N, N, N, N) connected E[z_a z_b z_c z_d] of one neuron: (V_(ab)(cd) + V_(ac)(bd) + V_(ad)(bc))/n."""
        return same_neuron_cumulant(self.V, self.n)

    @property
    def cross_connected_fourth(self) -> jax.Array:
        """(N, N, N, N) connected E[z_{i a} z_{i b} z_{j c} z_{j d}] for i != j: V_(ab)(cd)/n."""
        return self.V / self.n

    @property
    def fourth_moment(self) -> jax.Array:
        """(N, N, N, N) full E[z_a z_b z_c z_d] of one neuron: the three Wick pairings of Sigma plus the cumulant."""
        S = self.covariance
        return (jnp.einsum("ab,cd->abcd", S, S) + jnp.einsum("ac,bd->abcd", S, S)
                + jnp.einsum("ad,bc->abcd", S, S) + self.connected_fourth)

    @property
    def excess_kurtosis(self) -> jax.Array:
        """(N,) kappa_aaaa / Sigma_aa^2 per input (3 V_(aa)(aa) / (n Sigma_aa^2))."""
        d = jnp.diagonal(self.covariance)
        k4 = jnp.einsum("aaaa->a", self.connected_fourth)
        return k4 / (d * d)

    def joint_covariance(self) -> jax.Array:
        """(kN, kN) covariance of the flattened z (index i N + a)."""
        return jnp.kron(jnp.eye(self.neurons), self.covariance)

    def joint_cumulant(self) -> jax.Array:
        """(kN)^4 fourth cumulant of the flattened z (module docstring)."""
        return joint_cumulant(self.V, self.n, self.neurons)

    # ----------------------------------------------------------------- views
    def marginal(self, inputs: int | Sequence[int] | np.ndarray) -> OutputDistribution:
        """The distribution on a subset of the inputs (e.g. ``[a]`` or ``[a, b]``; an int means ``[a]``)."""
        idx = np.atleast_1d(np.asarray(inputs))
        if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu" or np.any(idx < 0) \
                or np.any(idx >= self.n_inputs):
            raise ValueError(f"inputs: expected input indices in [0, {self.n_inputs}), got {inputs!r}")
        ix = jnp.asarray(idx)
        return OutputDistribution(K=self.K[jnp.ix_(ix, ix)], G1=self.G1[jnp.ix_(ix, ix)],
                                  V=self.V[jnp.ix_(ix, ix, ix, ix)], n=self.n, neurons=self.neurons,
                                  layer=self.layer)

    def joint(self, neurons: int) -> OutputDistribution:
        """The joint distribution of ``neurons`` neurons of the same layer (correlated at O(1/n) through V)."""
        k = _validate.positive_int("neurons", neurons, maximum=64)
        return OutputDistribution(K=self.K, G1=self.G1, V=self.V, n=self.n, neurons=k, layer=self.layer)

    # ----------------------------------------------------------------- densities
    def _flat(self, z, name="z"):
        z = jnp.asarray(z, jnp.float64) if isinstance(z, jax.core.Tracer) else \
            jnp.asarray(_validate.real_array(name, z), jnp.float64)
        N, k = self.n_inputs, self.neurons
        if k == 1:
            if z.ndim < 1 or z.shape[-1] != N:
                raise ValueError(f"{name}: expected shape (..., {N}) (one neuron on {N} inputs), got {z.shape}")
            return z
        if z.ndim < 2 or z.shape[-2:] != (k, N):
            raise ValueError(f"{name}: expected shape (..., {k}, {N}) ({k} neurons on {N} inputs), got {z.shape}")
        return z.reshape(z.shape[:-2] + (k * N,))

    def _check_cov(self):
        if any(isinstance(v, jax.core.Tracer) for v in (self.K, self.G1, self.n)):
            return  # traced (the object itself is a jit argument): checked when called with concrete values
        d = np.linalg.eigvalsh(np.asarray(self.K) + np.asarray(self.G1) / float(self.n))
        if not np.all(d > 1e-12 * max(1.0, float(np.max(np.abs(d))))):
            raise ValueError("x: the covariance K + G1/n on these inputs is singular or not positive definite "
                             f"(eigenvalues {d}); drop repeated or collinear inputs (marginal) or use a larger width")

    def correction(self, z: ArrayLike) -> jax.Array:
        """c(z) = (1/24) kappa_{IJKL} He^{IJKL}(z), the relative first-order correction: p = N(z; Sigma) (1 + c)."""
        zf = self._flat(z)
        self._check_cov()
        return _pdf_parts(zf, self.joint_covariance(), self.joint_cumulant())[1]

    def pdf(self, z: ArrayLike, *, clip: bool = False) -> jax.Array:
        """First-order density N(z; Sigma) (1 + c(z)) at z (..., N) or (..., k, N).

        It may be negative where c(z) < -1 (docs/distribution.md, "Positivity"); ``clip=True`` returns
        max(p, 0) renormalised to integrate to 1 (k N <= 2 only: the normaliser is computed by quadrature).
        """
        zf = self._flat(z)
        self._check_cov()
        lg, c = _pdf_parts(zf, self.joint_covariance(), self.joint_cumulant())
        p = jnp.exp(lg) * (1.0 + c)
        if not _validate.flag("clip", clip):
            return p
        return jnp.maximum(p, 0.0) / self.clipped_mass()

    def logpdf(self, z: ArrayLike, *, clip: bool = False) -> jax.Array:
        """log of :meth:`pdf`: log N(z; Sigma) + log1p(c(z)); -inf where the first-order density is <= 0
        (``clip=True``: minus the log of the clipped mass, so that exp(logpdf) integrates to 1)."""
        zf = self._flat(z)
        self._check_cov()
        lg, c = _pdf_parts(zf, self.joint_covariance(), self.joint_cumulant())
        out = jnp.where(c > -1.0, lg + jnp.log1p(jnp.maximum(c, -1.0 + 1e-300)), -jnp.inf)
        if _validate.flag("clip", clip):
            out = out - jnp.log(self.clipped_mass())
        return out

    def gaussian_pdf(self, z: ArrayLike, *, corrected: bool = True) -> jax.Array:
        """Gaussian density with covariance K + G1/n (``corrected=True``) or the infinite-width K."""
        zf = self._flat(z)
        cov = self.covariance if _validate.flag("corrected", corrected) else self.K
        return jnp.exp(_gauss_only(zf, jnp.kron(jnp.eye(self.neurons), cov)))

    def gaussian_logpdf(self, z: ArrayLike, *, corrected: bool = True) -> jax.Array:
        zf = self._flat(z)
        cov = self.covariance if _validate.flag("corrected", corrected) else self.K
        return _gauss_only(zf, jnp.kron(jnp.eye(self.neurons), cov))

    # ----------------------------------------------------------------- positivity
    def min_factor(self, directions: int = 20000, seed: int = 0) -> float:
        """min over z of 1 + c(z): the first-order density is positive everywhere iff this is >= 0.

        Along a whitened ray w = r e the correction is (A r^4 - 6 B r^2 + 3 c0)/24 with A >= 0 (V is
        positive semi-definite), minimal at r^2 = 3B/A; the minimum over directions is exact for D = 1,
        on a fine angular grid for D = 2 and over ``directions`` random directions for D > 2 (an estimate).
        """
        self._check_cov()
        cov, kap = self.joint_covariance(), self.joint_cumulant()
        Lc, S, M2, c0 = _contractions(cov, kap)
        D = self.dim
        if D == 1:
            e = np.ones((1, 1))
        elif D == 2:
            t = np.linspace(0, np.pi, 4001)
            e = np.stack([np.cos(t), np.sin(t)], 1)
        else:
            e = np.random.default_rng(seed).standard_normal((directions, D))
            e /= np.linalg.norm(e, axis=1, keepdims=True)
        z = jnp.asarray(e) @ Lc.T  # whitened unit vectors mapped to z space
        u = z @ S
        A = np.asarray(jnp.einsum("ijkl,...i,...j,...k,...l->...", kap, u, u, u, u))
        B = np.asarray(jnp.einsum("kl,...k,...l->...", M2, u, u))
        c0 = float(c0)
        with np.errstate(divide="ignore", invalid="ignore"):
            inner = np.where((B > 0) & (A > 0), 3 * c0 - 9 * B * B / A, 3 * c0)
        inner = np.where((B > 0) & (A <= 0), -np.inf, inner)
        return float(1.0 + np.min(inner) / 24.0)

    @property
    def positive(self) -> bool:
        """Whether the first-order density is >= 0 everywhere (one input: excess kurtosis <= 4)."""
        return self.min_factor() >= 0.0

    def negative_region(self) -> list[tuple[float, float]]:
        """One input, one neuron: the z intervals where the first-order density is negative (a list of
        (lo, hi); empty when gamma = kappa_4/Sigma^2 <= 4; 1 + gamma He4(u)/24 < 0 for u^2 in 3 -+ sqrt(6 - 24/gamma))."""
        self._one("negative_region")
        self._check_cov()
        s2 = float(self.covariance[0, 0])
        g = float(self.excess_kurtosis[0])
        if g <= 4.0:
            return []
        r = math.sqrt(6.0 - 24.0 / g)
        lo, hi = math.sqrt(s2 * (3 - r)), math.sqrt(s2 * (3 + r))
        return [(-hi, -lo), (lo, hi)]

    def clipped_mass(self) -> jax.Array:
        """The integral of max(p, 0) (1 when the density is positive); k N <= 2.  One number: exact (closed-form
        CDF over the negative intervals); two: trapezoid rule in whitened coordinates over |w| <= 12 (the kink
        where p crosses 0 limits it to ~1e-6)."""
        D = self.dim
        if D > 2:
            raise ValueError(f"clip: renormalising a clipped density is implemented for k N <= 2 numbers, got {D}")
        if self.min_factor() >= 0:
            return jnp.asarray(1.0)
        if D == 1:  # exact: remove the two negative intervals with the closed-form CDF
            s2, k4 = self.covariance[0, 0], self.connected_fourth[0, 0, 0, 0]
            (_, _), (a, b) = self.negative_region()
            return 1.0 - 2.0 * (_cdf1(jnp.asarray(b), s2, k4) - _cdf1(jnp.asarray(a), s2, k4))
        cov, kap = self.joint_covariance(), self.joint_cumulant()
        Lc = jnp.linalg.cholesky(cov)
        t = jnp.linspace(-12, 12, 4801 if D == 1 else 961)
        h = t[1] - t[0]
        if D == 1:
            w = t[:, None]
        else:
            w = jnp.stack(jnp.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
        z = w @ Lc.T
        lg, c = _pdf_parts(z, cov, kap)
        p = jnp.maximum(jnp.exp(lg) * (1 + c), 0.0)
        return jnp.sum(p) * h ** D * jnp.prod(jnp.diag(Lc))

    # ----------------------------------------------------------------- one-input marginals
    def _one(self, what):
        if self.n_inputs != 1 or self.neurons != 1:
            raise ValueError(f"{what}: defined for one input and one neuron; take marginal([a]) of a single neuron "
                             f"(this distribution has {self.n_inputs} inputs, {self.neurons} neurons)")

    def cdf(self, z: ArrayLike, *, corrected_gaussian: bool | None = None) -> jax.Array:
        """One input: F(z) = Phi(u) - (gamma/24) He3(u) phi(u), u = z/sqrt(Sigma), gamma = kappa_4/Sigma^2
        (closed form).  ``corrected_gaussian=True``/``False`` gives instead the Gaussian CDF with K + G1/n / K."""
        self._one("cdf")
        self._check_cov()
        z = jnp.asarray(_validate.real_array("z", z), jnp.float64)
        if corrected_gaussian is None:
            return _cdf1(z, self.covariance[0, 0], self.connected_fourth[0, 0, 0, 0])
        s2 = self.covariance[0, 0] if corrected_gaussian else self.K[0, 0]
        return ndtr(z / jnp.sqrt(s2))

    def quantile(self, p: ArrayLike) -> jax.Array:
        """One input: z with F(z) = p (bisection; F is monotone when the density is positive, otherwise the
        root found is one of several).  p in (0, 1)."""
        self._one("quantile")
        self._check_cov()
        p = np.asarray(_validate.real_array("p", p), np.float64)
        if np.any((p <= 0) | (p >= 1)):
            raise ValueError("p: expected probabilities strictly between 0 and 1")
        s2 = self.covariance[0, 0]
        k4 = self.connected_fourth[0, 0, 0, 0]
        s = jnp.sqrt(s2)
        return _bisect(lambda z: _cdf1(z, s2, k4), jnp.asarray(p), -40.0 * s, 40.0 * s)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """One input: the central interval (quantile((1-level)/2), quantile((1+level)/2))."""
        level = _validate.real("level", level)
        if not 0 < level < 1:
            raise ValueError(f"level: expected a probability in (0, 1), got {level}")
        q = self.quantile(np.array([(1 - level) / 2, (1 + level) / 2]))
        return float(q[0]), float(q[1])


# ---------------------------------------------------------------------------------------------
# constructor


def output_distribution(net: MLP | None, x: ArrayLike | None = None, width: int | Sequence[int] | None = None,
                        layer: int = -1, *, neurons: int = 1,
                        finite: FiniteWidth | None = None, tol: float = 1e-9) -> OutputDistribution:
    """The first-order distribution of layer ``layer``'s preactivations at width ``width`` (docs/distribution.md).

    Args:
      net: the MLP (its hidden widths fix the ratios n_l/n_{l-1}); may be None when ``finite`` is given.
      x: inputs (N, n_0); not needed when ``finite`` is given.
      width: as :meth:`FiniteWidth.at_width`: None for the network's own widths, or n (hidden widths
        rescaled so that n_1 = n; uniform networks: every hidden width n).  Layer l is divided by n_{l-1}.
      layer: 1..L, or negative from the end (-1: the output layer).
      neurons: k, the number of neurons of the joint density (default 1).
      finite: a precomputed :class:`FiniteWidth` of ``net`` on ``x`` (skips :func:`finite_width`).
      tol: passed to :func:`finite_width` when it runs.
    """
    if finite is None:
        if net is None or x is None:
            raise ValueError("net: expected an MLP and inputs x (or finite=a FiniteWidth)")
        if not isinstance(net, MLP):
            raise ValueError(f"net: expected an efftheory.MLP, got {type(net).__name__}")
        finite = finite_width(net, x, tol=tol)
    else:
        if not isinstance(finite, FiniteWidth):
            raise ValueError(f"finite: expected a FiniteWidth, got {type(finite).__name__}")
        if net is not None and net != finite.net:
            raise ValueError("net: differs from finite.net; pass the network finite_width was computed for")
        if x is not None:
            xa = _validate.inputs("x", x)
            if xa.shape[0] != finite.K.shape[1]:
                raise ValueError(f"x: has {xa.shape[0]} inputs but finite was computed on {finite.K.shape[1]}")
    L = int(finite.K.shape[0])
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (-L <= layer <= L) or layer == 0:
        raise ValueError(f"layer: expected 1..{L} or -{L}..-1, got {layer!r}")
    l = int(layer) - 1 if layer > 0 else L + int(layer)
    k = _validate.positive_int("neurons", neurons, maximum=64)
    if width is not None:
        width = _validate.real("width", width, positive=True)
    n = np.asarray(finite.at_width(width).n)[l]
    return OutputDistribution(K=jnp.asarray(finite.K[l]), G1=jnp.asarray(finite.G1[l]),
                              V=jnp.asarray(np.asarray(finite.V[l])), n=jnp.asarray(n, jnp.float64),
                              neurons=k, layer=l + 1)
