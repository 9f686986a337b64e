r"""A small regression task that ships with the package (no downloads): smooth periodic targets on a circle.

A one-dimensional coordinate s in [-pi, pi) is embedded in n_0 = 2 dimensions on the circle

    x(s) = sqrt(2) (cos s, sin s),        so that (1/n_0) |x|^2 = 1 for every input,

which keeps every input at the same kernel scale (K^(l)_aa is the same for all a) and lets a bias-free
ReLU network tell all of them apart.  Output component j = 0..k-1 is the fixed smooth function

    f_j(s) = sin((j + 1) s + j) + (1/2) cos((j + 2) s - j/2)

(f_0(s) = sin s + cos(2s)/2).  Training coordinates are stratified: one uniform draw in each of N_D
equal arcs, kept at least 10% of an arc away from its ends (so training inputs never nearly coincide
and the kernels stay well conditioned), from a fixed seed; test coordinates are an even grid.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from . import _validate
from ._pytree import result

__all__ = ["Dataset", "circle_regression", "circle_inputs", "circle_target"]


@result(meta=("name",))
class Dataset:
    """A regression task.

    Attributes:
      x_train (N_D, n_0), y_train (N_D, k), x_test (N_T, n_0), y_test (N_T, k): float64 inputs and targets
        (y_test noise-free).
      s_train (N_D,), s_test (N_T,): the one-dimensional coordinates behind the inputs (for plots).
      name: a short description.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    s_train: np.ndarray
    s_test: np.ndarray
    name: str

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def outputs(self) -> int:
        return int(self.y_train.shape[1])


def circle_inputs(s: ArrayLike) -> np.ndarray:
    """x(s) = sqrt(2) (cos s, sin s): (N, 2) for coordinates s of shape (N,)."""
    s = np.asarray(s, np.float64).reshape(-1)
    return math.sqrt(2.0) * np.stack([np.cos(s), np.sin(s)], axis=1)


def circle_target(s: ArrayLike, outputs: int = 1) -> np.ndarray:
    """f_j(s) = sin((j+1) s + j) + cos((j+2) s - j/2)/2 for j < outputs: (N, outputs)."""
    k = _validate.positive_int("outputs", outputs)
    s = np.asarray(s, np.float64).reshape(-1)
    return np.stack([np.sin((j + 1) * s + j) + 0.5 * np.cos((j + 2) * s - 0.5 * j) for j in range(k)], axis=1)


def circle_regression(n_train: int = 8, n_test: int = 64, *, outputs: int = 1, noise: float = 0.0,
                      seed: int = 0) -> Dataset:
    """The circle task (module docstring).

    Args:
      n_train: N_D >= 1 training points (stratified random coordinates from ``seed``).
      n_test: N_T >= 1 test points on the even grid s = -pi + (t + 1/2) 2 pi / N_T.
      outputs: k >= 1 target components.
      noise: standard deviation of Gaussian noise added to the training targets (>= 0).
      seed: non-negative integer.
    """
    N = _validate.positive_int("n_train", n_train)
    T = _validate.positive_int("n_test", n_test)
    k = _validate.positive_int("outputs", outputs)
    sd = _validate.real("noise", noise, nonnegative=True)
    seed = _validate.positive_int("seed", seed, minimum=0)
    rng = np.random.default_rng([seed, 0xC12C])
    arc = 2 * math.pi / N
    s_train = -math.pi + arc * (np.arange(N) + rng.uniform(0.1, 0.9, size=N))
    s_test = -math.pi + (np.arange(T) + 0.5) * 2 * math.pi / T
    y_train = circle_target(s_train, k)
    if sd > 0:
        y_train = y_train + sd * rng.normal(size=y_train.shape)
    return Dataset(x_train=circle_inputs(s_train), y_train=y_train, x_test=circle_inputs(s_test),
                   y_test=circle_target(s_test, k), s_train=s_train, s_test=s_test,
                   name=f"circle: {N} training points (seed {seed}), {T} test points, {k} output(s), noise {sd:g}")
