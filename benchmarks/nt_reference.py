"""Regenerate tests/data/nt_reference.npz: neural-tangents' per-layer NNGP and NTK, float64.

Run in the pinned NT environment (.ci/nt_env.sh):

    .venv-nt/bin/python benchmarks/nt_reference.py [--out tests/data/nt_reference.npz] [--seed 0]

The oracle is built here directly from ``neural_tangents.stax`` -- independently of
``efftheory.interop.neural_tangents`` -- so the stored file checks both the theory and the interop
mapping.  Network: ``Dense(W_std=sqrt(C_W), b_std=sqrt(C_b))`` layers in NT's default "ntk"
parameterization with relu / erf / gelu between them; with lambda = C this is the PDLT network of
docs/theory.md, and layer l's kernels are those of the prefix network ending at Dense layer l.

Inputs are not normalised: five Gaussian rows of scale 3 in n_0 = 7 dimensions, then a copy of
row 0 (an identical pair), 2.5 x row 1 (a collinear pair) and -0.4 x row 2 (an anti-collinear
pair), so N = 8 and the rank-deficient 2x2 marginals (rho = +-1) are exercised.

Stored arrays (n_cfg configurations, Lmax = max depth; unused layers are NaN):
  x (N, n_0); activation (n_cfg,) str; depth (n_cfg,) int; C_W, C_b (n_cfg, Lmax);
  nngp, ntk (n_cfg, Lmax, N, N); seed; jax_version; nt_version.
Deterministic from the seed (the zip container's timestamps aside).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

try:
    import neural_tangents as nt
    from neural_tangents import stax
except ImportError as e:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "neural-tangents is not installed: run this in the pinned environment (.ci/nt_env.sh), "
        f"e.g. .venv-nt/bin/python {__file__} ({e})"
    ) from None

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "data" / "nt_reference.npz"

DEPTHS = (1, 3, 6)
# (C_W, C_b) per activation: the critical point where one exists, off-critical pairs, C_b > 0.
PAIRS = {
    "relu": ((2.0, 0.0), (1.5, 0.3), (2.6, 0.05)),
    "erf": ((1.0, 0.0), (2.5, 0.4), (0.6, 1.0)),
    "gelu": ((2.0, 0.0), (1.2, 0.5), (3.0, 0.1)),
}
# One configuration per activation with different values in every layer (catches layer-index slips).
PER_LAYER = ((1.0, 2.5, 0.8, 1.7), (0.0, 0.3, 1.2, 0.05))

ACTIVATIONS = {
    "relu": stax.Relu,
    "erf": stax.Erf,
    "gelu": lambda: stax.Gelu(approximate=False),
}


def inputs(seed: int, n: int = 5, n0: int = 7, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal((n, n0))
    return np.concatenate([x, x[:1], 2.5 * x[1:2], -0.4 * x[2:3]], axis=0)


def configs():
    for act in ("relu", "erf", "gelu"):
        for C_W, C_b in PAIRS[act]:
            for L in DEPTHS:
                yield act, L, (C_W,) * L, (C_b,) * L
        C_Ws, C_bs = PER_LAYER
        yield act, len(C_Ws), C_Ws, C_bs


def nt_kernels(act: str, C_Ws, C_bs, x):
    """(L, N, N) nngp and ntk, layer l from the prefix network ending at Dense layer l."""
    layers = []
    for l, (C_W, C_b) in enumerate(zip(C_Ws, C_bs)):
        if l > 0:
            layers.append(ACTIVATIONS[act]())
        layers.append(stax.Dense(16, W_std=math.sqrt(C_W), b_std=math.sqrt(C_b)))
    nngp, ntk = [], []
    for l in range(len(C_Ws)):
        _, _, kernel_fn = stax.serial(*layers[: 2 * l + 1])
        k = kernel_fn(jnp.asarray(x), None, ("nngp", "ntk"))
        nngp.append(np.asarray(k.nngp, dtype=np.float64))
        ntk.append(np.asarray(k.ntk, dtype=np.float64))
    return np.stack(nngp), np.stack(ntk)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    x = inputs(args.seed)
    cfgs = list(configs())
    Lmax = max(c[1] for c in cfgs)
    n_cfg, N = len(cfgs), x.shape[0]
    C_W = np.full((n_cfg, Lmax), np.nan)
    C_b = np.full((n_cfg, Lmax), np.nan)
    nngp = np.full((n_cfg, Lmax, N, N), np.nan)
    ntk = np.full((n_cfg, Lmax, N, N), np.nan)
    for i, (act, L, C_Ws, C_bs) in enumerate(cfgs):
        C_W[i, :L], C_b[i, :L] = C_Ws, C_bs
        nngp[i, :L], ntk[i, :L] = nt_kernels(act, C_Ws, C_bs, x)
        if not (np.all(np.isfinite(nngp[i, :L])) and np.all(np.isfinite(ntk[i, :L]))):
            raise FloatingPointError(f"NT returned non-finite kernels for {act} L={L} C_W={C_Ws} C_b={C_bs}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        x=x,
        activation=np.array([c[0] for c in cfgs]),
        depth=np.array([c[1] for c in cfgs], dtype=np.int64),
        C_W=C_W,
        C_b=C_b,
        nngp=nngp,
        ntk=ntk,
        seed=np.int64(args.seed),
        jax_version=np.str_(jax.__version__),
        nt_version=np.str_(nt.__version__),
    )
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({n_cfg} configurations, N={N}, {size / 1024:.1f} KiB) with "
          f"neural-tangents {nt.__version__}, jax {jax.__version__} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
