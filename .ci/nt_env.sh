#!/usr/bin/env bash
# Create (or update) the pinned neural-tangents oracle environment.
#
#   .ci/nt_env.sh [VENV]        default VENV: <repo>/.venv-nt
#
# neural-tangents 0.6.5 needs jax < 0.6 (and imports TensorFlow), so it never shares an
# environment with efftheory's core (which follows current jax).  This venv holds
# jax==0.5.3, jaxlib==0.5.3, neural-tangents==0.6.5 and efftheory itself, editable and
# without dependency resolution, plus what the tests and benchmarks import.
# Idempotent: re-running on an existing venv only installs what is missing.
#
# Then:
#   $VENV/bin/python benchmarks/nt_reference.py          # regenerate tests/data/nt_reference.npz
#   $VENV/bin/python -m pytest tests/test_nt.py -m nt -q  # live cross-checks
#   $VENV/bin/python benchmarks/bench_infinite.py --small
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-nt}"
PYTHON="${PYTHON:-python3}"

start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv at $VENV (with $("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
else
    echo "reusing venv at $VENV"
fi
PY="$VENV/bin/python"

"$PY" -m pip install --quiet --disable-pip-version-check \
    "jax==0.5.3" "jaxlib==0.5.3" "neural-tangents==0.6.5" \
    numpy scipy matplotlib tqdm filelock pytest
# efftheory from this checkout; --no-deps keeps pip from upgrading jax past the pin.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"

# Fail loudly if the pins did not hold or efftheory cannot load beside NT.
TF_CPP_MIN_LOG_LEVEL=3 "$PY" - <<'PYEOF'
import jax, neural_tangents
assert jax.__version__ == "0.5.3", f"jax {jax.__version__} installed, expected the pin 0.5.3"
import efftheory
import efftheory.interop.neural_tangents  # noqa: F401
print(f"jax {jax.__version__}, neural-tangents {neural_tangents.__version__}, efftheory {efftheory.__version__}")
PYEOF

end=$(date +%s)
echo "nt env ready at $VENV (install took $((end - start)) s)"
