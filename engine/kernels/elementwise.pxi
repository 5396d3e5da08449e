# ReLU, dropout masks (dropout_hash.h) and the masked scale.
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

cdef extern from "dropout_hash.h" nogil:
    unsigned long long fl_splitmix64(unsigned long long seed, unsigned long long i)


cdef enum:
    CHUNK = 16384   # elements per parallel work item in the element-wise kernels


def relu_forward(const floating[::1] x, floating[::1] out, int num_threads):
    """out = max(x, 0) on flat arrays (NaN stays NaN)."""
    cdef Py_ssize_t n = x.shape[0], blk, i, i1
    for blk in prange((n + CHUNK - 1) // CHUNK, nogil=True, schedule='static', num_threads=num_threads):
        i1 = _imin(n, (blk + 1) * CHUNK)
        for i in range(blk * CHUNK, i1):
            out[i] = 0 if x[i] < 0 else x[i]


def relu_backward(const floating[::1] y, const floating[::1] dy, floating[::1] dx, int num_threads):
    """dx = dy where the forward output y > 0, else 0."""
    cdef Py_ssize_t n = y.shape[0], blk, i, i1
    for blk in prange((n + CHUNK - 1) // CHUNK, nogil=True, schedule='static', num_threads=num_threads):
        i1 = _imin(n, (blk + 1) * CHUNK)
        for i in range(blk * CHUNK, i1):
            dx[i] = dy[i] if y[i] > 0 else 0


def mask_scale(const floating[::1] x, const unsigned char[::1] mask, double scale,
               floating[::1] out, int num_threads):
    """out = x * scale where mask is set, else 0 (inverted dropout, forward and backward)."""
    cdef Py_ssize_t n = x.shape[0], blk, i, i1
    for blk in prange((n + CHUNK - 1) // CHUNK, nogil=True, schedule='static', num_threads=num_threads):
        i1 = _imin(n, (blk + 1) * CHUNK)
        for i in range(blk * CHUNK, i1):
            out[i] = x[i] * <floating> scale if mask[i] else 0


def dropout_mask(unsigned char[::1] mask, unsigned long long seed, unsigned long long threshold, int num_threads):
    """mask[i] = 1 when the top 32 bits of splitmix64(seed, i) are >= threshold, else 0.

    threshold = p * 2^32 keeps each element with probability 1 - p. A counter-based hash:
    the mask depends only on (seed, i), not on the thread count, and it is the same
    function as the CUDA kernel's (engine/cuda_kernels.cu), so both backends draw the
    same masks from the same seed.
    """
    cdef Py_ssize_t n = mask.shape[0], blk, i, i1
    for blk in prange((n + CHUNK - 1) // CHUNK, nogil=True, schedule='static', num_threads=num_threads):
        i1 = _imin(n, (blk + 1) * CHUNK)
        for i in range(blk * CHUNK, i1):
            mask[i] = 1 if (fl_splitmix64(seed, <unsigned long long> i) >> 32) >= threshold else 0
