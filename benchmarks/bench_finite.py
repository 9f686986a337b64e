"""Time of the first-order finite-width tensors (all of G1, V, H1, A, B, D, F) against N and depth.

    python benchmarks/bench_finite.py [--small] [--full] [--ns N ...] [--depths L ...]
                                      [--acts tanh relu] [--relu-max-n N] [--no-peers] [--json PATH]
                                      [--memory BYTES] [--store DIR]

Reports cold (with JAX compilation) and warm times for tanh and relu MLPs on N random inputs
(normal, 4 dimensions); --full adds N = 16 (the issue's target size), and --ns 32 --depths 10
--acts tanh the second target.  relu (kinked: isotropic 32^4 / 96^3 rules, ~100x the work of
tanh per set) runs only up to N = --relu-max-n (default 4).  Prints the scaling exponent in N
fitted from the warm times, and per depth the warm time per layer.
No peer computes these tensors (neural-tangents has no finite-width corrections); the comparison
is with sampling.  For every row with N <= --sampling-max-n (default 4) it samples M = --sampling-networks
networks of width 64 (efftheory.empirical.sample_ensemble, float64, statistic four_point), times them, and
extrapolates (standard error ~ 1/sqrt(M)) how many networks, and how much time, it takes for the standard
error of every entry of V_hat in the last hidden layer to reach 1% of max |V| (and the theory's tol, 1e-9): the ratio
printed is that sampling time over the theory's warm time.  It is a lower bound on the cost of measuring
V: V_hat at one width also carries an O(1/n) bias, which only a width sweep removes.
--no-peers is accepted for benchmarks/run_all.py's uniform command line.
--memory BYTES and --store DIR pass finite_width's memory budget and on-disk results through (docs/scaling.md,
"Finite width: memory"); every row prints the process's peak RSS so far (it only grows from row to row).
Devices: one CPU device unless EFFTHEORY_CPU_DEVICES=n|all is set (efftheory/__init__.py); the header
says how many ran.  "cold" is the first call of its shape in this process: rows after the first reuse
kernels compiled for earlier rows, so only the first row's cold time is a fresh process's.
Time to the first result (issue #22): unless --small or --no-first-call, every row also runs its call in
fresh child processes: "first" with an empty compilation cache (EFFTHEORY_COMPILE_CACHE=off and an
empty XDG_CACHE_HOME), "cached" in a third process after a second one filled a cache
(EFFTHEORY_COMPILE_CACHE=<fresh directory>; --no-cached skips both), each with the number of XLA
programs the call compiled (JAX's backend-compile events: cache hits are not compiles).
    python benchmarks/bench_finite.py --child ACT DEPTH N   prints {"first_s", "programs", ...} (one row)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import numpy as np
from _common import loadavg, machine, machine_line, summary_row, under_load

import efftheory as et
from efftheory import empirical

SAMPLING_WIDTH = 64
PRECISIONS = (1e-2, 1e-9)   # relative standard error of V_hat (last hidden layer) to reach: 1% and the theory's tol


def sampling_cost(net, x, fw, n_networks: int):
    """Time to sample ``n_networks`` networks and the networks/time needed per relative precision of V."""
    sample = lambda: empirical.sample_ensemble(net, x, n_networks, seed=0, statistics=("four_point",),
                                               progress=False)
    sample()                                                           # compile
    ens, t = timed(sample)
    # the last hidden layer (the output layer has one neuron: no cross-neuron pairs to estimate V from)
    # four_point is the statistic at width n (V/n): times n_{L-2} for the standard error of V itself
    se = float(ens.fan_in[-2]) * np.asarray(empirical.four_point(ens).stderr)[-2]
    scale = float(np.max(np.abs(np.asarray(fw.V)[-2])))
    worst = float(np.nanmax(se))
    out = {"networks": n_networks, "time_s": t, "V_scale": scale, "stderr_max": worst}
    for eps in PRECISIONS:
        need = n_networks * (worst / (eps * scale)) ** 2
        out[f"networks_for_{eps:g}"] = need
        out[f"time_for_{eps:g}_s"] = t * need / n_networks
    return out


def peak_rss() -> int:
    """The process's peak resident memory in bytes so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


