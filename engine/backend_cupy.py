"""The CuPy operation set: the same names as backend.CpuOps, on CuPy arrays.

Imported only when a CuPy array reaches a layer or the CuPy backend is selected, so
importing `engine` never imports CuPy. GEMMs go through cupy.matmul / tensordot
(cuBLAS); the 1D convolutions, im2col/col2im, pooling, ReLU and dropout are the CUDA
kernels of cuda_kernels.cu, compiled by CuPy on first use, once per element type, and
cached. Every kernel writes each output element from one thread (no atomics), so its
result does not depend on the launch shape.
"""
from pathlib import Path

import cupy as cp
import numpy as np

from .backend import dropout_seed

SOURCE_PATH = Path(__file__).with_name("cuda_kernels.cu")
BLOCK = 256            # threads per block
MAX_BLOCKS = 1 << 16   # the kernels are grid-stride loops: more elements than threads is fine
_modules = {}


def _function(name, dtype):
    """The compiled kernel `name` for float32 or float64 (compiling the module on first use)."""
    dtype = np.dtype(dtype)
    module = _modules.get(dtype)
    if module is None:
        real = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[dtype]
        module = _modules[dtype] = cp.RawModule(code=SOURCE_PATH.read_text(), options=(f"-DFLATNET_REAL={real}",))
    return module.get_function(name)


def _launch(name, dtype, n, *args):
    """Run kernel `name` over `n` output elements.

    Python ints become np.int64 (the kernels' `long long`); numpy scalars keep their
    width (np.uint64 for `unsigned long long`, the element type for `real`).
    """
    if n == 0:
        return
    blocks = min((n + BLOCK - 1) // BLOCK, MAX_BLOCKS)
    args = tuple(np.int64(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in args)
    _function(name, dtype)((blocks,), (BLOCK,), args)


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
                out.shape[axis], int(axis == 2), pad, int(bool(flip)), int(b is not None))
        return out

    @staticmethod
    def conv1d_grad_params(axis, x, dy, pad, dw, db):
        N, C, H, W = x.shape
        K = dw.shape[1]
        part = cp.empty((N, C, K + 1), dtype=x.dtype)
        _launch("conv1d_grad_partial", x.dtype, part.size, x, dy, part, N, C, H, W, K, dy.shape[axis],
                int(axis == 2), pad)
        total = part.sum(axis=0)
        dw[...] = total[:, :K]
        db[...] = total[:, K]

    # GEMM ---------------------------------------------------------------------------
    @staticmethod
    def gemm(trans_a, trans_b, alpha, a, b, beta, c):
        prod = cp.matmul(_swap(a, trans_a), _swap(b, trans_b))
        _combine(alpha, prod, beta, c)
        return c

    @staticmethod
    def batched_gemm(trans_a, trans_b, alpha, a, b, beta, c, shared_a=False, shared_b=False):
        """As CpuOps.batched_gemm: c[i] = alpha op(a[i]) op(b[i]) + beta c[i]; a single c accumulates the batch."""
        A, B = _swap(a, trans_a), _swap(b, trans_b)
        batch = max(1 if shared_a else a.shape[0], 1 if shared_b else b.shape[0])
        if c.shape[0] == 1 and batch > 1:  # sum of the products over the batch: one GEMM over (batch, k)
            A = cp.broadcast_to(A[:1], (batch,) + A.shape[1:]) if shared_a else A
            B = cp.broadcast_to(B[:1], (batch,) + B.shape[1:]) if shared_b else B
            prod = cp.tensordot(A, B, axes=([0, 2], [0, 1]))[None]
        else:
            prod = cp.matmul(A[:1] if shared_a else A, B[:1] if shared_b else B)
        _combine(alpha, prod, beta, c)
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
        _launch("dropout_mask", np.float32, mask.size, mask, mask.size, np.uint64(seed), np.uint64(threshold))
        return mask

    @staticmethod
    def mask_scale(x, mask, scale, out):
        _launch("mask_scale", x.dtype, x.size, x, mask, x.dtype.type(scale), out, x.size)
        return out


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
