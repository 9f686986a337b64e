"""Wall time of the work efftheory splits over processes, in 1 and 2 local processes (issue #27).

    python benchmarks/bench_distributed.py [--processes 1 2] [--n 24] [--depth 4] [--networks 200000]
                                           [--json PATH] [--small]

Two cases, each run in P fresh local processes on 127.0.0.1 (the same start as ``efftheory launch``,
EFFTHEORY_* variables, jax.distributed):

* ``sources``: :func:`efftheory.finite_width` of a tanh MLP of depth --depth on --n random inputs
  (normal, 4 dimensions): "cold" is the first call in the process (JAX compilation included), "warm"
  a second call;
* ``sample``: :func:`efftheory.empirical.sample_ensemble` of --networks tanh networks (depth 3,
  width 32, 2 inputs, metric and four-point statistics, float32): "cold" the first call, "warm" a
  second one.

Every timed call starts after a barrier of all processes and ends when process 0 holds the whole
result (the exchange through the coordinator's key-value store included).  The parallel efficiency
is t_1 / (P t_P).  The 1-minute load average is recorded beside every case (the machine has
``os.cpu_count()`` cores; other work on it slows both sides).  Writes
benchmarks/results/distributed-<date>.json unless --json says otherwise.
    python benchmarks/bench_distributed.py --child CASE ...   one process of one case (internal)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))


def _child(case: str, args) -> None:
    from efftheory import distributed

    distributed.initialize()
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import efftheory as et
    from efftheory import empirical

    if case == "sources":
        net = et.MLP(depth=args.depth, width=64, activation="tanh", C_W=1.5, C_b=0.1)
        x = np.random.default_rng(0).normal(size=(args.n, 4))

        def call():
            return et.finite_width(net, x).V
    else:
        net = et.MLP(depth=3, width=32, activation="tanh", C_W=1.5, C_b=0.1)
        x = np.random.default_rng(0).normal(size=(2, 8))

        def call():
            return empirical.sample_ensemble(net, x, args.networks, seed=0, statistics=("metric", "four_point"),
                                             dtype="float32", progress=False).stats["zz"]
    times = []
    for i in range(2):
        distributed.barrier(f"bench{i}")
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    if distributed.process_index() == 0:
        print(json.dumps({"cold_s": times[0], "warm_s": times[1], "shape": list(np.shape(out)),
                          "checksum": float(np.nansum(np.asarray(out, np.float64)))}), flush=True)


def run_case(case: str, P: int, args) -> dict:
    from efftheory import launch

    port = launch.free_port()
    extra = ["--n", str(args.n), "--depth", str(args.depth), "--networks", str(args.networks)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", case, *extra],
                              env=launch.child_env(os.environ, f"127.0.0.1:{port}", P, i, 60.0) if P > 1 else
                              {k: v for k, v in os.environ.items() if not k.startswith("EFFTHEORY_")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(P)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    for p, (_, e) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{case} with {P} processes failed:\n{e[-3000:]}")
    row = json.loads(outs[0][0].strip().splitlines()[-1])
    row.update(case=case, processes=P, process_wall_s=wall, load_before=load0, load_after=os.getloadavg()[0])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--networks", type=int, default=200_000)
    p.add_argument("--cases", nargs="+", default=["sources", "sample"], choices=["sources", "sample"])
    p.add_argument("--small", action="store_true", help="N = 8, depth 3, 20000 networks")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.n, args.depth, args.networks = 8, 3, 20000
    if args.child:
        _child(args.child, args)
        return 0
    rows = []
    for case in args.cases:
        for P in args.processes:
            row = run_case(case, P, args)
            rows.append(row)
            print(f"{case:8s} P={P}: cold {row['cold_s']:7.2f} s  warm {row['warm_s']:7.2f} s  (processes "
                  f"{row['process_wall_s']:.1f} s, load {row['load_before']:.2f} -> {row['load_after']:.2f})",
                  flush=True)
    for case in args.cases:
        base = next((r for r in rows if r["case"] == case and r["processes"] == 1), None)
        for r in rows:
            if base is not None and r["case"] == case and r["processes"] > 1:
                for k in ("cold", "warm"):
                    r[f"efficiency_{k}"] = base[f"{k}_s"] / (r["processes"] * r[f"{k}_s"])
                    r[f"speedup_{k}"] = base[f"{k}_s"] / r[f"{k}_s"]
                assert r["checksum"] == base["checksum"] or case == "sources", "results differ from one process"
                print(f"{case:8s} P={r['processes']}: speed-up warm {r['speedup_warm']:.2f}x (efficiency "
                      f"{r['efficiency_warm']:.2f}), cold {r['speedup_cold']:.2f}x ({r['efficiency_cold']:.2f})")
    import platform

    out = {"benchmark": "bench_distributed", "date": datetime.date.today().isoformat(),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "settings": {"n": args.n, "depth": args.depth, "networks": args.networks}, "rows": rows}
    path = args.json or os.path.join(HERE, "results", f"distributed-{out['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
