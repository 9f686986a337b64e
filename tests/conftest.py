import numpy as np
import pytest

import efftheory  # noqa: F401  (turns on float64 in JAX before any test builds arrays)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
