"""efftheory.cli: one-line errors with exit status 2, a tiny compare run, resumable identical reports."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from efftheory.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["compare", "--activation", "tanh", "--depth", "3", "--widths", "8,16,32", "--networks", "50",
        "--seed", "5", "--no-progress"]


def _one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("efftheory: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(TINY + ["--out", str(out)]) == 0
    return out


def test_compare_writes_report_and_plots(run_dir, capsys):
    files = set(os.listdir(run_dir))
    assert {"report.json", "table.txt", "width_sweep.png", "four_point_depth.png", "cache"} <= files
    for png in ("width_sweep.png", "four_point_depth.png"):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG")
    assert any(f.endswith(".npz") for f in os.listdir(run_dir / "cache"))
    data = json.loads((run_dir / "report.json").read_text())
    assert data["config"]["seed"] == 5 and data["config"]["widths"] == [8, 16, 32]
    assert data["config"]["n_networks"] == 50 and data["config"]["dtype"] == "float32"
    assert data["config"]["inputs"]["n_inputs"] == 2 and "seeded" in data["config"]["inputs"]["source"]
    assert set(data["versions"]) >= {"efftheory", "jax", "numpy"}
    stats = {r["statistic"] for r in data["rows"]}
    assert stats == {"metric", "four_point", "ntk_mean", "ntk_variance"}
    table = (run_dir / "table.txt").read_text()
    # every number of a shown row is in report.json
    shown = [r for r in data["rows"] if r["shown"]]
    assert shown and all(str(r["width"]) in table for r in shown)


def test_compare_prints_the_table(tmp_path, capsys, run_dir):
    # rerun into the same folder: from the cache, identical report.json
    before = (run_dir / "report.json").read_bytes()
    capsys.readouterr()
    assert main(TINY + ["--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "measured ± stderr" in out and "theory n=∞" in out and "theory 1st order" in out
    assert "metric (K)" in out and "four_point (V/n)" in out and "ntk_variance" in out
    assert "width-sweep fits" in out
    assert (run_dir / "report.json").read_bytes() == before


def test_interrupted_run_resumes_to_the_identical_report(run_dir, capsys):
    before = (run_dir / "report.json").read_bytes()
    cache = run_dir / "cache"
    chunks = sorted(cache.glob("*.npz"))
    chunks[-1].unlink()  # as if interrupted before the last chunk was written
    assert main(TINY + ["--out", str(run_dir)]) == 0
    assert (run_dir / "report.json").read_bytes() == before
    assert sorted(cache.glob("*.npz")) == chunks


def test_mismatched_cache_is_a_one_line_error(run_dir, capsys):
    capsys.readouterr()
    before = (run_dir / "report.json").read_bytes()
    assert main(TINY + ["--C_b", "0.1", "--out", str(run_dir)]) == 2
    line = _one_line_error(capsys)
    assert "cache" in line and "configuration" in line and "C_b" in line
    argv = [a if a != "5" else "6" for a in TINY] + ["--out", str(run_dir)]  # another seed
    assert main(argv) == 2
    assert "seed" in _one_line_error(capsys)
    assert (run_dir / "report.json").read_bytes() == before


def test_library_cache_mismatch_is_a_one_line_error(tmp_path, capsys):
    # a cache without compare's own record: the empirical module's CacheMismatchError, exit status 2
    out = tmp_path / "lib"
    assert main(TINY[:6] + ["8,16", "--networks", "50", "--no-progress", "--out", str(out)]) == 0
    os.remove(out / "cache" / "compare-config.json")
    capsys.readouterr()
    assert main(TINY[:6] + ["8,16", "--networks", "50", "--no-progress", "--C_b", "0.2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("efftheory: error:")]
    assert len(errors) == 1 and "cache" in errors[0] and "Traceback" not in err


def test_other_widths_and_more_networks_reuse_the_cache(run_dir, capsys):
    argv = list(TINY)
    argv[argv.index("--widths") + 1] = "16,32"
    assert main(argv + ["--out", str(run_dir)]) == 0


def _npy(tmp_path, name, arr):
    p = tmp_path / name
    np.save(p, arr)
    return str(p)


@pytest.mark.parametrize("change, match", [
    ({"--activation": "nope"}, "unknown activation"),
    ({"--widths": "16,0,32"}, ">= 1"),
    ({"--widths": ""}, "empty"),
    ({"--widths": "16,,32"}, "empty entry"),
    ({"--widths": "16,abc"}, "integers"),
    ({"--widths": "16,16"}, "distinct"),
    ({"--networks": "0"}, "--networks"),
    ({"--networks": "-3"}, "--networks"),
    ({"--networks": "1"}, "at least 2"),
    ({"--depth": "1"}, "depth"),
    ({"--depth": "0"}, "depth"),
    ({"--inputs": "0"}, "--inputs"),
    ({"--inputs": "9"}, "at most"),
    ({"--seed": "-1"}, "--seed"),
    ({"--C_W": "-1"}, "C_W"),
    ({"--C_b": "nan"}, "finite"),
    ({"--dtype": "float16"}, "dtype"),
])
def test_bad_arguments(change, match, tmp_path, capsys):
    argv = list(TINY) + ["--out", str(tmp_path / "o")]
    for k, v in change.items():
        if k in argv:
            argv[argv.index(k) + 1] = v
        else:
            argv += [k, v]
    assert main(argv) == 2
    assert match in _one_line_error(capsys)


def test_bad_inputs_files(tmp_path, capsys):
    bad = {
        "missing": str(tmp_path / "missing.npy"),
        "text": str(tmp_path / "text.npy"),
        "vector": _npy(tmp_path, "vector.npy", np.ones(4)),
        "cube": _npy(tmp_path, "cube.npy", np.ones((2, 2, 2))),
        "strings": _npy(tmp_path, "strings.npy", np.array([["a", "b"]])),
        "nan": _npy(tmp_path, "nan.npy", np.array([[1.0, np.nan]])),
        "many": _npy(tmp_path, "many.npy", np.ones((9, 3))),
        "empty": _npy(tmp_path, "empty.npy", np.ones((0, 3))),
    }
    (tmp_path / "text.npy").write_text("not an array")
    npz = tmp_path / "arch.npz"
    np.savez(npz, x=np.ones((2, 3)))
    bad["npz"] = str(npz)
    for name, path in bad.items():
        argv = TINY + ["--inputs-file", path, "--out", str(tmp_path / "o")]
        assert main(argv) == 2, name
        assert "--inputs-file" in _one_line_error(capsys), name


def test_inputs_and_inputs_file_are_exclusive(tmp_path, capsys):
    p = _npy(tmp_path, "x.npy", np.ones((2, 3)))
    assert main(TINY + ["--inputs", "2", "--inputs-file", p, "--out", str(tmp_path)]) == 2
    assert "not allowed" in _one_line_error(capsys)


def test_unwritable_out(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(TINY + ["--out", str(f / "sub")]) == 2
    assert "--out" in _one_line_error(capsys)
    assert main(TINY + ["--out", str(f)]) == 2
    assert "--out" in _one_line_error(capsys)


def test_critical_conflicts_and_missing_criticality(tmp_path, capsys):
    assert main(TINY + ["--critical", "--C_W", "2", "--out", str(tmp_path)]) == 2
    assert "--critical" in _one_line_error(capsys)
    argv = ["kernels", "--activation", "sigmoid", "--depth", "2", "--critical"]
    assert main(argv) == 2
    assert "no critical initialization" in _one_line_error(capsys)


def test_usage_errors(capsys):
    assert main([]) == 2
    _one_line_error(capsys)
    assert main(["frobnicate"]) == 2
    _one_line_error(capsys)
    assert main(["compare", "--activation", "tanh", "--depth", "3"]) == 2  # no --out
    assert "--out" in _one_line_error(capsys)
    assert main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out


def test_kernels(tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["kernels", "--activation", "relu", "--depth", "3", "--critical", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "K_00" in text and "Theta_01" in text and "scale-invariant" in text
    data = json.loads((out / "kernels.json").read_text())
    K = np.asarray(data["K"])
    assert K.shape == (3, 2, 2) and np.allclose(K[:, 0, 0], K[0, 0, 0])  # critical relu: K constant
    assert (out / "kernels.png").read_bytes().startswith(b"\x89PNG")


def test_criticality(capsys):
    assert main(["criticality", "--activation", "relu"]) == 0
    text = capsys.readouterr().out
    assert "scale-invariant" in text and "C_W = 2" in text and "chi_perp" in text


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "efftheory", "compare", "--activation", "nope", "--depth", "3",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown activation" in lines[0] and "Traceback" not in r.stderr
