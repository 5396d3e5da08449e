"""The thin set of array operations the layers are written against, and what runs them.

Layers never call the compiled kernels or BLAS directly: they ask ``get_ops(x)`` for the
operation set that matches the array they hold, so the same layer code runs on every
backend. Two sets provide the same names: ``cpu.CpuOps`` (compiled Cython/OpenMP kernels
and BLAS, on numpy arrays) and ``cuda.CupyOps`` (CUDA kernels and cuBLAS, on CuPy arrays),
imported only when a CuPy array or the CuPy backend is asked for.

    threads.py   thread counts and the load estimate      memory.py  64-byte aligned buffers
    dropout.py   dropout masks' seeds (every backend)     select.py  backend choice and diagnosis
"""
import sys

import numpy as np

from .cpu import CpuOps


def _cupy_ndarray():
    """cupy.ndarray when CuPy has been imported by someone (we never import it just to check a type)."""
    cupy = sys.modules.get("cupy")
    return getattr(cupy, "ndarray", None)


def get_ops(x):
    """The operation set for array `x` (the backend is read from the array, never configured per layer)."""
    if type(x) is np.ndarray:  # the common case, decided without looking for CuPy
        return CpuOps
    device_array = _cupy_ndarray()
    if device_array is not None and isinstance(x, device_array):
        return ops_for("cupy")
    if isinstance(x, np.ndarray):
        return CpuOps
    raise TypeError(f"no backend for arrays of type {type(x).__name__}")


def is_array(x):
    """True for a numpy array or an array of a backend (CuPy)."""
    if type(x) is np.ndarray:
        return True
    device_array = _cupy_ndarray()
    return isinstance(x, np.ndarray) or (device_array is not None and isinstance(x, device_array))


def ops_for(name):
    """The operation set of backend 'cpu' or 'cupy' (imports CuPy for 'cupy')."""
    if name == "cpu":
        return CpuOps
    if name == "cupy":
        from .cuda import CupyOps
        return CupyOps
    raise ValueError(f"unknown backend {name!r} (expected cpu or cupy)")


def to_numpy(x):
    """A numpy array with the contents of `x`, wherever `x` lives (files are written from these)."""
    return get_ops(x).asnumpy(x) if is_array(x) else np.asarray(x)
