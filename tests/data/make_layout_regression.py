"""Writes tests/data/layout_regression.npz: finite_width and dntk_statistics tensors of fixed small nets.

Generated once from the code before the package layout change of issue #24 (one Gaussian engine,
equations apart from the run machinery); tests/test_layout_regression.py checks that the code still
gives the same numbers to rounding.  Run from the repository root:

    python tests/data/make_layout_regression.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import efftheory as et  # noqa: E402 - after the sys.path line above

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layout_regression.npz")
FINITE = ("K", "Theta", "G1", "V", "H1", "A", "B", "D", "F")
DNTK = ("K", "Theta", "P", "Q", "R", "S", "T", "U")
CASES = {"tanh": 1.0, "relu": 2.0, "gelu": 1.5}  # activation -> C_W
C_B, DEPTH, WIDTH = 0.1, 4, 32


def inputs(n: int) -> np.ndarray:
    """n fixed inputs of dimension 3."""
    return np.random.default_rng(0).normal(size=(n, 3))


def compute() -> dict[str, np.ndarray]:
    """Every array the regression test compares, by name ``finite/<act>/<field>`` or ``dntk/<act>/<field>``."""
    out = {}
    for act, C_W in CASES.items():
        net = et.MLP(depth=DEPTH, width=WIDTH, activation=act, C_W=C_W, C_b=C_B)
        fw = et.finite_width(net, inputs(5))
        for name in FINITE:
            out[f"finite/{act}/{name}"] = np.asarray(getattr(fw, name))
    for act in ("tanh", "gelu"):  # smooth activations only: dntk_statistics integrates sigma'''
        net = et.MLP(depth=DEPTH, width=WIDTH, activation=act, C_W=CASES[act], C_b=C_B)
        ds = et.dntk_statistics(net, inputs(3))
        for name in DNTK:
            out[f"dntk/{act}/{name}"] = np.asarray(getattr(ds, name))
    return out


if __name__ == "__main__":
    np.savez_compressed(PATH, **compute())
    print(PATH)
