"""One process of tests/test_distributed.py's multi-process runs (not a test module).

    python tests/_distributed_worker.py TASK OUT [STORE]

with EFFTHEORY_COORDINATOR / EFFTHEORY_NUM_PROCESSES / EFFTHEORY_PROCESS_ID set (or none: one process).
TASK: "sample", "train", "sources" (finite_width, N = 8, depth 3; STORE: its store), "sources_deep"
(the same at depth 6), "die" (process 1
exits at once after the start; the others wait on it).  Every process writes OUT.<index>.npz with its
result; a DistributedError is written to OUT.<index>.err and exits with status 3.
"""

from __future__ import annotations

import os
import sys
import time


def _task(task: str, store: str | None):
    import jax
    import numpy as np

    import efftheory as et
    import efftheory.empirical  # noqa: F401 - et.empirical
    from efftheory import distributed

    x = np.random.default_rng(0).normal(size=(8 if task.startswith("sources") else 3, 4))
    if task == "sample":
        net = et.MLP(depth=3, width=16, activation="tanh", C_W=1.5, C_b=0.1)
        sweep = et.empirical.sample(net, x, [8, 16], 37, seed=5, statistics=("metric", "four_point"), chunk=4,
                                    progress=False, cache_dir=store)
        return {f"{k}_{n}": v for n in sweep.widths for k, v in sweep[n].stats.items()}
    if task == "train":
        net = et.MLP(depth=3, width=8, activation="tanh", C_W=1.5, C_b=0.1)
        tr = et.empirical.train(net, x[:2], np.array([0.3, -0.2]), x[2:], steps=12, learning_rate=0.1, n_networks=11,
                                key=jax.random.PRNGKey(3), chunk=2, progress=False, cache_dir=store)
        return {"f_test": tr.f_test, "loss": tr.loss, "ntk_end": tr.ntk_end}
    if task in ("sources", "sources_deep"):
        net = et.MLP(depth=3 if task == "sources" else 6, width=16, activation="tanh", C_W=1.5, C_b=0.1)
        fw = et.finite_width(net, x, store=store)
        return {k: np.asarray(getattr(fw, k)) for k in ("G1", "V", "H1", "A", "B")}
    if task == "die":
        if distributed.process_index() == 1:
            time.sleep(2.0)
            os._exit(9)
        t0 = time.monotonic()
        try:
            distributed.barrier("die")
        finally:
            print(f"waited {time.monotonic() - t0:.2f} s", flush=True)
        return {}
    raise SystemExit(f"unknown task {task!r}")


def main() -> None:
    task, out = sys.argv[1], sys.argv[2]
    store = sys.argv[3] if len(sys.argv) > 3 else None
    import jax

    jax.config.update("jax_enable_x64", True)
    from efftheory import distributed

    distributed.initialize()
    index = distributed.process_index()
    try:
        result = _task(task, store)
    except distributed.DistributedError as e:
        with open(f"{out}.{index}.err", "w") as fh:
            fh.write(f"{e.process}\n{e}\n")
        distributed.abort(e)
    import numpy as np

    np.savez(f"{out}.{index}.npz", **result)


if __name__ == "__main__":
    main()
