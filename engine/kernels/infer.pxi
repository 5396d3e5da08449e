# Bindings of the compiled inference plan (_infer.h, the op table of _ops.h).
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

from libc.stdint cimport int64_t

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
