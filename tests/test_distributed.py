"""Several processes (efftheory.distributed, efftheory launch).

Default suite: the logic that needs no second process (settings from the environment, the split of
work items, the dead-process check on a stand-in client, the launcher's arguments, one-process
no-ops, the sources' ``part`` hook run as two shares in one process).  Physics step
(``-m physics``): 1, 2 and 3 real local processes on 127.0.0.1 (tests/_distributed_worker.py, the
``efftheory launch`` command line): sampling and training bit-identical to one process, the
finite-width sources equal to 1e-13, a killed process named in the others within a bound, and runs
killed in one process that resume to the same result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from efftheory import distributed, launch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_distributed_worker.py")
ENV_NAMES = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)


# ------------------------------------------------------------------------------------------ settings
def test_settings_from_env_none_and_all_three():
    assert distributed.settings_from_env({}) is None
    env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "3"}
    assert distributed.settings_from_env(env) == {"coordinator": "10.0.0.1:1234", "num_processes": 4,
                                                  "process_id": 3}


@pytest.mark.parametrize("drop", ENV_NAMES)
def test_settings_from_env_names_the_missing_variable(drop):
    env = {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "0"}
    del env[drop]
    with pytest.raises(ValueError, match=drop):
        distributed.settings_from_env(env)


@pytest.mark.parametrize("name,value,match", [
    (distributed.ENV_NUM_PROCESSES, "two", "expected an integer"),
    (distributed.ENV_NUM_PROCESSES, "0", ">= 1"),
    (distributed.ENV_PROCESS_ID, "2", r"0\.\.1"),
    (distributed.ENV_PROCESS_ID, "-1", ">= 0"),
    (distributed.ENV_COORDINATOR, "localhost", "host:port"),
    (distributed.ENV_COORDINATOR, "localhost:99999", "port in 1..65535"),
])
def test_settings_from_env_bad_values_name_the_variable(name, value, match):
    env = {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "0"}
    env[name] = value
    with pytest.raises(ValueError, match=name) as e:
        distributed.settings_from_env(env)
    assert e.match(match)


def test_settings_from_slurm():
    assert distributed.settings_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == {"slurm": True}
    assert distributed.settings_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    # the EFFTHEORY_* variables win over Slurm's
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", distributed.ENV_COORDINATOR: "h:1",
           distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "1"}
    assert distributed.settings_from_env(env)["num_processes"] == 2


def test_timeout_from_env():
    assert distributed.timeout({}) == distributed.DEFAULT_TIMEOUT == 60.0
    assert distributed.timeout({distributed.ENV_TIMEOUT: "5"}) == 5.0
    for bad in ("soon", "0", "-3", "inf"):
        with pytest.raises(ValueError, match=distributed.ENV_TIMEOUT):
            distributed.timeout({distributed.ENV_TIMEOUT: bad})


def test_initialize_arguments_are_checked():
    with pytest.raises(ValueError, match="give all three"):
        distributed.initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes"):
        distributed.initialize("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match="coordinator"):
        distributed.initialize("nowhere", 2, 0)
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing started


def test_one_process_is_a_no_op(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert distributed.initialize() is False
    assert not distributed.active()
    assert (distributed.process_index(), distributed.process_count()) == (0, 1)
    assert distributed.gather("k", {"a": 1}) == [{"a": 1}]
    assert distributed.agree("k", 5) == 5
    distributed.barrier("k")


def test_import_changes_no_jax_setting():
    code = ("import jax; before = {k: getattr(jax.config, k) for k in ('jax_cpu_collectives_implementation', "
            "'jax_enable_x64')}; import efftheory, efftheory.distributed, efftheory.launch, efftheory.cli; "
            "after = {k: getattr(jax.config, k) for k in before}; assert before == after, (before, after); "
            "from jax._src import xla_bridge; assert not xla_bridge._backends, 'backend started at import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------ work split
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 56, 70])
def test_parts_cover_every_item_once_and_balance(P, n):
    shares = [distributed.Part("t", i, P).select(n) for i in range(P)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(distributed.owner(i, P) == next(j for j, s in enumerate(shares) if i in s) for i in range(n))


def test_source_moments_part_hook_equals_one_call():
    """Two shares of the three- and four-input sets, computed one after the other in this process and
    exchanged by a stand-in for the key-value store, give source_moments' values exactly."""
    from efftheory.activations import get_activation as get
    from efftheory.gaussian._sources import source_moments

    rng = np.random.default_rng(1)
    X = rng.normal(size=(5, 3))
    K = 0.2 + X @ X.T / 3
    act = get("tanh")
    store = {}

    class Share(distributed.Part):
        def gather(self, mine, values, key=""):
            store.setdefault(key, {})[self.index] = (np.asarray(mine), np.asarray(values))
            got = store[key]
            idx = np.concatenate([got[i][0] for i in sorted(got)])
            vals = np.concatenate([got[i][1] for i in sorted(got)])
            order = np.argsort(idx)
            return idx[order], vals[order]

    source_moments(act, K, part=Share("t", 1, 2))  # its own share only (the rest unused)
    both = source_moments(act, K, part=Share("t", 0, 2))
    assert set(store) == {"k3", "k4"} and all(abs(len(v[1][0]) - len(v[0][0])) <= 1 for v in store.values())
    for a, b in zip(both, source_moments(act, K)):
        assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------ dead processes
