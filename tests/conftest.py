import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import engine  # noqa: E402

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def threads():
    """Restore the kernels' thread count after a test that changes it."""
    before = engine.backend._num_threads
    yield
    engine.set_num_threads(before)
