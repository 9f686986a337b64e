"""Shared by the first-order tests: the pair symmetries of finite_width's tensors, and one representative
per symmetry orbit (the Bonferroni count of the width-sweep tests)."""

import numpy as np


def distinct(shape):
    """Index of one representative per orbit of the pair symmetries (for the Bonferroni count)."""
    seen, keep = set(), []
    for idx in np.ndindex(*shape):
        if len(idx) == 2:
            key = tuple(sorted(idx))
        else:
            p, q = tuple(sorted(idx[:2])), tuple(sorted(idx[2:]))
            key = (min(p, q), max(p, q))
        if key not in seen:
            seen.add(key)
            keep.append(idx)
    return tuple(np.array(keep).T)


def assert_pair_symmetries(r, atol=1e-12):
    """Every tensor of a FiniteWidth result has the symmetries of its definition (docs/theory.md)."""
    for T in (r.V, r.A):
        np.testing.assert_allclose(T, T.transpose(0, 2, 1, 3, 4), atol=atol)
        np.testing.assert_allclose(T, T.transpose(0, 3, 4, 1, 2), atol=atol)
    np.testing.assert_allclose(r.B, r.B.transpose(0, 3, 4, 1, 2), atol=atol)
    np.testing.assert_allclose(r.B, r.B.transpose(0, 2, 1, 4, 3), atol=atol)
    np.testing.assert_allclose(r.D, r.D.transpose(0, 2, 1, 3, 4), atol=atol)
    np.testing.assert_allclose(r.D, r.D.transpose(0, 1, 2, 4, 3), atol=atol)
    np.testing.assert_allclose(r.F, r.F.transpose(0, 3, 4, 1, 2), atol=atol)
    np.testing.assert_allclose(r.G1, r.G1.transpose(0, 2, 1), atol=atol)
    np.testing.assert_allclose(r.H1, r.H1.transpose(0, 2, 1), atol=atol)
