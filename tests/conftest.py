import jax
import numpy as np
import pytest

# The tests are a user process: they turn on JAX's 64-bit mode for themselves, before any test builds
# arrays (importing efftheory no longer does; tests/test_jax_native.py checks efftheory without it).
jax.config.update("jax_enable_x64", True)

import efftheory  # noqa: E402,F401 - imported after the x64 switch above, for its import-time setup


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
