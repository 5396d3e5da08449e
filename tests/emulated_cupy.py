"""A CPU stand-in for CuPy, so flatnet's CuPy backend runs (slowly) where there is no GPU.

Installed as ``sys.modules["cupy"]`` by the ``backend`` fixture (conftest.py) only when the
real CuPy is not installed (``real_cupy_installed()``), and for a whole test run with
FLATNET_TEST_EMULATED_CUPY=1, where `auto` then selects it as it would a GPU. It mimics what
matters to the engine's glue code:

* ``ndarray`` is a numpy subclass that, like CuPy's arrays, refuses to mix with host
  (numpy) arrays: no implicit conversion (``__array__`` raises), numpy functions called
  on it raise, a ufunc or an assignment with a host array operand raises.
* ``RawModule(code, options)`` compiles the CUDA source as C++ with tests/cuda_emulation.h
  and calls its kernels through ctypes. Kernel arguments must be device arrays
  (C-contiguous) or numpy scalars of an explicit width, as with CuPy's RawKernel; a host
  array or a bare Python number is refused.
* ``cupy.cuda.cublas.{s,d}gemmStridedBatched`` take device addresses and compute on them as
  cuBLAS documents it (column-major, leading dimensions, strides, host alpha and beta); as in CuPy
  they refuse to run while the current stream captures. libcublas itself, which the engine calls
  through ctypes to capture GEMMs, is tests/cublas_emulation.c, built and loaded as
  libcublas.so.emulated so that the engine finds it among the process's libraries.
* Everything else (``cupy.matmul``, ``cupy.exp``, ...) is numpy's function on the
  unwrapped arrays, its results wrapped back.
* Streams and CUDA graphs: ``Stream.begin_capture()`` starts recording, and while it records a
  kernel launch or a call into libcublas (on the capturing stream, as the handle's stream was
  set) is recorded, not run; ``end_capture()`` returns a ``Graph`` whose ``launch()`` runs the records
  in order, on the addresses they were given. Any other device work while capturing (an
  element-wise operation, an assignment, a copy, a read, ``set``) raises, so an executor that
  passes here puts nothing but kernels and cuBLAS calls in its graphs, and anything a step
  changes reaches the device outside the capture.

What this verifies: the CuPy operation set's Python side (launch arguments, shapes,
dtypes, in-place writes), the host/device boundary in layers, loss, trainer and model
files, and the kernels' arithmetic. What it cannot: CUDA itself (NVRTC, cuBLAS, a real
launch on a device, speed).
"""
import ctypes
import hashlib
import importlib.machinery
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HEADER = Path(__file__).with_name("cuda_emulation.h")
_libs = {}
_build_dir = None
launch_shape = None  # (blocks, threads) to run a kernel as that many emulated threads; None: one thread
reads = 0  # device-to-host reads so far (asnumpy, .get(), float(), int(), bool(), .item())
graph_launches = 0  # Graph.launch() calls so far
_capture = None  # the list a stream capture records into, while one runs
_cublas_stream = 0  # the stream cuBLAS calls run on (cupy.cuda.cublas.setStream)


def _not_capturing(what):
    if _capture is not None:
        raise RuntimeError(f"{what} while a stream is capturing: a CUDA graph may hold only kernel launches "
                           f"and cuBLAS calls here (cudaErrorStreamCaptureUnsupported)")


