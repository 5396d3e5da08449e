# The vertical and horizontal 1D convolutions (forward, input and parameter gradients) and channel sums.
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

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
