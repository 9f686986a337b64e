"""The number of XLA programs finite_width compiles does not grow with N or depth (issue #22).

A fresh process's first call used to compile one program per kernel shape (65 at N = 4, depth 5;
100 at N = 8): the shapes followed the inputs' geometry, N and depth.  Small work (every set size at
N <= 8, efftheory.products.HOST_SETS) now runs in numpy, with sigma evaluated by one compiled
program of a fixed shape per sigma, so the finite-width part of the call compiles the same few
programs whatever N, depth and inputs.  Counted in child processes (a fresh process, compilation
cache off) with JAX's compile-duration events, after infinite_width (not part of this count) has
compiled its own programs on the same inputs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import jax, jax.monitoring as mon
import numpy as np
count = [0]
mon.register_event_duration_secs_listener(
    lambda name, secs, **kw: count.__setitem__(0, count[0] + 1) if name.endswith("backend_compile_duration") else None)
import efftheory as et
out = []
for act, N, L in json.loads(sys.argv[1]):
    x = np.random.default_rng(N).normal(size=(N, 4))
    net = et.MLP(L, 64, act, C_W=1.0 if act == "tanh" else 2.0)
    et.infinite_width(net, x)  # its programs are not counted here
    before = count[0]
    et.finite_width(net, x)
    out.append(count[0] - before)
print(json.dumps(out))
"""


def _counts(configs):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    env.update(JAX_PLATFORMS="cpu", EFFTHEORY_COMPILE_CACHE="off",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(configs)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compiled_programs_independent_of_n_and_depth():
    # fresh processes: the first call's count at N = 4, depth 3 and at N = 6, depth 5 ...
    (a,) = _counts([["tanh", 4, 3]])
    b, c, d = _counts([["tanh", 6, 5], ["tanh", 4, 5], ["tanh", 6, 3]])
    assert a == b, (a, b)
    # measured 9: sigma / sigma' on fixed chunks, two sixth-derivative scans, the trapezoid error model,
    # the activation's homogeneity check (3, once per sigma) and the two result conversions
    assert 0 < a <= 10, a
    # ... and, in the same process, another N or depth adds only the conversion of the results to jax
    # arrays (two programs per result shape), no integration kernel
    assert c == d and c <= 2, (c, d)


def test_compiled_programs_relu_small():
    # the exact kinked route: no kernel per shape either
    a, b = _counts([["relu", 4, 3], ["relu", 6, 5]])
    assert a <= 10 and b <= 2, (a, b)


INFINITE_CHILD = r"""
import json, sys
import jax, jax.monitoring as mon, jax.numpy as jnp
import numpy as np
count = [0]
mon.register_event_duration_secs_listener(
    lambda name, secs, **kw: count.__setitem__(0, count[0] + 1) if name.endswith("backend_compile_duration") else None)
import efftheory as et
N, L = int(sys.argv[1]), int(sys.argv[2])
def tanh_callable(z):
    return jnp.tanh(z)
x = np.random.default_rng(N).normal(size=(N, 4))
np.asarray(et.infinite_width(et.MLP(L, 64, tanh_callable, C_W=1.0), x).Theta)
print(json.dumps(count[0]))
"""


def _infinite_count(N, L):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    env.update(JAX_PLATFORMS="cpu", EFFTHEORY_COMPILE_CACHE="off",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", INFINITE_CHILD, str(N), str(L)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_infinite_width_callable_programs_independent_of_n_and_depth():
    """infinite_width with a user callable (the Mehler recursion) for few inputs runs in numpy with sigma
    on fixed chunks: a fresh process compiles the same programs at N = 5, depth 3 and N = 64, depth 10
    (measured 13: the activation's checks, sigma's evaluator, the Gram matrix, the result; the compiled
    recursion compiled 39 at N = 64, depth 10, one per series length, node count and N)."""
    a, b = _infinite_count(5, 3), _infinite_count(64, 10)
    assert a == b and 0 < a <= 16, (a, b)