class _Client:
    """Stands in for JAX's key-value client: process 1's heartbeat never changes."""

    def __init__(self, failed=None):
        self.failed = failed

    def key_value_try_get(self, key):
        if key.endswith("/failed"):
            if self.failed is None:
                raise RuntimeError("NOT_FOUND: Config key not found.")
            return self.failed
        return "7"


def _fake_state(monkeypatch, client, count=3, seconds=0.05):
    monkeypatch.setattr(distributed, "_state", dict(distributed._state, client=client, index=0, count=count,
                                                    timeout=seconds, seen={}))


def test_stale_heartbeat_names_the_process(monkeypatch):
    _fake_state(monkeypatch, _Client())
    distributed.check_alive()  # first look: remembered
    time.sleep(0.1)
    with pytest.raises(distributed.DistributedError, match=r"process 1 of 3 stopped: no heartbeat") as e:
        distributed.check_alive()
    assert e.value.process == 1 and "EFFTHEORY_DISTRIBUTED_TIMEOUT" in str(e.value)


def test_failure_reported_by_another_process_is_raised(monkeypatch):
    _fake_state(monkeypatch, _Client(failed="2\nprocess 2 of 3 stopped: no heartbeat"))
    with pytest.raises(distributed.DistributedError, match="process 2 of 3") as e:
        distributed.check_alive()
    assert e.value.process == 2


def test_unreachable_coordinator_names_process_0(monkeypatch):
    class Gone(_Client):
        def key_value_try_get(self, key):
            raise RuntimeError("UNAVAILABLE: Socket closed")

    _fake_state(monkeypatch, Gone())
    with pytest.raises(distributed.DistributedError, match=r"coordinator \(process 0\)") as e:
        distributed.check_alive()
    assert e.value.process == 0


# ------------------------------------------------------------------------------------------ launcher
@pytest.mark.parametrize("argv,match", [
    (["--processes", "2"], "after '--'"),
    (["--processes", "0", "--", "compare"], "--processes: expected 1..1024"),
    (["--", "compare"], "one of the arguments --processes --cluster is required"),
    (["--processes", "2", "--cluster", "--", "compare"], "not allowed with"),
    (["--processes", "2", "--timeout", "-1", "--", "compare"], "--timeout"),
    (["--processes", "2", "--coordinator", "host", "--", "compare"], "--coordinator: expected host:port"),
    (["--processes", "2", "--", "sample"], "expected one of compare, train"),
    (["--processes", "2", "--", "launch"], "cannot be 'launch'"),
])
def test_launch_arguments_are_checked(argv, match):
    with pytest.raises(launch.LaunchError, match=match):
        launch.parse(argv)


def test_launch_parse_and_child_env():
    args, command = launch.parse(["--processes", "3", "--timeout", "5", "--", "compare", "--out", "d", "--", "x"])
    assert args.processes == 3 and args.timeout == 5.0 and command == ["compare", "--out", "d", "--", "x"]
    env = launch.child_env({"PATH": "/bin"}, "127.0.0.1:5", 3, 2, 5.0)
    assert env[distributed.ENV_COORDINATOR] == "127.0.0.1:5" and env[distributed.ENV_NUM_PROCESSES] == "3"
    assert env[distributed.ENV_PROCESS_ID] == "2" and float(env[distributed.ENV_TIMEOUT]) == 5.0
    assert env["PATH"] == "/bin"
    assert 0 < launch.free_port() < 65536


