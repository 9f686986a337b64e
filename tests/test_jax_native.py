"""The theory as JAX functions (issue #21): jit, vmap and grad through infinite_width, chi_parallel,
chi_perp and one-input finite_width, against central finite differences of the concrete path; and
no global side effects at import (fresh subprocesses, where the user's 64-bit mode is off)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory
from efftheory import MLP, chi_parallel, chi_perp, finite_width, finite_width_diagonal, infinite_width

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-6  # gradients against central differences (issue #21)


def user_sigma(z):
    return jnp.tanh(z) + 0.1 * z


ACTS = ["relu", "erf", "tanh", "gelu", user_sigma]
ACT_IDS = ["relu", "erf", "tanh", "gelu", "user"]
X = np.random.default_rng(3).normal(size=(2, 3))


def _central(f, v, h):
    return (np.asarray(f(v + h), dtype=np.float64) - np.asarray(f(v - h), dtype=np.float64)) / (2 * h)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _entries(res):
    return jnp.stack([res.K[-1, 0, 0], res.K[-1, 0, 1], res.Theta[-1, 0, 0], res.Theta[-1, 0, 1]])


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_grad_of_kernels_wrt_C_W_and_C_b_matches_finite_differences(act):
    L, cw, cb = 3, 1.3, 0.2

    def f(cw, cb):
        return _entries(infinite_width(MLP(L, 8, act, C_W=cw, C_b=cb), X))

    dw, db = jax.jit(jax.jacfwd(f, argnums=(0, 1)))(cw, cb)
    rw, rb = jax.jacrev(f, argnums=(0, 1))(cw, cb)
    fd_w = _central(lambda v: f(float(v), cb), cw, 1e-4)  # concrete path (floats: no tracer)
    fd_b = _central(lambda v: f(cw, float(v)), cb, 1e-4)
    assert _rel(dw, fd_w) < RTOL and _rel(db, fd_b) < RTOL
    assert _rel(rw, dw) < 1e-12 and _rel(rb, db) < 1e-12


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_grad_wrt_x_matches_finite_differences(act):
    net = MLP(3, 8, act, C_W=1.4, C_b=0.1)

    def f(x):
        return infinite_width(net, x).K[-1, 0, 1] + 0.3 * infinite_width(net, x).Theta[-1, 1, 1]

    g = jax.grad(f)(jnp.asarray(X))
    fd = np.zeros_like(X)
    for i in np.ndindex(X.shape):
        e = np.zeros_like(X)
        e[i] = 1e-4
        fd[i] = (float(f(X + e)) - float(f(X - e))) / 2e-4
    assert np.max(np.abs(np.asarray(g) - fd)) < RTOL * np.max(np.abs(fd))


def test_per_layer_hyperparameters_are_differentiable():
    L = 3
    base = dict(C_W=np.array([1.0, 1.5, 1.2]), C_b=np.array([0.1, 0.05, 0.2]),
                lambda_W=np.array([0.5, 1.0, 2.0]), lambda_b=np.array([0.3, 0.2, 0.1]))

    def f(**hp):
        return _entries(infinite_width(MLP(L, 8, "tanh", **hp), X))

    for name in base:
        jac = jax.jacfwd(lambda v: f(**{**base, name: v}))(jnp.asarray(base[name]))  # (4, L): traced (L,) array
        for layer in range(L):
            e = np.zeros(L)
            e[layer] = 1e-4
            fd = (np.asarray(f(**{**base, name: base[name] + e})) - np.asarray(f(**{**base, name: base[name] - e}))) / 2e-4
            assert np.allclose(np.asarray(jac)[:, layer], fd, rtol=RTOL, atol=1e-9), (name, layer)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_jit_and_vmap_give_the_concrete_values(act):
    cws, cbs = np.array([0.9, 1.3, 2.0]), np.array([0.0, 0.1, 0.3])

    def f(cw, cb):
        r = infinite_width(MLP(4, 8, act, C_W=cw, C_b=cb), X)
        return r.K, r.Theta

    Kv, Tv = jax.jit(jax.vmap(f))(cws, cbs)
    for i in range(3):
        K, T = f(float(cws[i]), float(cbs[i]))
        assert np.allclose(Kv[i], K, rtol=1e-11, atol=1e-13) and np.allclose(Tv[i], T, rtol=1e-11, atol=1e-13)
    last = jax.jit(lambda x: infinite_width(MLP(4, 8, act, C_W=1.3, C_b=0.2), x, layers="last").K)(X)
    assert last.shape == (1, 2, 2) and last.dtype == jnp.float64


def test_chi_under_jit_vmap_and_grad():
    Ks = np.array([0.3, 1.0, 2.5])
    for act in ("tanh", "gelu", "relu", user_sigma):
        for chi in (chi_parallel, chi_perp):
            got = jax.jit(jax.vmap(lambda k, c: chi(act, k, c)))(Ks, jnp.full(3, 1.7))
            assert np.allclose(got, chi(act, Ks, 1.7), rtol=1e-12, atol=1e-14)
            dK = jax.grad(lambda k: chi(act, k, 1.7))(1.0)
            fd = _central(lambda k: chi(act, float(k), 1.7), 1.0, 1e-4)
            assert abs(float(dK) - float(fd)) <= RTOL * max(abs(float(fd)), 1e-8)
            dC = jax.grad(lambda c: chi(act, 1.0, c))(1.7)
            assert abs(float(dC) - float(chi(act, 1.0, 1.0))) < 1e-10


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "gelu", user_sigma], ids=ACT_IDS)
def test_single_input_finite_width_traced_end_to_end(act):
    net = MLP(4, 8, act, C_W=1.3, C_b=0.2)
    x1 = X[:1]
    ref = finite_width(net, x1)
    got = jax.jit(lambda x: finite_width(net, x))(x1)
    for name in ("K", "Theta", "G1", "V", "H1", "A", "B", "D", "F"):
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
        assert a.shape == b.shape
        assert np.allclose(a, b, rtol=1e-8, atol=1e-12), name

    def vg(cw):
        r = finite_width(MLP(4, 8, act, C_W=cw, C_b=0.2), x1)
        return jnp.stack([r.V[-1, 0, 0, 0, 0], r.G1[-1, 0, 0]])

    d = jax.jacfwd(vg)(1.3)
    fd = _central(lambda c: vg(float(c)), 1.3, 1e-4)
    for i in range(2):
        if abs(fd[i]) > 1e-10:  # relu: G1 = 0
            assert abs(float(d[i]) - fd[i]) <= RTOL * abs(fd[i]), i
    diag = jax.jit(lambda x: finite_width_diagonal(net, x).V)(X)
    assert np.allclose(diag, finite_width_diagonal(net, X).V, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_two_inputs_finite_width_traced(act):
    net = MLP(3, [8, 12], act, C_W=1.3, C_b=0.2, lambda_W=0.7, lambda_b=0.3)
    ref = finite_width(net, X, tol=1e-11)
    got = jax.jit(lambda x: finite_width(net, x))(X)
    for name in ("K", "Theta", "G1", "V", "H1", "A", "B", "D", "F"):
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
        assert np.max(np.abs(a - b)) <= 1e-8 * np.max(np.abs(b)), name

    def v(cw):
        r = finite_width(MLP(3, [8, 12], act, C_W=cw, C_b=0.2), X)
        return jnp.stack([r.V[-1, 0, 0, 1, 1], r.V[-1, 0, 1, 0, 1], r.G1[-1, 0, 1]])

    d = jax.jacfwd(v)(1.3)
    fd = (4 * _central(lambda c: v(float(c)), 1.3, 1e-3) - _central(lambda c: v(float(c)), 1.3, 2e-3)) / 3
    assert _rel(d, fd) < RTOL


def test_results_returned_from_a_transform_hold_no_tracer():
    r = jax.jit(lambda c: infinite_width(MLP(3, 4, "erf", C_W=c, C_b=0.1), X))(1.2)
    f = jax.vmap(lambda c: finite_width(MLP(3, 4, "tanh", C_W=c), X[:1]))(jnp.array([1.0, 1.5]))
    for res in (r, f):
        assert all(isinstance(v, float) for v in res.net.C_Ws + res.net.C_bs + res.net.lambda_Ws)
        assert np.isnan(res.net.C_Ws[0]) and res.net.C_bs[0] in (0.0, 0.1)
    assert f.V.shape == (2, 3, 1, 1, 1, 1)
    assert np.allclose(r.K, infinite_width(MLP(3, 4, "erf", C_W=1.2, C_b=0.1), X).K, rtol=1e-13)


def test_clear_errors_under_transforms():
    net = MLP(3, 8, "tanh")
    x3 = np.random.default_rng(0).normal(size=(3, 3))
    with pytest.raises(ValueError, match="jax.jit"):
        jax.jit(lambda x: finite_width(net, x).V)(x3)  # N = 3: sources chosen on the host
    with pytest.raises(ValueError, match="jax.vmap"):
        jax.vmap(lambda x: finite_width(MLP(3, 8, "relu"), x).V)(np.stack([X, X]))  # N = 2, kinked
    with pytest.raises(ValueError, match="store"):
        jax.jit(lambda x: finite_width(net, x, store="/tmp/nowhere").V)(X[:1])
    with pytest.raises(ValueError, match="rank 2"):
        jax.jit(lambda x: infinite_width(net, x).K)(X[0])
    with pytest.raises(ValueError, match="C_W"):
        jax.jit(lambda c: infinite_width(MLP(3, 8, "tanh", C_W=c), X).K)(jnp.ones(2))
    with pytest.raises(ValueError, match="C_W"):  # concrete values are still checked
        MLP(3, 8, "tanh", C_W=jnp.asarray(-1.0))


def _run(code: str, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_ENABLE_X64", "EFFTHEORY_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


IMPORT_CHILD = r"""
import json, jax, jax.numpy as jnp
before = (str(jnp.ones(3).dtype), jax.config.jax_enable_x64, jax.config.jax_compilation_cache_dir,
          jax.config.jax_persistent_cache_min_compile_time_secs)
