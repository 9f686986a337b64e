"""Writes tests/data/residual_regression.npz: numbers of plain MLPs (no skip connections) from the code
before residual MLPs were added (issue #25), so that skip = 0, branch = 1 can be checked to give them bit for
bit: infinite-width K and Theta (closed-form and generic activations, all layers and the folded last-layer
path, under jax.jit too), the susceptibilities, and the forward pass and exact NTK of fixed sampled
networks.  tests/test_residual_regression.py compares.  Run from the repository root:

    python tests/data/make_residual_regression.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax  # noqa: E402 - after the sys.path line above

jax.config.update("jax_enable_x64", True)  # as tests/conftest.py

import jax.numpy as jnp  # noqa: E402 - after the x64 switch

import efftheory as et  # noqa: E402
from efftheory import empirical  # noqa: E402

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "residual_regression.npz")
ACTIVATIONS = {"relu": 2.0, "abs": 1.0, "erf": 1.3, "tanh": 1.0, "gelu": 1.5}  # activation -> C_W
DEPTH, WIDTH = 5, 8


def inputs(n: int) -> np.ndarray:
    """n fixed inputs of dimension 3."""
    return np.random.default_rng(1).normal(size=(n, 3))


def _net(act: str, C_W: float) -> et.MLP:
    return et.MLP(depth=DEPTH, width=WIDTH, activation=act, C_W=(C_W, 0.9 * C_W, C_W, 1.1 * C_W, C_W),
                  C_b=0.1, lambda_W=0.7, lambda_b=(0.2, 0.3, 0.1, 0.0, 0.5))


def compute() -> dict[str, np.ndarray]:
    """Every array the regression test compares, by name ``<what>/<activation>/<field>``."""
    out = {}
    x = inputs(5)
    for act, C_W in ACTIVATIONS.items():
        net = _net(act, C_W)
        iw = et.infinite_width(net, x)
        out[f"infinite/{act}/K"], out[f"infinite/{act}/Theta"] = np.asarray(iw.K), np.asarray(iw.Theta)
        last = et.infinite_width(net, x, layers="last")
        out[f"last/{act}/K"], out[f"last/{act}/Theta"] = np.asarray(last.K), np.asarray(last.Theta)
        out[f"chi/{act}/parallel"] = np.asarray(et.chi_parallel(act, np.array([0.0, 0.3, 2.0]), C_W))
        out[f"chi/{act}/perp"] = np.asarray(et.chi_perp(act, np.array([0.0, 0.3, 2.0]), C_W))
    for act in ("relu", "tanh"):
        def kern(cw, act=act):
            net = et.MLP(depth=DEPTH, width=WIDTH, activation=act, C_W=cw, C_b=0.1)
            iw = et.infinite_width(net, x[:3])
            return iw.K, iw.Theta

        K, T = jax.jit(kern)(jnp.asarray(ACTIVATIONS[act], jnp.float64))
        out[f"traced/{act}/K"], out[f"traced/{act}/Theta"] = np.asarray(K), np.asarray(T)
        net = _net(act, ACTIVATIONS[act])
        params = empirical.init_params(net, jax.random.PRNGKey(3), 3, jnp.float64)
        zs = empirical.apply_all(net, params, x)
        for l, z in enumerate(zs):
            out[f"forward/{act}/z{l + 1}"] = np.asarray(z)
        out[f"ntk/{act}/H"] = np.asarray(empirical.ntk(net, params, x))
        ens = empirical.sample_ensemble(net, x[:3], 6, 0, statistics=("metric", "ntk"), dtype="float64")
        for k, v in sorted(ens.stats.items()):
            out[f"ensemble/{act}/{k}"] = np.asarray(v)
    return out


if __name__ == "__main__":
    np.savez_compressed(PATH, **compute())
    print(PATH)
