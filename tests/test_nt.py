"""efftheory's infinite-width kernels against neural-tangents (NT).

Two layers of checks:

* default suite (no NT needed): ``tests/data/nt_reference.npz`` holds NT's per-layer NNGP and NTK
  for relu / erf / gelu MLPs (regenerate with ``.venv-nt/bin/python benchmarks/nt_reference.py``);
  :func:`efftheory.infinite_width` must reproduce every layer to 1e-6 relative.
* ``-m nt`` (the pinned NT environment, ``.ci/nt_env.sh``): NT runs live on fresh random
  configurations, every activation family, and the ``efftheory.interop.neural_tangents`` round trip.

Relative disagreement of a layer: max |ours - NT| / max |NT| over the N x N kernel.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import efftheory

REFERENCE = Path(__file__).parent / "data" / "nt_reference.npz"
RTOL = 1e-6


def rel_err(ours, ref):
    """Per-layer max |ours - ref| / max |ref| for (L, N, N) stacks."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return np.max(np.abs(ours - ref), axis=(-2, -1)) / np.max(np.abs(ref), axis=(-2, -1))


# ------------------------------------------------------------------ stored reference (default suite)
def _load_reference():
    with np.load(REFERENCE) as d:
        return {k: d[k] for k in d.files}


_REF = _load_reference()


def _ref_id(i):
    L = int(_REF["depth"][i])
    cw, cb = _REF["C_W"][i, :L], _REF["C_b"][i, :L]
    short = (lambda v: f"{v[0]:g}") if L else None
    if np.all(cw == cw[0]) and np.all(cb == cb[0]):
        return f"{_REF['activation'][i]}-L{L}-CW{short(cw)}-Cb{short(cb)}"
    return f"{_REF['activation'][i]}-L{L}-perlayer"


def test_reference_file_is_sane():
    assert REFERENCE.stat().st_size < 200 * 1024
    x = _REF["x"]
    N = x.shape[0]
    n_cfg = len(_REF["depth"])
    assert _REF["nngp"].shape == _REF["ntk"].shape == (n_cfg, _REF["C_W"].shape[1], N, N)
    assert set(_REF["activation"]) == {"relu", "erf", "gelu"}
    # the inputs carry an identical pair and a collinear pair, and are not normalised
    norms = np.linalg.norm(x, axis=1)
    cos = (x @ x.T) / np.outer(norms, norms)
    off = cos[~np.eye(N, dtype=bool)]
    assert np.sum(np.isclose(np.abs(off), 1.0, atol=1e-12)) >= 4
    assert np.any(np.all(x[:, None] == x[None], axis=-1) & ~np.eye(N, dtype=bool))
    assert np.max(norms**2 / x.shape[1]) > 4.0
    assert any(np.any(_REF["C_b"][i, : _REF["depth"][i]] > 0) for i in range(n_cfg))


@pytest.mark.parametrize("i", range(len(_REF["depth"])), ids=_ref_id)
def test_infinite_width_matches_stored_nt(i):
    L = int(_REF["depth"][i])
    net = efftheory.MLP(L, 16, str(_REF["activation"][i]),
                        C_W=tuple(_REF["C_W"][i, :L]), C_b=tuple(_REF["C_b"][i, :L]))
    out = efftheory.infinite_width(net, _REF["x"])
    err_K = rel_err(out.K, _REF["nngp"][i, :L])
    err_T = rel_err(out.Theta, _REF["ntk"][i, :L])
    assert np.all(err_K <= RTOL), f"{net}: NNGP relative error per layer {err_K}"
    assert np.all(err_T <= RTOL), f"{net}: NTK relative error per layer {err_T}"


@pytest.mark.skipif(importlib.util.find_spec("neural_tangents") is not None,
                    reason="neural-tangents is installed here")
def test_interop_import_error_without_nt():
    with pytest.raises(ImportError, match=r"neural-tangents is not installed.*nt_env\.sh.*jax<0\.6"):
        import efftheory.interop.neural_tangents  # noqa: F401 - the import itself is under test


# ------------------------------------------------------------------ live NT (-m nt)
def _nt():
    pytest.importorskip("neural_tangents")
    import efftheory.interop.neural_tangents as ntm

    return ntm


# Gauss-Hermite degree (per dimension) of NT's ElementwiseNumerical in these small (N <= 8) live
# checks.  NT's rule, not efftheory's, limits the agreement on quadrature activations: measured
# against efftheory (itself checked against adaptive quadrature), NT's tanh kernels at variance K
# are off by 1e-7 (K=1), 4e-5 (K=2), 6e-3 (K=5) at deg 64, and by ~4e-9 up to K=5 at deg 400.
# So the live quadrature cases keep K <= NUMERICAL_K_MAX and use deg 400 (cheap at N <= 8).
DEG = 400
NUMERICAL_K_MAX = 5.0


