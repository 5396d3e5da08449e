# GEMM through scipy's BLAS, row-major, single and batched.
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

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
