"""Ensembles sharded over several devices (efftheory.empirical.ensemble): four CPU devices in a subprocess.

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
