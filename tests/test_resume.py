"""Long runs survive interruption (issue #8): a real ``python -m efftheory compare`` is killed midway (SIGINT,
then SIGKILL) after it has written at least one chunk, resumed, and gives the report of an uninterrupted run
byte for byte; corrupted and mismatched checkpoints are refused with a clear error, never mixed in."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import efftheory
from efftheory import empirical as em
from efftheory.cli import main
from efftheory.empirical import cache as cache_mod

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small, but long enough in sampling to be caught midway: 2 widths x 12 chunks of 10 networks.  The chunk size
# is part of the command: per-network numbers agree across chunk sizes only to rounding (XLA picks other
# kernels for other batch sizes), and a resumed run is bit-identical because it keeps the chunking.
RUN = ["compare", "--activation", "relu", "--C_W", "2", "--depth", "2", "--widths", "8,16", "--networks", "120",
       "--chunk", "10", "--inputs", "1", "--seed", "7", "--no-progress", "--no-plots"]
N_CHUNKS = 2 * 12


def _chunks(cache: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in cache.glob("*.npz") if not p.name.startswith(".tmp-"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process."""
    out = tmp_path_factory.mktemp("reference")
    assert main(RUN + ["--out", str(out)]) == 0
    return out


def _killed_run(tmp_path, sig) -> tuple[pathlib.Path, pathlib.Path, str]:
    """Start the run as a subprocess, wait for its first finished chunk, send ``sig``."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "efftheory", *RUN, "--out", str(out), "--cache", str(cache)]
    # SIGINT back to its default in the child: a test run launched in the background by a shell without job
    # control inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    try:
        while not (cache.is_dir() and _chunks(cache)):
            assert proc.poll() is None, f"the run ended before writing a chunk: {proc.communicate()}"
            assert time.monotonic() < deadline, "no chunk written within 180 s"
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    assert not (out / "report.json").exists(), "the run finished before it was interrupted: not a midway kill"
    assert 1 <= len(_chunks(cache)) < N_CHUNKS
    return out, cache, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.physics  # two real subprocess runs (~35 s): CI runs them in the physics step
def test_killed_run_resumes_to_the_identical_report(reference, tmp_path, sig, capsys):
    out, cache, err = _killed_run(tmp_path, sig)
    if sig == signal.SIGINT:
        last = err.strip().splitlines()[-1]
        assert last.startswith("efftheory: error: interrupted") and str(cache) in last and "Traceback" not in err
    written = {p.name: p.read_bytes() for p in _chunks(cache)}
    # resume: the same command (here in-process); finished chunks are reused as they are, not recomputed
    assert main(RUN + ["--out", str(out), "--cache", str(cache)]) == 0
    for name, data in written.items():
        assert (cache / name).read_bytes() == data
    assert len(_chunks(cache)) == N_CHUNKS
    assert (out / "report.json").read_bytes() == (reference / "report.json").read_bytes()
    assert (out / "table.txt").read_bytes() == (reference / "table.txt").read_bytes()


def test_stale_temporary_files_are_ignored(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference / "cache", out / "cache")
    (out / "cache" / ".tmp-deadbeef.npz").write_bytes(b"PK\x03\x04 half a chunk")
    assert main(RUN + ["--out", str(out)]) == 0
    assert (out / "report.json").read_bytes() == (reference / "report.json").read_bytes()


def _with(argv, option, value):
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("efftheory: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("damage", ["truncated", "garbled", "emptied", "arrays swapped"])
def test_corrupted_chunk_is_reported_not_used(reference, tmp_path, capsys, damage):
    out = tmp_path / "out"
    shutil.copytree(reference / "cache", out / "cache")
    chunks = _chunks(out / "cache")
    victim = chunks[1]
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbled":
        for i in range(len(data) // 3, len(data) // 3 + 16):
            data[i] ^= 0x5A
    elif damage == "emptied":
        data = bytearray()
    else:  # a well-formed chunk of other networks under this chunk's name (same config, same shapes)
        data = bytearray(chunks[0].read_bytes())
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(RUN + ["--out", str(out)]) == 2
    line = _error_line(capsys)
    assert victim.name in line and ("corrupted" in line or "holds networks" in line or "configuration" in line)
    assert not (out / "report.json").exists()


def test_mismatched_configuration_is_reported_not_mixed(reference, tmp_path, capsys):
    # the same --cache for another configuration: refused before any computation
    capsys.readouterr()
    assert main(_with(RUN, "--seed", "8") + ["--out", str(tmp_path / "a"), "--cache", str(reference / "cache")]) == 2
    line = _error_line(capsys)
    assert "another configuration" in line and "seed" in line
    # a chunk of another configuration under a name this run would use (compare's record removed):
    # the chunk's own configuration hash refuses it
    other = tmp_path / "other"
    assert main(_with(RUN, "--widths", "8") + ["--C_b", "0.5", "--out", str(other)]) == 0
    mine = tmp_path / "mine"
    shutil.copytree(other / "cache", mine / "cache")
    os.remove(mine / "cache" / "compare-config.json")
    capsys.readouterr()
    assert main(RUN + ["--out", str(mine)]) == 2
    line = _error_line(capsys)
    assert "different configuration" in line and ".npz" in line
    assert not (mine / "report.json").exists()


# ------------------------------------------------------------------------------------------ the library
NET = efftheory.MLP(2, 4, "tanh", C_W=1.3, C_b=0.1)
X = np.array([[1.0, -0.4, 0.3], [0.2, 0.9, -1.1]])


def test_library_resume_after_interrupt_matches_uninterrupted(tmp_path, monkeypatch):
    kw = dict(statistics=("metric",), chunk=7, progress=False)
    ref = em.sample(NET, X, [4, 8], 30, 3, **kw)
    real_save = cache_mod.save_chunk
    calls = []

    def interrupt_fourth(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "save_chunk", interrupt_fourth)
    with pytest.raises(KeyboardInterrupt):
        em.sample(NET, X, [4, 8], 30, 3, cache_dir=tmp_path, **kw)
    assert len(list(tmp_path.glob("*.npz"))) == 3 and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.setattr(cache_mod, "save_chunk", real_save)
    resumed = em.sample(NET, X, [4, 8], 30, 3, cache_dir=tmp_path, **kw)
    for n in (4, 8):
        for k in ref[n].stats:
            np.testing.assert_array_equal(resumed[n].stats[k], ref[n].stats[k])


def test_different_callables_of_one_name_never_share_a_cache(tmp_path):
    def act(z):
        return jnp.tanh(z)

    first = efftheory.MLP(2, 4, act, C_W=1.3, C_b=0.1)
    em.sample_ensemble(first, X, 7, 0, statistics=("metric",), chunk=7, progress=False, cache_dir=tmp_path)

    def act(z):  # noqa: F811 - the point: same name, same qualname, another function
        return jnp.sin(z)

    second = efftheory.MLP(2, 4, act, C_W=1.3, C_b=0.1)
    assert repr(first) == repr(second)
    with pytest.raises(em.CacheMismatchError, match="different configuration"):
        em.sample_ensemble(second, X, 7, 0, statistics=("metric",), chunk=7, progress=False, cache_dir=tmp_path)


def test_old_format_chunk_is_refused(tmp_path):
    em.sample_ensemble(NET, X, 7, 0, statistics=("metric",), chunk=7, progress=False, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    with np.load(path) as f:
        contents = {k: f[k] for k in f.files if k != "__format__"}
    np.savez(path, **contents)
    with pytest.raises(em.CacheMismatchError, match="format"):
        em.sample_ensemble(NET, X, 7, 0, statistics=("metric",), chunk=7, progress=False, cache_dir=tmp_path)


@pytest.fixture(scope="module")
def chunk_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chunk")
    arrays = {"zz": np.random.default_rng(0).normal(size=(5, 2, 3, 3)), "H": np.arange(20.0).reshape(5, 2, 2)}
    path = cache_mod.chunk_path(str(folder), "w4_seed0", 10, 15)
    digest = cache_mod.config_hash({"a": 1})
    cache_mod.save_chunk(path, arrays, {"a": 1}, digest, 10, 15)
    expected = {k: (v.shape, v.dtype) for k, v in arrays.items()}
    return pathlib.Path(path).read_bytes(), arrays, digest, expected


def test_a_zeroed_directory_entry_is_detected(chunk_file, tmp_path):
    """Zeroing the last member's CRC and sizes in the zip's central directory (18 bytes, 69 before the
    end: found by the hypothesis test below) makes np.load hand back that member as empty bytes whose
    CRC matches: reported as corrupted, not an AttributeError."""
    blob, _, digest, expected = chunk_file
    b = bytearray(blob)
    at = b.rindex(b"PK\x01\x02")  # the last central-directory entry
    b[at + 16:at + 28] = bytes(12)  # its CRC-32, compressed and uncompressed sizes
    path = tmp_path / "w4_seed0_0000000010-0000000015.npz"
    path.write_bytes(bytes(b))
    with pytest.raises(em.CacheMismatchError, match="corrupted"):
        cache_mod.load_chunk(str(path), digest, 10, 15, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_damage_to_a_chunk_file_is_detected(chunk_file, tmp_path_factory, data):
    """Flip, overwrite or cut bytes anywhere: the chunk either loads unchanged or raises CacheMismatchError."""
    blob, arrays, digest, expected = chunk_file
    kind = data.draw(st.sampled_from(["flip", "cut", "zero run"]))
    b = bytearray(blob)
    if kind == "flip":
        for i in data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=4)):
            b[i] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    else:
        i = data.draw(st.integers(0, len(b) - 1))
        end = min(len(b), i + data.draw(st.integers(1, 64)))
        b[i:end] = bytes(end - i)
    folder = tmp_path_factory.mktemp("damaged")
    path = folder / "w4_seed0_0000000010-0000000015.npz"
    path.write_bytes(bytes(b))
    try:
        got = cache_mod.load_chunk(str(path), digest, 10, 15, expected)
    except em.CacheMismatchError as e:
        assert str(path) in str(e)
        return
    assert bytes(b) == blob or got is not None
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
