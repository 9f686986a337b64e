"""Claim: efftheory.infinite_width computes NT's kernels, at a cost comparable to NT's kernel_fn.

Times :func:`efftheory.infinite_width` (all L layers' K and Theta) against neural-tangents'
``kernel_fn`` of the equivalent ``stax`` network (``efftheory.interop.neural_tangents.stax_mlp``,
jitted, final layer's nngp and ntk) on the same inputs in the same run, and reports how far apart
their final-layer kernels are.  Each timing: one warm-up (compile) call, then the median of
``--repeats`` calls (one call when the warm-up took over 10 s), each ended by
``block_until_ready``.  ratio = t_efftheory / t_NT (> 1: efftheory slower).  efftheory returns every
layer, NT only the last, so the ratio is if anything unfair to efftheory.

Activations: relu and erf (closed forms on both sides) and tanh passed as a plain callable
(efftheory's own 2-d quadrature, accuracy target 1e-13, vs NT's ``ElementwiseNumerical(fn, deg)``
with NT's suggested deg 25, whose error is ~1e-3 here: the two are not equally accurate, and the
rel. diff columns say by how much).  The quadrature case is timed only up to
``--numerical-max-n`` (default 256): on a 2-core CPU each call at N=1024 takes minutes per side.

Run in the NT environment, which has both (.ci/nt_env.sh):

    .venv-nt/bin/python benchmarks/bench_infinite.py [--small] [--json out.json]

Without neural-tangents only efftheory's timings are printed, and NT is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
try:
    import efftheory
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT))
    import efftheory

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    import efftheory.interop.neural_tangents as ntm
    import neural_tangents as nt

    NT_VERSION = nt.__version__
    NT_ERROR = None
except ImportError as e:
    ntm, NT_VERSION, NT_ERROR = None, None, str(e)


def _tanh(z):
    return jnp.tanh(z)


_tanh.__name__ = "tanh_callable"

# activation label -> (activation passed to MLP, C_W, C_b)
CASES = {
    "relu": ("relu", 2.0, 0.0),
    "erf": ("erf", 1.8, 0.1),
    "tanh (callable)": (_tanh, 1.2, 0.05),
}


SLOW_S = 10.0  # a warm-up call slower than this is timed once more, not ``repeats`` times


def timeit(fn, repeats: int) -> tuple[float, int, object]:
    """(median seconds, timed calls, last output) after one warm-up call."""
    t0 = time.perf_counter()
    out = fn()  # warm-up: compilation and caches
    if time.perf_counter() - t0 > SLOW_S:
        repeats = 1
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), repeats, out


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run_case(label, N, depth, repeats, deg, seed=0):
    act, C_W, C_b = CASES[label]
    net = efftheory.MLP(depth, 512, act, C_W=C_W, C_b=C_b)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((N, 16)))

    def eff():
        out = efftheory.infinite_width(net, x)
        out.K.block_until_ready()
        out.Theta.block_until_ready()
        return out

    row = dict(activation=label, N=N, depth=depth)
    row["efftheory_s"], row["efftheory_calls"], ours = timeit(eff, repeats)
    if ntm is not None:
        _, _, kernel_fn = ntm.stax_mlp(net, deg=deg)
        kf = jax.jit(kernel_fn, static_argnames=("get",))

        def ref():
            k = kf(x, None, get=("nngp", "ntk"))
            k.nngp.block_until_ready()
            k.ntk.block_until_ready()
            return k

        row["nt_s"], row["nt_calls"], k = timeit(ref, repeats)
        row["ratio"] = row["efftheory_s"] / row["nt_s"]
        row["rel_diff_K"] = rel(ours.K[-1], k.nngp)
        row["rel_diff_Theta"] = rel(ours.Theta[-1], k.ntk)
        if label.startswith("tanh"):
            row["nt_deg"] = deg
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description="efftheory.infinite_width vs neural-tangents kernel_fn")
    p.add_argument("--small", action="store_true", help="CI smoke size: N=64, depth 3")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (median)")
    p.add_argument("--deg", type=int, default=25,
                   help="Gauss-Hermite degree of NT's ElementwiseNumerical (NT suggests 25)")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="override the N values")
    p.add_argument("--numerical-max-n", type=int, default=256,
                   help="largest N at which the quadrature case (tanh) is timed: both sides cost "
                        "~ nodes^2 N^2 (on 2 CPU cores at N=256, depth 10: efftheory ~34 s, NT deg 25 "
                        "~28 s per call, so N=1024 would take ~9 min a call each)")
    args = p.parse_args(argv)

    sizes = args.sizes or ([64] if args.small else [256, 1024])
    depth = 3 if args.small else 10
    repeats = args.repeats or (3 if args.small else 3)

    dev = jax.devices()[0]
    head = (f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), python {platform.python_version()}, "
            f"efftheory {efftheory.__version__}, "
            + (f"neural-tangents {NT_VERSION}" if ntm is not None else "neural-tangents: skipped"))
    print(head)
    if ntm is None:
        print(f"neural-tangents not available ({NT_ERROR.splitlines()[0]}): timing efftheory alone")
    print(f"depth {depth}, n_0 = 16, median of {repeats} calls after one warm-up call (1 call when the "
          f"warm-up took > {SLOW_S:g} s)" + ("; ratio = efftheory / NT" if ntm is not None else ""))
    cols = f"{'activation':<16} {'N':>5} {'efftheory [s]':>14}"
    if ntm is not None:
        cols += f" {'NT [s]':>10} {'ratio':>7} {'|dK|/|K|':>10} {'|dTh|/|Th|':>11}"
    print(cols)
    print("-" * len(cols))

    rows = []
    t0 = time.perf_counter()
    for N in sizes:
        for label in CASES:
            if label.startswith("tanh") and N > args.numerical_max_n:
                rows.append(dict(activation=label, N=N, depth=depth,
                                 skipped=f"quadrature case not timed above N={args.numerical_max_n}"))
                print(f"{label:<16} {N:>5}  not timed: N > --numerical-max-n {args.numerical_max_n} "
                      "(~9 min a call on each side at N=1024 on 2 CPU cores)", flush=True)
                continue
            row = run_case(label, N, depth, repeats, args.deg)
            rows.append(row)
            line = f"{label:<16} {N:>5} {row['efftheory_s']:>14.4f}"
            if ntm is not None:
                line += (f" {row['nt_s']:>10.4f} {row['ratio']:>7.2f} {row['rel_diff_K']:>10.1e}"
                         f" {row['rel_diff_Theta']:>11.1e}")
            print(line, flush=True)
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s" + ("" if ntm is not None else "  (NT skipped)"))
    if ntm is not None and any("nt_deg" in r for r in rows):
        print(f"tanh: NT ElementwiseNumerical deg={args.deg} vs efftheory's own 2-d rule (target 1e-13); "
              "the rel. diff columns are NT's quadrature error (see efftheory.interop.neural_tangents.DEFAULT_DEG)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            benchmark="bench_infinite", header=head, jax=jax.__version__, device=str(dev.device_kind),
            platform=dev.platform, neural_tangents=NT_VERSION, nt_skipped=ntm is None,
            depth=depth, repeats=repeats, nt_deg=args.deg, total_s=total, rows=rows), indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
