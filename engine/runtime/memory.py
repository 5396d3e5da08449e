"""Buffers that start on a 64-byte boundary (a cache line, one AVX-512 vector)."""
import numpy as np


def aligned_empty(n, dtype=np.float32):
    """An array of n elements whose data starts on a 64-byte boundary (a cache line).

    Unaligned 64-byte vector loads span two cache lines; on the AVX-512 build that made
    the 1D-convolution op 1.7x slower."""
    dtype = np.dtype(dtype)
    raw = np.empty(n + 64 // dtype.itemsize, dtype)
    start = (-raw.ctypes.data % 64) // dtype.itemsize
    return raw[start:start + n]


def aligned_copy(array):
    """A float32 copy of `array` in memory starting on a 64-byte boundary."""
    src = np.asarray(array, dtype=np.float32)
    out = aligned_empty(src.size).reshape(src.shape)
    out[...] = src
    return out