def _my_activation(z):  # a user callable: smooth, no closed form anywhere
    import jax.numpy as jnp

    return z * jnp.exp(-z * z / 8.0) + 0.3 * jnp.sin(z) + 0.2 * z


CLOSED = ["relu", "erf", "gelu", "abs", "leaky_relu(0.2)", "sin", "linear"]
NUMERICAL = ["tanh", "silu", "sigmoid", "softplus", _my_activation]


def _random_case(seed, activation, *, scale, C_W_max=2.2, C_b_max=1.0):
    """A random MLP (depth 1-5, per-layer C_W, C_b, C_b = 0 in some layers) and N = 6 random,
    non-normalised inputs with a collinear pair, scaled so that max_a |x_a|^2 / n_0 is a random
    value up to ``scale**2``."""
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 6))
    N, n0 = 6, int(rng.integers(2, 9))
    C_W = tuple(rng.uniform(0.4, C_W_max, L))
    C_b = tuple(np.where(rng.random(L) < 0.3, 0.0, rng.uniform(0.0, C_b_max, L)))
    x = rng.standard_normal((N, n0))
    x[-1] = 1.7 * x[0]  # a collinear pair
    x *= rng.uniform(0.3, scale) / np.sqrt(np.max(np.sum(x * x, axis=1) / n0))
    return efftheory.MLP(L, 32, activation, C_W=C_W, C_b=C_b), x


def _name(a):
    return a if isinstance(a, str) else a.__name__


@pytest.mark.nt
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("activation", CLOSED, ids=_name)
def test_live_closed_form(activation, seed):
    ntm = _nt()
    net, x = _random_case(1000 * seed + CLOSED.index(activation), activation, scale=3.0)
    ref = ntm.kernels(net, x)
    out = efftheory.infinite_width(net, x)
    assert np.max(rel_err(out.K, ref.nngp)) <= RTOL, (net, rel_err(out.K, ref.nngp))
    assert np.max(rel_err(out.Theta, ref.ntk)) <= RTOL, (net, rel_err(out.Theta, ref.ntk))


@pytest.mark.nt
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("activation", NUMERICAL, ids=_name)
def test_live_numerical(activation, seed):
    """Activations NT integrates with ElementwiseNumerical (both sides are quadrature rules)."""
    ntm = _nt()
    net, x = _random_case(7000 + 100 * seed + NUMERICAL.index(activation), activation, scale=1.0,
                          C_W_max=1.6, C_b_max=0.4)
    out = efftheory.infinite_width(net, x)
    assert float(np.max(out.K)) <= NUMERICAL_K_MAX  # where NT's deg-400 rule is good to ~1e-8
    ref = ntm.kernels(net, x, deg=DEG)
    assert np.max(rel_err(out.K, ref.nngp)) <= RTOL, (net, rel_err(out.K, ref.nngp))
    assert np.max(rel_err(out.Theta, ref.ntk)) <= RTOL, (net, rel_err(out.Theta, ref.ntk))


@pytest.mark.nt
def test_live_identical_and_collinear_inputs():
    ntm = _nt()
    rng = np.random.default_rng(5)
    x = 3.0 * rng.standard_normal((4, 5))
    x = np.concatenate([x, x[:1], -0.5 * x[1:2], 4.0 * x[2:3]])
    for act in ("relu", "erf", "gelu", "abs", "tanh"):
        net = efftheory.MLP(4, 8, act, C_W=(1.3, 2.0, 1.1, 1.7), C_b=(0.0, 0.2, 0.0, 0.5))
        # tanh: max |x|^2 / n_0 = 1 keeps K <= NUMERICAL_K_MAX, where NT's quadrature is good
        xa = x if act != "tanh" else x / np.sqrt(np.max(np.sum(x * x, axis=1) / x.shape[1]))
        ref = ntm.kernels(net, xa, deg=DEG)
        out = efftheory.infinite_width(net, xa)
        assert np.max(rel_err(out.K, ref.nngp)) <= RTOL, (act, rel_err(out.K, ref.nngp))
        assert np.max(rel_err(out.Theta, ref.ntk)) <= RTOL, (act, rel_err(out.Theta, ref.ntk))


