"""efftheory.empirical.train: gradient descent on ensembles, the NTK that drives it, resumable runs."""

import os

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
import pytest

import efftheory as et
from efftheory import datasets, predict
from efftheory import empirical as E
from efftheory.empirical import training

DS = datasets.circle_regression(5, 3, outputs=2, seed=1)
NET = et.MLP(3, 16, "erf", C_W=2.0, C_b=0.3, output_width=2)
KEY = jax.random.PRNGKey(11)
X_ALL = np.concatenate([DS.x_train, DS.x_test])


def _train(**kw):
    args = dict(steps=6, learning_rate=0.05, n_networks=3, key=KEY, record_every=2, chunk=2, progress=False)
    args.update(kw)
    return E.train(kw.pop("net", NET), DS.x_train, DS.y_train, DS.x_test,
                   **{k: v for k, v in args.items() if k != "net"})


@pytest.fixture(scope="module")
def run():
    return _train()


def test_records_and_shapes(run):
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    assert run.f_train.shape == (3, 4, 5, 2) and run.f_test.shape == (3, 4, 3, 2)
    assert run.loss.shape == (3, 4) and run.ntk_start.shape == (3, 2, 2, 8, 8) == run.ntk_end.shape
    np.testing.assert_allclose(run.loss, 0.5 * ((run.f_train - DS.y_train) ** 2).sum(axis=(2, 3)), rtol=1e-12)
    np.testing.assert_array_equal(run.final_loss, run.loss[:, -1])
    assert np.all(run.loss[:, -1] < run.loss[:, 0])
    assert run.n_networks == 3 and run.dtype == "float64" and "Training(" in repr(run)
    change = run.ntk_relative_change()
    assert change.shape == (3,) and np.all((change > 0) & (change < 1))


