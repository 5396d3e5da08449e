import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import engine  # noqa: E402
import engine.runtime.select  # noqa: E402
import emulated_cupy  # noqa: E402

# FLATNET_TEST_EMULATED_CUPY=1: the emulation is `cupy` for the whole test run, so `auto` selects
# it and every test runs as it would on a machine where CuPy works (tests/test_selftest.py starts such a run).
EMULATED_RUN = os.environ.get("FLATNET_TEST_EMULATED_CUPY") == "1"
if EMULATED_RUN:
    emulated_cupy.install()

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def threads():
    """Restore the kernels' thread count after a test that changes it."""
    before = engine.runtime.threads._num_threads
    yield
    engine.set_num_threads(before)


class Backend:
    """A backend under test: moves layers and arrays there and back."""

    def __init__(self, name, label):
        self.name, self.label = name, label
        self.ops = engine.runtime.ops_for(name)

    def put(self, x):
        return self.ops.asarray(x)

    def get(self, y):
        return engine.runtime.to_numpy(y)

    def to(self, layer):
        return layer.to(self.name)


@pytest.fixture(params=["cpu", "cupy", "cupy-emulated"])
def backend(request):
    """Each layer test runs on the CPU, on CuPy where a GPU is usable, and on CuPy emulated on the CPU.

    'cupy-emulated' (tests/emulated_cupy.py) runs the CuPy backend's code with its CUDA
    kernels compiled as C++, where the real CuPy is not installed.
    """
    yield from _backend(request.param)


@pytest.fixture(params=["cupy", "cupy-emulated"])
def device_backend(request):
    """The backends other than the CPU, for tests that compare one with the CPU."""
    yield from _backend(request.param)


def _backend(name):
    import emulated_cupy
    if name == "cpu":
        yield Backend("cpu", name)
    elif name == "cupy":
        problem = engine.runtime.select.cupy_problem()
        if problem:
            pytest.skip(f"no usable GPU: {problem}")
        yield Backend("cupy", name)
    else:
        if emulated_cupy.real_cupy_installed():
            pytest.skip("the real CuPy is installed: its cases run instead of the emulation")
        if EMULATED_RUN:
            pytest.skip("the emulation is `cupy` for this test run: the `cupy` cases run on it")
        why = emulated_cupy.available()
        if why:
            pytest.skip(f"cannot emulate CuPy: {why}")
        emulated_cupy.install()
        try:
            yield Backend("cupy", name)
        finally:
            emulated_cupy.uninstall()


def small_launches(name, monkeypatch, emulated_shape):
    """The `cupy` module for a kernel test on `name`, with launches smaller than their work so that every
    grid-stride loop wraps: 'cupy' is the real CuPy where a GPU is usable (3 blocks of 32 threads a launch),
    'cupy-emulated' the emulation where the real CuPy is not installed (`emulated_shape`: emulated blocks and
    threads). A generator for fixtures: ``yield from`` it, or loop over it once."""
    if name == "cupy":
        problem = engine.runtime.select.cupy_problem()
        if problem:
            pytest.skip(f"no usable GPU: {problem}")
        import engine.runtime.cuda as bc
        monkeypatch.setattr(bc, "BLOCK", 32)
        monkeypatch.setattr(bc, "MAX_BLOCKS", 3)
        yield sys.modules["cupy"]
        return
    if emulated_cupy.real_cupy_installed() or emulated_cupy.is_emulated(sys.modules.get("cupy")):
        pytest.skip("CuPy (real, or emulated for this test run) is installed: the `cupy` cases run instead")
    why = emulated_cupy.available()
    if why:
        pytest.skip(f"cannot emulate CuPy: {why}")
    emulated_cupy.install()
    emulated_cupy.launch_shape = emulated_shape
    try:
        yield sys.modules["cupy"]
    finally:
        emulated_cupy.launch_shape = None
        emulated_cupy.uninstall()


def pytest_collection_modifyitems(config, items):
    """Tests marked `manual` (long fuzzing) run only when asked for: python -m pytest -m manual."""
    if "manual" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="manual: run with -m manual")
    for item in items:
        if "manual" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def emulated():
    """tests/emulated_cupy.py installed as `cupy` for one test (skipped where the real CuPy is installed)."""
    why = emulated_cupy.available()
    if why:
        pytest.skip(f"cannot emulate CuPy: {why}")
    if emulated_cupy.real_cupy_installed():
        pytest.skip("the real CuPy is installed")
    emulated_cupy.install()
    try:
        yield emulated_cupy
    finally:
        emulated_cupy.uninstall()
