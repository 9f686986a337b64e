"""Shared by the benchmark scripts: interleaved timing, the machine description, summary rows.

Timing protocol (every ratio the benchmarks print): each contender is called once to compile and warm
up, then the contenders are called in turn, ``repeats`` rounds (at least 3), the order rotating each
round, every call ended by ``jax.block_until_ready``.  A ratio is the median over rounds of the per-round
ratio, so that load from other processes, which comes and goes, hits both sides of a ratio alike.  The
1-minute load average is recorded before and after; a benchmark run with more runnable processes than
half the cores at either point is reported as taken under load.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax


def block(x):
    return jax.block_until_ready(x)


def interleaved(fns: dict, repeats: int = 3) -> dict:
    """Time callables in interleaved rounds.

    Returns {name: {"median_s", "times_s", "warmup_s"}} and, under the key "_rounds", the list of
    per-round {name: seconds} dicts (for per-round ratios, see :func:`ratio`).
    """
    repeats = max(3, int(repeats))
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        block(fn())
        out[name] = {"warmup_s": time.perf_counter() - t0, "times_s": []}
    names = list(fns)
    rounds = []
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        this = {}
        for name in order:
            t0 = time.perf_counter()
            block(fns[name]())
            this[name] = time.perf_counter() - t0
            out[name]["times_s"].append(this[name])
        rounds.append(this)
    for name in names:
        out[name]["median_s"] = statistics.median(out[name]["times_s"])
    out["_rounds"] = rounds
    return out


def ratio(timing: dict, num: str, den: str) -> float:
    """Median over rounds of t[num] / t[den] (> 1: ``den`` is faster)."""
    return statistics.median(r[num] / r[den] for r in timing["_rounds"])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "backend": dev.platform, "device": str(dev.device_kind),
        "devices": jax.device_count(), "loadavg_1min": loadavg(),
    }


def machine_line(mach: dict) -> str:
    """One header line from :func:`machine`: jax version, backend, CPU, cores and JAX devices (on a CPU,
    EFFTHEORY_CPU_DEVICES=n|all asks for more than one; efftheory/__init__.py)."""
    return (f"jax {mach['jax']} on {mach['backend']} ({mach['cpu']}, {mach['cores']} cores), "
            f"{mach['devices']} JAX device(s) (EFFTHEORY_CPU_DEVICES={os.environ.get('EFFTHEORY_CPU_DEVICES', 'unset')})")


def under_load(*loads) -> bool:
    cores = os.cpu_count() or 1
    return any(v is not None and v > 0.5 * cores for v in loads)


def summary_row(benchmark: str, case: str, ours_s: float, *, peer: str | None = None, peer_s: float | None = None,
                speedup: float | None = None, target: str | None = None, accuracy: dict | None = None,
                note: str | None = None) -> dict:
    """One line of the results table: speedup = peer time / our time (median of per-round ratios)."""
    return {"benchmark": benchmark, "case": case, "ours_s": ours_s, "peer": peer, "peer_s": peer_s,
            "speedup": speedup, "target": target, "accuracy": accuracy or {}, "note": note}
