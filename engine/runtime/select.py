"""Choosing a backend once per process, and saying why CuPy cannot be used when it cannot.

Importing `engine` never imports CuPy; ``select_backend`` (and ``cupy_problem``) do.
"""
import os

import numpy as np


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


BACKEND_ENV = "FLATNET_BACKEND"
_CUPY_WHEEL_HINT = ("pip install 'cupy-cuda12x[ctk]' (CUDA 12) or 'cupy-cuda13x[ctk]' (CUDA 13), matching your "
                    "driver; in this repository pip install -e '.[gpu]' or -e '.[gpu-cuda13]'")


def _diagnose(e):
    """The likely cause of a failed CuPy call, from its error."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "insufficientdriver" in low or "driver version is insufficient" in low:
        return f"the NVIDIA driver is older than this CuPy's CUDA: update the driver or use the CUDA 12 wheel ({text})"
    if any(s in low for s in ("nvrtc", "libcu", "libnv", "cuda_fp16", "include", "cannot open", "no such file",
                              "could not find", "not found")):
        return (f"CuPy cannot find a CUDA toolkit library or header it needs at run time; install the wheel with "
                f"its toolkit: {_CUPY_WHEEL_HINT} ({text})")
    return (f"{text}; if a CUDA library or header is missing, {_CUPY_WHEEL_HINT}; if the driver is older than "
            f"CuPy's CUDA, update it")


def smoke_test():
    """None when the device computes right, else what came out wrong (exceptions propagate).

    Runs what training needs beyond cuBLAS: our kernels from both modules (float32 and
    float64), and CuPy's own elementwise, reduction and indexing kernels (compiled at run
    time, so they need the CUDA headers a driver-only machine lacks) through a softmax
    cross-entropy written with them (as the loss computes it), a broadcast assignment and
    the finite check.
    """
    import cupy as cp

    from .cuda import CupyOps
    a = np.arange(-8, 8, dtype=np.float32).reshape(4, 4) / 4
    labels = np.array([0, 3, 1, 2])
    for dtype in (np.float32, np.float64):
        da = cp.asarray(a.astype(dtype))
        prod = CupyOps.gemm(False, False, 1.0, da, da, 0.0, cp.empty_like(da))  # our cuBLAS call
        out = CupyOps.relu_forward(prod, cp.empty_like(da))
        if not np.allclose(cp.asnumpy(out), np.maximum(a @ a, 0), rtol=1e-5):
            return f"a wrong {np.dtype(dtype).name} result from cuBLAS and the ReLU kernel"
    def cross_entropy(xp, x, y):  # the mean loss and its gradient, from logits x and labels y
        m = x.max(axis=1, keepdims=True)
        e = xp.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        rows = xp.arange(len(y))
        p = e / s
        p[rows, y] -= 1
        return float((xp.log(s[:, 0]) + m[:, 0] - x[rows, y]).mean()), p / len(y)
    want, dwant = cross_entropy(np, a, labels)
    got, dgot = cross_entropy(cp, cp.asarray(a), cp.asarray(labels))
    if not (np.isclose(got, want, rtol=1e-5) and np.allclose(cp.asnumpy(dgot), dwant, atol=1e-6)):
        return "a wrong softmax cross-entropy (CuPy's elementwise, reduction and indexing kernels)"
    buf = cp.empty((4, 4), dtype=cp.float32)
    buf[...] = cp.asarray(a[0])[None, :]
    if not (bool(cp.isfinite(buf).all()) and np.array_equal(cp.asnumpy(buf), np.broadcast_to(a[0], (4, 4)))):
        return "a wrong broadcast assignment or finite check"
    CupyOps.synchronize()
    return None


def cupy_problem():
    """None when CuPy imports and a device passes a smoke test, else the reason (with the underlying error)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising something else
        return f"CuPy is not installed or does not import ({type(e).__name__}: {e}); {_CUPY_WHEEL_HINT}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy imports but finds no usable CUDA device or driver ({type(e).__name__}: {e})"
    if n < 1:
        return "CuPy imports but there is no CUDA device"
    try:  # our kernels in float32 and float64, cuBLAS, and CuPy's own run-time compiled kernels
        wrong = smoke_test()
    except Exception as e:
        return f"the CUDA device failed a smoke test: {_diagnose(e)}"
    return f"the CUDA device computed {wrong} in the smoke test" if wrong else None


def select_backend(name=None):
    """Choose the backend once per process: 'auto', 'cpu' or 'cupy' (default: $FLATNET_BACKEND, else 'auto').

    'auto' takes CuPy only when it imports and a device passes a smoke test, else the CPU.
    'cupy' raises BackendUnavailable saying why when it cannot run. Returns (name, reason):
    the backend chosen and, for 'auto' falling back to the CPU, why CuPy was not used.
    Importing `engine` never imports CuPy; only this call does.
    """
    name = name or os.environ.get(BACKEND_ENV) or "auto"
    if name not in ("auto", "cpu", "cupy"):
        raise ValueError(f"unknown backend {name!r} (expected auto, cpu or cupy)")
    if name == "cpu":
        return "cpu", None
    problem = cupy_problem()
    if name == "cupy" and problem:
        raise BackendUnavailable(f"--backend cupy: {problem}")
    return ("cpu", problem) if problem else ("cupy", None)
