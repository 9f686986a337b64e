"""Benchmark of efftheory.empirical: ensemble throughput and the exact NTK, against peers measured in the same run.

Reports
  * this machine's plain matmul throughput (FLOP/s of a large jnp matmul, float32 and float64) and its
    standard-normal generation rate (jax.random.normal, threefry): the two ceilings of ensemble sampling;
  * networks sampled per second (metric + four-point statistics) at a few widths, for the "weights" and
    "conditional" methods, with the achieved fraction of the matmul ceiling (forward-pass FLOPs counted)
    and of the normal-generation ceiling (normals drawn per network counted);
  * ``efftheory.empirical.ntk`` (layer structure) against the autodiff NTK (jax.jacrev), and, when run
    with neural-tangents importable (``.venv-nt/bin/python``), against ``nt.empirical_ntk_fn``.

Usage:
  python benchmarks/bench_empirical.py [--small | --full] [--no-peers] [--json results.json]
  .venv-nt/bin/python benchmarks/bench_empirical.py --small      # adds the neural-tangents comparison

``--small`` is the CI smoke run (well under 30 s).  The NTK comparisons are interleaved rounds, median
of >= 3 (benchmarks/_common.py); speedup = peer time / our time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax

jax.config.update("jax_enable_x64", True)  # a program, not the library: its float64 rows need 64-bit arrays
import jax.numpy as jnp
import numpy as np
from _common import interleaved, loadavg, machine, machine_line, ratio, summary_row, under_load

import efftheory
from efftheory import empirical as E


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (already warmed up), results blocked on."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_flops(n: int, dtype, repeats: int) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    return 2.0 * n**3 / best_time(lambda: f(a, b), repeats)


def normals_per_second(count: int, dtype, repeats: int) -> float:
    f = jax.jit(lambda k: jax.random.normal(k, (count,), dtype))
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(f(key))
    return count / best_time(lambda: f(key), repeats)


def ensemble_rows(widths, depth, N, M, methods, dtypes, flops, normals, repeats):
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (N, N)))
    rows = []
    for n in widths:
        net = efftheory.MLP(depth, n, "tanh", C_W=1.0)
        sizes = (N,) + net.widths
        fwd_flops = 2.0 * N * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        for method in methods:
            per_net_normals = (sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) if method == "weights"
                               else sum(min(N, a) * b + b for a, b in zip(sizes[:-1], sizes[1:])))
            # about 2e8 normals per timed run (at most M networks, at least one chunk)
            chunk0 = E.default_chunk(net, N, N, ("metric", "four_point"), method, jnp.float32)
            m_run = int(min(M, max(chunk0, 2e8 // per_net_normals)))
            for dtype in dtypes:
                name = np.dtype(dtype).name
                kw = dict(statistics=("metric", "four_point"), method=method, dtype=dtype, progress=False)
                chunk = min(E.default_chunk(net, N, N, kw["statistics"], method, dtype), m_run)
                t0 = time.perf_counter()
                E.sample_ensemble(net, x, chunk, 0, chunk=chunk, **kw)  # compile
                compile_s = time.perf_counter() - t0
                t = best_time(lambda: E.sample_ensemble(net, x, m_run, 1, chunk=chunk, **kw).stats["zz"], repeats)
                rate = m_run / t
                rows.append({
                    "width": n, "depth": depth, "inputs": N, "method": method, "dtype": name, "networks": m_run,
                    "chunk": chunk, "seconds": t, "compile_seconds": compile_s, "networks_per_second": rate,
                    "forward_flops_per_network": fwd_flops,
                    "matmul_fraction": rate * fwd_flops / flops[name],
                    "normals_per_network": per_net_normals,
                    "normal_rate_fraction": rate * per_net_normals / normals[name],
                })
                r = rows[-1]
                print(f"  n={n:5d} {method:11s} {name:7s}: {rate:10.0f} networks/s  "
                      f"(matmul {100 * r['matmul_fraction']:.3f}% of peak, "
                      f"normals {100 * r['normal_rate_fraction']:.0f}% of jax.random.normal; compile {compile_s:.1f} s)")
    return rows


def nt_ntk(net, params, x, no_peers=False):
    """neural-tangents' empirical NTK of the same network (its 'ntk' parameterization), or None."""
    if no_peers:
        return None
    try:
        import neural_tangents as nt
        from neural_tangents import stax
    except ImportError:
        return None
    layers = []
    for l in range(net.depth):
        layers.append(stax.Dense(net.widths[l], W_std=float(np.sqrt(net.C_Ws[l])), b_std=float(np.sqrt(net.C_bs[l]))
                                 if net.C_bs[l] > 0 else None))
        if l + 1 < net.depth:
            layers.append(stax.Relu())
    _, apply_fn, _ = stax.serial(*layers)
    n_in = (x.shape[1],) + net.widths[:-1]
    nt_params = []
    for l, layer in enumerate(params):
        W = np.asarray(layer["W"]).T / np.sqrt(net.C_Ws[l] / n_in[l])
        if net.C_bs[l] > 0:
            nt_params.append((jnp.asarray(W), jnp.asarray(np.asarray(layer["b"]) / np.sqrt(net.C_bs[l]))))
        else:
            nt_params.append((jnp.asarray(W), None))
        if l + 1 < net.depth:
            nt_params.append(())
    fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0))
    return lambda: fn(x, None, nt_params)[:, :, 0, 0]


