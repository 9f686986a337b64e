"""Resources checked before they are spent, and paths checked up front (issue #23, points 8-10)."""

import json
import os
import threading
import time

import numpy as np
import pytest

import efftheory as et
from efftheory import _validate, cli
from efftheory import empirical as em
from efftheory.empirical import cache as _cache

NET = et.MLP(depth=3, width=8, activation="tanh")
X = np.random.default_rng(0).normal(size=(2, 3))


def test_huge_network_counts_are_refused_before_sampling(monkeypatch):
    monkeypatch.setattr(_validate, "available_memory", lambda: 8 << 30)
    t = time.perf_counter()
    with pytest.raises(ValueError, match=r"n_networks: 100000000 networks keep .* more than the 8 GiB"):
        em.sample(NET, X, [16, 32, 64, 128], 100_000_000, 0, progress=False)
    assert time.perf_counter() - t < 5.0  # refused up front, nothing sampled


def test_cli_refuses_huge_network_counts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_validate, "available_memory", lambda: 8 << 30)
    rc = cli.main(["compare", "--activation", "tanh", "--depth", "3", "--widths", "8,16,32,64", "--networks",
                   "100000000", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "n_networks" in err and "more than" in err, err
    cache = tmp_path / "run" / "cache"
    assert not cache.exists() or all(not f.endswith(".npz") for f in os.listdir(cache))


def test_cache_dir_that_is_a_file_or_unwritable_is_refused_up_front(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="cache_dir: .* not a directory"):
        em.sample_ensemble(NET, X, 4, 0, cache_dir=f, progress=False)
    with pytest.raises(ValueError, match="cache_dir: cannot write"):
        em.sample_ensemble(NET, X, 4, 0, cache_dir="/proc/efftheory-cache", progress=False)


def test_a_fifo_under_a_chunk_name_is_reported_not_read(tmp_path):
    path = tmp_path / "chunk.npz"
    os.mkfifo(path)
    with pytest.raises(em.CacheMismatchError if hasattr(em, "CacheMismatchError") else _cache.CacheMismatchError,
                       match="not a regular file"):
        _cache.load_chunk(str(path), "digest", 0, 4, {})


def test_a_fifo_as_inputs_file_is_refused(tmp_path, capsys):
    fifo = tmp_path / "inputs.npy"
    os.mkfifo(fifo)
    rc = cli.main(["kernels", "--activation", "tanh", "--depth", "3", "--inputs-file", str(fifo)])
    assert rc == 2 and "not a regular file" in capsys.readouterr().err


def test_stale_temporary_files_are_cleaned_and_fresh_ones_kept(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old, new = cache / ".tmp-abc.npz", cache / ".tmp-def.npz"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 3600
    os.utime(old, (past, past))
    em.sample_ensemble(NET, X, 4, 0, cache_dir=cache, progress=False, statistics=("metric",))
    assert not old.exists() and new.exists()


def test_concurrent_writes_of_the_configuration_never_collide(tmp_path):
    """compare-config.json used one fixed '.tmp' name: concurrent starts failed (20 in 6000)."""
    cache = str(tmp_path / "cache")
    errors = []

    def start(i):
        try:
            for _ in range(50):
                cli._check_cache(cache, {"seed": 0, "dtype": "float32"})
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads((tmp_path / "cache" / "compare-config.json").read_text()) == {"seed": 0, "dtype": "float32"}
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp-")]
