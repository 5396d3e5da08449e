# Bindings of the compiled training step and SGD update (_train.h).
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

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
        float *wpart
        long wpart_floats
        float *wpack
        float *bpad
        long bpad_floats
        double *times
    int FT_SGD_COLS
    int FT_KC
    int FP_NR
    int ft_forward(const fl_op *ops, int nops, const float *x, long n, ft_ctx *c)
    int ft_backward(const fl_op *ops, int nops, const float *x, const float *dlogits, long n, ft_ctx *c,
                    int upper, int lower)
    long ft_wg_slices(long K)
    int FT_VH_KMAX
    long ft_vh_scratch_floats(const fl_op *op)
    long ft_vh_wbuf_floats(const fl_op *op)
    double ft_peak(int threads, long iters, int repeat)
    void ft_sgd(const int64_t *tab, int nparams, float lr, float momentum, float dampening, float wd, int nesterov,
                int threads)


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
              float[::1] wpart,             # a weight gradient's partial sums (train_wgrad_slices)
              int num_threads,
              double[::1] times=None,       # OUT (optional, 2 n_ops): seconds per op, forward then backward
              int upper=-1, int lower=0):   # backward only: run ops upper-1 down to lower (-1: from the last)
    """Forward (backward=False) or backward of a compiled training step (engine/_train.h) on n images.

    The backward can run in parts, from the last op down: [lower, upper) after the part above it
    (upper = n_ops, or -1, starts from dlogits). Returns the number of threads of its parallel loops."""
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
    ctx.wpart = &wpart[0]
    ctx.wpart_floats = wpart.shape[0]
    if upper < 0:
        upper = ops.shape[0]
    if backward and not 0 <= lower <= upper <= ops.shape[0]:
        raise ValueError(f"train_run: ops [{lower}, {upper}) are not within the table's {ops.shape[0]}")
    ctx.times = NULL
    if times is not None:
        if times.shape[0] != 2 * ops.shape[0]:
            raise ValueError("train_run: times must have two entries per op")
        ctx.times = &times[0]
    with nogil:
        if backward:
            team = ft_backward(<const fl_op *> &ops[0, 0], <int> ops.shape[0], &x[0, 0], &dlogits[0, 0],
                               x.shape[0], &ctx, upper, lower)
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


def train_vh_sizes(const int64_t[::1] row):
    """A VH op row's buffers (_train.h): (floats of per-thread scratch, floats of the padded filters and
    biases, the longest 1D filter the kernels take)."""
    cdef const fl_op *op = <const fl_op *> &row[0]
    return ft_vh_scratch_floats(op), ft_vh_wbuf_floats(op), FT_VH_KMAX


def train_wgrad_slices(long rows):
    """Slices of a weight gradient's sum over `rows` rows (1: not sliced); each slice keeps a partial
    gradient in the step's wpart buffer."""
    return ft_wg_slices(rows)


def sgd_run(const int64_t[:, ::1] table, double lr, double momentum, double dampening, double weight_decay,
            bint nesterov, int num_threads):
    """SGD with momentum (optim.sgd_momentum's rule) on the parameters listed in `table` (rows: w, g, v, size,
    decay, first)."""
    if table.shape[1] != FT_SGD_COLS:
        raise ValueError(f"sgd_run: table must have {FT_SGD_COLS} columns")
    if table.shape[0] == 0:
        return
    with nogil:
        ft_sgd(&table[0, 0], <int> table.shape[0], <float> lr, <float> momentum, <float> dampening,
               <float> weight_decay, nesterov, num_threads)
