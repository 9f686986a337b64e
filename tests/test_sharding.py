"""Ensembles and training sharded over several devices (efftheory.empirical.ensemble, .training): four CPU
devices in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=4 gives a process four CPU devices.  There the sharded
run must equal the one-device run of the same process bit for bit (each device runs the one-device program
on its block of networks, with keys that depend only on the network index), its outputs must really be
split over the four devices, and its cache must be readable by a one-device process.  Across processes
with different device counts XLA's CPU thread partitioning of matrix products may move the last bit, so
the one-device parent compares to 1e-13.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import efftheory as et
from efftheory import empirical as E

ROOT = Path(__file__).resolve().parents[1]
NET = dict(depth=3, width=16, activation="tanh", C_W=1.2, C_b=0.1)
STATS = ("metric", "four_point", "ntk", "ntk_variance")

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    import efftheory as et
    from efftheory import empirical as E
    from efftheory.empirical import ensemble as ens

    out_dir, cache = sys.argv[1], sys.argv[2]
    net = et.MLP(**json.loads(sys.argv[3]))
    stats = tuple(json.loads(sys.argv[4]))
    x = np.random.default_rng(0).normal(size=(3, 4))
    devs = jax.devices()
    assert len(devs) == 4, devs
    report = {"devices": len(devs)}

    e4 = E.sample_ensemble(net, x, 10, 7, statistics=stats, chunk=3, progress=False, cache_dir=cache)
    e1 = E.sample_ensemble(net, x, 10, 7, statistics=stats, chunk=3, progress=False, devices=devs[:1])
    report["ensemble_equal"] = all(np.array_equal(e4.stats[k], e1.stats[k], equal_nan=True) for k in e4.stats)

    s4 = E.sample(net, x, [8, 16], 6, 3, method="conditional", chunk=2, progress=False)
    s1 = E.sample(net, x, [8, 16], 6, 3, method="conditional", chunk=2, progress=False, devices=devs[:1])
    report["sweep_equal"] = all(np.array_equal(a.stats[k], b.stats[k], equal_nan=True)
                                for a, b in zip(s4.ensembles, s1.ensembles) for k in a.stats)

    d4 = E.sample_ensemble(net, x, 10, 7, statistics=("metric",), progress=False)   # default chunk
    report["default_chunk_close"] = bool(np.allclose(d4.stats["zz"], e1.stats["zz"], rtol=1e-13, atol=1e-15))

    mesh = ens.network_mesh()
    fn = ens._chunk_fn(net, ens.moments.resolve(("metric",)), "weights", "float64", 2, mesh)
    out = fn(np.asarray(jax.random.PRNGKey(7)), np.uint32(0), x)
    report["output_devices"] = len(out["zz"].sharding.device_set)
    report["output_shape"] = list(out["zz"].shape)
    np.savez(out_dir + "/e4.npz", **e4.stats)
    print(json.dumps(report))
""")

TRAIN_CHILD = textwrap.dedent("""
    import json, os, shutil, sys
    import numpy as np
    import jax
    import efftheory as et
    from efftheory import empirical as E
    from efftheory.empirical import ensemble as ens
    from efftheory.empirical import training as tr

    out_dir = sys.argv[1]
    devs = jax.devices()
    assert len(devs) == 4, devs
    report = {"devices": len(devs)}

    # training: 10 networks in chunks of 2 on 4 devices (a full group of 4 blocks, then one block and 3
    # padding blocks) against one device of this process
    tx, ty, tt = TRAIN_DATA()
    tnet = et.MLP(**json.loads(sys.argv[2]))
    kw = json.loads(sys.argv[3])
    kw["key"] = jax.random.PRNGKey(kw.pop("seed"))
    t4 = E.train(tnet, tx, ty, tt, progress=False, cache_dir=out_dir + "/tcache", **kw)
    t1 = E.train(tnet, tx, ty, tt, progress=False, devices=devs[:1], **kw)
    fields = ("f_train", "f_test", "loss", "ntk_start", "ntk_end", "kernel_start")
    report["train_equal"] = all(np.array_equal(getattr(t4, f), getattr(t1, f)) for f in fields)
    init = tr._fns(tnet, tx.shape[1], "float64", kw["chunk"], ens.network_mesh())[0]
    p0 = init(np.asarray(kw["key"]), np.uint32(0))
    report["train_param_devices"] = len(p0[0]["W"].sharding.device_set)
    report["train_param_shape"] = list(p0[0]["W"].shape)
    # a crash when block 8's result is saved leaves its checkpoint (the second group, with 3 padding blocks)
    save = tr._cache.save_chunk

    def failing(path, *a, **k):
        if "-checkpoint" not in path and "_0000000008-" in path:
            raise RuntimeError("simulated crash")
        return save(path, *a, **k)

    tr._cache.save_chunk = failing
    try:
        E.train(tnet, tx, ty, tt, progress=False, cache_dir=out_dir + "/ckpt", checkpoint_every=0, **kw)
        report["crashed"] = False
    except RuntimeError:
        report["crashed"] = True
    tr._cache.save_chunk = save
    report["left"] = sorted(f for f in os.listdir(out_dir + "/ckpt") if "checkpoint" in f)
    shutil.copytree(out_dir + "/ckpt", out_dir + "/ckpt1")
    r4 = E.train(tnet, tx, ty, tt, progress=False, cache_dir=out_dir + "/ckpt", **kw)
    report["resumed_equal"] = all(np.array_equal(getattr(t4, f), getattr(r4, f)) for f in fields)
    np.savez(out_dir + "/t4.npz", **{f: getattr(t4, f) for f in fields})
    print(json.dumps(report))
""")

