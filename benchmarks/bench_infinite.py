"""Claim: efftheory.infinite_width is faster than neural-tangents' kernel_fn, at equal or better accuracy.

Times :func:`efftheory.infinite_width` against neural-tangents' (NT) ``kernel_fn`` of the equivalent
``stax`` network (``efftheory.interop.neural_tangents.stax_mlp``, jitted, last layer's nngp and ntk) on
the same inputs (N Gaussian inputs in n_0 = 16 dimensions, depth 10), interleaved in one process
(benchmarks/_common.py: median of >= 3 rounds, speedup = median of per-round NT time / our time).

Cases
  relu, erf            closed forms on both sides.  Ours twice: every layer (the default, L N^2
                       numbers per kernel) and ``layers="last"`` (what NT returns).
  tanh (callable)      a plain Python callable: efftheory's Mehler series (efftheory.gaussian._mehler) against
                       NT's ``stax.ElementwiseNumerical(fn, deg)`` (deg 25, NT's suggestion).
                       Accuracy of both against a high-order reference: the 2-d trapezoid rule of
                       efftheory.gaussian at twice its default node count, run on a subset of the inputs
                       (the infinite-width recursion is entrywise, so a subset's kernels are the
                       sub-blocks of the full ones).

Run in the NT environment, which has both (.ci/nt_env.sh):

    .venv-nt/bin/python benchmarks/bench_infinite.py [--small | --full] [--no-peers] [--json out.json]

Without neural-tangents (or with --no-peers) only efftheory is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import jax

import efftheory

jax.config.update("jax_enable_x64", True)  # a program, not the library: its float64 rows need 64-bit arrays
import jax.numpy as jnp
import numpy as np
from _common import interleaved, loadavg, machine, machine_line, ratio, summary_row, under_load

from efftheory import gaussian


def _tanh(z):
    return jnp.tanh(z)


_tanh.__name__ = "tanh_callable"

# label -> (activation passed to MLP, C_W, C_b)
CASES = {
    "relu": ("relu", 2.0, 0.0),
    "erf": ("erf", 1.8, 0.1),
    "tanh (callable)": (_tanh, 1.2, 0.05),
}
DEPTH = 10
N0 = 16


def load_nt(no_peers: bool):
    if no_peers:
        return None, None, "--no-peers"
    try:
        import neural_tangents as nt

        import efftheory.interop.neural_tangents as ntm
    except ImportError as e:
        return None, None, str(e).splitlines()[0]
    return ntm, nt.__version__, None


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def reference(net, x_sub):
    """Every layer's K and Theta on a few inputs by the 2-d rule at twice the default node count."""
    G = np.asarray(x_sub) @ np.asarray(x_sub).T / x_sub.shape[1]
    K, T = net.C_bs[0] + net.C_Ws[0] * G, net.lambda_bs[0] + net.lambda_Ws[0] * G
    Ks, Ts = [K], [T]
    for l in range(1, net.depth):
        order = 2 * gaussian.rule_size(net.sigma, float(np.max(np.diag(K))))
        S, dS = (np.asarray(v) for v in gaussian.pair_moments_quadrature(net.sigma, jnp.asarray(K), order=order))
        K, T = net.C_bs[l] + net.C_Ws[l] * S, net.lambda_bs[l] + net.lambda_Ws[l] * S + net.C_Ws[l] * dS * T
        Ks.append(K)
        Ts.append(T)
    return np.stack(Ks), np.stack(Ts)


def run_case(label, N, repeats, deg, ntm, n_ref=32, seed=0):
    act, C_W, C_b = CASES[label]
    net = efftheory.MLP(DEPTH, 512, act, C_W=C_W, C_b=C_b)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((N, N0)))
    closed = net.sigma.has_closed_form
    fns = {"ours": lambda: efftheory.infinite_width(net, x)}
    if closed:
        fns["ours_last"] = lambda: efftheory.infinite_width(net, x, layers="last")
    if ntm is not None:
        kf = jax.jit(ntm.stax_mlp(net, deg=deg)[2], static_argnames=("get",))
        fns["nt"] = lambda: kf(x, None, get=("nngp", "ntk"))
    timing = interleaved(fns, repeats)
    row = dict(activation=label, N=N, depth=DEPTH, repeats=max(3, repeats),
               timing={k: v for k, v in timing.items() if k != "_rounds"})
    ours = efftheory.infinite_width(net, x)
    acc = {}
    if not closed:
        sub = np.sort(np.random.default_rng(1).choice(N, size=min(n_ref, N), replace=False))
        Kr, Tr = reference(net, np.asarray(x)[sub])
        ix = np.ix_(range(DEPTH), sub, sub)
        acc["ours_vs_reference"] = max(rel(np.asarray(ours.K)[ix], Kr), rel(np.asarray(ours.Theta)[ix], Tr))
        infos = []
        for l in range(DEPTH - 1):
            _, _, info = gaussian.pair_moments_mehler(net.sigma, ours.K[l], return_info=True)
            infos.append(dict(terms=info.terms, fallback_pairs=info.fallback_pairs, pairs=info.pairs))
        row["mehler_layers"] = infos
    if ntm is not None:
        k = fns["nt"]()
        row["speedup"] = ratio(timing, "nt", "ours")
        acc["ours_vs_nt"] = max(rel(ours.K[-1], k.nngp), rel(ours.Theta[-1], k.ntk))
        if closed:
            row["speedup_last"] = ratio(timing, "nt", "ours_last")
        else:
            Kn, Tn = np.asarray(k.nngp)[np.ix_(sub, sub)], np.asarray(k.ntk)[np.ix_(sub, sub)]
            acc["nt_vs_reference"] = max(rel(Kn, Kr[-1]), rel(Tn, Tr[-1]))
            row["nt_deg"] = deg
    row["accuracy"] = acc
    return row


