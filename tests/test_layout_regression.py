"""The package layout change (issue #24) moved code, not numbers: finite_width and dntk_statistics
give the tensors stored in tests/data/layout_regression.npz (written by
tests/data/make_layout_regression.py from the code before the move) to rounding."""

import importlib.util
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _maker():
    spec = importlib.util.spec_from_file_location("make_layout_regression",
                                                  os.path.join(HERE, "data", "make_layout_regression.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stored():
    with np.load(os.path.join(HERE, "data", "layout_regression.npz")) as f:
        return dict(f)


@pytest.fixture(scope="module")
def computed():
    return _maker().compute()


def test_same_names(stored, computed):
    assert sorted(stored) == sorted(computed)


def test_same_tensors(stored, computed):
    for name, want in stored.items():
        got = computed[name]
        assert got.shape == want.shape, name
        scale = max(float(np.max(np.abs(want))), 1e-300)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * scale, err_msg=name)
