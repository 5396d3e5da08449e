"""The thin set of array operations the layers are written against, and thread control.

Layers never call the compiled kernels or BLAS directly: they ask ``get_ops(x)``
for the operation set that matches the array they hold, so the same layer code runs
on every backend. Two sets provide the same names: ``CpuOps`` (compiled Cython/OpenMP
kernels plus scipy's BLAS, on numpy arrays) and ``backend_cupy.CupyOps`` (CUDA kernels
and cuBLAS, on CuPy arrays), imported only when a CuPy array or the CuPy backend is
asked for.
"""
import os
import sys
import time

import numpy as np

from . import _kernels

_num_threads = None


def openmp_enabled():
    """True when the compiled kernels were built with OpenMP (else they run on one thread)."""
    return _kernels.openmp_enabled()


def get_num_threads():
    """Threads the kernels use: set_num_threads(n) if called, else OMP_NUM_THREADS, else all cores."""
    if not openmp_enabled():
        return 1
    if _num_threads is not None:
        return _num_threads
    return max(1, _kernels.omp_max_threads())


def set_num_threads(n):
    """Use `n` threads in the kernels from now on (None: back to OMP_NUM_THREADS / all cores)."""
    global _num_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"set_num_threads: expected a positive integer, got {n!r}")
        n = int(n)
    _num_threads = n


def threads_chosen():
    """True when the thread count was chosen (set_num_threads(n) or OMP_NUM_THREADS), not defaulted."""
    return _num_threads is not None or bool(os.environ.get("OMP_NUM_THREADS"))


class CpuShare:
    """How many cores other processes (or the hypervisor, as steal time) keep busy.

    Busy time of the whole machine from /proc/stat minus this process's own CPU time, over
    windows of at least `window` seconds (the counters tick every 10 ms); between windows
    the last estimate stands, so a call costs a clock read. `read` gives (machine busy
    core-seconds, own core-seconds) and `clock` seconds; tests pass their own.
    """

    def __init__(self, window=0.25, read=None, clock=time.monotonic, cores=None):
        self.window, self.read, self.clock = window, read or self._proc_stat, clock
        self.cores = cores or os.cpu_count() or 1
        self.others, self._last, self._broken = 0.0, None, False

    @staticmethod
    def _proc_stat():
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        ticks = [int(v) for v in fields[1:9]]
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait; steal counts as taken
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def update(self):
        """Refresh the estimate when a window has passed; returns cores busy with others' work."""
        now = self.clock()
        if self._broken or (self._last is not None and now - self._last[0] < self.window):
            return self.others
        try:
            busy, own = self.read()
        except (OSError, ValueError, IndexError):
            self._broken, self.others = True, 0.0  # no /proc/stat here: assume the machine is ours
            return self.others
        if self._last is not None:
            t, busy0, own0 = self._last
            self.others = max(0.0, ((busy - busy0) - (own - own0)) / (now - t))
        self._last = (now, busy, own)
        return self.others

    def threads(self, wanted):
        """At most `wanted` threads, one per core the others leave free (at least one)."""
        free = self.cores - self.update()
        return max(1, min(wanted, int(free + 0.5)))


cpu_share = CpuShare()


def run_threads():
    """Threads for the next parallel call whose threads wait for each other (barriers).

    A count the user chose is used as is. The default (all cores) shrinks to the cores other
    processes leave free: with one busy process beside it on two cores, two threads that wait
    at every barrier for a descheduled partner are slower than one (docs/benchmarks.md, "Under
    a competing load"). Results do not depend on the thread count, so this changes only the time.
    """
    wanted = get_num_threads()
    if wanted == 1 or threads_chosen():
        return wanted
    return cpu_share.threads(wanted)


# Below this many output elements a kernel runs on one thread: waking a sleeping thread
# pool costs tens of microseconds, more than the work (batch-1 inference is all such calls).
# Results do not depend on the thread count, so this changes only the time.
SERIAL_BELOW = 32768


def _threads(n_elements):
    return 1 if n_elements < SERIAL_BELOW else run_threads()


def kernels_path():
    """File of the compiled kernel module actually imported (CI checks it is a built extension)."""
    return os.path.abspath(_kernels.__file__)


