"""The CuPy operation set: the same names as runtime.cpu.CpuOps, on CuPy arrays.

Imported only when a CuPy array reaches a layer or the CuPy backend is selected, so
importing `engine` never imports CuPy. GEMMs are one cuBLAS strided batched call each
(a shared weight matrix has stride 0, transposes are cuBLAS's flags), except the weight
gradients summed over a batch (cupy.tensordot); the 1D convolutions, im2col/col2im,
pooling, ReLU and dropout are the CUDA kernels of cuda_kernels.cu, compiled by CuPy on
first use, once per element type, each kernel looked up once and cached. Every kernel
writes each output element from one thread (no atomics), so its result does not depend
on the launch shape.
"""
import ctypes
import os
from pathlib import Path

import cupy as cp
import numpy as np

from .dropout import dropout_seed

SOURCE_PATH = Path(__file__).parents[1] / "cuda_kernels.cu"
TF32_ENV = "FLATNET_TF32"  # "1": GraphBlas's float32 GEMMs may round their inputs to TF32 (train.py --tf32)
BLOCK = 256            # threads per block
MAX_BLOCKS = 1 << 16   # the kernels are grid-stride loops: more elements than threads is fine
GRAD_SEGMENT = 256     # output elements per thread (whole rows, at least one) in conv1d_grad_partial
_modules = {}
_functions = {}
_REAL = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def _module(dtype, source=SOURCE_PATH):
    """The compiled kernel module of `source` for float32 or float64 (compiled on first use, then cached)."""
    dtype = np.dtype(dtype)
    key = (source, dtype)
    if key not in _modules:
        if dtype not in _REAL:
            raise TypeError(f"the CUDA kernels take float32 or float64 arrays, not {dtype}")
        _modules[key] = cp.RawModule(code=source.read_text(),  # it includes dropout_hash.h beside it
                                     options=(f"-DFLATNET_REAL={_REAL[dtype]}", f"-I{source.parent}"))
    return _modules[key]


def kernel(name, dtype, source=SOURCE_PATH):
    """The kernel `name` of the module of `source` for `dtype`, looked up once (a lookup builds a new RawKernel)."""
    key = (name, np.dtype(dtype), source)
    f = _functions.get(key)
    if f is None:
        f = _functions[key] = _module(dtype, source).get_function(name)
    return f


def _kernel_arg(name, i, a):
    """A launch argument as the kernels take it: a C-contiguous device array, an integer as
    np.int64 (the kernels' 64-bit `long long` / `unsigned long long`), or a numpy float
    scalar of the element type. Anything else is refused, so no call site can pass a strided
    view or a 32-bit integer by accident."""
    if isinstance(a, cp.ndarray):
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: argument {i} is a strided view {a.shape} {a.strides}; the kernels take "
                             f"C-contiguous arrays")
        return a
    if isinstance(a, (int, np.integer)):  # bool included: the kernels' flags are long long too
        return np.int64(a)
    if isinstance(a, np.floating):
        return a
    raise TypeError(f"{name}: argument {i} is a {type(a).__name__}; a kernel takes device arrays, integers and "
                    f"numpy floats of the element type")


def _launch(name, dtype, n, *args):
    """Run kernel `name` of the `dtype` module over `n` output elements (see _kernel_arg)."""
    _run(kernel(name, dtype), name, n, args)


def launch(source, name, n, *args):
    """Run float32 kernel `name` of the CUDA file `source` over `n` output elements on the current stream."""
    _run(kernel(name, np.float32, source), name, n, args)


