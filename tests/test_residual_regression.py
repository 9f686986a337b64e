"""A plain MLP (skip = 0, branch = 1) gives, bit for bit, the numbers stored in
tests/data/residual_regression.npz, written by tests/data/make_residual_regression.py from the code before
residual MLPs were added (issue #25): infinite-width kernels (closed-form and generic activations, every
layer, the folded last-layer path and under jax.jit), susceptibilities, and the forward pass, exact NTK and
sampled ensemble statistics of fixed networks."""

import importlib.util
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _maker():
    spec = importlib.util.spec_from_file_location("make_residual_regression",
                                                  os.path.join(HERE, "data", "make_residual_regression.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stored():
    with np.load(os.path.join(HERE, "data", "residual_regression.npz")) as f:
        return dict(f)


@pytest.fixture(scope="module")
def computed():
    return _maker().compute()


def test_same_names(stored, computed):
    assert sorted(stored) == sorted(computed)


def test_bit_identical(stored, computed):
    for name, want in stored.items():
        got = computed[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
