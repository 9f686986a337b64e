"""Memory budget and on-disk results of finite_width: blocked quadrature, the sparse pair operators,
the layer store and resuming an interrupted run."""

import json
import os
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory.gaussian import _sources as sources
from efftheory.theory import _schedule, finite

NAMES = ("G1", "V", "H1", "A", "B", "D", "F")


def _kernel(N, act="tanh", seed=0):
    x = np.random.default_rng(seed).normal(size=(N, 3))
    return np.asarray(et.infinite_width(et.MLP(depth=2, width=8, activation=act), x).K)[0]


@pytest.mark.parametrize("act, N, block", [("tanh", 6, 4), ("gelu", 5, 2), ("relu", 5, 3)])
def test_source_blocks_bit_identical(act, N, block):
    """Integrating the sets in blocks changes no value beyond rounding: every rule is chosen per set,
    the shared trapezoid range and table spacing per kernel (only the compiled shapes of a call, and
    with them XLA's summation order, may differ: a few ulp)."""
    a = et.get_activation(act)
    K = _kernel(N, act)
    whole = sources.source_moments(a, K)
    blocked = sources.source_moments(a, K, block=block)
    for w, b in zip(whole, blocked):
        np.testing.assert_allclose(b, w, rtol=1e-14, atol=1e-17)


def test_apply_matches_dense_operator():
    """_apply(C2, X) equals the dense (N^2, N^2) operator built entry by entry (a repeated input,
    a1 == a2, adds its two coefficients on one column)."""
    rng = np.random.default_rng(3)
    N = 4
    C2 = rng.normal(size=(N, N, 2, 2))
    X = rng.normal(size=(N * N, 7))
    C = np.zeros((N * N, N * N))
    for a1 in range(N):
        for a2 in range(N):
            g = (a1, a2)
            for a in range(2):
                for b in range(2):
                    C[a1 * N + a2, g[a] * N + g[b]] += C2[a1, a2, a, b]
    np.testing.assert_allclose(finite._apply(C2, X), C @ X, rtol=1e-13, atol=1e-13)


def test_layer_step_memory_model():
    """layer_step allocates at most _STEP_TENSORS - 5 (N,)*4 float64 arrays beyond its five inputs
    (the Gaussian integrals replaced by constants: their blocks are budgeted separately)."""
    N = 24
    K = _kernel(N)
    Theta = K + 0.5
    act = et.get_activation("tanh")
    real = finite.source_moments
    finite.source_moments = lambda *a, **k: tuple(np.full((N,) * 4, 0.1) for _ in range(3))
    try:
        # G1, V, H1, A, B, D, F
        state = (np.full((N, N), 0.1), np.full((N,) * 4, 0.01), np.full((N, N), 0.2)) \
            + tuple(np.full((N,) * 4, 0.01 * i) for i in range(2, 6))
        finite.layer_step(act, 1.0, 1.0, 1.0, K, Theta, *state)  # compile the pair operators
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        finite.layer_step(act, 1.0, 1.0, 1.0, K, Theta, *state)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        finite.source_moments = real
    assert peak <= (_schedule.STEP_TENSORS - 5) * 8 * N**4, peak / (8 * N**4)


def _net():
    return et.MLP(depth=4, width=[12, 9, 15], activation="tanh", C_W=[1.3, 1.0, 1.1, 0.9])


def _x():
    return np.random.default_rng(5).normal(size=(5, 3))


def _interrupt(monkeypatch, net, x, store, after: int):
    """Run finite_width into ``store`` and interrupt it (KeyboardInterrupt) in the layer step after
    ``after`` finished ones; returns the real layer_step (layer_step stays patched)."""
    real = finite.layer_step
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(finite, "layer_step", dying)
    with pytest.raises(KeyboardInterrupt):
        et.finite_width(net, x, store=store)
    return real


def test_store_equals_memory_and_resumes(tmp_path, monkeypatch):
    """Results written to a store equal the in-memory ones bit for bit; a run killed after two layer
    steps resumes with the remaining ones only; a finished store is read back without any step."""
    net, x = _net(), _x()
    ref = et.finite_width(net, x)
    store = tmp_path / "fw"
    real = _interrupt(monkeypatch, net, x, store, after=2)
    calls = []
    assert json.loads((store / "manifest.json").read_text())["done"] == 3  # layer 0 and two steps
    calls.clear()
    monkeypatch.setattr(finite, "layer_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    got = et.finite_width(net, x, store=store)
    assert len(calls) == 1
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)))
    assert isinstance(got.V, np.memmap) and not got.V.flags.writeable
    calls.clear()
    again = et.finite_width(net, x, store=store)
    assert calls == []
    np.testing.assert_array_equal(np.asarray(again.F), np.asarray(ref.F))
    np.testing.assert_allclose(np.asarray(again.at_width(50).four_point), np.asarray(ref.at_width(50).four_point),
                               rtol=0, atol=0)