TRAIN_NET = dict(depth=3, width=16, activation="tanh", C_W=1.2, C_b=0.1)
TRAIN_KW = dict(steps=6, learning_rate=0.05, n_networks=10, seed=5, record_every=2, chunk=2)
TRAIN_FIELDS = ("f_train", "f_test", "loss", "ntk_start", "ntk_end", "kernel_start")


def _train_data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(4, 4)), rng.normal(size=(4, 1)), rng.normal(size=(2, 4))


TRAIN_CHILD = TRAIN_CHILD.replace("TRAIN_DATA()", "(lambda rng: (rng.normal(size=(4, 4)), rng.normal(size=(4, 1)), "
                      "rng.normal(size=(2, 4))))(np.random.default_rng(1))")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp), str(tmp / "cache"), json.dumps(NET),
                           json.dumps(STATS)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), tmp


def test_four_devices_equal_one_device_bit_for_bit(child):
    report, _ = child
    assert report["devices"] == 4
    assert report["ensemble_equal"]
    assert report["sweep_equal"]
    assert report["default_chunk_close"]


def test_outputs_are_split_over_the_devices(child):
    report, _ = child
    assert report["output_devices"] == 4
    assert report["output_shape"][0] == 4 * 2  # 4 devices x chunk 2 networks per step


def test_one_device_process_agrees_and_reads_the_sharded_cache(child):
    _, tmp = child
    e4 = np.load(tmp / "e4.npz")
    x = np.random.default_rng(0).normal(size=(3, 4))
    net = et.MLP(**NET)
    fresh = E.sample_ensemble(net, x, 10, 7, statistics=STATS, chunk=3, progress=False)
    for k in e4.files:
        np.testing.assert_allclose(fresh.stats[k], e4[k], rtol=1e-13, atol=1e-15, err_msg=k)
    # the 4-device run wrote one file per device block of 3 networks: this process resumes from them
    cached = E.sample_ensemble(net, x, 10, 7, statistics=STATS, chunk=3, progress=False, cache_dir=tmp / "cache")
    for k in e4.files:
        np.testing.assert_array_equal(cached.stats[k], e4[k], err_msg=k)


@pytest.mark.parametrize("devices", [[], "cpu", [0, 1], "dup"])
def test_bad_devices(devices):
    if devices == "dup":
        devices = [jax.devices()[0]] * 2
    with pytest.raises(ValueError, match="devices"):
        E.sample_ensemble(et.MLP(**NET), np.ones((2, 3)), 4, 0, progress=False, devices=devices)


@pytest.fixture(scope="module")
def train_child(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_training")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", TRAIN_CHILD, str(tmp), json.dumps(TRAIN_NET), json.dumps(TRAIN_KW)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), tmp


@pytest.mark.physics  # (slow, not physics: ~100 s of compiling in the child on a loaded 2-core machine)
def test_training_on_four_devices_equals_one_device_bit_for_bit(train_child):
    report, _ = train_child
    assert report["train_equal"]
    assert report["train_param_devices"] == 4
    assert report["train_param_shape"][0] == 4 * TRAIN_KW["chunk"]


@pytest.mark.physics
def test_training_resumes_from_checkpoints_across_device_counts(train_child):
    """The crash left block 8's checkpoint (its group also ran 3 padding blocks): the 4-device process
    resumed from it bit for bit, and so does this one-device process from a copy (to 1e-13, as above)."""
    report, tmp = train_child
    assert report["crashed"] and report["resumed_equal"]
    assert len(report["left"]) == 1 and "_0000000008-0000000010" in report["left"][0]
    t4 = np.load(tmp / "t4.npz")
    x, y, xt = _train_data()
    kw = dict(TRAIN_KW)
    kw["key"] = jax.random.PRNGKey(kw.pop("seed"))
    resumed = E.train(et.MLP(**TRAIN_NET), x, y, xt, progress=False, cache_dir=tmp / "ckpt1", **kw)
    cached = E.train(et.MLP(**TRAIN_NET), x, y, xt, progress=False, cache_dir=tmp / "tcache", **kw)
    for f in TRAIN_FIELDS:
        np.testing.assert_allclose(getattr(resumed, f), t4[f], rtol=1e-13, atol=1e-15, err_msg=f)
        np.testing.assert_array_equal(getattr(resumed, f)[:8], t4[f][:8], err_msg=f)  # from the 4-device cache
        np.testing.assert_array_equal(getattr(cached, f), t4[f], err_msg=f)


def test_train_bad_devices():
    x, y, xt = _train_data()
    with pytest.raises(ValueError, match="devices"):
        E.train(et.MLP(**TRAIN_NET), x, y, xt, steps=1, learning_rate=0.1, n_networks=2, key=jax.random.PRNGKey(0),
                progress=False, devices=[])