def test_launcher_stops_the_others_when_one_fails(tmp_path, capsys):
    """A stand-in for python: process 1 prints a line and exits with status 4, process 0 would sleep 60 s."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho \"I am $EFFTHEORY_PROCESS_ID of $EFFTHEORY_NUM_PROCESSES at "
                    "$EFFTHEORY_COORDINATOR\"\nif [ \"$EFFTHEORY_PROCESS_ID\" = 1 ]; then exit 4; fi\nexec sleep 60\n")
    fake.chmod(0o755)
    t0 = time.monotonic()
    assert launch.run_local(["compare"], 2, python=str(fake), timeout=5) == 4
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr()
    assert "[p1] I am 1 of 2 at 127.0.0.1:" in out.out and "[p0] I am 0 of 2" in out.out
    assert "process 1 of 2 exited with status 4; stopped the others" in out.err


def test_cli_launch_bad_arguments_exit_2(capsys):
    from efftheory.cli import main

    assert main(["launch", "--processes", "2"]) == 2
    assert "after '--'" in capsys.readouterr().err


def test_cli_cluster_without_settings_exits_2(monkeypatch, capsys):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch.main(["--cluster", "--", "compare", "--activation", "tanh", "--out", "x"]) == 2
    assert "--cluster" in capsys.readouterr().err


def test_cli_bad_environment_exits_2(monkeypatch, capsys):
    from efftheory.cli import main

    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert main(["kernels", "--activation", "tanh", "--depth", "2"]) == 2
    assert distributed.ENV_COORDINATOR in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ several processes
def _env(P: int, i: int, port: int, timeout: float = 5.0) -> dict:
    env = dict(os.environ)
    if P > 1:
        env = launch.child_env(env, f"127.0.0.1:{port}", P, i, timeout)
    else:
        for name in ENV_NAMES:
            env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(P, args, tmp_path, name, timeout=5.0):
    port = launch.free_port()
    return [subprocess.Popen([sys.executable, *args], env=_env(P, i, port, timeout), cwd=tmp_path,
                             stdout=open(tmp_path / f"{name}.{i}.log", "w"), stderr=subprocess.STDOUT)
            for i in range(P)]


def _run_worker(P, task, tmp_path, store=None, limit=240):
    out = str(tmp_path / f"{task}-{P}")
    procs = _start(P, [WORKER, task, out] + ([str(store)] if store else []), tmp_path, f"{task}-{P}")
    for p in procs:
        assert p.wait(timeout=limit) == 0, (tmp_path / f"{task}-{P}.{procs.index(p)}.log").read_text()
    return [dict(np.load(f"{out}.{i}.npz")) for i in range(P)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


@pytest.mark.physics
@pytest.mark.parametrize("task", ["sample", "train"])
def test_sampling_and_training_bit_identical_to_one_process(task, tmp_path):
    one = _run_worker(1, task, tmp_path)[0]
    for P in (2, 3):
        for got in _run_worker(P, task, tmp_path):  # every process returns the whole ensemble
            assert _same(got, one), (task, P)


@pytest.mark.physics
def test_finite_width_sources_equal_one_process(tmp_path):
    one = _run_worker(1, "sources", tmp_path)[0]
    for P in (2, 3):
        for got in _run_worker(P, "sources", tmp_path):
            diff = max(float(np.max(np.abs(got[k] - one[k]))) for k in one)
            assert diff <= 1e-13, (P, diff)
            print(f"[measured] sources N = 8, depth 3, {P} processes: max difference {diff:.3g}")


@pytest.mark.physics
def test_dead_process_is_named_within_bound(tmp_path):
    """Process 1 of 3 exits 2 s into a barrier; processes 0 and 2 raise DistributedError naming it
    within the timeout (5 s) plus 3 s."""
    out = str(tmp_path / "die")
    procs = _start(3, [WORKER, "die", out], tmp_path, "die")
    codes = [p.wait(timeout=120) for p in procs]
    assert codes[1] == 9 and codes[0] == codes[2] == 3, codes
    for i in (0, 2):
        who, message = open(f"{out}.{i}.err").read().split("\n", 1)
        assert who == "1" and "process 1 of 3 stopped" in message
        waited = float((tmp_path / f"die.{i}.log").read_text().split("waited ")[1].split(" s")[0])
        assert waited < 2.0 + 5.0 + 3.0, waited
        print(f"[measured] process {i}: named process 1 {waited - 2.0:.2f} s after it exited")


def _compare_args(out):
    return ["-m", "efftheory", "compare", "--activation", "tanh", "--depth", "3", "--widths", "8,16",
            "--networks", "400", "--chunk", "8", "--no-plots", "--no-progress", "--out", str(out)]


def _report(out) -> dict:
    r = json.load(open(os.path.join(out, "report.json")))
    r.pop("timings", None)
    return r


@pytest.mark.physics
def test_compare_killed_in_one_process_is_named_and_resumes(tmp_path):
    """3 processes of ``efftheory compare`` (400 networks at 2 widths, chunks of 8); process 1 is
    killed once process 0 has cached 4 chunks; 0 and 2 exit with status 3 naming process 1 within the
    timeout (5 s) plus 5 s; ``efftheory launch --processes 3`` then resumes to the report of one
    process."""
    ref = tmp_path / "one"
    subprocess.run([sys.executable, *_compare_args(ref)], env=_env(1, 0, 0), check=True, timeout=300,
                   capture_output=True)
    out = tmp_path / "three"
    procs = _start(3, _compare_args(out), tmp_path, "compare")
    cache = out / "cache"
    end = time.monotonic() + 240
    while time.monotonic() < end and not (cache.is_dir() and len(list(cache.glob("*.npz"))) >= 4):
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    codes = [p.wait(timeout=120) for p in procs]
    took = time.monotonic() - t0
    assert codes[1] == -signal.SIGKILL and codes[0] == codes[2] == 3, codes
    for i in (0, 2):
        log = (tmp_path / f"compare.{i}.log").read_text()
        assert "process 1 of 3 stopped" in log and "rerun the same command" in log, log
    assert took < 5.0 + 5.0, took
    print(f"[measured] compare, 3 processes, process 1 killed: the others exited naming it after {took:.2f} s")
    assert not (out / "report.json").exists()
    done = len(list(cache.glob("*.npz")))
    r = subprocess.run([sys.executable, "-m", "efftheory", "launch", "--processes", "3", "--timeout", "5", "--",
                        *_compare_args(out)[2:]], env=_env(1, 0, 0), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[p0] wrote" in r.stdout
    assert _report(out) == _report(ref)
    assert done < 100 == len(list(cache.glob("*.npz")))  # 2 widths x 50 chunks, part of them from the first run


@pytest.mark.physics
def test_finite_width_store_killed_resumes(tmp_path):
    """finite_width(store=) in 2 processes (N = 8, depth 6), process 1 killed once the store holds a
    finished layer: process 0 names it (status 3); both restarted with the same store give the
    one-process values to 1e-13."""
    one = _run_worker(1, "sources_deep", tmp_path)[0]
    store = tmp_path / "store"
    out = str(tmp_path / "killed")
    procs = _start(2, [WORKER, "sources_deep", out, str(store)], tmp_path, "killed")
    manifest = store / "manifest.json"
    end = time.monotonic() + 240
    while time.monotonic() < end:
        try:
            if json.loads(manifest.read_text())["done"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    codes = [p.wait(timeout=120) for p in procs]
    done = json.loads(manifest.read_text())["done"]
    assert codes == [3, -signal.SIGKILL], (codes, (tmp_path / "killed.0.log").read_text()[-2000:])
    assert "process 1 of 2 stopped" in open(f"{out}.0.err").read()
    assert 2 <= done < 6
    print(f"[measured] finite_width store: killed with {done - 1} of 5 layers done")
    for got in _run_worker(2, "sources_deep", tmp_path, store=store):
        assert max(float(np.max(np.abs(got[k] - one[k]))) for k in one) <= 1e-13
