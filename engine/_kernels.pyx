# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled kernels of the engine: 1D convolutions, im2col/col2im, pooling, ReLU, dropout, GEMM.

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


# ----------------------------------------------------------------------------- threads

def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(FLATNET_OPENMP)


def omp_max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return omp_get_max_threads()


def testing_threads_seen(int num_threads):
    """Run a parallel region with `num_threads` and return how many threads took part."""
    cdef int seen[1024]
    cdef int i, total = 0
    for i in range(1024):
        seen[i] = 0
    with nogil, parallel(num_threads=num_threads):
        i = omp_get_thread_num()
        if i < 1024:
            seen[i] = 1
    for i in range(1024):
        total += seen[i]
    return total


# ----------------------------------------------------------------------------- 1D convolutions

cdef inline Py_ssize_t _imax(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef enum:
    BLOCK = 1024   # elements per cache block of a plane in the 1D-convolution kernels


cdef inline Py_ssize_t _rows_per_block(Py_ssize_t width) noexcept nogil:
    return _imax(1, BLOCK // _imax(width, 1))


def vconv_forward(const floating[:, :, :, ::1] x,      # IN  (N, C, H, W)
                  const floating[:, ::1] w,            # IN  (C, K)
                  const floating[::1] b,               # IN  (C,) or None
                  Py_ssize_t pad,
                  bint flip,
                  floating[:, :, :, ::1] out,          # OUT (N, C, Ho, W)
                  int num_threads):
    """Vertical (along H) per-channel correlation.

    Input and output rows have the same width, so for one tap the output rows it
    reaches and the input rows they read are both contiguous runs of the plane. The
    output is done in blocks of whole rows (about BLOCK elements, staying in L1); in a
    block each tap is one vectorized pass, not one short pass per row (rows are 16 or 8
    wide in the paper's networks). Each output element adds the bias, then the taps in order.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = w.shape[1], Ho = out.shape[2]
    cdef Py_ssize_t R = _rows_per_block(W)
    cdef Py_ssize_t plane, n, c, blk, r0, r1, j0, j1, k, e
    cdef bint has_bias = b is not None
    cdef floating wk, bias
    cdef floating *yp
    cdef const floating *xp
    for plane in prange(N * C, nogil=True, schedule='static', num_threads=num_threads):
        n = plane // C
        c = plane % C
        bias = b[c] if has_bias else 0
        for blk in range((Ho + R - 1) // R):
            r0 = blk * R
            r1 = _imin(Ho, r0 + R)
            yp = &out[n, c, r0, 0]
            for e in range((r1 - r0) * W):
                yp[e] = bias
            for k in range(K):
                j0 = _imax(r0, pad - k)          # output rows j with 0 <= j + k - pad < H
                j1 = _imin(r1, H + pad - k)
                if j1 <= j0:
                    continue
                wk = w[c, K - 1 - k] if flip else w[c, k]
                yp = &out[n, c, j0, 0]
                xp = &x[n, c, j0 + k - pad, 0]
                for e in range((j1 - j0) * W):
                    yp[e] = yp[e] + wk * xp[e]


cdef inline void _pad_rows(const floating *xp, Py_ssize_t H, Py_ssize_t W, Py_ssize_t pad, Py_ssize_t Lw,
                           Py_ssize_t tail, floating *dst) noexcept nogil:
    """dst[r*Lw + t] = xp[r*W + t - pad] where 0 <= t - pad < W, else 0; then `tail` zeros."""
    cdef Py_ssize_t r, t
    cdef Py_ssize_t t0 = _imin(Lw, _imax(0, pad))       # [0, t0): zeros before the row
    cdef Py_ssize_t t1 = _imax(t0, _imin(Lw, W + pad))  # [t0, t1): the row; [t1, Lw): zeros
    for r in range(H):
        for t in range(t0):
            dst[r * Lw + t] = 0
        for t in range(t0, t1):
            dst[r * Lw + t] = xp[r * W + t - pad]
        for t in range(t1, Lw):
            dst[r * Lw + t] = 0
    for t in range(tail):
        dst[H * Lw + t] = 0


def hconv_forward(const floating[:, :, :, ::1] x,      # IN  (N, C, H, W)
                  const floating[:, ::1] w,            # IN  (C, K)
                  const floating[::1] b,               # IN  (C,) or None
                  Py_ssize_t pad,
                  bint flip,
                  floating[:, :, :, ::1] out,          # OUT (N, C, H, Wo)
                  int num_threads):
    """Horizontal (along W) per-channel correlation.

    Rows are short (16 or 8 columns in the paper's networks), so a loop per row and
    tap would be mostly loop overhead. Instead a block of rows is copied into a buffer
    with rows Lw = Wo + K - 1 wide, zero-padded (`pad` zeros before each row); then
    out[r, j] = bias + sum_k w[k] * buf[r*Lw + j + k] is, for each tap, one vectorized
    pass over the block (positions j >= Wo are scratch), and the Wo real columns of
    each row are copied out. Blocks hold about BLOCK elements, so they stay in L1.
    Each output element adds the bias, then the taps in order (a padded tap adds an exact zero).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = w.shape[1], Wo = out.shape[3]
    cdef Py_ssize_t Lw = Wo + K - 1, R = _rows_per_block(Lw)
    cdef Py_ssize_t plane, n, c, r, blk, r0, nr, k, e, j
    cdef bint has_bias = b is not None
    cdef floating wk, bias
    cdef floating *buf
    cdef floating *acc
    cdef floating *yr
    cdef const floating *src
    with nogil, parallel(num_threads=num_threads):
        buf = <floating *> malloc((2 * R * Lw + K) * sizeof(floating))
        acc = buf + R * Lw + K
        for plane in prange(N * C, schedule='static'):
            n = plane // C
            c = plane % C
            bias = b[c] if has_bias else 0
            for blk in range((H + R - 1) // R):
                r0 = blk * R
                nr = _imin(R, H - r0)
                _pad_rows(&x[n, c, r0, 0], nr, W, pad, Lw, K - 1, buf)
                for e in range(nr * Lw):
                    acc[e] = bias
                for k in range(K):
                    wk = w[c, K - 1 - k] if flip else w[c, k]
                    src = buf + k
                    for e in range(nr * Lw):
                        acc[e] = acc[e] + wk * src[e]
                for r in range(nr):
                    yr = &out[n, c, r0 + r, 0]
                    for j in range(Wo):
                        yr[j] = acc[r * Lw + j]
        free(buf)


cdef inline void _add_block_sums(const floating *acc, Py_ssize_t K, Py_ssize_t B, Py_ssize_t n,
                                 double *tot) noexcept nogil:
    """tot[k] += the sum, in double, of acc[k*B : k*B + n] for the K taps and the bias row (k = K)."""
    cdef Py_ssize_t k, e
    cdef double s
    for k in range(K + 1):
        s = 0
        for e in range(n):
            s = s + acc[k * B + e]
        tot[k] = tot[k] + s


cdef inline void _store_sums(double *tot, Py_ssize_t K, floating *dwc, floating *dbc) noexcept nogil:
    """One channel's gradients from its double sums: dwc[k] = tot[k], *dbc = tot[K] (unless dbc
    is NULL); then tot is zeroed for the thread's next channel."""
    cdef Py_ssize_t k
    for k in range(K):
        dwc[k] = <floating> tot[k]
    if dbc != NULL:
        dbc[0] = <floating> tot[K]
    memset(tot, 0, (K + 1) * sizeof(double))


def vconv_grad_params(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W) forward input
                      const floating[:, :, :, ::1] dy,  # IN  (N, C, Ho, W)
                      Py_ssize_t pad,
                      floating[:, ::1] dw,              # OUT (C, K)
                      floating[::1] db,                 # OUT (C,) or None
                      int num_threads):
    """dw[c,k] = sum over n, j, q of dy[n,c,j,q] * x[n,c,j+k-pad,q]; db[c] = sum of dy[:, c].

    Parallel over channels. For each block of output rows (as in vconv_forward), each
    thread accumulates the element-wise products over all images into its own
    (K+1) x BLOCK buffer (vectorized passes, in L1, no shared writes), then adds the
    block's sums into double accumulators.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = dw.shape[1], Ho = dy.shape[2]
    cdef Py_ssize_t R = _rows_per_block(W), B = R * W
    cdef Py_ssize_t n, c, blk, r0, r1, j0, j1, k, e
    cdef bint has_bias = db is not None
    cdef floating *acc
    cdef floating *ak
    cdef double *tot
    cdef const floating *dp
    cdef const floating *xp
    with nogil, parallel(num_threads=num_threads):
        acc = <floating *> malloc((K + 1) * B * sizeof(floating))
        tot = <double *> malloc((K + 1) * sizeof(double))
        memset(tot, 0, (K + 1) * sizeof(double))
        for c in prange(C, schedule='static'):
            for blk in range((Ho + R - 1) // R):
                r0 = blk * R
                r1 = _imin(Ho, r0 + R)
                memset(acc, 0, (K + 1) * B * sizeof(floating))
                for n in range(N):
                    dp = &dy[n, c, r0, 0]
                    ak = acc + K * B
                    for e in range((r1 - r0) * W):
                        ak[e] = ak[e] + dp[e]
                    for k in range(K):
                        j0 = _imax(r0, pad - k)
                        j1 = _imin(r1, H + pad - k)
                        if j1 <= j0:
                            continue
                        ak = acc + k * B + (j0 - r0) * W
                        dp = &dy[n, c, j0, 0]
                        xp = &x[n, c, j0 + k - pad, 0]
                        for e in range((j1 - j0) * W):
                            ak[e] = ak[e] + dp[e] * xp[e]
                _add_block_sums(acc, K, B, (r1 - r0) * W, tot)
            _store_sums(tot, K, &dw[c, 0], &db[c] if has_bias else NULL)
        free(tot)
        free(acc)


def hconv_grad_params(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W) forward input
                      const floating[:, :, :, ::1] dy,  # IN  (N, C, H, Wo)
                      Py_ssize_t pad,
                      floating[:, ::1] dw,              # OUT (C, K)
                      floating[::1] db,                 # OUT (C,) or None
                      int num_threads):
    """dw[c,k] = sum over n, r, j of dy[n,c,r,j] * x[n,c,r,j+k-pad]; db[c] = sum of dy[:, c].

    The layout of hconv_forward: for a block of rows, x zero-padded into rows
    Lw = Wo + K - 1 wide and dy into the same rows with zeros past Wo, so the block's
    share of dw[k] is a dot product sum_e dyb[e] * xb[e + k]. Parallel over channels;
    each thread accumulates the products over all images in its own (K+1) x block
    buffer (in L1), then adds the block's sums into double accumulators.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = dw.shape[1], Wo = dy.shape[3]
    cdef Py_ssize_t Lw = Wo + K - 1, R = _rows_per_block(Lw), B = R * Lw
    cdef Py_ssize_t n, c, blk, r0, nr, k, e
    cdef bint has_bias = db is not None
    cdef floating *xb
    cdef floating *dyb
    cdef floating *acc
    cdef floating *ak
    cdef double *tot
    cdef const floating *src
    with nogil, parallel(num_threads=num_threads):
        xb = <floating *> malloc(((K + 3) * B + K) * sizeof(floating))
        dyb = xb + B + K
        acc = dyb + B
        tot = <double *> malloc((K + 1) * sizeof(double))
        memset(tot, 0, (K + 1) * sizeof(double))
        for c in prange(C, schedule='static'):
            for blk in range((H + R - 1) // R):
                r0 = blk * R
                nr = _imin(R, H - r0)
                memset(acc, 0, (K + 1) * B * sizeof(floating))
                for n in range(N):
                    _pad_rows(&x[n, c, r0, 0], nr, W, pad, Lw, K - 1, xb)
                    _pad_rows(&dy[n, c, r0, 0], nr, Wo, 0, Lw, 0, dyb)
                    ak = acc + K * B
                    for e in range(nr * Lw):
                        ak[e] = ak[e] + dyb[e]
                    for k in range(K):
                        ak = acc + k * B
                        src = xb + k
                        for e in range(nr * Lw):
                            ak[e] = ak[e] + dyb[e] * src[e]
                _add_block_sums(acc, K, B, nr * Lw, tot)
            _store_sums(tot, K, &dw[c, 0], &db[c] if has_bias else NULL)
        free(tot)
        free(xb)


def channel_sum(const floating[:, :, ::1] x,   # IN  (N, C, P)
                floating[::1] out,             # OUT (C,)
                int num_threads):
    """out[c] = sum of x[:, c, :] (bias gradients), accumulated in double per channel."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t n, c, p
    cdef double s
    for c in prange(C, nogil=True, schedule='static', num_threads=num_threads):
        s = 0
        for n in range(N):
            for p in range(P):
                s = s + x[n, c, p]
        out[c] = <floating> s


# ----------------------------------------------------------------------------- im2col / col2im

def im2col(const floating[:, :, :, ::1] x,    # IN  (N, C, H, W)
           Py_ssize_t n0,                      # first image of the chunk
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad,
           floating[:, :, ::1] cols,           # OUT (n, C*kh*kw, Ho*Wo), n images from n0
           int num_threads):
    """cols[i, (c*kh + a)*kw + b, oy*Wo + ox] = x[n0+i, c, oy*stride + a - pad, ox*stride + b - pad] (0 outside)."""
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t n = cols.shape[0]
    cdef Py_ssize_t Ho = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t Wo = (W + 2 * pad - kw) // stride + 1
    cdef Py_ssize_t job, i, c, a, bb, oy, ox, iy, ix, row
    cdef floating *dst
    for job in prange(n * C, nogil=True, schedule='static', num_threads=num_threads):
        i = job // C
        c = job % C
        for a in range(kh):
            for bb in range(kw):
                row = (c * kh + a) * kw + bb
                dst = &cols[i, row, 0]
                for oy in range(Ho):
                    iy = oy * stride + a - pad
                    if iy < 0 or iy >= H:
                        for ox in range(Wo):
                            dst[oy * Wo + ox] = 0
                    elif stride == 1:
                        for ox in range(Wo):
                            ix = ox + bb - pad
                            dst[oy * Wo + ox] = x[n0 + i, c, iy, ix] if 0 <= ix < W else 0
                    else:
                        for ox in range(Wo):
                            ix = ox * stride + bb - pad
                            dst[oy * Wo + ox] = x[n0 + i, c, iy, ix] if 0 <= ix < W else 0


def col2im(const floating[:, :, ::1] cols,     # IN  (n, C*kh*kw, Ho*Wo)
           Py_ssize_t n0,
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad,
           floating[:, :, :, ::1] dx,          # OUT (N, C, H, W): images n0..n0+n overwritten
           int num_threads):
    """Adjoint of im2col: scatter-add the columns back into image planes (one plane per thread)."""
    cdef Py_ssize_t C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t n = cols.shape[0]
    cdef Py_ssize_t Ho = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t Wo = (W + 2 * pad - kw) // stride + 1
    cdef Py_ssize_t job, i, c, a, bb, oy, ox, iy, ix, row
    cdef const floating *src
    for job in prange(n * C, nogil=True, schedule='static', num_threads=num_threads):
        i = job // C
        c = job % C
        memset(&dx[n0 + i, c, 0, 0], 0, H * W * sizeof(floating))
        for a in range(kh):
            for bb in range(kw):
                row = (c * kh + a) * kw + bb
                src = &cols[i, row, 0]
                for oy in range(Ho):
                    iy = oy * stride + a - pad
                    if iy < 0 or iy >= H:
                        continue
                    for ox in range(Wo):
                        ix = ox * stride + bb - pad
                        if 0 <= ix < W:
                            dx[n0 + i, c, iy, ix] += src[oy * Wo + ox]


# ----------------------------------------------------------------------------- pooling

def maxpool_forward(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                    Py_ssize_t k, Py_ssize_t stride,
                    floating[:, :, :, ::1] out,       # OUT (N, C, Ho, Wo)
                    int[:, :, :, ::1] argmax,         # OUT (N, C, Ho, Wo): flat index in the plane
                    int num_threads):
    """Max over k x k windows (clipped at the border when Ho, Wo come from ceil mode); first max wins ties.

    Tap (a, b) of window (oy, ox) reads x[oy*s + a, ox*s + b] (s = stride). Each plane
    is first split into s*s phase planes, ph[pa][pb][i, j] = x[i*s + pa, j*s + pb]
    (-inf outside the input), Lw = Wo + (k-1)//s columns wide. In phase plane
    (a % s, b % s) the tap reads element [oy + a//s, ox + b//s], a constant offset
    from (oy, ox): so each tap is one long contiguous pass over all the windows of
    the plane (vectorized), into a buffer with rows Lw wide whose extra columns are
    scratch. A window's first tap lies inside the input, so -inf is never taken.
    Taps are visited in row-major order with a strict '>', so the first maximum (in
    row-major order) wins, as in a plain loop; a NaN is always taken, so it propagates.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3]
    cdef Py_ssize_t s = stride, dmax = (k - 1) // stride
    cdef Py_ssize_t Lw = Wo + dmax, Lh = Ho + dmax
    cdef Py_ssize_t PH = Lh * Lw + dmax                 # one phase plane (+ dmax read-ahead)
    cdef Py_ssize_t T = Ho * Lw                         # windows, with scratch columns
    cdef Py_ssize_t plane, n, c, i, j, r, pa, pb, a, b, e, oy, ox, jn, jr
    cdef int off
    cdef floating *yo
    cdef int *ao
    cdef floating v
    cdef bint take
    cdef const floating *xp
    cdef const floating *row
    cdef const floating *src
    cdef floating *ph
    cdef floating *dst
    cdef floating *best
    cdef int *arg
    cdef int *base = <int *> malloc(T * sizeof(int))   # flat input index of each window's tap (0, 0)
    if base == NULL:
        raise MemoryError()
    for oy in range(Ho):
        for ox in range(Lw):
            base[oy * Lw + ox] = <int> (oy * s * W + ox * s)
    with nogil, parallel(num_threads=num_threads):
        ph = <floating *> malloc((s * s * PH + T) * sizeof(floating))
        arg = <int *> malloc(T * sizeof(int))
        best = ph + s * s * PH
        for plane in prange(N * C, schedule='static'):
            n = plane // C
            c = plane % C
            xp = &x[n, c, 0, 0]
            for pa in range(s):
                for pb in range(s):
                    dst = ph + (pa * s + pb) * PH
                    jn = _imin(Lw, (W - pb + s - 1) // s)  # columns j*s + pb inside the input
                    for i in range(Lh):
                        r = i * s + pa
                        jr = jn if r < H else 0
                        row = xp + r * W + pb
                        if s == 2:  # the paper's pooling: a constant stride vectorizes
                            for j in range(jr):
                                dst[i * Lw + j] = row[2 * j]
                        else:
                            for j in range(jr):
                                dst[i * Lw + j] = row[j * s]
                        for j in range(jr, Lw):
                            dst[i * Lw + j] = -INFINITY
                    for j in range(dmax):
                        dst[Lh * Lw + j] = -INFINITY
            for e in range(T):
                best[e] = ph[e]
                arg[e] = base[e]
            for a in range(k):
                for b in range(k):
                    if a == 0 and b == 0:
                        continue
                    src = ph + ((a % s) * s + b % s) * PH + (a // s) * Lw + b // s
                    off = <int> (a * W + b)
                    for e in range(T):
                        v = src[e]
                        take = (v > best[e]) | (v != v)
                        arg[e] = base[e] + off if take else arg[e]
                        best[e] = v if take else best[e]
            for oy in range(Ho):
                yo = &out[n, c, oy, 0]
                ao = &argmax[n, c, oy, 0]
                for ox in range(Wo):
                    yo[ox] = best[oy * Lw + ox]
                    ao[ox] = arg[oy * Lw + ox]
        free(arg)
        free(ph)
    free(base)


def maxpool_backward(const floating[:, :, :, ::1] dy,   # IN  (N, C, Ho, Wo)
                     const int[:, :, :, ::1] argmax,    # IN  (N, C, Ho, Wo)
                     floating[:, :, :, ::1] dx,         # OUT (N, C, H, W)
                     int num_threads):
    """Route each output gradient to its window's maximum; overlapping windows add up."""
    cdef Py_ssize_t N = dy.shape[0], C = dy.shape[1], Ho = dy.shape[2], Wo = dy.shape[3]
    cdef Py_ssize_t H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t plane, n, c, oy, ox
    cdef floating *d
    for plane in prange(N * C, nogil=True, schedule='static', num_threads=num_threads):
        n = plane // C
        c = plane % C
        d = &dx[n, c, 0, 0]
        memset(d, 0, H * W * sizeof(floating))
        for oy in range(Ho):
            for ox in range(Wo):
                d[argmax[n, c, oy, ox]] += dy[n, c, oy, ox]


# ----------------------------------------------------------------------------- element-wise

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


# ----------------------------------------------------------------------------- BLAS

cdef void _gemm(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                const floating *a, int lda, const floating *b, int ldb,
                floating beta, floating *c, int ldc) noexcept nogil:
    """Row-major C (m x n) = alpha * op(A) op(B) + beta * C, through column-major BLAS.

    A row-major matrix is its transpose in column-major, so we ask BLAS for
    C^T = op(B)^T op(A)^T: swap the operands and keep the transpose flags.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef char tv
    cdef int rows, cols, incx, one = 1
    if m == 1 and k > 0:
        # One output row (a batch of one through a Linear layer): a GEMV. OpenBLAS's GEMM
        # would pack all of B for a single row, ten times slower at 4096 x 256.
        # C^T (n) = op(B)^T (n x k) x; B is column-major n x k (tb 'N') or k x n (tb 'T').
        if trans_b:
            tv, rows, cols = b'T', k, n
        else:
            tv, rows, cols = b'N', n, k
        incx = lda if trans_a else 1  # op(A) is 1 x k: a row of A, or a column of A^T
        if floating is float:
            sgemv(&tv, &rows, &cols, &alpha, <float *> b, &ldb, <float *> a, &incx, &beta, c, &one)
        else:
            dgemv(&tv, &rows, &cols, &alpha, <double *> b, &ldb, <double *> a, &incx, &beta, c, &one)
        return
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float *> b, &ldb, <float *> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double *> b, &ldb, <double *> a, &lda, &beta, c, &ldc)


def gemm(bint trans_a, bint trans_b, double alpha,
         const floating[:, ::1] a, const floating[:, ::1] b,
         double beta, floating[:, ::1] c):
    """c = alpha * op(a) @ op(b) + beta * c for row-major 2D arrays (c is written in place)."""
    cdef int m = c.shape[0], n = c.shape[1]
    cdef int k = a.shape[0] if trans_a else a.shape[1]
    cdef int kb = b.shape[1] if trans_b else b.shape[0]
    cdef int am = a.shape[1] if trans_a else a.shape[0]
    cdef int bn = b.shape[0] if trans_b else b.shape[1]
    if k != kb or am != m or bn != n:
        raise ValueError(f"gemm: shapes do not match: op(a) {am}x{k}, op(b) {kb}x{bn}, c {m}x{n}")
    if m == 0 or n == 0 or k == 0:
        raise ValueError("gemm: empty matrices")
    with nogil:
        _gemm(trans_a, trans_b, m, n, k, <floating> alpha, &a[0, 0], a.shape[1], &b[0, 0], b.shape[1],
              <floating> beta, &c[0, 0], n)


def batched_gemm(bint trans_a, bint trans_b, double alpha,
                 const floating[:, :, ::1] a, const floating[:, :, ::1] b,
                 double beta, floating[:, :, ::1] c,
                 bint shared_a, bint shared_b):
    """c[i] = alpha * op(a[i]) @ op(b[i]) + beta * c[i] for each i, in one nogil loop.

    With `shared_a` (or `shared_b`) the first matrix is used for every i and, when
    c has a single matrix, the products accumulate into it (weight gradients over a batch).
    Each product is one BLAS call; BLAS threads it, we never call it from OpenMP threads.
    """
    cdef Py_ssize_t batch = max(a.shape[0] if not shared_a else 1, b.shape[0] if not shared_b else 1)
    cdef int m = c.shape[1], n = c.shape[2]
    cdef int k = a.shape[1] if trans_a else a.shape[2]
    cdef int kb = b.shape[2] if trans_b else b.shape[1]
    cdef int am = a.shape[2] if trans_a else a.shape[1]
    cdef int bn = b.shape[1] if trans_b else b.shape[2]
    cdef Py_ssize_t i, ia, ib, ic
    cdef bint accumulate = c.shape[0] == 1 and batch > 1
    cdef floating beta_i
    if k != kb or am != m or bn != n:
        raise ValueError(f"batched_gemm: shapes do not match: op(a) {am}x{k}, op(b) {kb}x{bn}, c {m}x{n}")
    if not accumulate and c.shape[0] != batch:
        raise ValueError("batched_gemm: c must hold one matrix per product, or one to accumulate into")
    if m == 0 or n == 0 or k == 0 or batch == 0:
        return
    with nogil:
        for i in range(batch):
            ia = 0 if shared_a else i
            ib = 0 if shared_b else i
            ic = 0 if accumulate else i
            beta_i = <floating> beta if (not accumulate or i == 0) else 1
            _gemm(trans_a, trans_b, m, n, k, <floating> alpha, &a[ia, 0, 0], a.shape[2],
                  &b[ib, 0, 0], b.shape[2], beta_i, &c[ic, 0, 0], n)


# ----------------------------------------------------------------------------- fused inference

from libc.stdint cimport int64_t

cdef extern from "dropout_hash.h" nogil:
    unsigned long long fl_splitmix64(unsigned long long seed, unsigned long long i)


cdef extern from "_ops.h" nogil:
    ctypedef struct fl_op:
        pass
    int fl_nfields()
    const char *fl_field_name(int i)
    int fl_nkinds()
    const char *fl_kind_name(int i)

cdef extern from "_infer.h" nogil:
    int fp_nr()
    int fp_vl()
    int fp_run(const fl_op *ops, int nops, const float *x, long n, long in_size, float *out, long out_size,
                float *arena, long act_floats, long ctx_floats, long scratch_floats, int threads, double *times)


def infer_layout():
    """(filters per packed weight panel, floats per SIMD vector) of this build."""
    return fp_nr(), fp_vl()


def op_fields():
    """Names of the fields of a C op row (struct fl_op in _ops.h), in order: the op table's columns."""
    return [fl_field_name(i).decode() for i in range(fl_nfields())]


def op_kinds():
    """Names of the C op kinds (FL_GEMM, ... in _ops.h), in the order of their numbers."""
    return [fl_kind_name(i).decode() for i in range(fl_nkinds())]


cdef int _check_table(const int64_t[:, ::1] ops, str who) except -1:
    if ops.shape[1] != fl_nfields() or ops.shape[0] < 1:
        raise ValueError(f"{who}: op table must be (n_ops, {fl_nfields()}), got ({ops.shape[0]}, {ops.shape[1]})")
    return 0


def infer_run(const int64_t[:, ::1] ops,    # IN  op table built by engine.plan (pointers into arrays it keeps)
              const float[:, ::1] x,        # IN  (N, in_size) images, NCHW
              float[:, ::1] out,            # OUT (N, out_size)
              float[::1] arena,             # 64-byte aligned: num_threads x ctx_floats, then x scratch_floats
              Py_ssize_t act_floats, Py_ssize_t ctx_floats, Py_ssize_t scratch_floats,
              int num_threads,
              double[::1] times=None):      # OUT (optional, n_ops): seconds per op are added here
    """Run a compiled network (engine/_infer.h) on a batch, in one parallel region.

    Returns the number of threads that ran it; raises ValueError (and runs nothing) when x
    holds NaN or infinity."""
    cdef double *t = NULL
    cdef int team = 0
    _check_table(ops, "infer_run")
    if out.shape[0] != x.shape[0]:
        raise ValueError("infer_run: x and out must hold the same number of images")
    if num_threads < 1 or ctx_floats < 2 * act_floats or arena.shape[0] < num_threads * (ctx_floats + scratch_floats):
        raise ValueError("infer_run: arena too small for the thread count")
    if (<size_t> &arena[0]) % 64 or act_floats % 16 or ctx_floats % 16 or scratch_floats % 16:
        raise ValueError("infer_run: arena and its parts must start on 64-byte boundaries")
    if times is not None:
        if times.shape[0] != ops.shape[0]:
            raise ValueError("infer_run: times must have one entry per op")
        t = &times[0]
    if x.shape[0] == 0:
        return 0
    with nogil:
        team = fp_run(<const fl_op *> &ops[0, 0], <int> ops.shape[0], &x[0, 0], x.shape[0], x.shape[1], &out[0, 0], out.shape[1],
               &arena[0], act_floats, ctx_floats, scratch_floats, num_threads, t)
    if team == -2:
        raise MemoryError("infer_run: no memory for the work counters")
    if team < 0:
        raise ValueError("input holds NaN or infinite values")
    return team


# ----------------------------------------------------------------------------- compiled training step

cdef extern from "_train.h" nogil:
    ctypedef struct ft_ctx:
        int threads
        int team
        float *cols
        long cols_floats
        float *wbuf
        float *part
        long part_floats
        float *scratch
        long scratch_floats
        float *g0
        float *g1
        float *wpack
        float *bpad
        long bpad_floats
        double *times
    int FT_SGD_COLS
    int FT_KC
    int FP_NR
    int ft_forward(const fl_op *ops, int nops, const float *x, long n, ft_ctx *c)
    int ft_backward(const fl_op *ops, int nops, const float *x, const float *dlogits, long n, ft_ctx *c)
    double ft_peak(int threads, long iters, int repeat)
    void ft_sgd(const int64_t *tab, int nparams, float lr, float momentum, float dampening, float wd, int threads)


def train_run(bint backward,
              const int64_t[:, ::1] ops,    # IN  op table built by engine.trainstep (addresses of arrays it keeps)
              const float[:, ::1] x,        # IN  (n, in_size) images, NCHW
              const float[:, ::1] dlogits,  # IN  (n, n_out) loss gradient (backward only; else unused)
              float[::1] cols, float[::1] wbuf,
              float[:, ::1] part,           # (capacity, part_floats) per-image partial sums
              float[:, ::1] scratch,        # (threads, scratch_floats) per-thread scratch
              float[::1] g0, float[::1] g1,
              float[::1] wpack,             # a GEMM's packed weights
              float[::1] bpad,              # a padded bias, then as many zeros
              int num_threads,
              double[::1] times=None):      # OUT (optional, 2 n_ops): seconds per op, forward then backward
    """Forward (backward=False) or backward of a compiled training step (engine/_train.h) on n images.

    Returns the number of threads of its parallel loops."""
    cdef ft_ctx ctx
    cdef int team
    _check_table(ops, "train_run")
    if num_threads < 1 or scratch.shape[0] < num_threads or part.shape[0] < x.shape[0]:
        raise ValueError("train_run: work space too small for this batch or thread count")
    if backward and dlogits.shape[0] != x.shape[0]:
        raise ValueError("train_run: dlogits must hold one row per image")
    ctx.threads = num_threads
    ctx.team = 1
    ctx.cols = &cols[0]
    ctx.cols_floats = cols.shape[0]
    ctx.wbuf = &wbuf[0]
    ctx.part = &part[0, 0]
    ctx.part_floats = part.shape[1]
    ctx.scratch = &scratch[0, 0]
    ctx.scratch_floats = scratch.shape[1]
    ctx.g0 = &g0[0]
    ctx.g1 = &g1[0]
    ctx.wpack = &wpack[0]
    ctx.bpad = &bpad[0]
    ctx.bpad_floats = bpad.shape[0]
    ctx.times = NULL
    if times is not None:
        if times.shape[0] != 2 * ops.shape[0]:
            raise ValueError("train_run: times must have two entries per op")
        ctx.times = &times[0]
    with nogil:
        if backward:
            team = ft_backward(<const fl_op *> &ops[0, 0], <int> ops.shape[0], &x[0, 0], &dlogits[0, 0],
                               x.shape[0], &ctx)
        else:
            team = ft_forward(<const fl_op *> &ops[0, 0], <int> ops.shape[0], &x[0, 0], x.shape[0], &ctx)
    return team


def fma_peak(int num_threads, long iters=20000000, int repeat=3):
    """Measured float32 peak in GFLOP/s on num_threads threads (fused multiply-adds on SIMD vectors)."""
    cdef double gf
    with nogil:
        gf = ft_peak(num_threads, iters, repeat)
    return gf


def train_wgrad_scratch():
    """Floats of per-thread scratch the weight-gradient kernel needs."""
    return FT_KC * FP_NR


def sgd_run(const int64_t[:, ::1] table, double lr, double momentum, double dampening, double weight_decay,
            int num_threads):
    """SGD with momentum (Torch7's rule) on the parameters listed in `table` (rows: w, g, v, size, decay, first)."""
    if table.shape[1] != FT_SGD_COLS:
        raise ValueError(f"sgd_run: table must have {FT_SGD_COLS} columns")
    if table.shape[0] == 0:
        return
    with nogil:
        ft_sgd(&table[0, 0], <int> table.shape[0], <float> lr, <float> momentum, <float> dampening,
               <float> weight_decay, num_threads)
