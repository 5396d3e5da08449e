# im2col / col2im: the columns of the baseline convolution and their scatter back.
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

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