def summaries(rows, peer):
    out = []
    for r in rows:
        t = r["timing"]
        label = f"K, Theta, {r['activation']}, N = {r['N']}, depth {r['depth']}"
        if "ours_last" in t:
            target = ">= 2x (closed form)"
            out.append(summary_row("bench_infinite", label + ", every layer", t["ours"]["median_s"], peer=peer,
                                   peer_s=t.get("nt", {}).get("median_s"), speedup=r.get("speedup"),
                                   target=target, accuracy=r["accuracy"]))
            out.append(summary_row("bench_infinite", label + ", last layer (as NT)", t["ours_last"]["median_s"],
                                   peer=peer, peer_s=t.get("nt", {}).get("median_s"),
                                   speedup=r.get("speedup_last"), target=target, accuracy=r["accuracy"]))
        else:
            out.append(summary_row(
                "bench_infinite", label + ", every layer", t["ours"]["median_s"],
                peer=None if peer is None else f"{peer} ElementwiseNumerical(deg={r.get('nt_deg')})",
                peer_s=t.get("nt", {}).get("median_s"), speedup=r.get("speedup"),
                target=">= 50x, error <= 1e-8", accuracy=r["accuracy"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="efftheory.infinite_width vs neural-tangents kernel_fn")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CI smoke size: N = 256 (closed forms), 64 (tanh)")
    size.add_argument("--full", action="store_true", help="N = 1024 for every case (NT's tanh: minutes a call)")
    p.add_argument("--no-peers", action="store_true", help="time efftheory only, even if NT is importable")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median; at least 3)")
    p.add_argument("--deg", type=int, default=25, help="Gauss-Hermite degree of NT's ElementwiseNumerical")
    p.add_argument("--sizes", type=int, nargs=2, metavar=("N_CLOSED", "N_TANH"), help="override the N values")
    p.add_argument("--cases", nargs="+", choices=("relu", "erf", "tanh"), help="run only these cases")
    args = p.parse_args(argv)

    if args.sizes:
        n_closed, n_tanh = args.sizes
    elif args.small:
        n_closed, n_tanh = 256, 64
    elif args.full:
        n_closed, n_tanh = 1024, 1024
    else:
        n_closed, n_tanh = 1024, 256
    ntm, nt_version, nt_error = load_nt(args.no_peers)
    peer = None if ntm is None else f"neural-tangents {nt_version} kernel_fn"
    mach = machine()
    load0 = loadavg()
    print(machine_line(mach) + f", efftheory {efftheory.__version__}, "
          + (peer or f"neural-tangents skipped ({nt_error})"))
    print(f"depth {DEPTH}, n_0 = {N0}, interleaved rounds, median of >= {max(3, args.repeats)}; "
          "speedup = NT time / our time")
    rows = []
    t0 = time.perf_counter()
    for label in CASES:
        if args.cases and label.split()[0] not in args.cases:
            continue
        N = n_tanh if label.startswith("tanh") else n_closed
        row = run_case(label, N, args.repeats, args.deg, ntm)
        rows.append(row)
        t = row["timing"]
        line = f"{label:<16} N={N:>5}  ours {t['ours']['median_s']:9.4f} s"
        if "ours_last" in t:
            line += f"  (last layer {t['ours_last']['median_s']:.4f} s)"
        if "nt" in t:
            line += f"  NT {t['nt']['median_s']:9.4f} s  speedup {row['speedup']:6.1f}x"
            if "speedup_last" in row:
                line += f" ({row['speedup_last']:.1f}x last layer)"
        line += "  " + ", ".join(f"{k} {v:.1e}" for k, v in row["accuracy"].items())
        print(line, flush=True)
    load1 = loadavg()
    total = time.perf_counter() - t0
    loaded = under_load(load0, load1)
    print(f"total {total:.1f} s" + (f"; timings taken under load (1-min load average {load0:.1f} -> {load1:.1f} on "
                                    f"{mach['cores']} cores)" if loaded else ""))
    result = dict(benchmark="bench_infinite", machine=mach, neural_tangents=nt_version, nt_skipped=ntm is None,
                  depth=DEPTH, nt_deg=args.deg, total_s=total, loadavg=[load0, load1], under_load=loaded,
                  rows=rows, summary=summaries(rows, peer))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