import efftheory, efftheory.empirical
after = (str(jnp.ones(3).dtype), jax.config.jax_enable_x64, jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
print(json.dumps({"before": before, "after": after}))
"""


def test_import_changes_no_jax_setting():
    got = _run(IMPORT_CHILD)
    assert got["before"] == got["after"]
    assert got["after"][0] == "float32" and got["after"][2] is None


X64_CHILD = r"""
import json, numpy as np, jax, jax.numpy as jnp
import efftheory
from efftheory import MLP
x = np.random.default_rng(0).normal(size=(3, 4))
net = MLP(3, 16, "tanh", C_W=1.5, C_b=0.1)
r = efftheory.infinite_width(net, x)
f = efftheory.finite_width(net, x[:2])
c = efftheory.chi_perp("gelu", 0.7, 1.9)
out = {"dtypes": [str(r.K.dtype), str(f.V.dtype), str(f.at_width(32).metric.dtype), str(np.asarray(c).dtype)],
       "K": np.asarray(r.K).tolist(), "V": np.asarray(f.V).ravel().tolist(), "c": float(c),
       "user": str(jnp.ones(2).dtype)}
try:
    jax.jit(lambda cw: efftheory.infinite_width(MLP(3, 16, "tanh", C_W=cw), x).K)(1.5)
    out["error"] = None
except efftheory._precision.X64Error as e:
    out["error"] = str(e)
import efftheory.empirical as E
p64 = E.init_params(net, jax.random.PRNGKey(0), 4, dtype=jnp.float64)
p32 = E.init_params(net, jax.random.PRNGKey(0), 4, dtype=jnp.float32)
out["empirical"] = [str(p64[0]["W"].dtype), str(E.apply(net, p64, x).dtype), str(p32[0]["W"].dtype),
                    str(E.apply(net, p32, x.astype(np.float32)).dtype)]
with jax.enable_x64(True):
    jitted = jax.jit(lambda cw: efftheory.infinite_width(MLP(3, 16, "tanh", C_W=cw, C_b=0.1), x).K)
    out["jit"] = np.asarray(jitted(1.5)).tolist()
print(json.dumps(out))
"""


def test_theory_without_x64_is_float64_and_matches():
    got = _run(X64_CHILD)
    assert got["dtypes"] == ["float64"] * 4 and got["user"] == "float32"
    x = np.random.default_rng(0).normal(size=(3, 4))
    net = MLP(3, 16, "tanh", C_W=1.5, C_b=0.1)
    ref_K = np.asarray(infinite_width(net, x).K)
    assert np.allclose(got["K"], ref_K, rtol=1e-12, atol=0)
    assert np.allclose(got["V"], np.asarray(finite_width(net, x[:2]).V).ravel(), rtol=1e-12, atol=1e-15)
    assert abs(got["c"] - float(chi_perp("gelu", 0.7, 1.9))) <= 1e-12 * abs(got["c"])
    assert got["error"] is not None and "jax_enable_x64" in got["error"] and "enable_x64(True)" in got["error"]
    assert np.allclose(got["jit"], ref_K, rtol=1e-12, atol=0)
    assert got["empirical"] == ["float64", "float64", "float32", "float32"]


def test_result_dtype_is_float64_under_this_suite():
    assert efftheory.infinite_width(MLP(2, 4, "erf"), X).K.dtype == jnp.float64