class ndarray(np.ndarray):
    """A 'device' array: numpy storage, CuPy's refusal to mix with host arrays."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _not_capturing(f"cupy.{ufunc.__name__}")
        args = [_device_operand(a, ufunc.__name__) for a in inputs]
        if out is not None:
            kwargs["out"] = tuple(_device_operand(o, ufunc.__name__) for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        return out[0] if out is not None and len(out) == 1 else _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} was called on a device array (CuPy refuses this; "
                        f"use cupy.{func.__name__} or cupy.asnumpy first)")

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def __setitem__(self, key, value):
        _not_capturing("an assignment to a device array")
        super().__setitem__(key, _device_operand(value, "setitem"))

    @property
    def data(self):  # CuPy's MemoryPointer: .ptr is the device address
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        global reads
        _not_capturing("a device-to-host read")
        reads += 1
        return np.array(self.view(np.ndarray))

    def set(self, host):
        """Copy a host array of the same shape in (CuPy's ndarray.set)."""
        _not_capturing("ndarray.set (a host-to-device copy)")
        host = np.asarray(host)
        if host.shape != self.shape:
            raise ValueError(f"ndarray.set: shape mismatch {host.shape} vs {self.shape}")
        np.copyto(self.view(np.ndarray), host.astype(self.dtype, copy=False))

    def copy(self, order="C"):
        _not_capturing("ndarray.copy")
        return np.array(self.view(np.ndarray), order=order, copy=True).view(ndarray)

    # a Python number from a device array is a blocking read on a GPU: counted too
    def __float__(self):
        return float(self.get())

    def __int__(self):
        return int(self.get())

    def __bool__(self):
        return bool(self.get())

    def __index__(self):
        return self.get().__index__()

    def item(self, *args):
        return self.get().item(*args)


def _device_operand(a, what):
    if isinstance(a, (list, tuple)) and any(isinstance(v, np.ndarray) for v in a):  # cupy.stack([...]) and the like
        return type(a)(_device_operand(v, what) for v in a)
    if isinstance(a, ndarray):
        return a.view(np.ndarray)
    if isinstance(a, np.ndarray) and a.ndim > 0:
        raise TypeError(f"{what}: a host (numpy) array mixed with device arrays; CuPy refuses this")
    return a


def _wrap(result):
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, np.ndarray) and not isinstance(result, ndarray):
        return result.view(ndarray)
    if isinstance(result, np.generic):  # CuPy's reductions give 0-d device arrays
        return np.asarray(result).view(ndarray)
    return result


def _device_function(name):
    func = getattr(np, name)

    def call(*args, **kwargs):
        _not_capturing(f"cupy.{name}")
        args = [_device_operand(a, f"cupy.{name}") for a in args]
        kwargs = {k: _device_operand(v, f"cupy.{name}") for k, v in kwargs.items()}
        return _wrap(func(*args, **kwargs))

    call.__name__ = name
    return call


def asarray(a, dtype=None):
    """Host or device data -> a device array (the same object when it already is one of that dtype)."""
    _not_capturing("cupy.asarray")
    if isinstance(a, ndarray) and (dtype is None or a.dtype == np.dtype(dtype)):
        return a
    base = a.view(np.ndarray) if isinstance(a, ndarray) else a
    return np.array(base, dtype=dtype, copy=True).view(ndarray)


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def ascontiguousarray(a, dtype=None):
    _not_capturing("cupy.ascontiguousarray")
    if not isinstance(a, ndarray):
        raise TypeError("cupy.ascontiguousarray: expected a device array")
    return np.ascontiguousarray(a.view(np.ndarray), dtype=dtype).view(ndarray)


# ----------------------------------------------------------------------------- kernels

