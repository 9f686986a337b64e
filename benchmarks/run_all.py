"""Run every benchmark, collect the ratios against the peers, write one JSON and print a markdown table.

    python benchmarks/run_all.py [--small | --full] [--no-peers] [--only NAME ...] [--json PATH] [--markdown PATH]
    python benchmarks/run_all.py --from-json results/latest.json [--spread run1.json run2.json ...] --markdown RESULTS.md

--small (the default; ``make bench``) is the CI smoke size, a few minutes on 2 cores with the
neural-tangents peer; --full the sizes the README quotes (N = 1024: NT's numerical tanh alone takes minutes
a call; the finite-width tensors at N = 2 and 4, depths 3 and 10).  The result goes to benchmarks/results/latest.json:
the machine (CPU model, cores, jax version
of each environment, load average), every benchmark's own JSON, and the summary table.

Peers.  neural-tangents needs jax < 0.6 and lives in its own environment (.ci/nt_env.sh builds
.venv-nt, with efftheory installed editable).  A benchmark that has a peer (bench_infinite,
bench_empirical) therefore runs under .venv-nt/bin/python when that environment has neural-tangents,
so that both sides are timed in one process, interleaved; otherwise (or with --no-peers) it runs under
this interpreter and times efftheory alone.  bench_finite has no peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NT_PYTHON = ROOT / ".venv-nt" / "bin" / "python"
DEFAULT_JSON = HERE / "results" / "latest.json"
DEFAULT_MD = HERE / "RESULTS.md"

# name -> has a neural-tangents peer
BENCHMARKS = {"bench_infinite": True, "bench_empirical": True, "bench_finite": False}

sys.path.insert(0, str(HERE))


def nt_python() -> str | None:
    """.venv-nt's interpreter if it exists and has neural_tangents (found without importing TensorFlow)."""
    if not NT_PYTHON.exists():
        return None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('neural_tangents') is None)"
    try:
        ok = subprocess.run([str(NT_PYTHON), "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return str(NT_PYTHON) if ok else None


def run_one(name: str, python: str, size: str, no_peers: bool, timeout: float, extra=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = ([python, str(HERE / f"{name}.py"), size, "--json", str(out)] + (["--no-peers"] if no_peers else [])
               + list(extra))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        print(f"\n=== {name} ({Path(python).parent.parent.name if python != sys.executable else 'this python'}"
              f", {size}{', no peers' if no_peers else ''})", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout.splitlines():
            if not line.startswith(("I0000", "WARNING: All log messages", "E0000")):
                print("  " + line)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        data = json.loads(out.read_text())
        data["wall_s"] = time.perf_counter() - t0
        data["python"] = python
        return data


def _fmt_s(t) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_acc(acc: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.0e}" for k, v in acc.items()) or "-"


def table(rows) -> str:
    lines = ["| what | efftheory | peer (same run) | speedup | target | accuracy (max rel. diff.) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peer = "-" if r["peer"] is None else f"{r['peer']} {_fmt_s(r['peer_s'])}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        ours = _fmt_s(r["ours_s"]) + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['case']} | {ours} | {peer} | {speed} | {r['target'] or '-'} | {_fmt_acc(r['accuracy'])} |")
    return "\n".join(lines)


def _speedups(data: dict) -> dict:
    """case -> speedup of one run_all (or single-benchmark) JSON."""
    rows = data.get("table") or data.get("summary") or []
    return {r["case"]: r["speedup"] for r in rows if r.get("speedup") is not None}


def markdown(out: dict, spread=()) -> str:
    """benchmarks/RESULTS.md: when, where, under what load, and the table (README "Speed" section).
    ``spread``: further JSONs (run_all's or a single benchmark's) whose speedups give a min..max column."""
    m = out["machine"]
    envs = ", ".join(f"{v} ({Path(k).parent.parent.name})" for k, v in m.get("jax_by_interpreter", {}).items())
    lr = out.get("loadavg_range")
    lines = [
        "# Benchmarks: efftheory against its peers",
        "",
        f"Measured {out['created']} at commit `{(out.get('git_commit') or '?')[:10]}` by "
        f"`benchmarks/run_all.py --{out['mode']}` on {m['cpu']}, {m['cores']} cores, {m['backend']} backend, "
        f"jax {envs or m['jax']}.",
        "",
        ("1-minute load average during the run: "
         f"{lr[0]:.1f} .. {lr[1]:.1f} on {m['cores']} cores (other jobs shared the machine): absolute times are "
         "inflated and noisy; every speedup is the median of per-round ratios of interleaved calls in one process, "
         "so load hits both sides of a ratio alike." if lr else "Load average not recorded."),
        "",
        table(out["table"]),
    ]
    runs = [_speedups(out)] + [_speedups(d) for d in spread]
    if spread:
        lines += ["", f"Spread of the speedups over up to {len(runs)} runs (this one and {len(spread)} more, same "
                  "machine, taken the same day under varying load):", "", "| what | speedup min .. max | runs |",
                  "|---|---|---|"]
        for case in _speedups(out):
            vals = [r[case] for r in runs if case in r]
            lines.append(f"| {case} | {min(vals):.1f}x .. {max(vals):.1f}x | {len(vals)} |")
    lines += ["", "Accuracy: max relative difference (max |a - b| / max |b|) over every stored entry; "
              "the reference of the callable case is the 2-d Gauss rule of efftheory.gaussian at twice its "
              "default order, on 32 of the inputs.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CI smoke sizes (the default)")
    size.add_argument("--full", action="store_true", help="the README's sizes (tens of minutes with the peers)")
    size.add_argument("--smoke", action="store_true", help="--small with the smallest N (tests/test_benchmarks.py)")
    ap.add_argument("--no-peers", action="store_true", help="time efftheory only, under this interpreter")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output (default {DEFAULT_JSON})")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    ap.add_argument("--markdown", type=Path, help=f"also write the markdown report here (--full: {DEFAULT_MD})")
    ap.add_argument("--from-json", type=Path, help="run nothing: write the markdown of this run_all JSON")
    ap.add_argument("--spread", type=Path, nargs="*", default=(), help="further JSONs for the min..max column")
    args = ap.parse_args(argv)
    if args.from_json:
        out = json.loads(args.from_json.read_text())
        md = markdown(out, [json.loads(p.read_text()) for p in args.spread])
        if args.markdown:
            args.markdown.write_text(md)
            print(f"wrote {args.markdown}")
        else:
            print(md)
        return out
    size = "--full" if args.full else "--small"
    extra = {"bench_infinite": ["--sizes", "128", "32"]} if args.smoke else {}
    if args.full:  # the four-input integrals grow like N^8 in time: N = 8 at depth 10 would take an hour
        extra = {"bench_finite": ["--ns", "2", "4", "--depths", "3", "10"]}

    from _common import machine, under_load

    t0 = time.perf_counter()
    peer_py = None if args.no_peers else nt_python()
    if not args.no_peers and peer_py is None:
        print("neural-tangents environment not found (.ci/nt_env.sh builds .venv-nt): timing efftheory alone")
    results = {}
    for name, has_peer in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        python = peer_py if (has_peer and peer_py) else sys.executable
        results[name] = run_one(name, python, size, no_peers=args.no_peers or not (has_peer and peer_py),
                                timeout=args.timeout, extra=extra.get(name, []))
    rows = [r for data in results.values() for r in data.get("summary", [])]
    loads = [v for data in results.values() for v in data.get("loadavg", [])]
    loaded = under_load(*loads)
    envs = {data["python"]: data.get("machine", {}).get("jax") for data in results.values()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    out = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else size.lstrip("-"), "peers": not args.no_peers and peer_py is not None,
        "git_commit": commit,
        "machine": {**machine(), "jax_by_interpreter": envs}, "under_load": loaded,
        "loadavg_range": [min(loads), max(loads)] if loads else None, "total_s": time.perf_counter() - t0,
        "table": rows, "benchmarks": results,
    }
    md = table(rows)
    print("\n" + md)
    m = out["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores; jax " + ", ".join(f"{v} ({Path(k).parent.parent.name})"
                                                            for k, v in envs.items())
          + (f"; timings taken under load (1-min load average {min(loads):.1f}..{max(loads):.1f} on {m['cores']} "
             "cores): ratios are medians of interleaved rounds" if loaded else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.json} in {out['total_s']:.0f} s")
    md_path = args.markdown or (DEFAULT_MD if args.full and not args.only else None)
    if md_path:
        spread = [json.loads(p.read_text()) for p in args.spread]
        md_path.write_text(markdown(json.loads(json.dumps(out, default=str)), spread))
        print(f"wrote {md_path}")
    return out


if __name__ == "__main__":
    main()