def ntk_rows(N, width, depth, dtypes, repeats, no_peers=False):
    rows = []
    net = efftheory.MLP(depth, width, "relu", C_W=2.0, C_b=0.1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(N, width)))
    for dtype in dtypes:
        name = np.dtype(dtype).name
        params = E.init_params(net, jax.random.PRNGKey(0), width, dtype)
        xd = x.astype(dtype)
        lr = E.learning_rates(net, width)

        def apply_fn(p, x):
            return E.apply(net, p, x)

        fns = {"ntk": lambda: E.ntk(net, params, xd),
               "autodiff": lambda: E.ntk_autodiff(apply_fn, params, xd, learning_rates=lr)}
        nt_fn = nt_ntk(net, params, xd, no_peers)
        if nt_fn is not None:
            fns["nt"] = nt_fn
        timing = interleaved(fns, repeats)
        H, Ha = fns["ntk"](), fns["autodiff"]()
        rel = float(jnp.max(jnp.abs(H - Ha)) / jnp.max(jnp.abs(Ha)))
        t_layer, t_auto = timing["ntk"]["median_s"], timing["autodiff"]["median_s"]
        row = {"inputs": N, "width": width, "depth": depth, "dtype": name, "ntk_seconds": t_layer,
               "autodiff_seconds": t_auto, "speedup_vs_autodiff": ratio(timing, "autodiff", "ntk"),
               "max_rel_diff_autodiff": rel}
        if nt_fn is not None:
            Hn = nt_fn()
            row["nt_seconds"] = timing["nt"]["median_s"]
            row["speedup_vs_nt"] = ratio(timing, "nt", "ntk")
            row["max_rel_diff_nt"] = float(jnp.max(jnp.abs(H - Hn)) / jnp.max(jnp.abs(Hn)))
        rows.append(row)
        msg = (f"  N={N} n={width} L={depth} {name}: ntk {1e3 * t_layer:.1f} ms, autodiff {1e3 * t_auto:.1f} ms "
               f"({row['speedup_vs_autodiff']:.0f}x), rel diff {rel:.1e}")
        if "nt_seconds" in row:
            msg += (f"; neural-tangents {1e3 * row['nt_seconds']:.1f} ms ({row['speedup_vs_nt']:.0f}x), "
                    f"rel diff {row['max_rel_diff_nt']:.1e}")
        print(msg)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CI smoke run (< 30 s)")
    size.add_argument("--full", action="store_true", help="the full sizes (the default)")
    ap.add_argument("--no-peers", action="store_true", help="skip neural-tangents even if importable")
    ap.add_argument("--json", help="write the results to this path")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    small = args.small
    reps = 3
    mach = machine()
    load0 = loadavg()
    print(machine_line(mach))

    mm_n = 512 if small else 2048
    flops = {np.dtype(d).name: matmul_flops(mm_n, d, reps) for d in (jnp.float32, jnp.float64)}
    normals = {np.dtype(d).name: normals_per_second(2**20 if small else 2**24, d, reps)
               for d in (jnp.float32, jnp.float64)}
    print(f"matmul {mm_n}^3: {flops['float32'] / 1e9:.1f} GFLOP/s float32, {flops['float64'] / 1e9:.1f} GFLOP/s float64;"
          f" jax.random.normal: {normals['float32'] / 1e6:.0f} M/s float32, {normals['float64'] / 1e6:.0f} M/s float64")

    print("ensembles (tanh, metric + four-point statistics):")
    if small:
        ens = ensemble_rows([64], 3, 4, 2048, ("weights", "conditional"), (jnp.float32,), flops, normals, 1)
    else:
        ens = ensemble_rows([32, 128, 512], 4, 4, 8192, ("weights", "conditional"), (jnp.float32, jnp.float64),
                            flops, normals, 2)

    print("exact NTK (relu, output neuron 0):")
    ntk = ntk_rows(32, 128, 3, (jnp.float64,), reps, args.no_peers) if small else \
        ntk_rows(128, 512, 5, (jnp.float32, jnp.float64), reps, args.no_peers)
    load1 = loadavg()
    loaded = under_load(load0, load1)
    summary = []
    for r in ntk:
        peer = "neural-tangents empirical_ntk_fn" if "nt_seconds" in r else None
        summary.append(summary_row(
            "bench_empirical", f"empirical NTK, N = {r['inputs']}, width {r['width']}, depth {r['depth']}, {r['dtype']}",
            r["ntk_seconds"], peer=peer, peer_s=r.get("nt_seconds"), speedup=r.get("speedup_vs_nt"),
            target=">= 20x", accuracy={"ours_vs_autodiff": r["max_rel_diff_autodiff"],
                                       **({"ours_vs_nt": r["max_rel_diff_nt"]} if peer else {})}))
    results = {
        "benchmark": "bench_empirical", "small": small, "machine": mach, "jax": jax.__version__,
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
        "python": platform.python_version(), "matmul_size": mm_n, "matmul_flops_per_second": flops,
        "normals_per_second": normals, "ensembles": ens, "ntk": ntk, "total_seconds": time.perf_counter() - t_start,
        "loadavg": [load0, load1], "under_load": loaded, "summary": summary,
    }
    print(f"total {results['total_seconds']:.1f} s" + (f"; timings taken under load (1-min load average "
                                                        f"{load0:.1f} -> {load1:.1f})" if loaded else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