def test_start_is_init_params_and_ntk_full(run):
    """Network m starts from init_params(net, fold_in(key, m)); the recorded NTK is tangent.ntk_full there."""
    for m in range(3):
        params = E.init_params(NET, jax.random.fold_in(KEY, m), 2)
        z = np.asarray(E.apply(NET, params, X_ALL))
        np.testing.assert_allclose(run.f_train[m, 0], z[:5], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(run.f_test[m, 0], z[5:], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(run.ntk_start[m], np.asarray(E.ntk_full(NET, params, X_ALL)), rtol=1e-11,
                                   atol=1e-13)
        a = np.asarray(jax.scipy.special.erf(E.apply_all(NET, params, X_ALL)[-2]))  # the last layer's input
        np.testing.assert_allclose(run.kernel_start[m], 0.3 + 2.0 / 16 * a @ a.T, rtol=1e-12)


def test_matches_gradient_descent_written_out_by_hand(run):
    """Network 2 (the padded last chunk) against a plain loop: jax.grad of the loss and the learning-rate tree."""
    params = E.init_params(NET, jax.random.fold_in(KEY, 2), 2)
    lrs = E.learning_rates(NET, 2)

    def loss(p):
        return 0.5 * jnp.sum((E.apply(NET, p, DS.x_train) - DS.y_train) ** 2)

    grad = jax.jit(jax.grad(loss))
    for t in range(1, 7):
        g = grad(params)
        params = tuple({n: layer[n] - 0.05 * lr[n] * gl[n] for n in ("W", "b")}
                       for layer, gl, lr in zip(params, g, lrs))
        if t % 2 == 0:
            np.testing.assert_allclose(run.f_test[2, t // 2], np.asarray(E.apply(NET, params, DS.x_test)),
                                       rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run.ntk_end[2], np.asarray(E.ntk_full(NET, params, X_ALL)), rtol=1e-10, atol=1e-12)


def test_small_steps_move_outputs_by_minus_eta_ntk_times_the_error():
    """z_t - z_0 = -eta t sum_{j, b in D} H_{ij;ab} (z_{j;b} - y_{j;b}) + O(eta^2), at training and test inputs,
    with two outputs (the off-diagonal NTK blocks H_{12} take part); two steps, recorded at the end."""
    errs = []
    for eta in (1e-3, 1e-4):
        r = _train(steps=2, learning_rate=eta)
        f0 = np.concatenate([r.f_train[:, 0], r.f_test[:, 0]], axis=1)    # (M, N, k)
        f1 = np.concatenate([r.f_train[:, 1], r.f_test[:, 1]], axis=1)
        e = r.f_train[:, 0] - DS.y_train                                   # (M, N_D, k)
        pred = -2 * eta * np.einsum("mijab,mbj->mai", r.ntk_start[..., :5], e)
        assert np.abs(pred).max() > 10 * eta  # the step is not trivially small compared with eta
        errs.append(np.abs(f1 - f0 - pred).max() / np.abs(pred).max())
    assert errs[1] < 2e-3
    assert 5 < errs[0] / errs[1] < 20  # the remainder is O(eta^2): the relative error falls like eta


def test_last_layer_training_keeps_the_ntk():
    """Only the last layer trains: its NTK lambda_b + (lambda_W/n) sigma . sigma depends on frozen layers only.
    (Also: one output with 1-D targets, float32, a typed key.)"""
    net = predict.last_layer_net(et.MLP(2, 16, "erf", C_W=2.0, C_b=0.3))
    r = E.train(net, DS.x_train, DS.y_train[:, 0], DS.x_test, steps=4, learning_rate=0.05, n_networks=2,
                key=jax.random.key(0), dtype=jnp.float32, progress=True)
    assert r.dtype == "float32" and r.f_test.dtype == np.float64 and r.y_train.shape == (5, 1)
    np.testing.assert_array_equal(r.steps, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(r.ntk_end, r.ntk_start, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.ntk_start[:, 0, 0], r.kernel_start, rtol=1e-6)  # lambda = C: the NTK is K^
    assert np.all(r.loss[:, -1] < r.loss[:, 0])


class _Interrupt(Exception):
    pass


def _with_segment_limit(monkeypatch, limit, calls):
    """Make training's compiled segment function raise after ``limit`` calls (None: never), counting calls."""
    original = training._fns

    def fns(*a):
        init, segment, record = original(*a)

        def counted(*args):
            calls.append(1)
            if limit is not None and len(calls) > limit:
                raise _Interrupt
            return segment(*args)

        return init, counted, record

    monkeypatch.setattr(training, "_fns", fns)


def test_interrupted_run_resumes_from_the_last_record_with_identical_results(run, tmp_path, monkeypatch):
    reference = _train(chunk=3)
    for name in ("f_train", "f_test", "loss", "ntk_start", "ntk_end", "kernel_start"):  # the chunk size does not matter
        np.testing.assert_allclose(getattr(reference, name), getattr(run, name), rtol=1e-12, atol=1e-13)
    cache = tmp_path / "cache"
    calls = []
    _with_segment_limit(monkeypatch, 2, calls)
    with pytest.raises(_Interrupt):
        _train(chunk=3, cache_dir=cache, checkpoint_every=0.0)
    files = os.listdir(cache)
    assert len(files) == 1 and "checkpoint" in files[0]          # records 1 and 2 of the chunk are checkpointed
    monkeypatch.undo()
    calls.clear()
    _with_segment_limit(monkeypatch, None, calls)
    resumed = _train(chunk=3, cache_dir=cache, checkpoint_every=0.0)
    assert len(calls) == 1                                      # only the last segment (steps 4..6) was run
    for name in ("f_train", "f_test", "loss", "ntk_start", "ntk_end", "kernel_start"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(reference, name))
    files = os.listdir(cache)
    assert len(files) == 1 and "checkpoint" not in files[0]      # a finished chunk replaces its checkpoint
    calls.clear()
    again = _train(chunk=3, cache_dir=cache)
    assert not calls
    np.testing.assert_array_equal(again.f_test, reference.f_test)
    # another configuration in the same folder starts afresh in its own files
    other = _train(chunk=3, cache_dir=cache, learning_rate=0.04)
    assert len(os.listdir(cache)) == 2 and not np.array_equal(other.f_test, reference.f_test)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps:"),
    (dict(learning_rate=-0.1), "learning_rate:"),
    (dict(learning_rate=float("inf")), "learning_rate:"),
    (dict(n_networks=0), "n_networks:"),
    (dict(key=5), "key:"),
    (dict(record_every=0), "record_every:"),
    (dict(chunk=0), "chunk:"),
    (dict(dtype=np.int32), "dtype:"),
    (dict(cache_dir=3), "cache_dir:"),
    (dict(checkpoint_every=-1.0), "checkpoint_every:"),
])
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _train(**kwargs)


def test_data_validation():
    kw = dict(steps=2, learning_rate=0.1, n_networks=2, key=KEY)
    with pytest.raises(ValueError, match=r"y_train: expected shape \(N_train, output_width\) = \(5, 2\)"):
        E.train(NET, DS.x_train, DS.y_train[:, 0], DS.x_test, **kw)
    with pytest.raises(ValueError, match="y_train: contains NaN"):
        E.train(NET, DS.x_train, np.full((5, 2), np.nan), DS.x_test, **kw)
    with pytest.raises(ValueError, match="x_test: expected inputs of dimension"):
        E.train(NET, DS.x_train, DS.y_train, np.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match="x_train"):
        E.train(NET, DS.x_train[0], DS.y_train, DS.x_test, **kw)
    with pytest.raises(ValueError, match="net:"):
        E.train("erf", DS.x_train, DS.y_train, DS.x_test, **kw)


def test_dataset_is_fixed_by_its_seed():
    a, b = datasets.circle_regression(7, 9, outputs=2, seed=4), datasets.circle_regression(7, 9, outputs=2, seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, datasets.circle_regression(7, 9, outputs=2, seed=5).x_train)
    np.testing.assert_allclose(np.sum(a.x_train**2, axis=1) / 2, 1.0)
    np.testing.assert_allclose(a.y_train[:, 0], np.sin(a.s_train) + 0.5 * np.cos(2 * a.s_train))
    gaps = np.diff(np.sort(np.r_[a.s_train, a.s_train[0] + 2 * np.pi]))
    assert gaps.min() > 0.2 * 2 * np.pi / 7 - 1e-12
    noisy = datasets.circle_regression(7, 9, noise=0.1, seed=4)
    assert 0 < np.abs(noisy.y_train - a.y_train[:, :1]).max() < 0.5
    assert a.y_test.shape == (9, 2) and a.n_train == 7 and a.outputs == 2
    with pytest.raises(ValueError, match="n_train"):
        datasets.circle_regression(0)
    with pytest.raises(ValueError, match="noise"):
        datasets.circle_regression(noise=-1)