@pytest.mark.nt
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_stax_mlp_round_trip(activation):
    """stax_mlp(net) is the PDLT network: same forward pass, same kernels, same empirical NTK."""
    ntm = _nt()
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt

    C_W, C_b = (1.5, 2.0, 1.2), (0.1, 0.0, 0.4)
    net = efftheory.MLP(3, (24, 40), activation, C_W=C_W, C_b=C_b, output_width=2)
    rng = np.random.default_rng(11)
    x = (2.0 if activation == "relu" else 0.8) * rng.standard_normal((5, 7))
    init_fn, apply_fn, kernel_fn = ntm.stax_mlp(net, deg=DEG)

    # forward pass: NT's standard-normal parameters, scaled as in docs/theory.md "The network"
    out_shape, params = init_fn(jax.random.PRNGKey(0), x.shape)
    assert out_shape == (5, 2)
    dense = [p for p in params if isinstance(p, tuple) and len(p) == 2 and p[0] is not None and p[0].ndim == 2]
    assert [W.shape for W, _ in dense] == [(7, 24), (24, 40), (40, 2)]
    h = x
    for l, (W, b) in enumerate(dense):
        z = math.sqrt(C_b[l]) * np.asarray(b).reshape(-1) + (math.sqrt(C_W[l] / h.shape[1]) * np.asarray(W).T @ h.T).T
        h = np.asarray(net.sigma.fn(jnp.asarray(z))) if l < net.depth - 1 else z
    np.testing.assert_allclose(np.asarray(apply_fn(params, x)), h, rtol=1e-10, atol=1e-10)

    # kernels: the full network's kernel_fn is the last layer of kernels() and of infinite_width
    k = kernel_fn(x, None, ("nngp", "ntk"))
    per_layer = ntm.kernels(net, x, deg=DEG)
    np.testing.assert_allclose(per_layer.nngp[-1], np.asarray(k.nngp), rtol=1e-12, atol=0)
    np.testing.assert_allclose(per_layer.ntk[-1], np.asarray(k.ntk), rtol=1e-12, atol=0)
    theory = efftheory.infinite_width(net, x)
    assert rel_err(theory.K[-1:], np.asarray(k.nngp)[None])[0] <= RTOL
    assert rel_err(theory.Theta[-1:], np.asarray(k.ntk)[None])[0] <= RTOL

    # NT's empirical NTK of a wide instance approaches Theta (lambda = C is NT's "ntk" training)
    wide = net.with_width(4096).replace(output_width=1)
    init_w, apply_w, _ = ntm.stax_mlp(wide, deg=DEG)
    _, params_w = init_w(jax.random.PRNGKey(1), x.shape)
    ntk_emp = nt.empirical_ntk_fn(apply_w, trace_axes=(), vmap_axes=0)(x, None, params_w)
    ntk_emp = np.asarray(ntk_emp).reshape(5, 5)
    err = np.max(np.abs(ntk_emp - np.asarray(theory.Theta[-1]))) / np.max(np.abs(np.asarray(theory.Theta[-1])))
    assert err < 0.1, err


@pytest.mark.nt
def test_stax_mlp_rejects_other_learning_rates():
    ntm = _nt()
    with pytest.raises(ValueError, match="lambda_W"):
        ntm.stax_mlp(efftheory.MLP(2, 8, "relu", C_W=2.0, lambda_W=1.0))
    with pytest.raises(ValueError, match="lambda_b"):
        ntm.kernels(efftheory.MLP(2, 8, "relu", C_W=2.0, C_b=0.1, lambda_b=0.0), np.ones((2, 3)))


@pytest.mark.nt
def test_activation_mapping_is_by_function_not_name():
    """A user callable that is merely *called* erf must not get NT's closed-form Erf layer."""
    ntm = _nt()
    import jax.numpy as jnp

    def erf(z):  # an impostor: tanh under the name erf
        return jnp.tanh(z)

    x = np.random.default_rng(3).standard_normal((4, 3))
    impostor = efftheory.MLP(3, 8, erf, C_W=1.5, C_b=0.2)
    assert impostor.sigma.name == "erf"
    ref = ntm.kernels(impostor, x, deg=DEG)
    real = ntm.kernels(impostor.replace(activation="erf"), x)
    tanh = efftheory.infinite_width(impostor.replace(activation="tanh"), x)
    assert np.max(rel_err(tanh.K, ref.nngp)) <= RTOL
    assert np.max(rel_err(real.nngp, ref.nngp)) > 1e-3
    with pytest.warns(UserWarning, match="not smooth"):
        ntm.activation_layer(efftheory.Activation("relu6", lambda z: jnp.clip(z, 0.0, 6.0), smooth=False))


# ------------------------------------------------------------------ residual MLPs (-m nt)
RESIDUAL_RTOL = 1e-10  # closed-form NT layers: both sides are exact formulas