def test_store_refuses_other_runs_and_damage(tmp_path, monkeypatch):
    net, x = _net(), _x()
    store = tmp_path / "fw"
    real = _interrupt(monkeypatch, net, x, store, after=1)
    monkeypatch.setattr(finite, "layer_step", real)
    with pytest.raises(ValueError, match="store: .* another computation"):
        et.finite_width(net, x, store=store, tol=1e-8)
    with pytest.raises(ValueError, match="store: .* another computation"):
        et.finite_width(net, x + 1e-3, store=store)
    with pytest.raises(ValueError, match="store: .* another computation"):
        et.finite_width(et.MLP(depth=4, width=[12, 9, 15], activation="gelu", C_W=[1.3, 1.0, 1.1, 0.9]), x,
                        store=store)
    # sigma is told by its values: two lambdas have the same name
    nets = [et.MLP(depth=2, activation=f) for f in (lambda z: jnp.tanh(z), lambda z: jnp.tanh(1.01 * z))]
    assert repr(nets[0]) == repr(nets[1])
    assert _schedule.config(nets[0], x, 1e-9) != _schedule.config(nets[1], x, 1e-9)
    V = np.load(store / "V.npy", mmap_mode="r+")  # damage the layer the run would resume from
    V[1, 0, 0, 0, 0] += 1.0
    V.flush()
    del V
    with pytest.raises(ValueError, match="store: layer 1 .* checksum"):
        et.finite_width(net, x, store=store)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="store: .* not an efftheory store"):
        et.finite_width(net, x, store=junk)
    assert os.listdir(junk) == ["notes.txt"]
    early = tmp_path / "early"  # killed while creating its files, before the first manifest
    early.mkdir()
    (early / "V.npy").write_bytes(b"\x93NUMPY partial")
    (early / ".tmp-x.json").write_text("{")
    got = et.finite_width(net, x, store=early)
    np.testing.assert_array_equal(np.asarray(got.V), np.asarray(et.finite_width(net, x).V))


def test_memory_budget_errors():
    net, x = _net(), _x()
    with pytest.raises(ValueError, match="memory: .*store="):
        et.finite_width(net, np.random.default_rng(0).normal(size=(40, 3)), memory=1e8)
    with pytest.raises(ValueError, match="memory"):
        et.finite_width(net, x, memory=-1.0)
    with pytest.raises(ValueError, match="memory"):
        et.finite_width(net, x, memory=float("nan"))
    with pytest.raises(ValueError, match="store"):
        et.finite_width(net, x, store=12)


def test_memory_budget_is_kept(tmp_path):
    """Under a budget that forces small quadrature blocks, the arrays finite_width allocates
    (tracemalloc: numpy and Python; JAX's own buffers are not counted) stay within it, and the
    results are those of the unbounded call."""
    x = np.random.default_rng(2).normal(size=(9, 3))
    net = et.MLP(depth=2, width=16, activation="tanh")
    ref = et.finite_width(net, x)
    budget = (_schedule.FLOOR + (_schedule.STEP_TENSORS + 3 * _schedule.AHEAD) * 8 * 9**4
              + (1 + _schedule.AHEAD) * 100 * sources.SET_BYTES)  # the sources of 1 + _AHEAD layers at once
    assert _schedule.plan_memory(9, 2, budget, True) == 100  # 126 four-input sets: two blocks
    tracemalloc.start()
    try:
        got = et.finite_width(net, x, memory=budget, store=tmp_path / "fw")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= budget, (peak, budget)
    for name in NAMES:
        r = np.asarray(getattr(ref, name))
        np.testing.assert_allclose(np.asarray(getattr(got, name)), r, rtol=1e-13, atol=1e-15 * np.max(np.abs(r)))


def test_interrupt_stops_the_source_threads(tmp_path, monkeypatch):
    """finite_width computes later layers' sources in threads; an interrupted run stops and joins
    them before the exception leaves finite_width (a thread left inside XLA aborts the interpreter
    at exit)."""
    import threading

    net, x = _net(), _x()
    _interrupt(monkeypatch, net, x, tmp_path / "fw", after=1)
    assert [t for t in threading.enumerate() if t.name == "efftheory-sources"] == []