def _compile(code, options):
    """Compile CUDA `code` as C++ for the CPU (cached by source and options); returns the ctypes library."""
    global _build_dir
    key = hashlib.sha256((code + "\0" + "\0".join(options)).encode()).hexdigest()[:16]
    if key not in _libs:
        if _build_dir is None:
            _build_dir = Path(tempfile.mkdtemp(prefix="flatnet-emulated-cupy-"))
        src, lib = _build_dir / f"{key}.cu", _build_dir / f"{key}.so"
        src.write_text(code)
        cmd = ["g++", "-O1", "-shared", "-fPIC", "-x", "c++", "-include", str(HEADER), *options, "-o", str(lib),
               str(src)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        _libs[key] = ctypes.CDLL(str(lib))
    return _libs[key]


_SCALARS = {np.dtype(np.int64): ctypes.c_longlong, np.dtype(np.uint64): ctypes.c_ulonglong,
            np.dtype(np.int32): ctypes.c_int, np.dtype(np.float32): ctypes.c_float,
            np.dtype(np.float64): ctypes.c_double}


class _Kernel:
    def __init__(self, lib, name):
        self.lib, self.name = lib, name
        self.func = getattr(lib, name)
        self.func.restype = None

    def __call__(self, grid, block, args):
        if not (isinstance(grid, tuple) and isinstance(block, tuple) and grid[0] >= 1 and block[0] >= 1):
            raise ValueError(f"{self.name}: grid and block must be tuples of positive sizes, got {grid}, {block}")
        c_args = []
        for i, a in enumerate(args):
            if isinstance(a, ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {i} is not C-contiguous")
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.generic) and a.dtype in _SCALARS:
                c_args.append(_SCALARS[a.dtype](a.item()))
            else:
                raise TypeError(f"{self.name}: argument {i} is a {type(a).__name__}; a kernel takes device arrays "
                                f"and numpy scalars of an explicit width")
        # The kernels are grid-stride loops: one emulated thread with a grid of one covers every
        # element. With launch_shape = (blocks, threads) set, every thread of that grid runs instead.
        blocks, threads = launch_shape or (1, 1)

        def run():
            for bi in range(blocks):
                for ti in range(threads):
                    self.lib.flatnet_launch(bi, ti, threads, blocks)
                    self.func(*c_args)

        if _capture is not None:
            _capture.append(run)  # recorded with the addresses and values given now
        else:
            run()


class RawModule:
    def __init__(self, code=None, options=()):
        self.lib = _compile(code, tuple(options))

    def get_function(self, name):
        return _Kernel(self.lib, name)


# ----------------------------------------------------------------------------- cuBLAS

def _gemm(ctype, stream, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc, strideC,
          batchCount):
    """{S,D}gemmStridedBatched as cuBLAS documents it, on `stream`: column-major matrices at device addresses,
    C_i = alpha op(A_i) op(B_i) + beta C_i with X_i at X + i * strideX elements (op: 0 = N, 1 = T); alpha and
    beta are host addresses (the default pointer mode), read at the call. While a stream captures, a call on
    that stream is recorded, and one on another stream refused (it would run at once, outside the graph)."""
    size = ctypes.sizeof(ctype)

    def matrix(ptr, ld, rows, cols):  # column-major rows x cols, leading dimension ld
        flat = np.ctypeslib.as_array((ctype * (ld * (cols - 1) + rows)).from_address(ptr))
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (size, ld * size))

    a_rows, b_rows = (m if transa == 0 else k), (k if transb == 0 else n)
    if min(m, n, k, batchCount) < 0 or transa not in (0, 1) or transb not in (0, 1) or \
            lda < max(1, a_rows) or ldb < max(1, b_rows) or ldc < max(1, m):
        raise RuntimeError("CUBLAS_STATUS_INVALID_VALUE")
    al, be = ctype.from_address(alpha).value, ctype.from_address(beta).value

    def run():
        for i in range(batchCount):
            a = matrix(A + i * strideA * size, lda, a_rows, k if transa == 0 else m)
            b = matrix(B + i * strideB * size, ldb, b_rows, n if transb == 0 else k)
            c = matrix(C + i * strideC * size, ldc, m, n)
            prod = al * ((a if transa == 0 else a.T) @ (b if transb == 0 else b.T))
            c[...] = prod if be == 0 else prod + be * c  # beta = 0: C is not read

    if _capture is None:
        run()
    elif stream != _capture.stream.ptr:
        raise RuntimeError("a cuBLAS call on a stream other than the capturing one: it would run at once, "
                           "outside the graph")
    else:
        _capture.append(run)


def _gemm_strided_batched(ctype):
    """cupy.cuda.cublas.{s,d}gemmStridedBatched: as CuPy, the handle's stream is first set to the current
    stream (which CuPy refuses while that stream captures, see _set_stream)."""
    def gemm(handle, *args):
        _set_stream(handle, get_current_stream().ptr)
        _gemm(ctype, _cublas_stream, *args)
    return gemm


_libcublas = []  # the stand-in libcublas (tests/cublas_emulation.c) and its registered callback, kept alive
libcublas_errors = []  # what made a call into it fail (the engine sees only the status)
_GEMM_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_longlong, *[ctypes.c_int] * 5, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong,
                                  ctypes.c_int)


def _load_libcublas():
    """Build and load libcublas.so.emulated once per process: the engine finds it among the loaded libraries
    as it finds the real libcublas, and calls it through ctypes (GraphBlas in engine/runtime/cuda.py)."""
    global _build_dir
    if _libcublas:
        return
    if _build_dir is None:
        _build_dir = Path(tempfile.mkdtemp(prefix="flatnet-emulated-cupy-"))
    path = _build_dir / "libcublas.so.emulated"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(path), str(HEADER.with_name("cublas_emulation.c"))],
                   check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(path))

    def gemm(is_double, stream, *args):  # an exception cannot cross into C: it becomes a cuBLAS status
        try:
            _gemm(ctypes.c_double if is_double else ctypes.c_float, stream, *args)
            return 0
        except Exception as e:
            libcublas_errors.append(e)
            return 14  # CUBLAS_STATUS_INTERNAL_ERROR

    callback = _GEMM_CALLBACK(gemm)
    lib.flatnet_set_gemm(callback)
    _libcublas.extend([lib, callback])


