"""finite_width(store=): stored results cannot be silently damaged or mixed, and resources are
checked before they are spent (efftheory/theory/_store.py, _schedule.plan_memory, _schedule.config).

The fault-injection tests that need a small or read-only file system mount one (tmpfs, a read-only
bind mount) and are skipped where the process may not mount (not root, or no mount namespace)."""

import contextlib
import errno
import json
import multiprocessing
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory import _validate
from efftheory.theory import _schedule, _store
from efftheory.theory._store import NAMES


def _net():
    return et.MLP(depth=4, width=8, activation="tanh", C_W=1.2, C_b=0.1)


def _x():
    return np.random.default_rng(3).normal(size=(4, 3))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished store and the in-memory result it must equal."""
    path = tmp_path_factory.mktemp("finished") / "fw"
    got = et.finite_width(_net(), _x(), store=path)
    ref = et.finite_width(_net(), _x())
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)))
    return path, ref


def _copy(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@contextlib.contextmanager
def _mount(*args):
    target = args[-1]
    os.makedirs(target, exist_ok=True)
    if subprocess.run(["mount", *args], capture_output=True).returncode != 0:
        pytest.skip("this process cannot mount a file system (needs root)")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True)


# ---------------------------------------------------------------------------------------------
# 1, 2: every layer verified on every open; sizes checked before mapping


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_any_altered_layer_of_a_finished_store_raises(finished, tmp_path, layer):
    path = _copy(finished[0], tmp_path / "fw")
    V = np.load(path / "V.npy", mmap_mode="r+")
    V[layer, 1, 0, 2, 3] *= 1.0 + 1e-12
    V.flush()
    del V
    with pytest.raises(ValueError, match=f"store: layer {layer} .* checksum"):
        et.finite_width(_net(), _x(), store=path)


def test_a_tensor_overwritten_with_zeros_raises(finished, tmp_path):
    path = _copy(finished[0], tmp_path / "fw")
    np.save(path / "B.npy", np.zeros_like(np.load(path / "B.npy")))
    with pytest.raises(ValueError, match="store: layer 1 .* checksum.*move the directory aside"):
        et.finite_width(_net(), _x(), store=path)


def test_a_partial_store_with_an_altered_earlier_layer_does_not_resume(finished, tmp_path):
    path = _copy(finished[0], tmp_path / "fw")
    m = json.loads((path / "manifest.json").read_text())
    m["done"], m["checksums"] = 3, m["checksums"][:3]  # layers 0..2 finished, layer 3 to compute
    (path / "manifest.json").write_text(json.dumps(m))
    A = np.load(path / "A.npy", mmap_mode="r+")
    A[1, 0, 0, 0, 0] += 1e-9  # not the layer the run resumes from
    A.flush()
    del A
    with pytest.raises(ValueError, match="store: layer 1 .* checksum"):
        et.finite_width(_net(), _x(), store=path)


@pytest.mark.parametrize("name", ["V", "G1"])
def test_a_truncated_file_is_reported_and_left_as_it_is(finished, tmp_path, name):
    path = _copy(finished[0], tmp_path / "fw")
    f = path / f"{name}.npy"
    size = f.stat().st_size
    os.truncate(f, size - 8 * 37)
    with pytest.raises(ValueError, match=f"store: .*{name}.npy.*truncated"):
        et.finite_width(_net(), _x(), store=path)
    assert f.stat().st_size == size - 8 * 37  # the evidence is not zero-filled back to size


def test_a_wrong_dtype_says_dtype(finished, tmp_path):
    path = _copy(finished[0], tmp_path / "fw")
    np.save(path / "F.npy", np.load(path / "F.npy").astype(np.float32))
    with pytest.raises(ValueError, match="store: .*F.npy has dtype float32, expected float64"):
        et.finite_width(_net(), _x(), store=path)


# ---------------------------------------------------------------------------------------------
# 3: activations identified by definition and values


def test_clipped_callables_of_one_name_never_share_a_store(tmp_path):
    def make(c):
        def clipped(z):
            return jnp.clip(z, -c, c)
        return clipped

    x = np.random.default_rng(0).normal(size=(3, 2)) * 4.0  # K ~ 16: the integrals reach |z| > 8
    nets = [et.MLP(depth=2, width=8, activation=make(c), C_W=1.0) for c in (6.0, 8.0)]
    assert repr(nets[0]) == repr(nets[1])
    c6, c8 = (_schedule.config(n, x, 1e-9) for n in nets)
    assert c6["sigma"] != c8["sigma"] and c6["sigma_code"] != c8["sigma_code"]
    # literal constants too: two lambdas whose values agree where sampled still differ by definition
    a = et.MLP(depth=2, activation=lambda z: jnp.clip(z, -2e4, 2e4))
    b = et.MLP(depth=2, activation=lambda z: jnp.clip(z, -3e4, 3e4))
    xs = np.full((2, 2), 0.01)
    assert _schedule.config(a, xs, 1e-9)["sigma"] == _schedule.config(b, xs, 1e-9)["sigma"]
    assert _schedule.config(a, xs, 1e-9) != _schedule.config(b, xs, 1e-9)
    et.finite_width(nets[0], x, store=tmp_path / "fw")
    with pytest.raises(ValueError, match="store: .* another computation"):
        et.finite_width(nets[1], x, store=tmp_path / "fw")


def test_the_same_definition_gives_the_same_store():
    x = _x()
    f1 = et.MLP(depth=3, activation=lambda z: jnp.tanh(z) * 0.5)
    f2 = et.MLP(depth=3, activation=lambda z: jnp.tanh(z) * 0.5)
    assert _schedule.config(f1, x, 1e-9) == _schedule.config(f2, x, 1e-9)
    assert _schedule.config(_net(), x, 1e-9) == _schedule.config(_net(), x, 1e-9)


# ---------------------------------------------------------------------------------------------
# 4: one writer at a time


def _hold_lock(path, ready, release):
    import filelock

    with filelock.FileLock(os.path.join(path, ".lock")):
        ready.set()
        release.wait(60)


def test_a_store_being_computed_is_refused_to_a_second_process(tmp_path):
    path = tmp_path / "fw"
    path.mkdir()
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(path), ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(ValueError, match="store: .* being computed by another process"):
            et.finite_width(_net(), _x(), store=path)
        assert not (path / "manifest.json").exists()
    finally:
        release.set()
        p.join(60)
    got = et.finite_width(_net(), _x(), store=path)  # the lock is free again
    assert json.loads((path / "manifest.json").read_text())["done"] == 4
    assert got.V.shape == (4, 4, 4, 4, 4)


_CONCURRENT = """
import sys, numpy as np, efftheory as et
net = et.MLP(depth=4, width=8, activation="tanh", C_W=float(sys.argv[2]), C_b=0.1)
x = np.random.default_rng(3).normal(size=(4, 3))
try:
    fw = et.finite_width(net, x, store=sys.argv[1])
