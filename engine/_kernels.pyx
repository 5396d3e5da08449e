# The shared source of the compiled kernels: 1D convolutions, im2col/col2im, pooling, ReLU, dropout,
# GEMM, and the bindings of the compiled inference plan and training step (_infer.h, _train.h). One
# file per family in engine/kernels/, included below.
#
# setup.py compiles this source once per CPU target (baseline, avx2, avx512) into the extensions
# engine._kernels_<target>, each from a generated .pyx that only includes this file; engine/_kernels.py
# picks one at import. The directives (language_level=3, boundscheck=False, wraparound=False,
# initializedcheck=False, cdivision=True) are setup.py's.
"""

Conventions
-----------
* Arrays are C-contiguous NCHW; every argument is a typed contiguous memoryview.
  IN arrays are read, OUT arrays are overwritten entirely (no need to zero them).
* ``floating`` is float32 or float64 (fused type); float64 exists for gradient checks.
* The 1D convolutions are cross-correlations with zero padding, like Conv2d:
      y[j] = bias + sum_k w[k] * x[j + k - pad],   0 <= j < n_out
  so 'full' is pad = K-1, n_out = N+K-1; 'same' is pad = (K-1)//2, n_out = N;
  'valid' is pad = 0, n_out = N-K+1: three windows of the same kernel.
  The input gradient of that map is the same correlation with the flipped filter,
  pad' = K-1-pad and n_out = N (``flip=True``).
* Work is split over whole planes (image x channel) or whole channels, so every
  output element is written by exactly one thread in a fixed order: results do not
  depend on the thread count, and no atomics or shared accumulators are needed.
  Weight gradients are parallel over channels; each thread keeps its own row
  accumulators (allocated inside the parallel block) and reduces them at the end.
* ``num_threads`` comes from Python (engine.get_num_threads()); BLAS is only ever
  called outside parallel regions, so BLAS threads never nest inside OpenMP threads.
"""
from cython.parallel cimport prange, parallel
from cython cimport floating
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport INFINITY
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FLATNET_OPENMP 1
    #else
    #define FLATNET_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    static int omp_get_num_threads(void) { return 1; }
    #endif
    """
    int FLATNET_OPENMP
    int omp_get_max_threads() nogil
    int omp_get_thread_num() nogil
    int omp_get_num_threads() nogil


# Helpers every family below uses.

cdef inline Py_ssize_t _imax(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


# One file per kernel family (engine/kernels/); they compile into this one extension.
include "kernels/threads.pxi"
include "kernels/cpu.pxi"
include "kernels/conv1d.pxi"
include "kernels/im2col.pxi"
include "kernels/pool.pxi"
include "kernels/elementwise.pxi"
include "kernels/blas.pxi"
include "kernels/infer.pxi"
include "kernels/train.pxi"