class CpuOps:
    """Array operations on numpy arrays: compiled kernels, scipy BLAS and numpy allocation."""

    name = "cpu"
    xp = np

    @staticmethod
    def asarray(x):
        """x as a numpy array, copied to the host if it lives on another backend."""
        return to_numpy(x)

    @staticmethod
    def asnumpy(x):
        return np.asarray(x)

    @staticmethod
    def synchronize():
        pass

    # 1D convolutions ----------------------------------------------------------------
    @staticmethod
    def conv1d(axis, x, w, b, pad, flip, out):
        """Per-channel correlation along H (axis=2) or W (axis=3); see _kernels for the formula."""
        f = _kernels.vconv_forward if axis == 2 else _kernels.hconv_forward
        f(x, w, b, pad, flip, out, _threads(out.size * w.shape[1]))
        return out

    @staticmethod
    def conv1d_grad_params(axis, x, dy, pad, dw, db):
        f = _kernels.vconv_grad_params if axis == 2 else _kernels.hconv_grad_params
        f(x, dy, pad, dw, db, _threads(dy.size * dw.shape[1]))

    # GEMM ---------------------------------------------------------------------------
    @staticmethod
    def gemm(trans_a, trans_b, alpha, a, b, beta, c):
        _kernels.gemm(trans_a, trans_b, alpha, a, b, beta, c)
        return c

    @staticmethod
    def batched_gemm(trans_a, trans_b, alpha, a, b, beta, c, shared_a=False, shared_b=False):
        _kernels.batched_gemm(trans_a, trans_b, alpha, a, b, beta, c, shared_a, shared_b)
        return c

    # im2col -------------------------------------------------------------------------
    @staticmethod
    def im2col(x, n0, kh, kw, stride, pad, cols):
        _kernels.im2col(x, n0, kh, kw, stride, pad, cols, _threads(cols.size))
        return cols

    @staticmethod
    def col2im(cols, n0, kh, kw, stride, pad, dx):
        _kernels.col2im(cols, n0, kh, kw, stride, pad, dx, _threads(cols.size))
        return dx

    # reductions, pooling, element-wise ---------------------------------------------
    @staticmethod
    def channel_sum(x3, out):
        _kernels.channel_sum(x3, out, _threads(x3.size))
        return out

    @staticmethod
    def maxpool_forward(x, k, stride, out, argmax):
        _kernels.maxpool_forward(x, k, stride, out, argmax, _threads(out.size * k * k))

    @staticmethod
    def maxpool_backward(dy, argmax, dx, k, stride):
        """Scatter dy to the argmax positions (k and stride are for backends that gather instead)."""
        _kernels.maxpool_backward(dy, argmax, dx, _threads(dx.size))
        return dx

    @staticmethod
    def relu_forward(x, out):
        _kernels.relu_forward(x.reshape(-1), out.reshape(-1), _threads(x.size))
        return out

    @staticmethod
    def relu_backward(y, dy, dx):
        _kernels.relu_backward(y.reshape(-1), dy.reshape(-1), dx.reshape(-1), _threads(y.size))
        return dx

    @staticmethod
    def dropout_mask(rng, p, mask):
        """Fill `mask` (uint8) with 1 at probability 1-p, from a seed drawn from the Generator `rng`."""
        seed, threshold = dropout_seed(rng, p)
        _kernels.dropout_mask(mask.reshape(-1), seed, threshold, _threads(mask.size))
        return mask

    @staticmethod
    def mask_scale(x, mask, scale, out):
        _kernels.mask_scale(x.reshape(-1), mask.reshape(-1), scale, out.reshape(-1), _threads(x.size))
        return out


def dropout_seed(rng, p):
    """(seed, threshold) of one dropout mask: a seed drawn from the layer's numpy Generator
    (so a checkpoint's generator state fixes every later mask, on every backend) and
    p * 2^32 (the kernels keep an element when 32 hash bits are >= it)."""
    return int(rng.integers(0, 2**63)), dropout_threshold(p)


def dropout_threshold(p):
    """p * 2^32: the kernels keep an element when 32 bits of its hash are >= it."""
    return min(int(round(p * 2.0**32)), 2**32)


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


def _cupy_problem():
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
        from .backend_cupy import smoke_test
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
    problem = _cupy_problem()
    if name == "cupy" and problem:
        raise BackendUnavailable(f"--backend cupy: {problem}")
    return ("cpu", problem) if problem else ("cupy", None)


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
        from .backend_cupy import CupyOps
        return CupyOps
    raise ValueError(f"unknown backend {name!r} (expected cpu or cupy)")


def to_numpy(x):
    """A numpy array with the contents of `x`, wherever `x` lives (files are written from these)."""
    return get_ops(x).asnumpy(x) if is_array(x) else np.asarray(x)
