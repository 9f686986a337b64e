"""efftheory.empirical.ensemble: reproducible, chunk-independent, resumable sampling of networks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory
from efftheory import empirical as E

NET = efftheory.MLP(3, 6, "tanh", C_W=1.2, C_b=0.1, output_width=2)
X = np.array([[1.0, 0.3, -0.5, 0.2], [0.1, -1.0, 0.4, 0.6], [0.7, 0.7, 0.0, -0.3]])
ALL = ("metric", "four_point", "ntk", "ntk_variance", "ntk_preactivation")


@pytest.fixture(scope="module")
def reference():
    return E.sample_ensemble(NET, X, 37, seed=11, statistics=ALL, chunk=16, progress=False)


def _assert_same(a, b):
    assert a.stats.keys() == b.stats.keys()
    for k in a.stats:
        np.testing.assert_array_equal(a.stats[k], b.stats[k], err_msg=k)


def test_network_m_is_init_params_at_fold_in_seed_m(reference):
    m = 29
    key = jax.random.fold_in(jax.random.PRNGKey(11), m)
    p = E.init_params(NET, key, X.shape[1])
    zs = E.apply_all(NET, p, X)
    for l, z in enumerate(zs):
        np.testing.assert_allclose(reference.stats["zz"][m, l], z @ z.T / z.shape[1], rtol=1e-12, atol=1e-15)
    H = E.ntk_full(NET, p, X)
    np.testing.assert_allclose(reference.stats["H"][m], (H[0, 0] + H[1, 1]) / 2, rtol=1e-12)
    z = np.asarray(zs[-1])
    np.testing.assert_allclose(reference.stats["Hoff_zz"][m],
                               (np.einsum("ab,c,d->abcd", H[0, 1], z[:, 0], z[:, 1])
                                + np.einsum("ab,c,d->abcd", H[1, 0], z[:, 1], z[:, 0])) / 2, rtol=1e-12, atol=1e-14)
    zh = np.asarray(zs[1])
    same = np.einsum("ai,bi,ci,di->abcd", zh, zh, zh, zh) / 6
    cross = (np.einsum("ai,bi,cj,dj->abcd", zh, zh, zh, zh) / 36 * 36 - 6 * same) / 30
    np.testing.assert_allclose(reference.stats["zzzz"][m, 1], same, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(reference.stats["zz_zz"][m, 1], cross, rtol=1e-12, atol=1e-15)


def test_same_seed_same_results_for_any_chunk_size(reference):
    # chunks of 16 (reference) and 5: both pad their last chunk; network m's numbers never move
    _assert_same(reference, E.sample_ensemble(NET, X, 37, seed=11, statistics=ALL, chunk=5, progress=False))
    other = E.sample_ensemble(NET, X, 37, seed=12, statistics=ALL, chunk=16, progress=False)
    assert not np.allclose(other.stats["zz"], reference.stats["zz"])
    # a longer run extends a shorter one network by network
    longer = E.sample_ensemble(NET, X, 45, seed=11, statistics=ALL, chunk=16, progress=True)
    for k in reference.stats:
        np.testing.assert_array_equal(longer.stats[k][:37], reference.stats[k])


def test_cache_resume_gives_identical_results(tmp_path, monkeypatch, reference):
    from efftheory.empirical import cache as cache_mod

    real_save = cache_mod.save_chunk
    saves = []

    def crash_on_second(*args, **kwargs):
        saves.append(args[0])
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated crash before the second chunk is written")
        return real_save(*args, **kwargs)

    kw = dict(statistics=ALL, chunk=16, progress=False, cache_dir=tmp_path)
    monkeypatch.setattr(cache_mod, "save_chunk", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        E.sample_ensemble(NET, X, 37, seed=11, **kw)
    files = sorted(os.listdir(tmp_path))
    assert files == ["w6x6x2_seed11_0000000000-0000000016.npz"]  # the finished chunk only, no temporary file
    monkeypatch.setattr(cache_mod, "save_chunk", real_save)
    resumed = E.sample_ensemble(NET, X, 37, seed=11, **kw)
    _assert_same(reference, resumed)
    assert len(os.listdir(tmp_path)) == 3

    # a second run is served from the cache alone: nothing is computed, so nothing is written
    monkeypatch.setattr(cache_mod, "save_chunk", lambda *a, **k: pytest.fail("recomputed a cached chunk"))
    _assert_same(reference, E.sample_ensemble(NET, X, 37, seed=11, **kw))


def test_cache_refuses_mismatched_or_corrupted_chunks(tmp_path):
    E.sample_ensemble(NET, X, 8, seed=1, statistics=("metric",), chunk=8, progress=False, cache_dir=tmp_path)
    # same file names, another configuration (other inputs): never mixed in
    with pytest.raises(E.CacheMismatchError, match="different configuration"):
        E.sample_ensemble(NET, X * 2, 8, seed=1, statistics=("metric",), chunk=8, progress=False,
                          cache_dir=tmp_path)
    with pytest.raises(E.CacheMismatchError, match="different configuration"):
        E.sample_ensemble(NET.replace(activation="relu"), X, 8, seed=1, statistics=("metric",), chunk=8,
                          progress=False, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(E.CacheMismatchError, match="corrupted"):
        E.sample_ensemble(NET, X, 8, seed=1, statistics=("metric",), chunk=8, progress=False, cache_dir=tmp_path)
    assert issubclass(E.CacheMismatchError, ValueError)


def test_sweep_uses_independent_per_width_keys():
    sweep = E.sample(NET, X, [4, 6], 5, seed=3, statistics=("metric",), progress=False)
    assert sweep.widths == (4, 6) and sweep[6].net.hidden_widths == (6, 6)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 6), 2)
    zs = E.apply_all(NET, E.init_params(NET, key, 4), X)
    np.testing.assert_allclose(sweep[6].stats["zz"][2, 1], zs[1] @ zs[1].T / 6, rtol=1e-12)
    stacked = sweep.estimate(E.metric)
    assert stacked.value.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(stacked.value[1], E.metric(sweep[6]).value)


def test_conditional_method_matches_weights_in_law():
    net = efftheory.MLP(3, 16, "relu", C_W=2.0, C_b=0.05)
    kw = dict(statistics=("four_point",), progress=False)
    a = E.sample_ensemble(net, X, 2000, 0, method="weights", **kw)
    b = E.sample_ensemble(net, X, 2000, 1, method="conditional", **kw)
    for est in (E.metric, E.four_point_same_neuron):
        ea, eb = est(a), est(b)
        pull = (ea.value - eb.value) / np.hypot(ea.stderr, eb.stderr)
        assert np.nanmax(np.abs(pull)) < 4.5, est.__name__


def test_float32_and_float64_metrics_agree():
    net = efftheory.MLP(3, 32, "tanh", C_W=1.0)
    f64 = E.metric(E.sample_ensemble(net, X, 2000, 0, statistics=("metric",), method="conditional",
                                     progress=False))
    e32 = E.sample_ensemble(net, X, 2000, 1, statistics=("metric",), method="conditional", dtype=jnp.float32,
                            progress=False)
    assert e32.stats["zz"].dtype == np.float32 and e32.dtype == "float32"
    f32 = E.metric(e32)
    # independent draws: agreement within 4 combined standard errors (the float32 arithmetic error,
    # ~1e-6 relative per network, is far below the statistical error)
    assert np.max(np.abs(f32.value - f64.value) / np.hypot(f32.stderr, f64.stderr)) < 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_networks=0), "^n_networks: "),
    (dict(n_networks=2.5), "^n_networks: "),
    (dict(chunk=0), "^chunk: "),
    (dict(chunk=1.5), "^chunk: "),
    (dict(seed=-1), "^seed: "),
    (dict(x=X[0]), "^x: "),
    (dict(x=np.full((2, 3), np.nan)), "^x: "),
    (dict(widths=[4, 0]), r"^widths\[1\]: "),
    (dict(widths=[]), "^widths: "),
    (dict(widths=[4, 4]), "^widths: "),
    (dict(statistics=("metric", "kurtosis")), "^statistics: "),
    (dict(statistics=("ntk",), method="conditional"), "^method: "),
    (dict(method="exact"), "^method: "),
    (dict(dtype=jnp.float16), "^dtype: "),
    (dict(cache_dir=3), "^cache_dir: "),
    (dict(net="mlp"), "^net: "),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    args = dict(net=NET, x=X, widths=[4, 8], n_networks=4, seed=0, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        E.sample(**args)