def _residual_case(seed, activation):
    """A random residual MLP (depth 3-6, per-layer skip of either sign and branch, widths with a change
    so that some hidden layers stay plain) and N = 5 random non-normalised inputs."""
    rng = np.random.default_rng(seed)
    L = int(rng.integers(3, 7))
    widths = [32] * (L - 1)
    if L >= 5:
        widths[2:] = [48] * (L - 3)  # layer 3 changes width: plain
    eligible = [2 <= l <= L - 1 and widths[l - 2] == widths[l - 1] for l in range(1, L + 1)]
    skip = [float(rng.uniform(-1.1, 1.1)) if e else 0.0 for e in eligible]
    branch = [float(rng.uniform(0.3, 1.5)) if e else 1.0 for e in eligible]
    C_W, C_b = tuple(rng.uniform(0.4, 1.8, L)), tuple(rng.uniform(0.0, 0.5, L))
    x = rng.standard_normal((5, 4)) * rng.uniform(0.5, 1.5)
    return efftheory.MLP(L, widths, activation, C_W=C_W, C_b=C_b, skip=skip, branch=branch), x


@pytest.mark.nt
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("activation", ["relu", "erf", "gelu", "abs", "linear"])
def test_live_residual_closed_form(activation, seed):
    ntm = _nt()
    net, x = _residual_case(300 + 10 * seed + len(activation), activation)
    assert net.residual
    ref = ntm.kernels(net, x)
    out = efftheory.infinite_width(net, x)
    assert np.max(rel_err(out.K, ref.nngp)) <= RESIDUAL_RTOL, (net, rel_err(out.K, ref.nngp))
    assert np.max(rel_err(out.Theta, ref.ntk)) <= RESIDUAL_RTOL, (net, rel_err(out.Theta, ref.ntk))


@pytest.mark.nt
def test_live_residual_numerical():
    """tanh through NT's ElementwiseNumerical (deg 400): NT's quadrature limits the agreement (RTOL)."""
    ntm = _nt()
    net, x = _residual_case(77, "tanh")
    x = x / np.sqrt(np.max(np.sum(x * x, axis=1) / x.shape[1]))
    out = efftheory.infinite_width(net, x)
    assert float(np.max(out.K)) <= NUMERICAL_K_MAX
    ref = ntm.kernels(net, x, deg=DEG)
    assert np.max(rel_err(out.K, ref.nngp)) <= RTOL, (net, rel_err(out.K, ref.nngp))
    assert np.max(rel_err(out.Theta, ref.ntk)) <= RTOL, (net, rel_err(out.Theta, ref.ntk))


@pytest.mark.nt
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_residual_stax_round_trip(activation):
    """The residual stax network is efftheory's residual MLP: with NT's parameters mapped to PDLT ones
    (W = sqrt(C_W / n_in) W_NT^T, b = sqrt(C_b) b_NT), the same outputs and the same empirical NTK
    (efftheory's layer-structure NTK against NT's autodiff one) to 1e-10 in float64."""
    ntm = _nt()
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt

    from efftheory import empirical

    net = efftheory.MLP(5, 16, activation, C_W=(1.5, 1.2, 0.9, 1.1, 1.3), C_b=(0.1, 0.2, 0.0, 0.3, 0.1),
                        skip=[0, 0.7, -0.4, 0.9, 0], branch=[1, 0.5, 1.3, 0.6, 1], output_width=2)
    x = np.random.default_rng(3).standard_normal((4, 6))
    init_fn, apply_fn, _ = ntm.stax_mlp(net, deg=DEG)
    _, params_nt = init_fn(jax.random.PRNGKey(2), x.shape)
    dense = [p for p in jax.tree_util.tree_leaves(params_nt, is_leaf=lambda p: isinstance(p, tuple) and len(p) == 2
                                                  and hasattr(p[0], "ndim") and p[0].ndim == 2)
             if isinstance(p, tuple)]
    assert [W.shape for W, _ in dense] == [(6, 16), (16, 16), (16, 16), (16, 16), (16, 2)]
    sizes = (6,) + net.widths
    params = tuple({"W": jnp.asarray(math.sqrt(net.C_Ws[l] / sizes[l]) * np.asarray(W).T),
                    "b": jnp.asarray(math.sqrt(net.C_bs[l]) * np.asarray(b).reshape(-1))}
                   for l, (W, b) in enumerate(dense))
    np.testing.assert_allclose(np.asarray(empirical.apply(net, params, x)), np.asarray(apply_fn(params_nt, x)),
                               rtol=1e-10, atol=1e-12)
    ntk_nt = np.asarray(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0)(x, None, params_nt))
    ours = np.asarray(empirical.ntk_full(net, params, x))  # (k, k, N, N); NT: (N, N, k, k)
    err = np.max(np.abs(ours - ntk_nt.transpose(2, 3, 0, 1))) / np.max(np.abs(ntk_nt))
    assert err < 1e-10, err