# ----------------------------------------------------------------------------- streams and graphs

class _Records(list):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream


class Graph:
    def __init__(self, records):
        self._records = list(records)

    def launch(self, stream=None):
        global graph_launches
        _not_capturing("Graph.launch")
        graph_launches += 1
        for run in self._records:
            run()


class Stream:
    """A stream: work runs at once (in order), except while it captures (see the module docstring)."""
    _next_ptr = 2  # 0: the legacy default stream
    _current = []

    def __init__(self, null=False, non_blocking=False):
        self.ptr = 0 if null else Stream._next_ptr
        Stream._next_ptr += 0 if null else 1

    def __enter__(self):
        Stream._current.append(self)
        return self

    def __exit__(self, *exc):
        Stream._current.pop()

    def begin_capture(self, mode=None):
        global _capture
        if self.ptr in (0, 1):
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if _capture is not None:
            raise RuntimeError("cudaErrorIllegalState: a stream is already capturing")
        _capture = _Records(self)

    def end_capture(self):
        global _capture
        if _capture is None or _capture.stream is not self:
            raise RuntimeError("cudaErrorIllegalState: this stream is not capturing")
        records, _capture = _capture, None
        return Graph(records)


_NULL_STREAM = Stream(null=True)


def get_current_stream():
    return Stream._current[-1] if Stream._current else _NULL_STREAM


def _set_stream(handle, ptr):
    """cupy.cuda.cublas.setStream, which CuPy refuses for a stream that is capturing."""
    global _cublas_stream
    if _capture is not None and _capture.stream.ptr == ptr:
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
    _cublas_stream = ptr


# ----------------------------------------------------------------------------- the module

def available():
    """None when the emulation can run here (a C++ compiler), else why not."""
    missing = [cc for cc in ("g++", "gcc") if not shutil.which(cc)]
    return f"{' and '.join(missing)} not on the PATH" if missing else None


def make_module():
    mod = types.ModuleType("cupy", __doc__)
    mod.ndarray, mod.asarray, mod.asnumpy, mod.ascontiguousarray = ndarray, asarray, asnumpy, ascontiguousarray
    mod.RawModule = RawModule
    mod.__flatnet_emulated__ = True
    mod.__version__ = "emulated"
    for name in ("float32", "float64", "int32", "int64", "uint8", "uint64", "bool_"):
        setattr(mod, name, getattr(np, name))
    for name in ("empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "arange", "matmul", "tensordot",
                 "broadcast_to", "stack", "exp", "log", "isfinite", "maximum", "sum", "allclose", "array_equal"):
        setattr(mod, name, _device_function(name))
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, deviceSynchronize=lambda: _not_capturing("sync"),
                                    runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0,
                                    getDeviceProperties=lambda i: {"name": b"emulated (CPU)"})
    cublas = types.SimpleNamespace(sgemmStridedBatched=_gemm_strided_batched(ctypes.c_float),
                                   dgemmStridedBatched=_gemm_strided_batched(ctypes.c_double),
                                   setStream=_set_stream)
    mod.cuda = types.SimpleNamespace(runtime=runtime, cublas=cublas, get_cublas_handle=lambda: 1, Stream=Stream,
                                     Graph=Graph, get_current_stream=get_current_stream)
    return mod


def is_emulated(module):
    return getattr(module, "__flatnet_emulated__", False)


def real_cupy_installed():
    """True when the real CuPy is imported or importable (whatever sys.modules['cupy'] holds now)."""
    mod = sys.modules.get("cupy")
    if mod is not None and not is_emulated(mod):
        return True
    return importlib.machinery.PathFinder.find_spec("cupy") is not None


_MISSING = object()
BOUND = ("cupy", "engine.runtime.cuda", "engine.runtime.cuda_step")  # cupy, and the modules that import it
_saved = []  # those entries of sys.modules before each install(), restored by uninstall()


def install():
    """Put the stand-in in sys.modules['cupy'] (dropping any engine module bound to a previous one)."""
    _load_libcublas()
    _saved.append(tuple(sys.modules.get(name, _MISSING) for name in BOUND))
    sys.modules["cupy"] = make_module()
    for name in BOUND[1:]:
        sys.modules.pop(name, None)


def uninstall():
    """Undo the last install(): the entries of BOUND in sys.modules as they were before it."""
    before = _saved.pop() if _saved else (_MISSING,) * len(BOUND)
    for name, mod in zip(BOUND, before):
        if mod is _MISSING:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod
