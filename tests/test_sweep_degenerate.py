"""Degenerate width-sweep fits give a documented result, never LinAlgError or silent NaN (issue #23, 11)."""

import numpy as np
import pytest

from efftheory import empirical as em

W = np.array([16.0, 32.0, 64.0, 128.0])
V = 1.0 + 1.6 / W + 3.0 / W**2  # exact: a = 1, c1 = 1.6, c2 = 3


@pytest.mark.parametrize("scale", [1e-200, 1e-30, 1.0, 1e30, 1e200, 1e300])
def test_uniform_stderr_scale_does_not_change_the_fit(scale):
    """WLS with equal weights does not depend on their scale: a, c1, c2 exact, stderrs proportional."""
    f = em.width_sweep_fit(W, V, np.full(4, scale), 1.0, 1.6)
    ref = em.width_sweep_fit(W, V, np.full(4, 1.0), 1.0, 1.6)
    assert not f.unavailable
    np.testing.assert_allclose([f.a, f.c1, f.c2], [1.0, 1.6, 3.0], rtol=1e-9)
    np.testing.assert_allclose(f.c1_stderr / scale, ref.c1_stderr, rtol=1e-12)
    assert em.verdict(f, 1.0, 1.6) in em.VERDICTS


def test_huge_stderrs_are_unresolved_not_an_error():
    f = em.width_sweep_fit(W, V + 0.3, np.full(4, 1e250), 1.0, 1.6)
    assert em.verdict(f, 1.0, 1.6) == "consistent, unresolved"


def test_stderrs_spanning_too_many_decades_are_unavailable():
    s = np.array([1e-300, 1e300, 1.0, 1.0])
    f = em.width_sweep_fit(W, V, s, 1.0, 1.6)
    assert f.unavailable and np.isnan(f.a) and np.isnan(f.c1_stderr)
    assert em.verdict(f, 1.0, 1.6) == "consistent, unresolved"
    assert "unavailable" in f.UNAVAILABLE


def test_elementwise_only_the_degenerate_entry_is_marked():
    values = np.stack([V, V, V], axis=1)
    s = np.stack([np.full(4, 1e-4), np.array([1e-300, 1e300, 1.0, 1.0]), np.full(4, 1e200)], axis=1)
    f = em.width_sweep_fit(W, values, s, np.ones(3), np.full(3, 1.6))
    assert list(f.unavailable) == [False, True, False]
    assert list(em.verdict(f, np.ones(3), np.full(3, 1.6))) == ["agrees", "consistent, unresolved",
                                                                "consistent, unresolved"]