except ValueError as e:
    print("REFUSED", e)
    sys.exit(0)
ref = et.finite_width(net, x)
ok = all(np.array_equal(np.asarray(getattr(fw, n)), np.asarray(getattr(ref, n))) for n in ("G1", "V", "A", "B", "D", "F"))
print("OK" if ok else "MIXED")
"""


def test_concurrent_runs_on_one_new_store_never_mix(tmp_path):
    """Two processes with different C_W start on one new directory at once (measured before the lock:
    mixed tensors in 1 of 6 trials): each either gets its own exact result or is refused."""
    for trial in range(2):
        path = tmp_path / f"fw{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(path), cw], stdout=subprocess.PIPE,
                                  text=True) for cw in ("1.2", "0.9")]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        words = [o.split()[0] if o.split() else "" for o in outs]
        assert all(w in ("OK", "REFUSED") for w in words), outs
        assert "OK" in words, outs


# ---------------------------------------------------------------------------------------------
# 5, 6: a full disk and read-only media


def test_no_space_is_an_error_naming_the_file(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_store.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"store: cannot write .*G1\.npy: No space left on device"):
        et.finite_width(_net(), _x(), store=tmp_path / "fw")


@pytest.mark.physics
def test_a_full_disk_raises_and_keeps_the_earlier_layers(tmp_path):
    """On a real 1.5 MiB file system: a store whose tensors do not fit raises OSError naming a file
    (no SIGBUS), and a store that filled the disk while finishing its layers keeps them whole."""
    mnt = str(tmp_path / "small")
    with _mount("-t", "tmpfs", "-o", "size=1536k", "tmpfs", mnt):
        x = np.random.default_rng(1).normal(size=(9, 3))  # 5 x 4 x 9^4 x 8 B = 1.05 MB of tensors
        net = et.MLP(depth=4, width=8, activation="tanh")
        code = ("import numpy as np, efftheory as et\n"
                "x = np.random.default_rng(1).normal(size=(9, 3))\n"
                "net = et.MLP(depth=4, width=8, activation='tanh')\n"
                f"et.finite_width(net, x, store={mnt + '/a'!r})\n"
                f"et.finite_width(net, x, store={mnt + '/b'!r})\n")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert run.returncode == 1, (run.returncode, run.stderr[-2000:])  # an exception, not a signal
        assert "No space left on device" in run.stderr and mnt + "/b/" in run.stderr, run.stderr[-2000:]
        got = et.finite_width(net, x, store=mnt + "/a")  # the first store is whole and verified
        np.testing.assert_array_equal(np.asarray(got.V), np.asarray(et.finite_width(net, x).V))


def test_a_finished_store_on_read_only_media_is_read(finished, tmp_path):
    src = _copy(finished[0], tmp_path / "src")
    with _mount("--bind", "-o", "ro", str(src), str(tmp_path / "ro")) as ro:
        with pytest.raises(OSError):
            open(os.path.join(ro, "probe"), "w")
        got = et.finite_width(_net(), _x(), store=ro)
        for name in NAMES:
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(finished[1], name)))
        assert not got.V.flags.writeable


def test_an_unfinished_store_on_read_only_media_says_so(finished, tmp_path):
    src = _copy(finished[0], tmp_path / "src")
    m = json.loads((src / "manifest.json").read_text())
    m["done"], m["checksums"] = 2, m["checksums"][:2]
    (src / "manifest.json").write_text(json.dumps(m))
    with _mount("--bind", "-o", "ro", str(src), str(tmp_path / "ro")) as ro:
        with pytest.raises(ValueError, match="store: .* cannot be written .* give a writable directory"):
            et.finite_width(_net(), _x(), store=ro)


# ---------------------------------------------------------------------------------------------
# 7, 16: memory checked up front; permissions follow the umask


def test_memory_model_is_checked_against_the_machine(monkeypatch):
    with pytest.raises(ValueError, match=r"x: N = 200 inputs at depth 10 need .* more than the 22 GiB .*store="):
        _schedule.plan_memory(200, 10, None, False, available=22 << 30)
    with pytest.raises(ValueError, match=r"x: N = 120 inputs at depth 10 need .*more than the 22 GiB"):
        _schedule.plan_memory(120, 10, None, True, available=22 << 30)
    assert _schedule.plan_memory(16, 10, None, False, available=22 << 30) == _schedule.SET_BLOCK
    # a tight machine gets smaller blocks instead of a refusal, when the smallest block fits
    t4 = 8.0 * 9**4
    fixed = 6 * 3 * t4 + (_schedule.STEP_TENSORS + 3 * _schedule.AHEAD) * t4 + _schedule.FLOOR
    per_set = (1 + _schedule.AHEAD) * _schedule.SET_BYTES
    assert _schedule.plan_memory(9, 3, None, False, available=int(fixed + 100 * per_set)) == 100
    # the public call refuses before it allocates anything
    monkeypatch.setattr(_validate, "available_memory", lambda: 200 << 20)
    with pytest.raises(ValueError, match="x: N = 40 inputs at depth 4 need .* more than the 200 MiB"):
        et.finite_width(_net(), np.random.default_rng(0).normal(size=(40, 3)))


def test_manifest_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        et.finite_width(_net(), _x(), store=tmp_path / "fw")
    finally:
        os.umask(old)
    mode = (tmp_path / "fw" / "manifest.json").stat().st_mode & 0o777
    assert mode == 0o664, oct(mode)
    assert not [f for f in os.listdir(tmp_path / "fw") if f.startswith(".tmp-")]


def test_store_that_is_a_file_is_refused_up_front(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="store: .* not a directory"):
        et.finite_width(_net(), _x(), store=f)
    assert f.read_text() == "x"

