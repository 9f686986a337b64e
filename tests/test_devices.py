"""The CPU devices efftheory asks JAX for at import (EFFTHEORY_CPU_DEVICES=n or all; by default JAX's
own one), and the finite-width sources spread over them: any device count gives the same bits.
Conditional sampling on two CPU devices at a size where a batched LAPACK QR deadlocked XLA:CPU
(jax 0.10.2) must finish.

Each configuration runs in a child process: JAX fixes its device count when it first computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import numpy as np
import jax
import efftheory as et
x = np.random.default_rng(3).normal(size=(4, 3))
x[3] = -0.5 * x[1]  # a collinear pair
fw = et.finite_width(et.MLP(2, 64, "tanh", C_W=1.0), x)
np.savez(sys.argv[1], V=np.asarray(fw.V), F=np.asarray(fw.F), A=np.asarray(fw.A))
print(json.dumps({"devices": len(jax.devices())}))
"""


def _env(**env_extra):
    """This process's environment without its device settings, CPU only, efftheory from this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("EFFTHEORY_CPU_DEVICES", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    return env


def _run(tmp, name, **env_extra):
    out = tmp / f"{name}.npz"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=_env(**env_extra), capture_output=True,
                          text=True, timeout=600)
    return proc, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devices")
    res = {}
    for name, env in (("one", {"EFFTHEORY_CPU_DEVICES": "1"}), ("three", {"EFFTHEORY_CPU_DEVICES": "3"}),
                      ("default", {}), ("all", {"EFFTHEORY_CPU_DEVICES": "all"}),
                      ("flag", {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                "EFFTHEORY_CPU_DEVICES": "3"})):
        proc, out = _run(tmp, name, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[name] = json.loads(proc.stdout.strip().splitlines()[-1])["devices"], np.load(out)
    return res


def test_device_counts(runs):
    assert runs["one"][0] == 1
    assert runs["three"][0] == 3
    assert runs["default"][0] == 1  # JAX's own default is left alone
    assert runs["all"][0] == len(os.sched_getaffinity(0))
    assert runs["flag"][0] == 2  # the user's XLA flag wins


def test_finite_width_identical_on_any_device_count(runs):
    ref = runs["one"][1]
    for name in ("three", "default", "all", "flag"):
        for key in ref.files:
            np.testing.assert_array_equal(runs[name][1][key], ref[key], err_msg=f"{name} {key}")
        assert np.all(np.isfinite(ref["V"]))


def test_bad_device_count_is_named(tmp_path):
    proc, _ = _run(tmp_path, "bad", EFFTHEORY_CPU_DEVICES="two")
    assert proc.returncode != 0
    assert "EFFTHEORY_CPU_DEVICES" in proc.stderr and "positive integer" in proc.stderr


SAMPLE = r"""
import faulthandler, sys
faulthandler.dump_traceback_later(120, exit=True)
import numpy as np
import jax
import efftheory as et
from efftheory import empirical as em
assert len(jax.devices()) == 2
x = np.random.default_rng(2).normal(size=(16, 16))
net = et.MLP(3, 64, "tanh", C_W=1.0)
for _ in range(2):  # the LAPACK QR this replaced hung on the first or second call
    e = em.sample_ensemble(net, x, 2000, 1, method="conditional", chunk=1000, dtype="float32", progress=False,
                           statistics=("metric",))
one = em.sample_ensemble(net, x, 2000, 1, method="conditional", chunk=1000, dtype="float32", progress=False,
                         statistics=("metric",), devices=jax.devices()[:1])
for k in e.stats:
    np.testing.assert_array_equal(np.asarray(e.stats[k]), np.asarray(one.stats[k]), err_msg=k)
print("ok")
"""


def test_conditional_sampling_on_two_cpu_devices_finishes(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SAMPLE], env=_env(EFFTHEORY_CPU_DEVICES="2"), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