CHILD_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import jax.monitoring as mon
# programs compiled: backend compilations (the event also fires for a program loaded from a cache) less cache hits
count = [0]
mon.register_event_duration_secs_listener(
    lambda name, secs, **kw: count.__setitem__(0, count[0] + 1) if name.endswith("backend_compile_duration") else None)
mon.register_event_listener(lambda name, **kw: count.__setitem__(0, count[0] - 1) if name.endswith("cache_hits") else None)
import numpy as np
import efftheory as et
act, L, N, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
x = np.random.default_rng(N).normal(size=(N, 4))  # as the parent's rows
net = et.MLP(L, 64, act, C_W=1.0 if act == "tanh" else 2.0)
imp = time.perf_counter() - t0
t = time.perf_counter(); fw = et.finite_width(net, x); np.asarray(fw.V); first = time.perf_counter() - t
out = {"import_s": imp, "first_s": first, "programs": count[0]}
if warm:
    c = count[0]
    t = time.perf_counter(); fw = et.finite_width(net, x); np.asarray(fw.V); out["warm_s"] = time.perf_counter() - t
    out["warm_programs"] = count[0] - c
print(json.dumps(out))
"""


def fresh_call(act: str, L: int, N: int, cache: str | None = None, warm: bool = False) -> dict:
    """finite_width's first call in a fresh Python process: the compilation cache off and an empty
    XDG_CACHE_HOME (cache None), or efftheory's cache in ``cache``."""
    import subprocess
    import tempfile

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as xdg:
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
        env.update(EFFTHEORY_COMPILE_CACHE=cache or "off", XDG_CACHE_HOME=xdg,
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run([sys.executable, "-c", CHILD_CODE, act, str(L), str(N), "1" if warm else "0"],
                              env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"fresh process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_calls(act: str, L: int, N: int, cached: bool) -> dict:
    """{"first_s", "programs"} of a fresh process with an empty cache and, with ``cached``,
    {"cached_s", "cached_programs"} of a fresh process after another one filled a cache."""
    import tempfile

    out = fresh_call(act, L, N)
    res = {"first_s": out["first_s"], "programs": out["programs"], "child_import_s": out["import_s"]}
    if cached:
        with tempfile.TemporaryDirectory() as cache:
            fresh_call(act, L, N, cache=cache)  # fills it
            again = fresh_call(act, L, N, cache=cache)
        res.update(cached_s=again["first_s"], cached_programs=again["programs"])
    return res


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        act, L, N = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(fresh_call(act, L, N, warm=True)))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", action="store_true", help="CI smoke size")
    ap.add_argument("--full", action="store_true", help="include N = 16, depth 10")
    ap.add_argument("--no-peers", action="store_true", help="accepted and ignored (no peer exists)")
    ap.add_argument("--ns", type=int, nargs="+", help="override the numbers of inputs N")
    ap.add_argument("--depths", type=int, nargs="+", help="override the depths")
    ap.add_argument("--acts", nargs="+", default=["tanh", "relu"], choices=["tanh", "relu"], help="activations")
    ap.add_argument("--relu-max-n", type=int, default=4, help="largest N for relu")
    ap.add_argument("--sampling-max-n", type=int, default=4, help="largest N compared with sampling")
    ap.add_argument("--sampling-networks", type=int, default=None, help="networks sampled (default 2000; 200 --small)")
    ap.add_argument("--memory", type=float, default=None,
                    help="finite_width(memory=): a budget in bytes for efftheory's arrays")
    ap.add_argument("--store", default=None,
                    help="finite_width(store=): keep results on disk, in a fresh subfolder per row")
    ap.add_argument("--no-first-call", action="store_true",
                    help="skip the first calls in fresh processes (the default with --small)")
    ap.add_argument("--no-cached", action="store_true", help="skip the fresh process with a filled cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    mach, load0, t0 = machine(), loadavg(), time.perf_counter()
    Ns = (1, 2) if args.small else (2, 4, 8) + ((16,) if args.full else ())
    depths = (3,) if args.small else (3, 10)
    Ns, depths = tuple(args.ns or Ns), tuple(args.depths or depths)
    print(machine_line(mach), flush=True)
    print(f"compilation cache: {jax.config.jax_compilation_cache_dir or 'off'}", flush=True)
    first = not (args.small or args.no_first_call)
    rows = []
    for act, C_W in (("tanh", 1.0), ("relu", 2.0)):
        if act not in args.acts:
            continue
        for L in depths:
            for N in Ns:
                if act == "relu" and N > max(args.relu_max_n, 2 if args.small else 0):
                    continue
                x = np.random.default_rng(N).normal(size=(N, 4))  # the same inputs for every depth and run
                net = et.MLP(L, 64, act, C_W=C_W)
                def run(tag):
                    store = os.path.join(args.store, f"{act}_L{L}_N{N}_{tag}_{os.getpid()}") if args.store else None
                    return et.finite_width(net, x, memory=args.memory, store=store)

                _, cold = timed(lambda: run("cold"))
                fw, warm = timed(lambda: run("warm"))
                rss = peak_rss()
                row = dict(activation=act, depth=L, N=N, cold_s=cold, warm_s=warm, peak_rss_bytes=rss)
                print(f"{act:5s} depth {L:2d} N {N:2d}: cold {cold:7.2f} s  warm {warm:7.2f} s  "
                      f"(process peak RSS so far {rss / 2**30:.2f} GiB)", flush=True)
                if first:
                    row.update(first_calls(act, L, N, cached=not args.no_cached))
                    print(f"      fresh process, empty cache: first call {row['first_s']:.2f} s, "
                          f"{row['programs']} programs compiled"
                          + (f"; filled cache: {row['cached_s']:.2f} s, {row['cached_programs']} compiled"
                             if "cached_s" in row else ""), flush=True)
                if N <= args.sampling_max_n:
                    M = args.sampling_networks or (200 if args.small else 2000)
                    c = sampling_cost(net.with_width(SAMPLING_WIDTH), x, fw, M)
                    row["sampling"] = c
                    print(f"      sampling {M} networks (width {SAMPLING_WIDTH}): {c['time_s']:.2f} s, largest "
                          f"standard error of V_hat (last hidden layer) {c['stderr_max'] / c['V_scale']:.2%} of max|V|; "
                          + "; ".join(f"to {eps:g}: {c[f'networks_for_{eps:g}']:.2g} networks, "
                                      f"{c[f'time_for_{eps:g}_s']:.2g} s = {c[f'time_for_{eps:g}_s'] / warm:.2g}x "
                                      "the theory" for eps in PRECISIONS), flush=True)
                rows.append(row)
    for act in args.acts:
        for L in depths:
            pts = [(r["N"], r["warm_s"]) for r in rows if r["activation"] == act and r["depth"] == L and r["N"] > 1]
            if len(pts) >= 2:
                slope = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
                print(f"{act} depth {L}: warm time ~ N^{slope:.2f}")
        for N in Ns:
            pts = [(r["depth"], r["warm_s"]) for r in rows if r["activation"] == act and r["N"] == N]
            if len(pts) >= 2:
                (l0, t0), (l1, t1) = min(pts), max(pts)
                print(f"{act} N {N}: warm time per added layer {(t1 - t0) / (l1 - l0):.3f} s (depth {l0} -> {l1})")
    load1 = loadavg()
    summary = [summary_row("bench_finite", f"all first-order tensors, {r['activation']}, depth {r['depth']}, "
                           f"N = {r['N']}", r["warm_s"],
                           note=(f"first call of a fresh process {r['first_s']:.2f} s ({r['programs']} programs compiled)"
                                 + (f", with a filled cache {r['cached_s']:.2f} s" if "cached_s" in r else "")
                                 + "; " if "first_s" in r else "") + f"cold {r['cold_s']:.2f} s (with compilation)"
                           + (f"; sampling width-64 networks to a 1% standard error on V: "
                              f"{r['sampling']['time_for_0.01_s']:.3g} s "
                              f"({r['sampling']['time_for_0.01_s'] / r['warm_s']:.3g}x)" if "sampling" in r else ""))
               for r in rows if r["N"] == max(x["N"] for x in rows if x["activation"] == r["activation"])]
    loaded = under_load(load0, load1)
    if loaded:
        print(f"timings taken under load (1-min load average {load0:.1f} -> {load1:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_finite", "machine": mach, "rows": rows, "summary": summary,
                       "loadavg": [load0, load1], "under_load": loaded, "total_s": time.perf_counter() - t0},
                      f, indent=1)


if __name__ == "__main__":
    main()
