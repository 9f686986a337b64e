r"""The traced paths: the theory as pure JAX functions of the inputs and hyperparameters.

The public entry points (:func:`efftheory.infinite_width`, :func:`efftheory.chi_parallel`,
:func:`efftheory.chi_perp`, :func:`efftheory.finite_width` on one or two inputs) validate concrete
arguments and choose rule sizes, series lengths and fallbacks on the host, from the data.  Under
``jax.jit``, ``jax.vmap`` or ``jax.grad`` the inputs x or the MLP's hyperparameters are tracers,
whose values are unknown while tracing; the entry points then dispatch here (shape checks only),
to functions built from jnp operations alone, with rules of a fixed, documented size:

* closed-form activations (relu, abs, erf, leaky_relu, sin, linear): the same closed forms as the
  concrete path (:mod:`efftheory.gaussian._fastmath`), exact;
* scale-invariant activations on one input: closed forms in c+ = sigma(1), c- = -sigma(-1), exact;
* finite width: one input by the closed one-input recursions (:func:`finite_single`, any sigma); two
  inputs by layer_step's recursions written in jnp (:func:`finite_two`) for smooth sigma only (the
  pair operators use autodiff derivatives of sigma up to the fifth under the 2-d rule, instead of
  integration by parts; kinked and scale-invariant sigma raise); three or more inputs raise;
* other activations (tanh, gelu, silu, softplus, sigmoid, user callables): the midpoint trapezoid
  rules of :mod:`efftheory.gaussian` on [-9, 9] with :data:`NODES_1D` nodes for one-input
  expectations (diagonals, susceptibilities, single-input finite-width moments) and
  :data:`NODES_2D` nodes per direction for pairs of inputs.  For smooth sigma with tanh's strip of
  analyticity these reach 1e-13 relative for variances up to K ~ 3000 (1-d) and K ~ 50 (2-d)
  (:func:`efftheory.gaussian.nodes_for`); beyond, accuracy degrades gradually.  Kinked
  non-homogeneous callables converge only like h^2 (~1e-5 here).

Inputs that are identical or collinear (|rho| = 1 between two different inputs) give NaN gradients
with kinked closed forms (relu, abs, leaky_relu: d asin(rho)/d rho is infinite there); values are
fine.  A zero-variance input (x = 0 with C_b = 0: K = 0) gives NaN in the traced finite-width
recursions of a non-scale-invariant sigma (their one-input forms divide by K).  No overflow check
runs under a trace (non-finite kernels come back as inf/nan rather than
KernelOverflowError).  Derivatives are those of the discretised integrals, which for smooth
integrands converge as fast as the values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._precision import check_traced, has_tracer, is_tracer
from .._precision import enable_x64 as _enable_x64
from ..gaussian import derivative, normal_rule, pair_kernel

__all__ = ["NODES_1D", "NODES_2D", "traced", "transform_name", "kernels", "chi", "finite_single", "finite_two"]

#: Nodes of the one-dimensional rule under a trace.
NODES_1D = 4096
#: Nodes per direction of the two-dimensional rule under a trace.
NODES_2D = 512


def traced(*args) -> bool:
    return has_tracer(args)


def homogeneous(act) -> bool:
    """act.homogeneous, evaluated on concrete numbers even inside a trace (it probes sigma)."""
    with jax.ensure_compile_time_eval():
        return act.homogeneous


_NAMES = {"BatchTracer": "jax.vmap", "VmapTracer": "jax.vmap", "JVPTracer": "jax.grad/jax.jvp",
          "LinearizeTracer": "jax.grad/jax.linearize",
          "DynamicJaxprTracer": "jax.jit", "JitTracer": "jax.jit"}


def _tracers(obj, out):
    if is_tracer(obj):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _tracers(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tracers(v, out)
    elif type(obj).__name__ == "MLP":
        for f in ("C_Ws", "C_bs", "lambda_Ws", "lambda_bs", "skips", "branches"):
            _tracers(getattr(obj, f), out)
    return out


def transform_name(*args) -> str:
    """The JAX transformation whose tracers ``args`` hold, in words (e.g. "jax.vmap")."""
    names = []
    for t in _tracers(args, []):
        n = _NAMES.get(type(t).__name__, f"a JAX transformation ({type(t).__name__})")
        if n not in names:
            names.append(n)
    return " and ".join(names) or "a JAX transformation"


def static_net(net):
    """``net`` for the ``net`` field of a result built under a trace: traced hyperparameters replaced by
    NaN (a tracer kept in a result's static metadata would outlive its trace when the result is
    returned from the transformed function).  Unchanged when nothing is traced."""
    if not has_tracer(net):
        return net
    out = object.__new__(type(net))
    for k, v in net.__dict__.items():
        if k == "_cached_key":
            continue
        if k in ("C_Ws", "C_bs", "lambda_Ws", "lambda_bs", "skips", "branches"):
            v = tuple(float("nan") if is_tracer(e) else float(e) for e in v)
        object.__setattr__(out, k, v)
    return out


def hyperparameters(net, l0: int = 0, *, residual: bool = False):
    """(C_W, C_b, lambda_W, lambda_b) as four float64 arrays of shape (L - l0,) (traced or not); with
    ``residual`` also (skip, branch)."""
    names = ("C_Ws", "C_bs", "lambda_Ws", "lambda_bs") + (("skips", "branches") if residual else ())
    return tuple(jnp.stack([jnp.asarray(v, jnp.float64) for v in vs[l0:]]) if len(vs) > l0 else jnp.zeros(0)
                 for vs in (getattr(net, n) for n in names))


def input_gram(x):
    """(1/n_0) x x^T of a traced (or concrete) x: shape checks only."""
    check_traced("x", x)
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x: expected an array of rank 2 (N inputs, n_0 features), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x: expected a non-empty array of shape (N, n_0), got shape {x.shape}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"x: expected real numbers, got dtype {x.dtype}")
    x = x.astype(jnp.float64)
    return x @ x.T / x.shape[1]


# ------------------------------------------------------------------------------------------ pair moments
def _rule(n):
    u, w = normal_rule(n)
    return jnp.asarray(u), jnp.asarray(w)


def _expect1(f, K, n=NODES_1D):
    """<f(z)> for z ~ N(0, K), K any shape (fixed rule)."""
    u, w = _rule(n)
    z = jnp.sqrt(jnp.maximum(K, 0.0))[..., None] * u
    return jnp.sum(f(z) * w, axis=-1)


def _pair_generic(act, K):
    """(S, dS) of a generic activation: 1-d rule on the diagonal, 2-d rule on the pairs a < b."""
    N = K.shape[0]
    fn, dfn = act.fn, derivative(act.fn)
    d = jnp.diagonal(K)
    S = jnp.diag(_expect1(lambda z: fn(z) ** 2, d))
    dS = jnp.diag(_expect1(lambda z: dfn(z) ** 2, d))
    if N == 1:
        return S, dS
    iu, ju = np.triu_indices(N, 1)
    s, ds = _expect2_pairs(fn, d[iu], d[ju], K[iu, ju])
    S = S.at[iu, ju].set(s).at[ju, iu].set(s)
    dS = dS.at[iu, ju].set(ds).at[ju, iu].set(ds)
    return S, dS


def _safe_sqrt(v):
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _expect2_pairs(fn, k11, k22, k12, n=NODES_2D):
    """(<sigma_1 sigma_2>, <sigma'_1 sigma'_2>) for pairs (P,) by the n x n midpoint rule in
    z1 = a u, z2 = b u + c v: sigma(z1) on the n nodes u, sigma(z2) and sigma'(z2) (one jvp) on the
    n x n grid, summed over v first.  Square roots with finite gradients at 0 (collinear inputs)."""
    u, w = _rule(n)
    a = _safe_sqrt(k11)
    b = jnp.where(a > 0, k12 / jnp.where(a > 0, a, 1.0), 0.0)
    c = _safe_sqrt(k22 - b * b)

    def one(abc):
        a_, b_, c_ = abc
        z1 = a_ * u
        s1, d1 = jax.jvp(fn, (z1,), (jnp.ones_like(z1),))
        z2 = b_ * u[:, None] + c_ * u[None, :]
        s2, d2 = jax.jvp(fn, (z2,), (jnp.ones_like(z2),))
        return jnp.sum(w * s1 * (s2 @ w)), jnp.sum(w * d1 * (d2 @ w))

    return jax.lax.map(one, (a, b, c))


def pair_moments_traced(act, K):
    """(S, dS) = (<sigma_a sigma_b>_K, <sigma'_a sigma'_b>_K) for an (N, N) kernel, traceable."""
    if act.has_closed_form:
        d = jnp.diagonal(K)
        eye = jnp.eye(K.shape[0], dtype=bool)
        kern = pair_kernel(act)
        if not homogeneous(act):
            return kern(K, d[:, None], d[None, :], eye)
        # Scale-invariant sigma: the diagonal is m K_aa and m exactly.  It is set apart because the
        # closed forms there sit at rho = 1, where asin and sqrt(1 - rho^2) have infinite derivatives
        # (times the zero derivative of the fixed rho = 1: NaN gradients otherwise).
        m, _ = _homogeneous_constants(act.fn)
        S, dS = kern(jnp.where(eye, 0.0, K), d[:, None], d[None, :], jnp.zeros_like(eye))
        return jnp.where(eye, m * d[:, None], S), jnp.where(eye, m, dS)
    return _pair_generic(act, K)


# ------------------------------------------------------------------------------------------ infinite width
def kernels(net, x, keep):
    """K and Theta (len(keep), N, N) of the layers ``keep`` (1-based), as a pure function of x and the
    hyperparameters (lax.scan over layers)."""
    check_traced("infinite_width", net, x)
    G = input_gram(x)
    act = net.sigma
    if net.residual:  # docs/theory.md, "Residual MLPs": xi^2 (layer l) + gamma^2 (the plain step)
        C_W, C_b, lW, lb, xi, gamma = hyperparameters(net, residual=True)
        K0, T0 = C_b[0] + C_W[0] * G, lb[0] + lW[0] * G

        def step(carry, hp):
            K, T = carry
            cw, cb, lw, lbb, x_, g_ = hp
            S, dS = pair_moments_traced(act, K)
            x2, g2 = x_ * x_, g_ * g_
            K1, T1 = x2 * K + g2 * (cb + cw * S), x2 * T + g2 * (lbb + lw * S + cw * dS * T)
            return (K1, T1), (K1, T1)

        _, (Ks, Ts) = jax.lax.scan(step, (K0, T0), (C_W[1:], C_b[1:], lW[1:], lb[1:], xi[1:], gamma[1:]))
        Ks = jnp.concatenate([K0[None], Ks])
        Ts = jnp.concatenate([T0[None], Ts])
        idx = np.asarray(keep) - 1
        return Ks[idx], Ts[idx]
    C_W, C_b, lW, lb = hyperparameters(net)
    K0, T0 = C_b[0] + C_W[0] * G, lb[0] + lW[0] * G

    def step(carry, hp):
        K, T = carry
        cw, cb, lw, lbb = hp
        S, dS = pair_moments_traced(act, K)
        K1, T1 = cb + cw * S, lbb + lw * S + cw * dS * T
        return (K1, T1), (K1, T1)

    _, (Ks, Ts) = jax.lax.scan(step, (K0, T0), (C_W[1:], C_b[1:], lW[1:], lb[1:]))
    Ks = jnp.concatenate([K0[None], Ks])
    Ts = jnp.concatenate([T0[None], Ts])
    idx = np.asarray(keep) - 1
    return Ks[idx], Ts[idx]


# ------------------------------------------------------------------------------------------ criticality
@functools.lru_cache(maxsize=256)
def _homogeneous_constants(fn) -> tuple[float, float]:
    """(m, q) = ((c+^2 + c-^2)/2, (c+^4 + c-^4)/2) with c+ = sigma(1), c- = -sigma(-1)."""
    with _enable_x64(True), jax.ensure_compile_time_eval():
        s = np.asarray(fn(jnp.asarray([1.0, -1.0], dtype=jnp.float64)), dtype=np.float64)
    return float((s[0] ** 2 + s[1] ** 2) / 2), float((s[0] ** 4 + s[1] ** 4) / 2)


def _limits0(fn):
    ds = derivative(fn)
    dds = derivative(ds)
    e = jnp.asarray([1e-20, -1e-20], dtype=jnp.float64)
    d1, d2 = ds(e), dds(e)
    dd0 = jnp.mean(d1 * d1)
    return dd0 + fn(jnp.zeros((), jnp.float64)) * jnp.mean(d2), dd0


def activation(a):
    """get_activation, with a user callable probed on numbers even inside a trace."""
    from ..activations import get_activation

    with jax.ensure_compile_time_eval():
        return get_activation(a)


def chi_checked(name: str, act, K, C_W, which: str):
    """:func:`chi` behind the public chi_parallel / chi_perp under a trace: shape and dtype checks only."""
    check_traced(name, K, C_W)
    K = jnp.asarray(K)
    if not (jnp.issubdtype(K.dtype, jnp.floating) or jnp.issubdtype(K.dtype, jnp.integer)):
        raise ValueError(f"K: expected real variance(s), got dtype {K.dtype}")
    if K.size == 0:
        raise ValueError(f"K: expected at least one variance, got an empty array of shape {K.shape}")
    if jnp.ndim(C_W) != 0:
        raise ValueError(f"C_W: expected a real scalar, got shape {jnp.shape(C_W)}")
    return chi(act, K, C_W, which)


def chi(act, K, C_W, which: str):
    """chi_parallel (``which="parallel"``) or chi_perp at variance(s) K, traceable in K and C_W.

    Scale-invariant sigma: C_W m exactly; otherwise the fixed 1-d rule (NODES_1D nodes), K = 0 as
    the limit from above."""
    K = jnp.asarray(K, jnp.float64)
    C_W = jnp.asarray(C_W, jnp.float64)
    if homogeneous(act):
        m, _ = _homogeneous_constants(act.fn)
        return C_W * m * jnp.ones_like(K)
    fn, ds = act.fn, derivative(act.fn)
    lim_par, lim_perp = _limits0(fn)
    pos = K > 0
    Ks = jnp.where(pos, K, 1.0)
    if which == "parallel":
        v = _expect1(lambda z: fn(z) * ds(z) * z, Ks) / Ks
        return C_W * jnp.where(pos, v, lim_par)
    v = _expect1(lambda z: ds(z) ** 2, Ks)
    return C_W * jnp.where(pos, v, lim_perp)


# ------------------------------------------------------------------------------------------ one input
def _single_moments(act, K):
    """What one step of the single-input recursions needs at variance K (scalar), as a dict:
    S = <s^2>, dS = <s'^2>, dSdK = d<s^2>/dK, dSpdK = d<s'^2>/dK, T = <(s^2)''''>, Tp = <(s'^2)''''>,
    P = <(s' s)'>, Mss = <s^4>, Mds = <s'^2 s^2>, Mdd = <s'^4> (docs/theory.md, "V and G1", its one-input forms)."""
    if homogeneous(act):
        m, q = _homogeneous_constants(act.fn)
        zero = jnp.zeros_like(K)
        return dict(S=m * K, dS=m + zero, dSdK=m + zero, dSpdK=zero, T=zero, Tp=zero, P=m + zero,
                    Mss=3.0 * q * K * K, Mds=q * K, Mdd=q + zero)
    fn, ds = act.fn, derivative(act.fn)
    u, w = _rule(NODES_1D)
    z = jnp.sqrt(K) * u
    s, sp = fn(z), ds(z)
    s2, sp2 = s * s, sp * sp
    he2 = (z * z - K) / (2.0 * K * K)                       # d<f>/dK = <f (z^2 - K)> / (2 K^2)
    he4 = (z ** 4 - 6.0 * K * z * z + 3.0 * K * K) / K ** 4  # <f''''> = <f He4> / K^4
    E = lambda f: jnp.sum(f * w)
    return dict(S=E(s2), dS=E(sp2), dSdK=E(s2 * he2), dSpdK=E(sp2 * he2), T=E(s2 * he4), Tp=E(sp2 * he4),
                P=E(sp * s * z) / K, Mss=E(s2 * s2), Mds=E(sp2 * s2), Mdd=E(sp2 * sp2))


def finite_single(net, x):
    """Every first-order statistic of one input (x of shape (1, n_0)), as a pure function of x and the
    hyperparameters: the scalar forms of layer_step's recursions (docs/theory.md).

    Returns a dict of (L,) arrays: K, Theta, G1, V, H1, A, B, D, F."""
    check_traced("finite_width", net, x)
    G = input_gram(x)[0, 0]
    C_W, C_b, lW, lb = hyperparameters(net)
    r = jnp.asarray(net.width_ratios()[:max(net.depth - 1, 0)], jnp.float64)
    act = net.sigma
    K0, T0 = C_b[0] + C_W[0] * G, lb[0] + lW[0] * G
    z = jnp.zeros_like(K0)
    names = ("K", "Theta", "G1", "V", "H1", "A", "B", "D", "F")

    def step(c, hp):
        K, Th, G1, V, H1, A, B, D, F = c
        cw, cb, lw, lbb, rr = hp
        m = _single_moments(act, K)
        Z, R, Rp = cw * m["dS"], cw * m["dSdK"], cw * m["dSpdK"]
        Q = (lw / cw) * R + Th * Rp
        cov_ss = m["Mss"] - m["S"] ** 2
        cov_ds = m["Mds"] - m["dS"] * m["S"]
        cov_dd = m["Mdd"] - m["dS"] ** 2
        G1_bracket = R * G1 + cw / 8 * m["T"] * V
        out = (
            cb + cw * m["S"],
            lbb + lw * m["S"] + cw * m["dS"] * Th,
            rr * G1_bracket,
            cw ** 2 * cov_ss + rr * R * R * V,
            rr * ((lw / cw) * G1_bracket + Th * (Rp * G1 + cw / 8 * m["Tp"] * V) + Z * H1 + Rp * (D + 2.0 * F)),
            lw ** 2 * cov_ss + 2.0 * lw * cw * Th * cov_ds + cw ** 2 * Th * Th * cov_dd
            + rr * (Q * Q * V + 2.0 * Q * Z * D + Z * Z * A),
            cw ** 2 * Th * Th * m["Mdd"] + rr * Z * Z * B,
            lw * cw * cov_ss + cw ** 2 * Th * cov_ds + rr * (Q * V * R + Z * D * R),
            cw ** 2 * Th * m["Mds"] + rr * cw ** 2 * m["P"] ** 2 * F,
        )
        return out, out

    first = (K0, T0) + (z,) * 7
    _, rest = jax.lax.scan(step, first, (C_W[1:], C_b[1:], lW[1:], lb[1:], r))
    return {n: jnp.concatenate([f[None], v]) for n, f, v in zip(names, first, rest)}


def single_input_error(what: str, N: int, *args) -> ValueError:
    return ValueError(
        f"{what}: under {transform_name(*args)} only one or two inputs (x of shape (1, n_0) or (2, n_0)) are "
        f"traceable, got N = {N}: the N >= 3 first-order sources (three- and four-input Gaussian integrals) "
        "choose their rules and enumerate input sets on the host; transform finite_width_diagonal or a function "
        "of one or two inputs at a time, or call finite_width outside the transformation")


def check_two_inputs(net, x) -> None:
    """N = 2 under a trace needs a smooth sigma that is not scale-invariant (module docstring)."""
    act = net.sigma
    with jax.ensure_compile_time_eval():
        bad = act.kinked or act.homogeneous
    if bad:
        raise ValueError(
            f"finite_width: under {transform_name(net, x)} two inputs need a smooth activation (tanh, erf, gelu, "
            f"silu, softplus, sigmoid, a smooth callable); {act.name!r} is kinked or scale-invariant, whose "
            "two-input operators need the exact polar rules of the host path: use one input at a time "
            "(x of shape (1, n_0), or finite_width_diagonal), or call finite_width outside the transformation")


# ------------------------------------------------------------------------------------------ two inputs
def _derivatives(fn, k: int):
    """[sigma, sigma', ..., sigma^(k)] as elementwise functions (nested forward-mode derivatives)."""
    out = [fn]
    for _ in range(k):
        out.append(derivative(out[-1]))
    return out


def _pair_grid(act, k11, k22, k12, k: int = 5, n: int = NODES_2D):
    """The n-node values sigma^(j)(z_0) (k+1, n) and sigma^(j)(z_1) (k+1, n, n) of the 2-d rule
    z_0 = a u, z_1 = b u + c v at the covariance [[k11, k12], [k12, k22]], and the weights."""
    u, w = _rule(n)
    a = _safe_sqrt(k11)
    b = jnp.where(a > 0, k12 / jnp.where(a > 0, a, 1.0), 0.0)
    c = _safe_sqrt(k22 - b * b)
    fs = _derivatives(act.fn, k)
    z0 = a * u
    z1 = b * u[:, None] + c * u[None, :]
    return jnp.stack([f(z0) for f in fs]), jnp.stack([f(z1) for f in fs]), w


def _grid_mean(D0, D1, w, f0, f1):
    """<f0(z_0) f1(z_1)> on the grid of :func:`_pair_grid` (f0, f1: arrays built from D0, D1)."""
    return jnp.sum(w * f0 * (f1 @ w))


def _finite_two_step(act, cw, lw, rr, K, Th, G1, V, H1, A, B, D, F):
    """One step l -> l+1 of layer_step's recursions for N = 2 inputs, in jnp (smooth sigma only):
    the pair operators by autodiff derivatives of sigma (no kinks: no integration by parts needed)
    under the 2-d rule, the diagonal pairs by the one-input forms, sources on the same grid."""
    from .finite import pair_index

    N = 2
    D0, D1, w = _pair_grid(act, K[0, 0], K[1, 1], K[0, 1])
    E = jnp.stack([jnp.stack([_grid_mean(D0, D1, w, D0[i], D1[j]) for j in range(6)]) for i in range(6)])
    ET = E.T  # the pair (1, 0)
    one = [_single_moments(act, K[a, a]) for a in range(N)]
    S = jnp.array([[one[0]["S"], E[0, 0]], [E[0, 0], one[1]["S"]]])
    dS = jnp.array([[one[0]["dS"], E[1, 1]], [E[1, 1], one[1]["dS"]]])

    def pair_ops(M, shift):
        """R2 (without C_W/2) and T4 of sigma^(shift) sigma^(shift) for the pairs (N, N, 2, 2[, 2, 2])."""
        R2 = [[None, None], [None, None]]
        T4 = [[None, None], [None, None]]
        slots = np.indices((2, 2, 2, 2)).reshape(4, -1).T
        for a1 in range(N):
            for a2 in range(N):
                if a1 == a2:
                    m = one[a1]
                    tot2 = 2.0 * (m["dSdK"] if shift == 0 else m["dSpdK"])  # <(f^2)''> = 2 d<f^2>/dK
                    tot4 = m["T"] if shift == 0 else m["Tp"]
                    R2[a1][a2] = jnp.zeros((2, 2)).at[0, 0].set(tot2)
                    T4[a1][a2] = jnp.zeros((2, 2, 2, 2)).at[0, 0, 0, 0].set(tot4)
                else:
                    Mp = M if a1 == 0 else M.T
                    R2[a1][a2] = jnp.array([[Mp[shift + 2, shift], Mp[shift + 1, shift + 1]],
                                            [Mp[shift + 1, shift + 1], Mp[shift, shift + 2]]])
                    vals = [Mp[shift + int(4 - s.sum()), shift + int(s.sum())] for s in slots]
                    T4[a1][a2] = jnp.stack(vals).reshape(2, 2, 2, 2)
        return (jnp.stack([jnp.stack(r) for r in R2]), jnp.stack([jnp.stack(r) for r in T4]))

    R2, T4 = pair_ops(E, 0)
    Rp2, Tp4 = pair_ops(E, 1)
    P1 = []
    for a1 in range(N):
        row = []
        for a2 in range(N):
            if a1 == a2:
                row.append(jnp.stack([one[a1]["P"], 0.0 * one[a1]["P"]]))
            else:
                Mp = E if a1 == 0 else ET
                row.append(jnp.stack([Mp[2, 0], Mp[1, 1]]))  # <sigma''_a sigma_b>, <sigma'_a sigma'_b>
        P1.append(jnp.stack(row))
    P1 = jnp.stack(P1)

    # sources <s_a s_b s_c s_d>, <s'_a s'_b s_c s_d>, <s'_a s'_b s'_c s'_d> on the grid
    def source(kind):
        out = np.empty((N,) * 4, dtype=object)
        for idx in np.ndindex(*(N,) * 4):
            f0 = jnp.ones_like(D0[0])
            f1 = jnp.ones_like(D1[0])
            for pos, a in enumerate(idx):
                order = 1 if (kind == "dd" or (kind == "ds" and pos < 2)) else 0
                if a == 0:
                    f0 = f0 * D0[order]
                else:
                    f1 = f1 * D1[order]
            out[idx] = _grid_mean(D0, D1, w, f0, f1)
        return jnp.stack(list(out.reshape(-1))).reshape((N,) * 4)

    Mss, Mds, Mdd = source("ss"), source("ds"), source("dd")
    P = pair_index(N).reshape(-1, 2)
    n2 = N * N

    def apply(C2, X):
        out = 0.0
        for a in range(2):
            for b in range(2):
                out = out + C2[..., a, b].reshape(-1, 1) * X[P[:, a] * N + P[:, b]]
        return out

    def contract4(T, X):
        Pi = pair_index(N)
        first, second = (Pi[..., i][:, :, None, None, None, None] for i in range(2))
        slot = np.indices((2, 2, 2, 2))[:, None, None]
        g = [np.where(slot[k] == 0, first, second) for k in range(4)]
        return jnp.einsum("pqabcd,pqabcd->pq", T, X[g[0], g[1], g[2], g[3]])

    def pair_gather(X):
        Pi = pair_index(N)
        a1, a2 = Pi[..., 0][:, :, None, None], Pi[..., 1][:, :, None, None]
        ga = np.broadcast_to(Pi[:, :, :, None], (N, N, 2, 2))
        gb = np.broadcast_to(Pi[:, :, None, :], (N, N, 2, 2))
        return X[a1, a2, ga, gb]

    def p_transform(P1, F):
        p0, p1 = P1[..., 0], P1[..., 1]
        out = p1[:, :, None, None] * p1[None, None] * F
        out = out + p0[:, :, None, None] * p0[None, None] * jnp.einsum("aacc->ac", F)[:, None, :, None]
        out = out + p0[:, :, None, None] * p1[None, None] * jnp.einsum("aacd->acd", F)[:, None]
        return out + p1[:, :, None, None] * p0[None, None] * jnp.einsum("abcc->abc", F)[..., None]

    m = lambda X: X.reshape(n2, n2)
    t = lambda X: X.reshape(N, N, N, N)
    Z = cw * dS
    R2, Rp2 = cw / 2 * R2, cw / 2 * Rp2
    Q2 = (lw / cw) * R2 + Th[:, :, None, None] * Rp2
    T12, T34 = Th[:, :, None, None], Th[None, None, :, :]
    zf = Z.reshape(-1)
    B_new = rr * Z[:, :, None, None] * Z[None, None] * B + cw ** 2 * Th[:, None, :, None] * Th[None, :, None, :] * Mdd
    F_new = rr * cw ** 2 * p_transform(P1, F) + cw ** 2 * Th[:, None, :, None] * Mds.transpose(0, 2, 1, 3)
    cov_ss = Mss - S[:, :, None, None] * S[None, None]
    cov_ds = Mds - dS[:, :, None, None] * S[None, None]
    cov_dd = Mdd - dS[:, :, None, None] * dS[None, None]
    cov_sd = cov_ds.transpose(2, 3, 0, 1)
    Vm = m(V)
    V_new = rr * t(apply(R2, apply(R2, Vm).T).T) + cw ** 2 * cov_ss
    G1_bracket = apply(R2, G1.reshape(-1, 1)).reshape(N, N) + cw / 8 * contract4(T4, V)
    QV = apply(Q2, Vm)
    ZD = zf[:, None] * m(D)
    D_new = rr * t(apply(R2, (QV + ZD).T).T) + lw * cw * cov_ss + cw ** 2 * T12 * cov_ds
    QZD = apply(Q2, ZD.T)
    A_new = rr * (t(apply(Q2, QV.T).T) + t(QZD) + t(QZD.T) + t(zf[:, None] * m(A) * zf[None, :]))
    A_new = A_new + lw ** 2 * cov_ss + lw * cw * (T34 * cov_sd) + lw * cw * (T12 * cov_ds) + cw ** 2 * T12 * T34 * cov_dd
    Mx = D + F.transpose(0, 2, 1, 3) + F.transpose(0, 2, 3, 1)
    RpM = jnp.einsum("pqab,pqab->pq", Rp2, pair_gather(Mx))
    H1_new = rr * ((lw / cw) * G1_bracket
                   + Th * (apply(Rp2, G1.reshape(-1, 1)).reshape(N, N) + cw / 8 * contract4(Tp4, V))
                   + Z * H1 + RpM)
    K_new = None  # computed by the caller from S, dS
    del K_new
    return S, dS, (rr * G1_bracket, V_new, H1_new, A_new, B_new, D_new, F_new)


def finite_two(net, x):
    """All first-order statistics of two inputs (x of shape (2, n_0)) as a pure JAX function (smooth,
    non-scale-invariant sigma; fixed 2-d rules).  Returns a dict of (L, 2, 2) and (L, 2, 2, 2, 2) arrays."""
    check_traced("finite_width", net, x)
    G = input_gram(x)
    C_W, C_b, lW, lb = hyperparameters(net)
    r = jnp.asarray(net.width_ratios()[:max(net.depth - 1, 0)], jnp.float64)
    act = net.sigma
    K0, T0 = C_b[0] + C_W[0] * G, lb[0] + lW[0] * G
    z2, z4 = jnp.zeros((2, 2)), jnp.zeros((2,) * 4)
    names = ("K", "Theta", "G1", "V", "H1", "A", "B", "D", "F")

    def step(c, hp):
        Th = c[1]
        cw, cb, lw, lbb, rr = hp
        S, dS, rest = _finite_two_step(act, cw, lw, rr, *c)
        out = (cb + cw * S, lbb + lw * S + cw * dS * Th) + rest
        return out, out

    first = (K0, T0, z2, z4, z2, z4, z4, z4, z4)
    _, rest = jax.lax.scan(step, first, (C_W[1:], C_b[1:], lW[1:], lb[1:], r))
    return {n: jnp.concatenate([f[None], v]) for n, f, v in zip(names, first, rest)}
