"""Residual MLPs (issue #25): the spec (validation, identity, dict and pickle) and the infinite-width
recursion (docs/theory.md, "Residual MLPs"), checked against exact deep-linear closed forms and across the
closed-form, generic and traced paths."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory.activations import Activation
from efftheory.network import Layer


# ------------------------------------------------------------------------------------------ the spec
def test_scalar_skip_and_branch_apply_to_hidden_layers():
    net = et.MLP(5, 8, "tanh", skip=0.6, branch=0.8)
    assert net.skips == (0.0, 0.6, 0.6, 0.6, 0.0)
    assert net.branches == (1.0, 0.8, 0.8, 0.8, 1.0)
    assert net.residual and not et.MLP(5, 8, "tanh").residual
    layers = net.layers(3)
    assert [la.index for la in layers] == [1, 2, 3, 4, 5]
    assert [(la.n_in, la.n_out) for la in layers] == [(3, 8), (8, 8), (8, 8), (8, 8), (8, 1)]
    assert [la.residual for la in layers] == [False, True, True, True, False]
    assert layers[2] == Layer(3, 8, 8, 1.0, 0.0, 1.0, 0.0, 0.6, 0.8)


def test_per_layer_skip_with_width_changes():
    net = et.MLP(5, [8, 16, 16, 8], "relu", skip=[0, 0, 0.5, 0, 0], branch=[1, 1, 2.0, 1, 1])
    assert net.skips == (0.0, 0.0, 0.5, 0.0, 0.0) and net.branches == (1.0, 1.0, 2.0, 1.0, 1.0)
    assert [la.residual for la in net.layers(2)] == [False, False, True, False, False]


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=8, skip=[0.5, 0, 0, 0, 0]), r"skip\[0\]: layer 1 is plain \(the first layer"),
    (dict(width=8, skip=[0, 0, 0, 0, 0.5]), r"skip\[4\]: layer 5 is plain \(the output layer"),
    (dict(width=8, branch=[1, 1, 1, 1, 2.0]), r"branch\[4\]: layer 5 is plain"),
    (dict(width=[8, 16, 16, 8], skip=[0, 0.5, 0, 0, 0]), r"skip\[1\]: layer 2 is plain \(its widths differ"),
    (dict(width=[8, 16, 16, 8], skip=0.5), r"skip: a scalar skip applies to every hidden layer 2\.\.4, but layer 2"),
    (dict(width=[8, 16, 16, 8], branch=0.5), r"branch: a scalar branch"),
    (dict(width=8, branch=0.0), r"branch: expected a positive number \(> 0\)"),
    (dict(width=8, branch=-1.0), r"branch: expected a positive number"),
    (dict(width=8, skip=float("nan")), r"skip: expected a finite real number"),
    (dict(width=8, skip=float("inf")), r"skip: expected a finite real number"),
    (dict(width=8, skip="0.5"), r"skip: expected"),
    (dict(width=8, skip=[0.1, 0.2]), r"skip: expected a scalar or a sequence of 5 per-layer values, got 2"),
    (dict(width=8, branch=[1, 1, np.nan, 1, 1]), r"branch\[2\]: expected a finite real number"),
])
def test_bad_residual_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        et.MLP(5, activation="tanh", **kwargs)


def test_shallow_nets_have_no_residual_layer():
    with pytest.raises(ValueError, match=r"skip: a depth-2 MLP has no hidden-to-hidden layer"):
        et.MLP(2, 8, skip=0.5)
    assert et.MLP(2, 8, skip=0.0, branch=1.0) == et.MLP(2, 8)
    assert not et.MLP(1, skip=0.0).residual


def test_negative_skip_is_allowed():
    assert et.MLP(4, 8, skip=-0.7).skips == (0.0, -0.7, -0.7, 0.0)


def test_identity_dict_pickle_repr():
    net = et.MLP(5, 8, "tanh", C_W=1.2, skip=0.6, branch=0.8)
    plain = et.MLP(5, 8, "tanh", C_W=1.2)
    assert net != plain and hash(net) != hash(plain)
    assert net == et.MLP(5, 8, "tanh", C_W=1.2, skip=[0, 0.6, 0.6, 0.6, 0], branch=[1, 0.8, 0.8, 0.8, 1])
    assert hash(net) == hash(et.MLP(5, 8, "tanh", C_W=1.2, skip=[0, 0.6, 0.6, 0.6, 0], branch=[1, .8, .8, .8, 1]))
    d = net.to_dict()
    assert d["skip"] == 0.6 and d["branch"] == 0.8
    assert et.MLP.from_dict(d) == net
    assert pickle.loads(pickle.dumps(net)) == net
    assert "skip=0.6, branch=0.8" in repr(net)
    # a plain MLP's dict and repr are the ones it had before skip and branch existed
    assert set(plain.to_dict()) == {"depth", "width", "activation", "C_W", "C_b", "lambda_W", "lambda_b",
                                    "output_width"}
    assert "skip" not in repr(plain)
    assert et.MLP(5, 8, "tanh", C_W=1.2, skip=0.0, branch=1.0) == plain
    # per-layer values that are not uniform survive as lists
    mixed = et.MLP(5, 8, "tanh", skip=[0, 0.1, 0.2, 0.3, 0])
    assert mixed.to_dict()["skip"] == [0.0, 0.1, 0.2, 0.3, 0.0] and "branch" in mixed.to_dict()
    assert et.MLP.from_dict(mixed.to_dict()) == mixed


def test_replace_and_with_width_carry_residual():
    net = et.MLP(5, 8, "tanh", skip=0.6, branch=0.8)
    deeper = net.replace(depth=7)
    assert deeper.skips == (0.0,) + (0.6,) * 5 + (0.0,) and deeper.branches == (1.0,) + (0.8,) * 5 + (1.0,)
    assert net.with_width(32).skips == net.skips and net.with_width(32).hidden_widths == (32,) * 4
    assert net.replace(skip=0.0, branch=1.0) == et.MLP(5, 8, "tanh")
    with pytest.raises(ValueError, match=r"skip\[1\]: layer 2 is plain"):
        net.with_width([8, 16, 16, 8])


# ------------------------------------------------------------------------------------------ infinite width
def deep_linear(C_W, C_b, lam_W, lam_b, xi, gamma, G, L):
    """Closed forms of the deep linear residual MLP (docs/theory.md, "Residual MLPs"): layers 2..L-1 residual,
    a = xi^2 + gamma^2 C_W, c = gamma^2 C_b,
        K^(l)     = a^(l-1) K1 + c S_l,                              S_l = (a^(l-1) - 1)/(a - 1)
        Theta^(l) = a^(l-1) Theta1 + gamma^2 [ (l-1) a^(l-2) lam_W K1 + lam_b S_l + lam_W c ((l-1) a^(l-2) - S_l)/(a - 1) ]
    (a = 1: S_l = l - 1 and the last term is lam_W c (l-1)(l-2)/2), and the plain output layer
        K^(L) = C_b + C_W K^(L-1),  Theta^(L) = lam_b + lam_W K^(L-1) + C_W Theta^(L-1)."""
    K1, T1 = C_b + C_W * G, lam_b + lam_W * G
    a, c, g2 = xi ** 2 + gamma ** 2 * C_W, gamma ** 2 * C_b, gamma ** 2
    Ks, Ts = [], []
    for l in range(1, L):
        if a == 1.0:
            S, last = l - 1.0, lam_W * c * (l - 1) * (l - 2) / 2
        else:
            S = (a ** (l - 1) - 1) / (a - 1)
            last = lam_W * c * ((l - 1) * a ** (l - 2) - S) / (a - 1)
        Ks.append(a ** (l - 1) * K1 + c * S)
        Ts.append(a ** (l - 1) * T1 + g2 * ((l - 1) * a ** (l - 2) * lam_W * K1 + lam_b * S + last))
    Ks.append(C_b + C_W * Ks[-1])
    Ts.append(lam_b + lam_W * Ks[-2] + C_W * Ts[-1])
    return np.stack(Ks), np.stack(Ts)


DEEP_LINEAR = [  # (C_W, C_b, lambda_W, lambda_b, xi, gamma)
    (1.3, 0.2, 0.7, 0.4, 0.6, 0.9),     # a = 1.4130
    (1.0, 0.3, 1.0, 0.3, 0.8, 0.6),     # xi^2 + gamma^2 = 1, C_W = 1: a = 1 (linear growth)
    (0.8, 0.0, 2.0, 0.5, -1.1, 0.35),   # negative skip, a = 1.308
]


@pytest.mark.parametrize("hp", DEEP_LINEAR)
@pytest.mark.parametrize("path", ["closed", "generic", "traced", "last"])
def test_deep_linear_residual_is_exact(hp, path, rng):
    C_W, C_b, lW, lb, xi, gamma = hp
    L, x = 7, rng.normal(size=(5, 4)) * 1.5
    G = x @ x.T / 4
    K, T = deep_linear(C_W, C_b, lW, lb, xi, gamma, G, L)
    act = "linear" if path != "generic" else Activation("identity-callable", lambda z: z)
    kw = dict(C_W=C_W, C_b=C_b, lambda_W=lW, lambda_b=lb, skip=xi, branch=gamma)
    if path == "traced":
        def f(xi_, gamma_):
            r = et.infinite_width(et.MLP(L, 8, act, **{**kw, "skip": xi_, "branch": gamma_}), x)
            return r.K, r.Theta

        got_K, got_T = jax.jit(f)(jnp.float64(xi), jnp.float64(gamma))
    else:
        r = et.infinite_width(et.MLP(L, 8, act, **kw), x, layers="last" if path == "last" else None)
        got_K, got_T = r.K, r.Theta
    if path == "last":
        K, T = K[-1:], T[-1:]
    np.testing.assert_allclose(got_K, K, rtol=1e-12, atol=1e-12 * np.max(np.abs(K)))
    np.testing.assert_allclose(got_T, T, rtol=1e-12, atol=1e-12 * np.max(np.abs(T)))




@pytest.mark.parametrize("name", ["relu", "erf", "tanh", "gelu"])
def test_residual_step_by_quadrature(name, rng):
    """Layer 2 of a residual MLP against an independent 2-d Gauss-Hermite rule for <s s> and <s' s'>."""
    fn = et.get_activation(name).fn
    x = rng.normal(size=(2, 3))
    C_W, C_b, lW, lb, xi, gamma = 1.4, 0.1, 0.9, 0.3, 0.7, 0.5
    r = et.infinite_width(et.MLP(3, 8, name, C_W=C_W, C_b=C_b, lambda_W=lW, lambda_b=lb, skip=xi, branch=gamma), x)
    K1, T1 = np.asarray(r.K[0]), np.asarray(r.Theta[0])
    u, w = np.polynomial.hermite_e.hermegauss(200)
    w = w / w.sum()
    U1, U2 = np.meshgrid(u, u, indexing="ij")
    W2 = np.outer(w, w)
    Lc = np.linalg.cholesky(K1)
    z1 = Lc[0, 0] * U1
    z2 = Lc[1, 0] * U1 + Lc[1, 1] * U2
    s1, s2 = np.asarray(fn(jnp.asarray(z1))), np.asarray(fn(jnp.asarray(z2)))
    d = jax.vmap(jax.grad(fn))
    d1 = np.asarray(d(jnp.asarray(z1.reshape(-1)))).reshape(z1.shape)
    d2 = np.asarray(d(jnp.asarray(z2.reshape(-1)))).reshape(z2.shape)
    S = np.array([[np.sum(W2 * s1 * s1), np.sum(W2 * s1 * s2)], [0, np.sum(W2 * s2 * s2)]])
    dS = np.array([[np.sum(W2 * d1 * d1), np.sum(W2 * d1 * d2)], [0, np.sum(W2 * d2 * d2)]])
    S[1, 0], dS[1, 0] = S[0, 1], dS[0, 1]
    K2 = xi ** 2 * K1 + gamma ** 2 * (C_b + C_W * S)
    T2 = xi ** 2 * T1 + gamma ** 2 * (lb + lW * S + C_W * dS * T1)
    tol = 1e-10 if name in ("erf", "tanh", "gelu") else 2e-3  # Gauss-Hermite converges slowly on relu's kink
    np.testing.assert_allclose(r.K[1], K2, rtol=tol)
    np.testing.assert_allclose(r.Theta[1], T2, rtol=tol)


@pytest.mark.parametrize("name", ["relu", "erf", "abs", "tanh"])
def test_residual_paths_agree(name, rng):
    """Closed form, generic (Mehler) and traced (jit) recursions, all layers and the folded last layer."""
    act = et.get_activation(name)
    x = rng.normal(size=(5, 3))
    kw = dict(C_W=1.3, C_b=0.2, lambda_W=0.8, lambda_b=0.1, skip=[0, 0.7, -0.5, 0.9, 0], branch=[1, 0.6, 1.2, 0.5, 1])
    ref = et.infinite_width(et.MLP(5, 8, act, **kw), x)
    generic = et.infinite_width(et.MLP(5, 8, Activation("g", act.fn, smooth=act.smooth), **kw), x)
    last = et.infinite_width(et.MLP(5, 8, act, **kw), x, layers="last")
    traced = jax.jit(lambda s: et.infinite_width(et.MLP(5, 8, act, **{**kw, "skip": s}), x).K)(
        jnp.asarray(kw["skip"], jnp.float64))
    tol = 1e-9 if act.smooth else 3e-3  # the generic path integrates kinks slowly (tests/test_infinite.py)
    np.testing.assert_allclose(generic.K, ref.K, rtol=tol, atol=tol)
    np.testing.assert_allclose(generic.Theta, ref.Theta, rtol=tol, atol=tol)
    np.testing.assert_allclose(last.K[0], ref.K[-1], rtol=1e-13)
    np.testing.assert_allclose(last.Theta[0], ref.Theta[-1], rtol=1e-13)
    np.testing.assert_allclose(traced, ref.K, rtol=1e-9, atol=1e-12)


def test_grad_through_skip():
    """d K^(L) / d xi by jax.grad against a central finite difference of the concrete recursion."""
    x = np.array([[0.3, -1.0], [1.2, 0.4]])

    def last(xi):
        return et.infinite_width(et.MLP(4, 8, "tanh", C_W=1.1, skip=xi, branch=0.7), x).K[-1, 0, 1]

    g = float(jax.grad(last)(jnp.float64(0.5)))
    h = 1e-5
    fd = (float(last(0.5 + h)) - float(last(0.5 - h))) / (2 * h)
    assert g == pytest.approx(fd, rel=1e-7)


# ------------------------------------------------------------------------------------------ finite networks
def _numpy_forward(net, params, x):
    """The residual forward pass written out with numpy from the layer equation."""
    z, zs = None, []
    a = np.asarray(x)
    for l, p in enumerate(params):
        W, b = np.asarray(p["W"]), np.asarray(p["b"])
        branch = a @ W.T + b
        z = branch if l in (0, net.depth - 1) else net.skips[l] * z + net.branches[l] * branch
        zs.append(z)
        a = np.asarray(net.sigma.fn(jnp.asarray(z)))
    return zs


@pytest.mark.parametrize("name", ["tanh", "relu"])
def test_forward_and_exact_ntk_against_autodiff(name, rng):
    from efftheory import empirical

    net = et.MLP(5, [6, 6, 6, 6], name, C_W=1.5, C_b=0.2, lambda_W=0.7, lambda_b=0.3,
                 skip=[0, 0.8, -0.4, 0.6, 0], branch=[1, 0.6, 1.3, 0.9, 1], output_width=2)
    x = rng.normal(size=(4, 3))
    params = empirical.init_params(net, jax.random.PRNGKey(7), 3, jnp.float64)
    zs = empirical.apply_all(net, params, x)
    for got, want in zip(zs, _numpy_forward(net, params, x)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)

    def apply_fn(p, xx):
        return empirical.apply(net, p, xx)

    lrs = empirical.learning_rates(net, 3)
    want = np.asarray(empirical.ntk_autodiff(apply_fn, params, x, learning_rates=lrs, output=None))
    got = np.asarray(empirical.ntk_full(net, params, x))
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 1e-10, err
    np.testing.assert_allclose(empirical.ntk(net, params, x, output=1), want[1, 1], rtol=1e-10, atol=1e-12)


def test_train_residual_networks():
    """empirical.train on residual MLPs: the start is init_params' network and its exact NTK, the run is
    gradient descent written out by hand, and a small step moves the outputs by -eta H (z - y)."""
    from efftheory import datasets
    from efftheory import empirical as E

    ds = datasets.circle_regression(5, 3, outputs=2, seed=1)
    net = et.MLP(4, 16, "erf", C_W=1.6, C_b=0.2, skip=0.8, branch=0.6, output_width=2)
    key = jax.random.PRNGKey(5)
    x_all = np.concatenate([ds.x_train, ds.x_test])
    run = E.train(net, ds.x_train, ds.y_train, ds.x_test, steps=4, learning_rate=0.05, n_networks=2, key=key,
                  record_every=4, progress=False)
    params = E.init_params(net, jax.random.fold_in(key, 1), 2)
    np.testing.assert_allclose(run.f_train[1, 0], np.asarray(E.apply(net, params, ds.x_train)), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(run.ntk_start[1], np.asarray(E.ntk_full(net, params, x_all)), rtol=1e-11, atol=1e-13)
    lrs = E.learning_rates(net, 2)
    grad = jax.jit(jax.grad(lambda p: 0.5 * jnp.sum((E.apply(net, p, ds.x_train) - ds.y_train) ** 2)))
    for _ in range(4):
        g = grad(params)
        params = tuple({n: la[n] - 0.05 * lr[n] * gl[n] for n in ("W", "b")} for la, gl, lr in zip(params, g, lrs))
    np.testing.assert_allclose(run.f_test[1, -1], np.asarray(E.apply(net, params, ds.x_test)), rtol=1e-10, atol=1e-12)
    # one small step: z_1 - z_0 = -eta sum H (z_0 - y) + O(eta^2)
    eta = 1e-4
    r = E.train(net, ds.x_train, ds.y_train, ds.x_test, steps=1, learning_rate=eta, n_networks=2, key=key,
                progress=False)
    f0 = np.concatenate([r.f_train[:, 0], r.f_test[:, 0]], axis=1)
    f1 = np.concatenate([r.f_train[:, -1], r.f_test[:, -1]], axis=1)
    pred = -eta * np.einsum("mijab,mbj->mai", r.ntk_start[..., :5], r.f_train[:, 0] - ds.y_train)
    assert np.abs(f1 - f0 - pred).max() / np.abs(pred).max() < 1e-3


def test_conditional_and_weight_sampling_agree_for_residual_nets():
    """The two ways to draw a residual network (weights, or the exact layer-by-layer conditional law with the
    skip path added) sample the same law: their mean metrics agree within 4 standard errors."""
    from efftheory import empirical as E

    net = et.MLP(4, 24, "tanh", C_W=1.2, C_b=0.1, skip=-0.7, branch=0.9)
    x = np.array([[1.0, 0.3, -0.5], [0.2, -1.0, 0.6]])
    a = E.metric(E.sample_ensemble(net, x, 600, 1, method="weights", dtype="float64", progress=False))
    b = E.metric(E.sample_ensemble(net, x, 600, 2, method="conditional", dtype="float64", progress=False))
    pull = (a.value - b.value) / np.hypot(a.stderr, b.stderr)
    assert np.max(np.abs(pull)) < 4, pull
    # and both sit near the infinite-width kernel (width 24: a few percent of 1/n bias at most)
    K = np.asarray(et.infinite_width(net, x).K)
    assert np.max(np.abs(a.value - K) / K.max(axis=(1, 2), keepdims=True)) < 0.1
