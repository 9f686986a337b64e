"""The code passes the linter configured in pyproject.toml ([tool.ruff]): ``ruff check efftheory tests
benchmarks`` reports nothing.  Skipped only where ruff is not installed (it is in the ``test`` extra)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if Path(exe).exists():
        return [exe]
    try:
        import ruff  # noqa: F401 - only to learn whether the package is installed
    except ImportError:
        return None
    return [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing():
    cmd = _ruff()
    if cmd is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    out = subprocess.run(cmd + ["check", "--no-cache", "efftheory", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff check found problems:\n{out.stdout}\n{out.stderr}"
