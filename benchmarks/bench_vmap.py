"""jax.vmap over a 16 x 16 grid of (C_W, C_b) against a Python loop of the concrete calls (issue #21).

For each configuration (activation, N inputs, depth L) the quantity is: K and Theta of every
layer (:func:`efftheory.infinite_width`) and chi_parallel, chi_perp at the last layer's variance
K^(L)_00 with that C_W.  The vmapped version is one ``jax.jit(jax.vmap(f))`` call over the 256
points (traced path, efftheory/theory/_traced.py); the loop calls the same f on Python floats
(concrete path: host-chosen rules, Mehler series).  Printed per configuration: first call
(compilation included) and warm call, for both, the speedups, and the largest relative difference.

    python benchmarks/bench_vmap.py                 # all configurations
    python benchmarks/bench_vmap.py tanh:1 relu:8   # some (activation:N)

Not a timed test: numbers depend on the machine (the project's shared 2-core Xeon for RESULTS).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # the transformed calls need 64-bit mode (efftheory._precision)

import efftheory
from efftheory import MLP

DEPTH = 8
CONFIGS = ("tanh:1", "gelu:1", "tanh:2", "relu:8", "erf:8")


def make_f(act: str, x):
    def f(cw, cb):
        r = efftheory.infinite_width(MLP(DEPTH, 64, act, C_W=cw, C_b=cb), x)
        k = r.K[-1, 0, 0]
        return r.K, r.Theta, efftheory.chi_parallel(act, k, cw), efftheory.chi_perp(act, k, cw)

    return f


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def run(config: str) -> dict:
    act, N = config.split(":")
    N = int(N)
    x = np.random.default_rng(0).normal(size=(N, 4))
    CW, CB = (a.ravel() for a in np.meshgrid(np.linspace(0.8, 2.2, 16), np.linspace(0.0, 0.3, 16), indexing="ij"))
    f = make_f(act, x)
    g = jax.jit(jax.vmap(f))
    vec, v_first = timed(lambda: g(CW, CB))
    _, v_warm = timed(lambda: g(CW, CB))

    def loop():
        outs = [f(float(a), float(b)) for a, b in zip(CW, CB)]
        return [jnp.stack([jnp.asarray(o[i]) for o in outs]) for i in range(4)]

    ref, l_first = timed(loop)
    _, l_warm = timed(loop)
    err = max(float(jnp.max(jnp.abs(v - r) / jnp.maximum(jnp.abs(r), 1e-300))) for v, r in zip(vec, ref))
    return dict(config=f"{act} N={N} L={DEPTH}", vmap_first=v_first, vmap_warm=v_warm, loop_first=l_first,
                loop_warm=l_warm, max_rel_diff=err)


def main(argv) -> None:
    configs = argv or CONFIGS
    print(f"{'config':<18} {'vmap first':>10} {'vmap warm':>10} {'loop first':>10} {'loop warm':>10} "
          f"{'x first':>8} {'x warm':>8} {'max rel diff':>12}")
    for c in configs:
        r = run(c)
        print(f"{r['config']:<18} {r['vmap_first']:>9.3f}s {r['vmap_warm']:>9.3f}s {r['loop_first']:>9.2f}s "
              f"{r['loop_warm']:>9.2f}s {r['loop_first'] / r['vmap_first']:>7.1f}x "
              f"{r['loop_warm'] / r['vmap_warm']:>7.0f}x {r['max_rel_diff']:>12.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
