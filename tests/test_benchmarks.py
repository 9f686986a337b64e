"""benchmarks/run_all.py runs every benchmark at its smallest size and writes its JSON and table.

Timings are not checked (CI never gates on absolute time); the peers (neural-tangents, in its own
environment) are left out so that the test runs anywhere.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_smoke(tmp_path):
    out = tmp_path / "latest.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--no-peers",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["benchmarks"]) == {"bench_infinite", "bench_empirical", "bench_finite"}
    m = data["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["jax"]
    cases = [r["case"] for r in data["table"]]
    assert any("relu" in c for c in cases) and any("tanh (callable)" in c for c in cases)
    assert any("empirical NTK" in c for c in cases) and any("first-order" in c for c in cases)
    assert all(r["ours_s"] > 0 for r in data["table"])
    tanh = next(r for r in data["table"] if "tanh (callable)" in r["case"])
    assert tanh["accuracy"]["ours_vs_reference"] < 1e-8
    assert "| what | efftheory |" in proc.stdout
