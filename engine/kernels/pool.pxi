# Max-pooling forward (with its argmax) and backward.
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

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
