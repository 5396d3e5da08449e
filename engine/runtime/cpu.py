"""The CPU operation set: compiled Cython/OpenMP kernels and BLAS on numpy arrays."""
import numpy as np

from .. import _kernels
from .dropout import dropout_seed
from .threads import threads_for


class CpuOps:
    """Array operations on numpy arrays: compiled kernels, scipy BLAS and numpy allocation."""

    name = "cpu"
    xp = np

    @staticmethod
    def asarray(x):
        """x as a numpy array, copied to the host if it lives on another backend (a CuPy array's get())."""
        return x.get() if not isinstance(x, np.ndarray) and hasattr(x, "get") else np.asarray(x)

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
        f(x, w, b, pad, flip, out, threads_for(out.size * w.shape[1]))
        return out

    @staticmethod
    def conv1d_grad_params(axis, x, dy, pad, dw, db):
        f = _kernels.vconv_grad_params if axis == 2 else _kernels.hconv_grad_params
        f(x, dy, pad, dw, db, threads_for(dy.size * dw.shape[1]))

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
        _kernels.im2col(x, n0, kh, kw, stride, pad, cols, threads_for(cols.size))
        return cols

    @staticmethod
    def col2im(cols, n0, kh, kw, stride, pad, dx):
        _kernels.col2im(cols, n0, kh, kw, stride, pad, dx, threads_for(cols.size))
        return dx

    # reductions, pooling, element-wise ---------------------------------------------
    @staticmethod
    def channel_sum(x3, out):
        _kernels.channel_sum(x3, out, threads_for(x3.size))
        return out

    @staticmethod
    def maxpool_forward(x, k, stride, out, argmax):
        _kernels.maxpool_forward(x, k, stride, out, argmax, threads_for(out.size * k * k))

    @staticmethod
    def maxpool_backward(dy, argmax, dx, k, stride):
        """Scatter dy to the argmax positions (k and stride are for backends that gather instead)."""
        _kernels.maxpool_backward(dy, argmax, dx, threads_for(dx.size))
        return dx

    @staticmethod
    def relu_forward(x, out):
        _kernels.relu_forward(x.reshape(-1), out.reshape(-1), threads_for(x.size))
        return out

    @staticmethod
    def relu_backward(y, dy, dx):
        _kernels.relu_backward(y.reshape(-1), dy.reshape(-1), dx.reshape(-1), threads_for(y.size))
        return dx

    @staticmethod
    def dropout_mask(rng, p, mask):
        """Fill `mask` (uint8) with 1 at probability 1-p, from a seed drawn from the Generator `rng`."""
        seed, threshold = dropout_seed(rng, p)
        _kernels.dropout_mask(mask.reshape(-1), seed, threshold, threads_for(mask.size))
        return mask

    @staticmethod
    def mask_scale(x, mask, scale, out):
        _kernels.mask_scale(x.reshape(-1), mask.reshape(-1), scale, out.reshape(-1), threads_for(x.size))
        return out