def _run(function, name, n, args):
    if n == 0:
        return
    blocks = min((n + BLOCK - 1) // BLOCK, MAX_BLOCKS)
    function((blocks,), (BLOCK,), tuple(_kernel_arg(name, i, a) for i, a in enumerate(args)))


def _swap(a, trans):
    return a.swapaxes(-1, -2) if trans else a


class CupyOps:
    """Array operations on CuPy arrays (C-contiguous, float32 or float64, on the current device)."""

    name = "cupy"
    xp = cp

    @staticmethod
    def asarray(x):
        return cp.asarray(x)

    @staticmethod
    def asnumpy(x):
        return cp.asnumpy(x)

    @staticmethod
    def synchronize():
        cp.cuda.runtime.deviceSynchronize()

    # 1D convolutions ----------------------------------------------------------------
    @staticmethod
    def conv1d(axis, x, w, b, pad, flip, out):
        N, C, H, W = x.shape
        _launch("conv1d_forward", x.dtype, out.size, x, w, w if b is None else b, out, N, C, H, W, w.shape[1],
                out.shape[axis], axis == 2, pad, bool(flip), b is not None)
        return out

    @staticmethod
    def conv1d_grad_params(axis, x, dy, pad, dw, db):
        """dw, db of conv1d: partial sums per image and per band of output rows (see the kernel), in double."""
        N, C, H, W = x.shape
        K = dw.shape[1]
        Ho, Wo = dy.shape[2], dy.shape[3]
        rows = max(1, GRAD_SEGMENT // Wo)
        S = (Ho + rows - 1) // rows
        part = cp.empty((N, C, S, K + 1), dtype=cp.float64)
        _launch("conv1d_grad_partial", x.dtype, part.size, x, dy, part, N, C, H, W, K, dy.shape[axis],
                axis == 2, pad, rows, S)
        total = part.sum(axis=(0, 2))
        dw[...] = total[:, :K]
        db[...] = total[:, K]

    # GEMM ---------------------------------------------------------------------------
    @staticmethod
    def gemm(trans_a, trans_b, alpha, a, b, beta, c):
        strided_gemm(trans_a, trans_b, alpha, a, b, beta, c, 1, 0, 0)
        return c

    @staticmethod
    def batched_gemm(trans_a, trans_b, alpha, a, b, beta, c, shared_a=False, shared_b=False):
        """As CpuOps.batched_gemm: c[i] = alpha op(a[i]) op(b[i]) + beta c[i]; a single c accumulates the batch."""
        batch = max(1 if shared_a else a.shape[0], 1 if shared_b else b.shape[0])
        if c.shape[0] == 1 and batch > 1:  # sum of the products over the batch: one GEMM over (batch, k)
            A, B = _swap(a, trans_a), _swap(b, trans_b)
            A = cp.broadcast_to(A[:1], (batch,) + A.shape[1:]) if shared_a else A
            B = cp.broadcast_to(B[:1], (batch,) + B.shape[1:]) if shared_b else B
            _combine(alpha, cp.tensordot(A, B, axes=([0, 2], [0, 1]))[None], beta, c)
        else:  # one strided batched GEMM; a shared operand has stride 0 (no pointer arrays, no copies)
            strided_gemm(trans_a, trans_b, alpha, a, b, beta, c, batch, 0 if shared_a else a[0].size,
                          0 if shared_b else b[0].size)
        return c

    # im2col -------------------------------------------------------------------------
    @staticmethod
    def im2col(x, n0, kh, kw, stride, pad, cols):
        _, C, H, W = x.shape
        Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
        _launch("im2col", x.dtype, cols.size, x, cols, n0, cols.shape[0], C, H, W, kh, kw, stride, pad, Ho, Wo)
        return cols

    @staticmethod
    def col2im(cols, n0, kh, kw, stride, pad, dx):
        _, C, H, W = dx.shape
        n = cols.shape[0]
        Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
        _launch("col2im", dx.dtype, n * C * H * W, cols, dx, n0, n, C, H, W, kh, kw, stride, pad, Ho, Wo)
        return dx

    # reductions, pooling, element-wise ---------------------------------------------
    @staticmethod
    def channel_sum(x3, out):
        out[...] = x3.sum(axis=(0, 2), dtype=cp.float64)
        return out

    @staticmethod
    def maxpool_forward(x, k, stride, out, argmax):
        N, C, H, W = x.shape
        _launch("maxpool_forward", x.dtype, out.size, x, out, argmax, N * C, H, W, out.shape[2], out.shape[3],
                k, stride)

    @staticmethod
    def maxpool_backward(dy, argmax, dx, k, stride):
        N, C, H, W = dx.shape
        _launch("maxpool_backward", dx.dtype, dx.size, dy, argmax, dx, N * C, H, W, dy.shape[2], dy.shape[3],
                k, stride)
        return dx

    @staticmethod
    def relu_forward(x, out):
        _launch("relu_forward", x.dtype, x.size, x, out, x.size)
        return out

    @staticmethod
    def relu_backward(y, dy, dx):
        _launch("relu_backward", y.dtype, y.size, y, dy, dx, y.size)
        return dx

    @staticmethod
    def dropout_mask(rng, p, mask):
        """Fill `mask` (uint8) with 1 at probability 1-p, on the device, from a seed drawn from `rng`.

        The CPU kernel's counter-based hash (see cuda_kernels.cu), so for the same
        generator state both backends draw the same mask.
        """
        seed, threshold = dropout_seed(rng, p)
        _launch("dropout_mask", np.float32, mask.size, mask, mask.size, seed, threshold)
        return mask

    @staticmethod
    def mask_scale(x, mask, scale, out):
        _launch("mask_scale", x.dtype, x.size, x, mask, x.dtype.type(scale), out, x.size)
        return out


def strided_gemm(trans_a, trans_b, alpha, a, b, beta, c, batch=1, stride_a=0, stride_b=0, capturable=False):
    """c[i] = alpha op(a[i]) op(b[i]) + beta c[i] for i < batch, in one cuBLAS call ({s,d}gemmStridedBatched)
    on the current stream; capturable=True calls cuBLAS directly (GraphBlas), so that a stream capture records it.

    a, b and c are C-contiguous; a[i] starts stride_a elements after a[i-1] (0: one matrix for the
    whole batch), likewise b; op transposes through cuBLAS's flag, not a copy. cuBLAS is
    column-major, where a row-major matrix reads as its transpose: c = op(a) op(b) is computed
    as c^T = op(b)^T op(a)^T, so the operands swap places.
    """
    for i, x in enumerate((a, b, c)):
        if not x.flags.c_contiguous or x.dtype != c.dtype:
            raise ValueError(f"gemm: operand {i} is {x.dtype} {x.shape} {x.strides}; expected C-contiguous {c.dtype}")
    m, n = c.shape[-2:]
    (am, k), (bk, bn) = a.shape[-2:][::-1 if trans_a else 1], b.shape[-2:][::-1 if trans_b else 1]
    if (am, bk, bn) != (m, k, n) or c.size != batch * m * n or any(
            stride and x.size != batch * stride for x, stride in ((a, stride_a), (b, stride_b))):
        raise ValueError(f"gemm: shapes {a.shape}{'^T' * trans_a} x {b.shape}{'^T' * trans_b} -> {c.shape} "
                         f"do not match for a batch of {batch}")
    if c.size == 0:
        return
    if k == 0:
        c *= beta
        return
    alpha, beta = np.array(alpha, c.dtype), np.array(beta, c.dtype)  # host scalars (cuBLAS's default pointer mode)
    args = (int(trans_b), int(trans_a), n, m, k, alpha.ctypes.data, b.data.ptr, b.shape[-1], stride_b, a.data.ptr,
            a.shape[-1], stride_a, beta.ctypes.data, c.data.ptr, n, m * n, batch)
    if capturable:
        GraphBlas.get().gemm(c.dtype, *args)
        return
    gemm = {np.dtype(np.float32): cp.cuda.cublas.sgemmStridedBatched,
            np.dtype(np.float64): cp.cuda.cublas.dgemmStridedBatched}[c.dtype]
    gemm(cp.cuda.get_cublas_handle(), *args)  # (CuPy sets the handle's stream to the current one)


def _loaded_library(name):
    """The path of the shared library whose file name starts with `name` among those this process has mapped."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if Path(path).name.startswith(name):
                return path
    raise OSError(f"{name} is not loaded in this process")


class GraphBlas:
    """cuBLAS's strided batched GEMMs called directly, on a handle of their own whose stream is set to the
    current stream at each call, so that a stream capture records them. (CuPy's cuBLAS functions refuse to
    run while a stream captures.) The library is the libcublas CuPy loaded (found among the process's
    mapped libraries, so the versions match); the handle gets a workspace of its own, as cuBLAS asks of
    code that captures its calls. With $FLATNET_TF32=1 its float32 GEMMs may use TF32 tensor cores
    (cuBLAS's CUBLAS_TF32_TENSOR_OP_MATH); by default they compute in float32 (CUBLAS_DEFAULT_MATH)."""

    WORKSPACE_BYTES = 32 * 2**20
    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        cp.cuda.get_cublas_handle()  # CuPy loads libcublas
        lib = ctypes.CDLL(_loaded_library("libcublas.so"))
        vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        gemm_args = [vp, i, i, i, i, i, vp, vp, i, ll, vp, i, ll, vp, vp, i, ll, i]
        self._gemm = {}
        for dtype, name in ((np.float32, "cublasSgemmStridedBatched"), (np.float64, "cublasDgemmStridedBatched")):
            f = getattr(lib, name)
            f.argtypes, f.restype = gemm_args, i
            self._gemm[np.dtype(dtype)] = f
        self._set_stream = lib.cublasSetStream_v2
        self._set_stream.argtypes, self._set_stream.restype = [vp, vp], i
        self.handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.tf32 = os.environ.get(TF32_ENV, "0") == "1"
        if self.tf32:
            lib.cublasSetMathMode.argtypes, lib.cublasSetMathMode.restype = [vp, i], i
            self._check(lib.cublasSetMathMode(self.handle, 3), "cublasSetMathMode")  # CUBLAS_TF32_TENSOR_OP_MATH
        self.workspace = None
        if hasattr(lib, "cublasSetWorkspace_v2"):
            self.workspace = cp.empty(self.WORKSPACE_BYTES, dtype=cp.uint8)
            lib.cublasSetWorkspace_v2.argtypes, lib.cublasSetWorkspace_v2.restype = [vp, vp, ctypes.c_size_t], i
            self._check(lib.cublasSetWorkspace_v2(self.handle, self.workspace.data.ptr, self.WORKSPACE_BYTES),
                        "cublasSetWorkspace")

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def gemm(self, dtype, *args):
        """{s,d}gemmStridedBatched(handle, *args) on the current stream."""
        self._check(self._set_stream(self.handle, cp.cuda.get_current_stream().ptr), "cublasSetStream")
        self._check(self._gemm[np.dtype(dtype)](self.handle, *args), "cublas gemmStridedBatched")


def _combine(alpha, prod, beta, c):
    """c = alpha * prod + beta * c, in place."""
    if alpha != 1.0:
        prod *= alpha
    if beta == 0.0:
        c[...] = prod
    else:
        if beta != 1.0:
            c *= beta
        c += prod
