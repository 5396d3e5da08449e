/* Compiled float32 training step on the CPU (engine/trainstep.py builds the op table
 * from the shared lowering, engine/lowering.py).
 *
 * The whole batch goes through each op in turn, channels-last: an image's activation
 * is (H, W, C), so a 1x1 (lateral) convolution, a k x k convolution (on im2col columns)
 * and a Linear layer are each ONE large GEMM over the batch (register-blocked
 * micro-kernels, see "GEMMs" below), and the per-channel ops (vertical + horizontal 1D
 * convolutions, fused; pooling; dropout) are loops whose innermost index runs over
 * contiguous channels; bias and ReLU are applied inside the GEMM tiles.
 *
 * Forward keeps what backward needs: every op's output (ReLU folded into the op before
 * it: its output is stored after the ReLU and backward masks the gradient with
 * out > 0, or a max-pooling after it does, on the pooled gradient), pooling argmaxes and
 * dropout masks; a fused VH op's backward computes its vertical output again. Backward
 * runs the ops in reverse on two ping-pong gradient buffers.
 *
 * Determinism: every output element, and every weight gradient, is computed with a
 * fixed summation order whatever the thread count. Loops over images give each image to
 * one thread; per-image partial sums of the bias and 1D-filter gradients are reduced
 * over the images in order (in double); GEMM tiles sum over k in order. Denormals are
 * flushed to zero in these kernels (FTZ/DAZ), as float32 training slows down on them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FT_FTZ_ON() unsigned ft_csr_ = _mm_getcsr(); _mm_setcsr(ft_csr_ | 0x8040)
#define FT_FTZ_OFF() _mm_setcsr(ft_csr_)
#else
#define FT_FTZ_ON() do {} while (0)
#define FT_FTZ_OFF() do {} while (0)
#endif
#include "_ops.h"
#include "_infer.h"  /* the SIMD vector type and loads of the inference kernels */
#include "dropout_hash.h"

/* What a step needs besides the op table; all buffers are owned by the caller (Python). */
typedef struct {
    int threads;     /* threads of the per-image loops */
    int team;        /* out: threads that ran the last parallel loop */
    float *cols;     /* CONV im2col columns: chunk x Ho*Wo x k*k*C floats at most */
    long cols_floats; /* its size */
    float *wbuf;     /* transposed 1D filters (kv + kh) x C, or a CONV's packed weight gradient */
    float *wpack;    /* a GEMM's weights packed for fp_tile (ft_pack) */
    float *bpad;     /* a bias padded to whole panels; then as many zeros (the input gradients' "bias") */
    long bpad_floats;
    float *part;     /* per-image partial gradient sums: n x part_floats */
    long part_floats;
    float *scratch;  /* per-thread scratch: threads x scratch_floats */
    long scratch_floats;
    float *g0, *g1;  /* gradient ping-pong buffers, n x (largest activation) floats each */
    float *wpart;    /* a weight gradient's partial sums, one per slice of its long sum (ft_gemm_wgrad) */
    long wpart_floats;
    double *times;   /* NULL, or seconds per op are added: forward to times[o], backward to times[nops + o] */
} ft_ctx;

static inline double ft_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static inline long ft_in_size(const fl_op *op) { return op->c_in * op->h_in * op->w_in; }
static inline long ft_out_size(const fl_op *op) { return op->c_out * op->h_out * op->w_out; }

static inline int ft_tid(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
static inline int ft_team(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* GEMMs: the forward and input-gradient products run the inference path's micro-kernel
 * (fp_tile, _infer.h) on weights packed once per step (ft_pack, ft_gemm_packed); weight
 * gradients, whose products have a small output and a long sum, their own kernel
 * (ft_wg_tile, ft_gemm_wgrad). Both share fixed tiles between the threads, so every result
 * is the same whatever the thread count. (BLAS was tried first: its results depend on its
 * own thread count, its threads compete with ours, and here it ran the weight gradients'
 * shapes at 12 GFLOP/s per core, a third of the peak.) */

/* Bp = a (K x N) matrix B in panels of FP_NR columns, Bp[p][k][j] = B(k, p FP_NR + j), zero past
 * N (the layout fp_tile reads): trans = 1 packs B = W^T of W (N x K), trans = 0 B = W (K x N). */
static void ft_pack(ft_ctx *c, const float *W, int trans, long K, long N, float *bp) {
    long panels = (N + FP_NR - 1) / FP_NR;
    #pragma omp parallel for schedule(static) num_threads(c->threads)
    for (long p = 0; p < panels; p++)
        for (long k = 0; k < K; k++)
            for (long j = 0; j < FP_NR; j++) {
                long col = p * FP_NR + j;
                bp[(p * K + k) * FP_NR + j] = col < N ? (trans ? W[col * K + k] : W[k * N + col]) : 0.f;
            }
}

#define FT_RB 8  /* tiles of FP_MR rows per row block: a block of A is reused by every panel of B */

/* C (M x N) = A (M x K) B + bias (+ ReLU), A and C row-major, B packed by ft_pack, bias padded
 * to whole panels: the inference path's register-blocked micro-kernel (fp_tile), on tiles of
 * FP_MR rows x FP_NR columns claimed by the threads, row block by row block. Each element is
 * one tile's sum over k in order: the result does not depend on the thread count. */
static void ft_gemm_packed(ft_ctx *c, long M, long N, long K, const float *A, const float *bp, const float *bias,
                           float *C, int relu) {
    long mp = (M + FP_MR - 1) / FP_MR, np_ = (N + FP_NR - 1) / FP_NR;
    long per_block = np_ * FT_RB, tiles = (mp + FT_RB - 1) / FT_RB * per_block;
    #pragma omp parallel num_threads(c->threads)
    {
        FT_FTZ_ON();
        const float *arow[FP_MR];
        #pragma omp for schedule(dynamic, FT_RB)
        for (long t = 0; t < tiles; t++) {
            long rem = t % per_block, jp = rem / FT_RB, ip = t / per_block * FT_RB + rem % FT_RB;
            if (ip >= mp) continue;
            long i0 = ip * FP_MR, j0 = jp * FP_NR;
            int mr = (int)(M - i0 < FP_MR ? M - i0 : FP_MR), nr = (int)(N - j0 < FP_NR ? N - j0 : FP_NR);
            for (int i = 0; i < FP_MR; i++) arow[i] = A + (i0 + (i < mr ? i : 0)) * K;
            fp_tile(1, K, 0, arow, bp + jp * K * FP_NR, bias + j0, C + i0 * N + j0, N, mr, nr, relu);
        }
        FT_FTZ_OFF();
    }
}

/* ft_gemm_packed on the calling thread alone (inside a loop over images): the same tiles, each summed over k
 * in the same order, so the same results. */
static void ft_gemm_packed_serial(long M, long N, long K, const float *A, const float *bp, const float *bias, float *C,
                                  int relu) {
    long mp = (M + FP_MR - 1) / FP_MR, np_ = (N + FP_NR - 1) / FP_NR;
    const float *arow[FP_MR];
    for (long ib = 0; ib < mp; ib += FT_RB)
        for (long jp = 0; jp < np_; jp++)
            for (long ip = ib; ip < ib + FT_RB && ip < mp; ip++) {
                long i0 = ip * FP_MR, j0 = jp * FP_NR;
                int mr = (int)(M - i0 < FP_MR ? M - i0 : FP_MR), nr = (int)(N - j0 < FP_NR ? N - j0 : FP_NR);
                for (int i = 0; i < FP_MR; i++) arow[i] = A + (i0 + (i < mr ? i : 0)) * K;
                fp_tile(1, K, 0, arow, bp + jp * K * FP_NR, bias + j0, C + i0 * N + j0, N, mr, nr, relu);
            }
}

/* bias padded to whole panels of FP_NR (zeros past n) */
static const float *ft_pad_bias(const float *b, long n, float *out) {
    long np_ = (n + FP_NR - 1) / FP_NR * FP_NR;
    for (long j = 0; j < np_; j++) out[j] = j < n ? b[j] : 0.f;
    return out;
}

/* A weight gradient's tile: W[f0.., j0..] (+)= sum over rows k of A[k, f] B[k, j], for up to FP_MR
 * rows f (A's columns) and FP_NR columns j, with A (K x lda) and B (K x ldb) row-major: each row
 * k gives FP_MR scalars of A (contiguous) times two vectors of B. mr, nr: the tile's real size
 * (rows past mr repeat the last one, columns past nr are read from B but not stored). */
static inline void ft_wg_tile(const float *A, long lda, const float *B, long ldb, long K, float *W, long ldw,
                              int mr, int nr, int accumulate) {
    fp_v acc[FP_MR][2];
    for (int i = 0; i < FP_MR; i++) {
        if (accumulate && i < mr) {
            for (int j = 0; j < FP_NR; j++) {
                float v = j < nr ? W[i * ldw + j] : 0.f;
                if (j < FP_VL) acc[i][0][j] = v; else acc[i][1][j - FP_VL] = v;
            }
        } else {
            acc[i][0] = (fp_v){0};
            acc[i][1] = (fp_v){0};
        }
    }
    if (mr == FP_MR) {  /* full tiles: the FP_MR scalars of a row of A are a[0 .. FP_MR - 1] */
        for (long k = 0; k < K; k++) {
            const float *a = A + k * lda, *b = B + k * ldb;
            fp_v b0 = fp_load(b), b1 = fp_load(b + FP_VL);
            for (int i = 0; i < FP_MR; i++) {
                acc[i][0] += a[i] * b0;
                acc[i][1] += a[i] * b1;
            }
        }
    } else {
        int last = mr - 1;
        for (long k = 0; k < K; k++) {
            const float *a = A + k * lda, *b = B + k * ldb;
            fp_v b0 = fp_load(b), b1 = fp_load(b + FP_VL);
            for (int i = 0; i < FP_MR; i++) {
                float ai = a[i < mr ? i : last];
                acc[i][0] += ai * b0;
                acc[i][1] += ai * b1;
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) W[i * ldw + j] = j < FP_VL ? acc[i][0][j] : acc[i][1][j - FP_VL];
}

#define FT_KC 256  /* rows of A and B per pass over the tiles: a panel of B stays in L1, A in L2 */
#define FT_WG_SLICE_ROWS (8 * FT_KC)  /* a long weight-gradient sum is cut into slices of at least this many rows */
#define FT_WG_SLICES 16               /* and at most this many slices */

/* The slices of a weight gradient's sum over K rows: fixed by K alone (not by the thread count), so
 * the result is the same on any number of threads; 1: not sliced. */
static long ft_wg_slices(long K) {
    long s = K / FT_WG_SLICE_ROWS;
    return s < 2 ? 1 : s > FT_WG_SLICES ? FT_WG_SLICES : s;
}

/* bt (kc x FP_NR) = rows k0 .. k0 + kc - 1 of B (row stride cn), columns j0 .. j0 + nr - 1, zero past nr */
static inline void ft_copy_panel(const float *B, long cn, long k0, long kc, long j0, int nr, float *bt) {
    const float *b = B + k0 * cn + j0;
    for (long k = 0; k < kc; k++)
        for (int j = 0; j < FP_NR; j++) bt[k * FP_NR + j] = j < nr ? b[k * cn + j] : 0.f;
}

/* W (f x cn) (+)= A^T B over K rows, A (K x f) and B (K x cn) row-major (a weight gradient:
 * A the output gradient, B the op's input or im2col columns). In each pass of FT_KC rows the
 * threads claim tiles of W; a tile's pass is done by one thread, and the passes follow each
 * other (a barrier), so every tile is summed over k in order: the result does not depend on
 * the thread count, or on which thread took which tile.
 * A thread copies each panel of B it works on to its scratch (FT_KC x FP_NR floats, zero past cn),
 * where the tiles that follow read it contiguously: in place its rows lie cn floats apart, and a
 * panel of 256 such rows did not stay in L1 (few cache sets), while the copy does. */
static void ft_gemm_wgrad(ft_ctx *c, long K, long f, long cn, const float *A, const float *B, float *W,
                          int accumulate) {
    long fpanels = (f + FP_MR - 1) / FP_MR, jpanels = (cn + FP_NR - 1) / FP_NR, tiles = fpanels * jpanels;
    long S = ft_wg_slices(K), size = f * cn;
    if (S > 1 && S * size <= c->wpart_floats) {
        /* A long sum (a first layer's columns, a lateral on large images): each slice of rows is one
         * thread's, its partial W in c->wpart (no barrier per pass), then the partials are added in
         * slice order. */
        long per = (K + S - 1) / S;
        #pragma omp parallel num_threads(c->threads)
        {
            FT_FTZ_ON();
            float *bt = c->scratch + (long)ft_tid() * c->scratch_floats;
            #pragma omp for schedule(dynamic, 1)
            for (long sl = 0; sl < S; sl++) {
                long lo = sl * per, hi = lo + per < K ? lo + per : K;
                float *Ws = c->wpart + sl * size;
                for (long k0 = lo; k0 < hi; k0 += FT_KC) {
                    long kc = hi - k0 < FT_KC ? hi - k0 : FT_KC;
                    for (long jp = 0; jp < jpanels; jp++) {
                        long j0 = jp * FP_NR;
                        int nr = (int)(cn - j0 < FP_NR ? cn - j0 : FP_NR);
                        ft_copy_panel(B, cn, k0, kc, j0, nr, bt);
                        for (long fp = 0; fp < fpanels; fp++) {
                            long f0 = fp * FP_MR;
                            int mr = (int)(f - f0 < FP_MR ? f - f0 : FP_MR);
                            ft_wg_tile(A + k0 * f + f0, f, bt, FP_NR, kc, Ws + f0 * cn + j0, cn, mr, nr, k0 > lo);
                        }
                    }
                }
            }
            #pragma omp for schedule(static)
            for (long e = 0; e < size; e++) {
                float sum = accumulate ? W[e] : 0.f;
                for (long sl = 0; sl < S; sl++) sum += c->wpart[sl * size + e];
                W[e] = sum;
            }
            FT_FTZ_OFF();
        }
        return;
    }
    #pragma omp parallel num_threads(c->threads)
    {
        FT_FTZ_ON();
        float *bt = c->scratch + (long)ft_tid() * c->scratch_floats;
        for (long k0 = 0; k0 < K; k0 += FT_KC) {
            long kc = K - k0 < FT_KC ? K - k0 : FT_KC, copied = -1;
            #pragma omp for schedule(dynamic, 4)
            for (long t = 0; t < tiles; t++) {  /* filter panel inner: a panel of B serves several tiles */
                long j0 = t / fpanels * FP_NR, f0 = t % fpanels * FP_MR;
                int nr = (int)(cn - j0 < FP_NR ? cn - j0 : FP_NR), mr = (int)(f - f0 < FP_MR ? f - f0 : FP_MR);
                if (copied != j0) {  /* a new panel of B: copied, contiguous, zero past cn */
                    ft_copy_panel(B, cn, k0, kc, j0, nr, bt);
                    copied = j0;
                }
                ft_wg_tile(A + k0 * f + f0, f, bt, FP_NR, kc, W + f0 * cn + j0, cn, mr, nr, accumulate || k0 > 0);
            }
        }
        FT_FTZ_OFF();
    }
}

/* Run BODY for each image i in [0, n) on the context's threads (one image, one thread; images
 * are claimed one at a time, so a thread the machine delays holds up no one). */
#define FT_PER_IMAGE(c, n, BODY)                                                   \
    do {                                                                           \
        int ft_team_ = 1;                                                          \
        _Pragma("omp parallel num_threads((c)->threads)")                          \
        {                                                                          \
            FT_FTZ_ON();                                                           \
            if (ft_tid() == 0) ft_team_ = ft_team();                               \
            float *scr = (c)->scratch + (long)ft_tid() * (c)->scratch_floats;      \
            (void)scr;                                                             \
            _Pragma("omp for schedule(dynamic, 1)")                                \
            for (long i = 0; i < (n); i++) { BODY; }                               \
            FT_FTZ_OFF();                                                          \
        }                                                                          \
        (c)->team = ft_team_;                                                      \
    } while (0)

/* ---------------------------------------------------------------- element-wise pieces */

/* dy *= (y > 0): the gradient through a ReLU whose output is y. */
static void ft_relu_mask(float *dy, const float *y, long len) {
    for (long j = 0; j < len; j++) dy[j] = y[j] > 0.f ? dy[j] : 0.f;
}

/* part[f] = sum over P positions of dy[p, f] (one image's bias gradient); with relu, dy is first
 * masked with y > 0 in place (the gradient through the op's ReLU), in the same pass. */
static void ft_colsum(float *dy, const float *y, int relu, long P, long F, float *part) {
    for (long f = 0; f < F; f++) part[f] = 0.f;
    for (long p = 0; p < P; p++) {
        float *g = dy + p * F;
        if (relu)
            for (long f = 0; f < F; f++) g[f] = y[p * F + f] > 0.f ? g[f] : 0.f;
        for (long f = 0; f < F; f++) part[f] += g[f];
    }
}

/* Whether op o is a max-pooling right after an op with a folded ReLU (a GEMM, CONV or Linear). The
 * pooling's backward then does that op's pass over its output gradient: it masks the gradient by its own
 * output (at each argmax, the ReLU's output is the pooled maximum, so the mask is the same) before
 * scattering it, and leaves the op's per-image bias-gradient sums in c->part; the op's backward skips
 * ft_colsum, which would read and write its whole (unpooled) output gradient and read its output. */
static inline int ft_pool_takes_relu(const fl_op *ops, int nops, int o) {
    if (o <= 0 || o >= nops || ops[o].kind != FL_POOL || !ops[o - 1].relu) return 0;
    int k = (int)ops[o - 1].kind;
    return k == FL_GEMM || k == FL_CONV || k == FL_LINEAR;
}

/* out[j * ostride] = sum over images i (in order, in double) of part[i * part_floats + off + j], j < len. */
static void ft_reduce(const ft_ctx *c, long n, long off, long len, float *out, long ostride) {
    for (long j = 0; j < len; j++) {
        double s = 0.0;
        for (long i = 0; i < n; i++) s += c->part[i * c->part_floats + off + j];
        out[j * ostride] = (float)s;
    }
}

/* ---------------------------------------------------------------- layout changes */

static void ft_to_nhwc(const float *x, float *y, long C, long HW) {
    for (long p = 0; p < HW; p++)
        for (long ch = 0; ch < C; ch++) y[p * C + ch] = x[ch * HW + p];
}

static void ft_to_nchw(const float *x, float *y, long C, long HW) {
    for (long ch = 0; ch < C; ch++)
        for (long p = 0; p < HW; p++) y[ch * HW + p] = x[p * C + ch];
}

/* ---------------------------------------------------------------- k x k convolution (im2col) */

/* One image's im2col matrix, (Ho Wo) x (k k C), from its channels-last input: row (oy, ox) holds the window's
 * (ky, kx, c), zero where it leaves the image (padding). A window row is k*C contiguous floats of the input:
 * one copy, with zeros before and after it at the image's left and right edges. */
static void ft_im2col(const fl_op *op, const float *x, float *cols) {
    long C = op->c_in, H = op->h_in, W = op->w_in, Ho = op->h_out, Wo = op->w_out;
    long k = op->k, s = op->stride, pad = op->pad, KKC = k * k * C;
    for (long oy = 0; oy < Ho; oy++)
        for (long ox = 0; ox < Wo; ox++) {
            float *row = cols + (oy * Wo + ox) * KKC;
            long ix0 = ox * s - pad, lo = ix0 < 0 ? -ix0 : 0, hi = W - ix0 < k ? W - ix0 : k;  /* kx inside: [lo, hi) */
            if (lo > k) lo = k;
            if (hi < lo) hi = lo;
            for (long ky = 0; ky < k; ky++) {
                long iy = oy * s + ky - pad;
                float *dst = row + ky * k * C;
                if (iy < 0 || iy >= H) {
                    memset(dst, 0, k * C * sizeof(float));
                    continue;
                }
                memset(dst, 0, lo * C * sizeof(float));
                memcpy(dst + lo * C, x + (iy * W + ix0 + lo) * C, (hi - lo) * C * sizeof(float));
                memset(dst + hi * C, 0, (k - hi) * C * sizeof(float));
            }
        }
}

/* The adjoint of ft_im2col: dx (zeroed here) gets each column entry added at its input position. */
static void ft_col2im(const fl_op *op, const float *cols, float *dx) {
    long C = op->c_in, H = op->h_in, W = op->w_in, Ho = op->h_out, Wo = op->w_out;
    long k = op->k, s = op->stride, pad = op->pad, KKC = k * k * C;
    memset(dx, 0, H * W * C * sizeof(float));
    for (long oy = 0; oy < Ho; oy++)
        for (long ox = 0; ox < Wo; ox++) {
            const float *row = cols + (oy * Wo + ox) * KKC;
            for (long ky = 0; ky < k; ky++) {
                long iy = oy * s + ky - pad;
                if (iy < 0 || iy >= H) continue;
                for (long kx = 0; kx < k; kx++) {
                    long ix = ox * s + kx - pad;
                    if (ix < 0 || ix >= W) continue;
                    const float *src = row + (ky * k + kx) * C;
                    float *d = dx + (iy * W + ix) * C;
                    for (long ch = 0; ch < C; ch++) d[ch] += src[ch];
                }
            }
        }
}

/* A CONV's weights for its forward GEMM: the master (F, C, k, k) to op->mid's (F, (ky, kx, c)), packed into
 * c->wpack; returns its bias padded to whole panels. */
static const float *ft_conv_weights(const fl_op *op, ft_ctx *c) {
    long C = op->c_in, F = op->c_out, k = op->k, KKC = k * k * C;
    const float *w = fl_cptr(op->w);
    float *wp = fl_ptr(op->mid);
    for (long f = 0; f < F; f++)
        for (long ch = 0; ch < C; ch++)
            for (long t = 0; t < k * k; t++) wp[f * KKC + t * C + ch] = w[(f * C + ch) * k * k + t];
    ft_pack(c, wp, 1, KKC, F, c->wpack);
    return ft_pad_bias(fl_cptr(op->b), F, c->bpad);
}

static void ft_conv_forward(const fl_op *op, const float *x, long n, ft_ctx *c) {
    long C = op->c_in, F = op->c_out, k = op->k, KKC = k * k * C, P = op->h_out * op->w_out;
    long in_sz = ft_in_size(op), chunk = op->chunk;
    float *y = fl_ptr(op->out);
    const float *bias = ft_conv_weights(op, c);
    for (long n0 = 0; n0 < n; n0 += chunk) {
        long m = n - n0 < chunk ? n - n0 : chunk;
        float *cols = op->aux ? fl_ptr(op->aux) : c->cols;  /* the op's own columns: kept for backward */
        FT_PER_IMAGE(c, m, ft_im2col(op, x + (n0 + i) * in_sz, cols + i * P * KKC));
        ft_gemm_packed(c, m * P, F, KKC, cols, c->wpack, bias, y + n0 * P * F, (int)op->relu);
    }
}

/* The input gradient of a stride-1 convolution as a convolution of the output gradient:
 * dx[iy, ix, c] = sum over (ky, kx, f) of dy[iy + ky - q, ix + kx - q, f] W[f, c, k-1-ky, k-1-kx],
 * q = k - 1 - pad, dy zero outside. Its columns (im2col of dy, k*k*F per input pixel) times the
 * flipped weights, packed here as B (k*k*F x C), give dx directly: no col2im scatter, and the GEMM's
 * sum is k*k*F long instead of F (the column-gradient GEMM writes k*k*C floats per output pixel and
 * sums only F). Images go in chunks whose columns fit c->cols. */
static void ft_conv_input_grad(const fl_op *op, const float *dy, float *dx, long n, ft_ctx *c) {
    long C = op->c_in, F = op->c_out, k = op->k, KKF = k * k * F, HW = op->h_in * op->w_in;
    long P = op->h_out * op->w_out, in_sz = ft_in_size(op), panels = (C + FP_NR - 1) / FP_NR;
    long chunk = c->cols_floats / (HW * KKF);
    const float *w = fl_cptr(op->w);
    fl_op t = *op;  /* the transposed convolution's geometry: dy (Ho x Wo x F) in, H x W out */
    t.c_in = F; t.h_in = op->h_out; t.w_in = op->w_out; t.h_out = op->h_in; t.w_out = op->w_in;
    t.pad = k - 1 - op->pad;
    if (chunk > n) chunk = n;
    #pragma omp parallel for schedule(static) num_threads(c->threads)
    for (long p = 0; p < panels; p++)  /* B[(ky, kx, f), ch] = W[f, ch, k-1-ky, k-1-kx], zero past C */
        for (long kk = 0; kk < KKF; kk++) {
            long f = kk % F, tap = kk / F, ky = k - 1 - tap / k, kx = k - 1 - tap % k;
            for (long j = 0; j < FP_NR; j++) {
                long ch = p * FP_NR + j;
                c->wpack[(p * KKF + kk) * FP_NR + j] = ch < C ? w[((f * C + ch) * k + ky) * k + kx] : 0.f;
            }
        }
    for (long n0 = 0; n0 < n; n0 += chunk) {
        long m = n - n0 < chunk ? n - n0 : chunk;
        float *cols = c->cols;
        FT_PER_IMAGE(c, m, ft_im2col(&t, dy + (n0 + i) * P * F, cols + i * HW * KKF));
        ft_gemm_packed(c, m * HW, C, KKF, cols, c->wpack, c->bpad + c->bpad_floats / 2, dx + n0 * in_sz, 0);
    }
}

/* whether ft_conv_input_grad applies: stride 1, and one image's columns fit c->cols (trainstep.py sizes
 * c->cols and c->wpack for it under the same geometric condition) */
static inline int ft_conv_transposed_ok(const fl_op *op, const ft_ctx *c) {
    return op->stride == 1 && op->pad <= op->k - 1 && c->cols_floats >= op->h_in * op->w_in * op->k * op->k * op->c_out;
}

static void ft_conv_backward(const fl_op *op, const float *x, float *dy, float *dx, long n, ft_ctx *c, int summed) {
    long C = op->c_in, F = op->c_out, k = op->k, KKC = k * k * C, P = op->h_out * op->w_out;
    long in_sz = ft_in_size(op), chunk = op->chunk;
    const float *wp = fl_cptr(op->mid);
    float *dw = fl_ptr(op->dw), *dwp = c->wbuf;
    const float *y = fl_cptr(op->out);
    if (!summed)  /* (else the pooling after it masked dy and left the sums: ft_pool_takes_relu) */
        FT_PER_IMAGE(c, n, ft_colsum(dy + i * P * F, y + i * P * F, (int)op->relu, P, F, c->part + i * c->part_floats));
    ft_reduce(c, n, 0, F, fl_ptr(op->db), 1);
    int transposed = dx && ft_conv_transposed_ok(op, c);
    if (dx && !transposed) ft_pack(c, wp, 0, F, KKC, c->wpack);
    for (long n0 = 0; n0 < n; n0 += chunk) {
        long m = n - n0 < chunk ? n - n0 : chunk;
        float *cols = op->aux ? fl_ptr(op->aux) : c->cols;
        const float *dyc = dy + n0 * P * F;
        if (!op->aux)  /* the forward's columns were overwritten: again */
            FT_PER_IMAGE(c, m, ft_im2col(op, x + (n0 + i) * in_sz, cols + i * P * KKC));
        ft_gemm_wgrad(c, m * P, F, KKC, dyc, cols, dwp, n0 > 0);
        if (dx && !transposed) {
            ft_gemm_packed(c, m * P, KKC, F, dyc, c->wpack, c->bpad + c->bpad_floats / 2, cols, 0);  /* columns' gradient */
            FT_PER_IMAGE(c, m, ft_col2im(op, cols + i * P * KKC, dx + (n0 + i) * in_sz));
        }
    }
    if (transposed) ft_conv_input_grad(op, dy, dx, n, c);
    for (long f = 0; f < F; f++)  /* back to the master layout (F, C, k, k) */
        for (long ch = 0; ch < C; ch++)
            for (long t = 0; t < k * k; t++) dw[(f * C + ch) * k * k + t] = dwp[f * KKC + t * C + ch];
}

/* ---------------------------------------------------------------- k x k convolution (Winograd)
 * F(m x m, k x k) (engine/winograd.py; Lavin & Gray 2016) for a stride-1 CONV whose row has tile = m:
 * the output is cut into m x m tiles; each tile's (m+k-1)^2 input patch d becomes V = BT d B, each filter
 * g becomes U = G g GT, and for each of the n^2 = (m+k-1)^2 transformed points e one GEMM over the batch's
 * tiles, M_e (tiles x F) = V_e (tiles x C) U_e (C x F), replaces the k^2 taps; Y = AT M A per tile.
 * Backward: the weight gradient in the transformed domain, dU_e (F x C) = dM_e^T V_e with dM = A dY AT,
 * then dg = GT dU G; the input gradient by the same forward algorithm on dy with the filters flipped and
 * transposed. Each image's transforms are done by one thread, the GEMMs are ft_gemm_packed and
 * ft_gemm_wgrad: the results do not depend on the thread count.
 * Buffers (trainstep.py sizes them): op->tv the transformed input, n^2 x (n images x tiles) x C, kept
 * from forward to backward, then the transformed output gradient of the input gradient; op->tm the
 * products (and dM); op->mid the packed U; c->wbuf dU; per-thread scratch 2 n^2 max(C, F) floats. */
#define FT_WINO_BLOCK 64  /* filters whose weight gradients are transformed back together */

/* U_e = (G g GT)_e packed for ft_gemm_packed as B (Cin x Fout), e = 0 .. n^2 - 1, each panels(Fout) x Cin x FP_NR:
 * g = w[fo][ci] (w: Fout x Cin x k x k), or with flip the input gradient's g = w[ci][fo] rotated by 180 degrees
 * (w: Cin x Fout x k x k, the forward's F x C). A panel's FP_NR filters are transformed together (the
 * innermost loops run over them), so each (point, panel, input channel) is one contiguous store. */
static void ft_wino_pack(const fp_wino *t, const float *w, long Cin, long Fout, int flip, float *up, ft_ctx *c) {
    long k = t->k, n = t->n, panels = (Fout + FP_NR - 1) / FP_NR, per_e = panels * Cin * FP_NR;
    #pragma omp parallel for schedule(static) num_threads(c->threads)
    for (long item = 0; item < panels * Cin; item++) {
        float gk[5 * 5 * FP_NR], tmp[8 * 5 * FP_NR];  /* k <= 5, n <= 8 (lowering.conv_tile) */
        long p = item / Cin, ci = item % Cin;
        for (long y = 0; y < k; y++)
            for (long x = 0; x < k; x++)
                for (long j = 0; j < FP_NR; j++) {
                    long fo = p * FP_NR + j;
                    gk[(y * k + x) * FP_NR + j] = fo >= Fout ? 0.f
                        : flip ? w[((ci * Fout + fo) * k + (k - 1 - y)) * k + (k - 1 - x)]
                               : w[((fo * Cin + ci) * k + y) * k + x];
                }
        for (long a = 0; a < n; a++)  /* tmp = G g (n x k), per filter */
            for (long x = 0; x < k; x++) {
                float *o = tmp + (a * k + x) * FP_NR;
                for (long j = 0; j < FP_NR; j++) o[j] = 0.f;
                for (long y = 0; y < k; y++) {
                    float f = t->g[a * k + y];
                    for (long j = 0; j < FP_NR; j++) o[j] += f * gk[(y * k + x) * FP_NR + j];
                }
            }
        for (long a = 0; a < n; a++)  /* U = tmp GT (n x n), per filter */
            for (long b = 0; b < n; b++) {
                float *o = up + (a * n + b) * per_e + (p * Cin + ci) * FP_NR;
                for (long j = 0; j < FP_NR; j++) o[j] = 0.f;
                for (long x = 0; x < k; x++) {
                    float f = t->g[b * k + x];
                    for (long j = 0; j < FP_NR; j++) o[j] += f * tmp[(a * k + x) * FP_NR + j];
                }
            }
    }
}

/* the input transforms of one image's th x tw tiles into rows row0 .. of V (blocks R x C) */
static void ft_wino_in(const fp_wino *t, const float *x, long H, long W, long C, long pad, long th, long tw,
                       float *V, long R, long row0, float *scr) {
    for (long q = 0; q < th * tw; q++) fp_wino_in_tile(t, x, H, W, C, pad, q / tw, q % tw, V, R, row0 + q, scr);
}

/* the output transforms of one image's tiles from rows row0 .. of M (blocks R x F) into y (Ho x Wo x F) */
static void ft_wino_out(const fp_wino *t, const float *M, long R, long row0, long th, long tw, long F, long Ho,
                        long Wo, const float *bias, int relu, float *y, float *scr) {
    for (long q = 0; q < th * tw; q++)
        fp_wino_out_tile(t, M, R, row0 + q, q / tw, q % tw, F, Ho, Wo, bias, relu, y, scr);
}

/* dM[e][row0 + tile][f] = (A dY AT)[e], the adjoint of ft_wino_out, for each tile of one image's output
 * gradient dy (Ho x Wo x F), zero past its edges. */
static void ft_wino_dout(const fp_wino *t, const float *dy, long Ho, long Wo, long F, long th, long tw, float *dM,
                         long R, long row0, float *scr) {
    long n = t->n, m = t->m;
    float *tmp = scr;
    for (long ty = 0; ty < th; ty++)
        for (long tx = 0; tx < tw; tx++) {
            long row = row0 + ty * tw + tx;
            for (long a = 0; a < n; a++)  /* tmp[a][b] = sum_u AT[u][a] dY[u][b] (n x m) */
                for (long b = 0; b < m; b++) {
                    float *o = tmp + (a * m + b) * F;
                    memset(o, 0, F * sizeof(float));
                    long ox = tx * m + b;
                    if (ox >= Wo) continue;
                    for (long u = 0; u < m; u++) {
                        long oy = ty * m + u;
                        float f = t->at[u * n + a];
                        if (oy >= Ho || f == 0.f) continue;
                        const float *s = dy + (oy * Wo + ox) * F;
                        for (long j = 0; j < F; j++) o[j] += f * s[j];
                    }
                }
            for (long a = 0; a < n; a++)  /* dM[a][b] = sum_u tmp[a][u] AT[u][b] */
                for (long b = 0; b < n; b++) {
                    float *o = dM + ((a * n + b) * R + row) * F;
                    memset(o, 0, F * sizeof(float));
                    for (long u = 0; u < m; u++) {
                        float f = t->at[u * n + b];
                        if (f == 0.f) continue;
                        const float *s = tmp + (a * m + u) * F;
                        for (long j = 0; j < F; j++) o[j] += f * s[j];
                    }
                }
        }
}

/* A stride-1 convolution of n channels-last images x (H x W x Cin) into y (Ho x Wo x Fout) by Winograd, with
 * U packed by ft_wino_pack: input transforms into V, one GEMM per transformed point into M, output transforms. */
static void ft_wino_conv(const fp_wino *t, const float *x, long H, long W, long Cin, long pad, long Ho, long Wo,
                         long Fout, const float *up, float *V, float *M, const float *bias, int relu, float *y, long n,
                         ft_ctx *c) {
    long th = (Ho + t->m - 1) / t->m, tw = (Wo + t->m - 1) / t->m, T = th * tw, R = n * T;
    long per_e = (Fout + FP_NR - 1) / FP_NR * Cin * FP_NR;
    FT_PER_IMAGE(c, n, ft_wino_in(t, x + i * H * W * Cin, H, W, Cin, pad, th, tw, V, R, i * T, scr));
    for (long e = 0; e < t->n * t->n; e++)
        ft_gemm_packed(c, R, Fout, Cin, V + e * R * Cin, up + e * per_e, c->bpad + c->bpad_floats / 2,
                       M + e * R * Fout, 0);
    FT_PER_IMAGE(c, n, ft_wino_out(t, M, R, i * T, th, tw, Fout, Ho, Wo, bias, relu, y + i * Ho * Wo * Fout, scr));
}

static void ft_wino_forward(const fl_op *op, const float *x, long n, ft_ctx *c) {
    fp_wino t = fp_wino_of(op);
    float *up = fl_ptr(op->mid);
    ft_wino_pack(&t, fl_cptr(op->w), op->c_in, op->c_out, 0, up, c);
    ft_wino_conv(&t, x, op->h_in, op->w_in, op->c_in, op->pad, op->h_out, op->w_out, op->c_out, up, fl_ptr(op->tv),
                 fl_ptr(op->tm), fl_cptr(op->b), (int)op->relu, fl_ptr(op->out), n, c);
}

static void ft_wino_backward(const fl_op *op, float *dy, float *dx, long n, ft_ctx *c, int summed) {
    fp_wino t = fp_wino_of(op);
    long C = op->c_in, F = op->c_out, Ho = op->h_out, Wo = op->w_out, P = Ho * Wo, k = t.k, nn = t.n * t.n;
    long th = (Ho + t.m - 1) / t.m, tw = (Wo + t.m - 1) / t.m, R = n * th * tw;
    float *V = fl_ptr(op->tv), *dM = fl_ptr(op->tm), *dU = c->wbuf, *dw = fl_ptr(op->dw);
    const float *y = fl_cptr(op->out);
    if (!summed)  /* (else the pooling after it masked dy and left the sums: ft_pool_takes_relu) */
        FT_PER_IMAGE(c, n, ft_colsum(dy + i * P * F, y + i * P * F, (int)op->relu, P, F, c->part + i * c->part_floats));
    ft_reduce(c, n, 0, F, fl_ptr(op->db), 1);
    FT_PER_IMAGE(c, n, ft_wino_dout(&t, dy + i * P * F, Ho, Wo, F, th, tw, dM, R, i * th * tw, scr));
    for (long e = 0; e < nn; e++)  /* dU_e (F x C) = dM_e^T V_e */
        ft_gemm_wgrad(c, R, F, C, dM + e * R * F, V + e * R * C, dU + e * F * C, 0);
    #pragma omp parallel for schedule(static) num_threads(c->threads)
    for (long fc0 = 0; fc0 < F * C; fc0 += FT_WINO_BLOCK) {  /* dg = GT dU G (k x k), a block of filters at a time */
        float tmp[5 * 8 * FT_WINO_BLOCK];
        long nb = F * C - fc0 < FT_WINO_BLOCK ? F * C - fc0 : FT_WINO_BLOCK;
        for (long y0 = 0; y0 < k; y0++)
            for (long b = 0; b < t.n; b++) {
                float *o = tmp + (y0 * t.n + b) * FT_WINO_BLOCK;
                for (long i = 0; i < nb; i++) o[i] = 0.f;
                for (long a = 0; a < t.n; a++) {
                    float f = t.g[a * k + y0];
                    const float *s = dU + (a * t.n + b) * F * C + fc0;
                    for (long i = 0; i < nb; i++) o[i] += f * s[i];
                }
            }
        for (long i = 0; i < nb; i++)
            for (long y0 = 0; y0 < k; y0++)
                for (long x0 = 0; x0 < k; x0++) {
                    float acc = 0.f;
                    for (long b = 0; b < t.n; b++) acc += tmp[(y0 * t.n + b) * FT_WINO_BLOCK + i] * t.g[b * k + x0];
                    dw[(fc0 + i) * k * k + y0 * k + x0] = acc;
                }
    }
    if (dx) {  /* the input gradient: dy (Ho x Wo x F) correlated with the flipped, transposed filters */
        float *up = fl_ptr(op->mid);
        ft_wino_pack(&t, fl_cptr(op->w), F, C, 1, up, c);
        ft_wino_conv(&t, dy, Ho, Wo, F, k - 1 - op->pad, op->h_in, op->w_in, C, up, V, dM, NULL, 0, dx, n, c);
    }
}

/* ---------------------------------------------------------------- vertical + horizontal 1D convolutions
 * v[i, x, c] = bv[c] + sum_t wv[t, c] in[i + t - vb, x, c]   (rows outside the input are zero)
 * y[i, j, c] = bh[c] + sum_t wh[t, c] v[i, j + t - hb, c]    (columns likewise)
 *
 * One vector of FP_VL channels at a time, on planes of that vector gathered into the thread's scratch, as
 * the inference path's fp_vh does (on the channels-last activation every tap would stride by C floats).
 * The last vector of channels is padded with zero lanes, where the filters are zero too. The planes, in
 * vectors:
 *   pp  the input with its zero rows: Hp = Hm + kv - 1 rows of W, pp[r] = in[r - vb];
 *   tp  v with its zero columns: Hm rows of L = Wo + kh - 1, tp[i, p] = v[i, p - hb]. The backward
 *       computes it again from pp: kv multiply-adds per element cost less than a round trip of v
 *       through memory;
 *   dp  the output gradient (masked by the ReLU) with kh - 1 zero columns on each side: Hm rows of
 *       L + kh - 1, dp[i, q] = dy[i, q - (kh - 1)];
 *   qp  v's gradient with its zero rows: H + kv - 1 rows of W, qp[q] = dv[q - (kv - 1 - vb)].
 * Then each sum runs over taps held in registers:
 *   dv[i, p - hb] = sum_t wh[t] dp[i, p - t + kh - 1]     dwh[t] = sum_i,j dy[i, j] tp[i, j + t]
 *   dx[r] = sum_t wv[t] qp[r + kv - 1 - t]                dwv[t] = sum_i,x dv[i, x] pp[i + t, x]
 * c->wbuf holds the filters transposed to (k, Cp) and the biases, Cp = C rounded up to whole vectors,
 * zero past C: wv (kv x Cp), wh (kh x Cp), bv, bh. */

#define FT_VH_KMAX 16  /* the longest 1D filter of the compiled step (trainstep.py falls back past it) */

static inline long ft_vh_vectors(const fl_op *op) { return (op->c_in + FP_VL - 1) / FP_VL; }

/* n vectors, each cw <= FP_VL channels from src (one every `stride` floats), to dst (contiguous, zero past
 * cw); with mask, each element is zeroed where mask (laid out as src) is not positive (a ReLU's output) */
static inline void ft_gather(const float *src, const float *mask, long stride, long n, int cw, float *dst) {
    if (cw == FP_VL && !mask) {
        for (long k = 0; k < n; k++) fp_store(dst + k * FP_VL, fp_load(src + k * stride));
        return;
    }
    for (long k = 0; k < n; k++)
        for (int l = 0; l < FP_VL; l++)
            dst[k * FP_VL + l] = l < cw && (!mask || mask[k * stride + l] > 0.f) ? src[k * stride + l] : 0.f;
}

/* one vector's first cw lanes to dst */
static inline void ft_put(float *dst, fp_v v, int cw) {
    if (cw == FP_VL) fp_store(dst, v);
    else for (int l = 0; l < cw; l++) dst[l] = v[l];
}

static inline void ft_zero_vectors(float *p, long n) {
    if (n > 0) memset(p, 0, n * FP_VL * sizeof(float));
}

/* v of one vector of channels into tp, from pp */
static inline __attribute__((always_inline)) void ft_vh_vertical_block(
        const float *restrict pp, float *restrict tp, const float *wv, fp_v bv, long Cp, long W, long Hm, long Wo,
        long x0, long x1, long hb, long kv, long kh) {
    long L = Wo + kh - 1;
    fp_v wvr[FT_VH_KMAX];
    for (long t = 0; t < kv; t++) wvr[t] = fp_load(wv + t * Cp);
    for (long i = 0; i < Hm; i++) {
        float *row = tp + i * L * FP_VL;
        ft_zero_vectors(row, fp_min(L, hb + x0));
        for (long xx = x0; xx < x1; xx++) {
            const float *s = pp + (i * W + xx) * FP_VL;
            fp_v acc = bv;
            for (long t = 0; t < kv; t++) acc += wvr[t] * fp_load(s + t * W * FP_VL);
            fp_store(row + (xx + hb) * FP_VL, acc);
        }
        long p1 = fp_max(0, hb + x1);
        ft_zero_vectors(row + p1 * FP_VL, L - p1);
    }
}

/* y of one vector of channels (channels-last, cw lanes), from tp */
static inline __attribute__((always_inline)) void ft_vh_horizontal_block(
        const float *restrict tp, float *restrict y, const float *wh, fp_v bh, long Cp, long C, long Hm, long Wo,
        long kh, int cw, int relu) {
    long L = Wo + kh - 1;
    fp_v whr[FT_VH_KMAX];
    for (long t = 0; t < kh; t++) whr[t] = fp_load(wh + t * Cp);
    for (long i = 0; i < Hm; i++) {
        const float *row = tp + i * L * FP_VL;
        float *o = y + i * Wo * C;
        for (long j = 0; j < Wo; j++) {
            fp_v acc = bh;
            for (long t = 0; t < kh; t++) acc += whr[t] * fp_load(row + (j + t) * FP_VL);
            ft_put(o + j * C, relu ? fp_relu(acc) : acc, cw);
        }
    }
}

/* The backward of one vector of channels: its gradient sums into part (the image's, at channel c of each
 * row: dwv (kv x C), dbv (C), dwh (kh x C), dbh (C)), and dx (channels-last, cw lanes) unless NULL. */
static inline __attribute__((always_inline)) void ft_vh_backward_block(
        const float *restrict pp, const float *restrict tp, const float *restrict dp, float *restrict qp,
        float *restrict dx, const float *wv, const float *wh, long Cp, long C, long H, long W, long Hm, long Wo,
        long x0, long x1, long vb, long hb, long kv, long kh, int cw, float *part) {
    long L = Wo + kh - 1, Ld = L + kh - 1, A = kv - 1 - vb, Hq = H + kv - 1;
    fp_v z = {0}, wvr[FT_VH_KMAX], whr[FT_VH_KMAX], dwv[FT_VH_KMAX], dwh[FT_VH_KMAX], dbv = z, dbh = z;
    for (long t = 0; t < kv; t++) { wvr[t] = fp_load(wv + t * Cp); dwv[t] = z; }
    for (long t = 0; t < kh; t++) { whr[t] = fp_load(wh + t * Cp); dwh[t] = z; }
    for (long i = 0; i < Hm; i++) {  /* horizontal: dbh, dwh */
        const float *g = dp + (i * Ld + kh - 1) * FP_VL, *s = tp + i * L * FP_VL;
        for (long j = 0; j < Wo; j++) {
            fp_v gj = fp_load(g + j * FP_VL);
            dbh += gj;
            for (long t = 0; t < kh; t++) dwh[t] += gj * fp_load(s + (j + t) * FP_VL);
        }
    }
    if (dx)  /* rows of qp that no row of v fills */
        for (long q = 0; q < Hq; q++)
            if (q - A < 0 || q - A >= Hm) ft_zero_vectors(qp + q * W * FP_VL, W);
    for (long i = 0; i < Hm; i++) {  /* v's gradient: dbv, dwv, and qp */
        long q = i + A;
        float *qrow = dx && q >= 0 && q < Hq ? qp + q * W * FP_VL : NULL;
        const float *g = dp + i * Ld * FP_VL;
        for (long xx = x0; xx < x1; xx++) {
            const float *gp = g + (xx + hb + kh - 1) * FP_VL;
            fp_v d = z;
            for (long t = 0; t < kh; t++) d += whr[t] * fp_load(gp - t * FP_VL);
            dbv += d;
            const float *s = pp + (i * W + xx) * FP_VL;
            for (long t = 0; t < kv; t++) dwv[t] += d * fp_load(s + t * W * FP_VL);
            if (qrow) fp_store(qrow + xx * FP_VL, d);
        }
        if (qrow) {
            ft_zero_vectors(qrow, x0);
            ft_zero_vectors(qrow + x1 * FP_VL, W - x1);
        }
    }
    if (dx)  /* vertical: dx */
        for (long r = 0; r < H; r++) {
            float *o = dx + r * W * C;
            for (long xx = 0; xx < W; xx++) {
                const float *s = qp + ((r + kv - 1) * W + xx) * FP_VL;
                fp_v acc = z;
                for (long t = 0; t < kv; t++) acc += wvr[t] * fp_load(s - t * W * FP_VL);
                ft_put(o + xx * C, acc, cw);
            }
        }
    float *pdbv = part + kv * C, *pdwh = pdbv + C, *pdbh = pdwh + kh * C;
    for (long t = 0; t < kv; t++) ft_put(part + t * C, dwv[t], cw);
    ft_put(pdbv, dbv, cw);
    for (long t = 0; t < kh; t++) ft_put(pdwh + t * C, dwh[t], cw);
    ft_put(pdbh, dbh, cw);
}

/* The geometry every block of a VH op shares */
typedef struct {
    long C, Cp, H, W, Hm, Wo, L, Hp, kv, vb, kh, hb, x0, x1;
} ft_vh_geom;

static ft_vh_geom ft_vh_geometry(const fl_op *op) {
    ft_vh_geom g;
    g.C = op->c_in; g.Cp = ft_vh_vectors(op) * FP_VL; g.H = op->h_in; g.W = op->w_in; g.Hm = op->h_mid;
    g.Wo = op->w_out; g.kv = op->kv; g.vb = op->vbefore; g.kh = op->kh; g.hb = op->hbefore;
    g.L = g.Wo + g.kh - 1; g.Hp = g.Hm + g.kv - 1;
    g.x0 = fp_max(0, -g.hb); g.x1 = fp_min(g.W, g.L - g.hb);  /* the columns of v that land in tp */
    return g;
}

/* pp for channels [c, c + cw) of one image's input x */
static void ft_vh_gather_input(const ft_vh_geom *g, const float *x, long c, int cw, float *pp) {
    for (long r = 0; r < g->Hp; r++) {
        long ir = r - g->vb;
        if (ir < 0 || ir >= g->H) ft_zero_vectors(pp + r * g->W * FP_VL, g->W);
        else ft_gather(x + ir * g->W * g->C + c, NULL, g->C, g->W, cw, pp + r * g->W * FP_VL);
    }
}

/* the filters and biases transposed and padded into wbuf (see above) */
static void ft_vh_filters(const fl_op *op, float *wbuf) {
    long C = op->c_in, Cp = ft_vh_vectors(op) * FP_VL, kv = op->kv, kh = op->kh;
    const float *wv = fl_cptr(op->wv), *wh = fl_cptr(op->wh), *bv = fl_cptr(op->bv), *bh = fl_cptr(op->bh);
    float *wvt = wbuf, *wht = wvt + kv * Cp, *bvp = wht + kh * Cp, *bhp = bvp + Cp;
    memset(wbuf, 0, (kv + kh + 2) * Cp * sizeof(float));
    for (long ch = 0; ch < C; ch++) {
        for (long t = 0; t < kv; t++) wvt[t * Cp + ch] = wv[ch * kv + t];
        for (long t = 0; t < kh; t++) wht[t * Cp + ch] = wh[ch * kh + t];
        bvp[ch] = bv[ch];
        bhp[ch] = bh[ch];
    }
}

/* v of channels [c, c + cw) of one image into tp, from its input x (gathered into pp on the way) */
static void ft_vh_vertical(const ft_vh_geom *g, const float *wbuf, const float *x, long c, int cw, float *pp,
                           float *tp) {
    const float *wvt = wbuf, *bvp = wvt + (g->kv + g->kh) * g->Cp;
    ft_vh_gather_input(g, x, c, cw, pp);
#define FT_VH_V(KV, KH) ft_vh_vertical_block(pp, tp, wvt + c, fp_load(bvp + c), g->Cp, g->W, g->Hm, g->Wo, g->x0, \
                                             g->x1, g->hb, KV, KH)
    if (g->kv == 5 && g->kh == 5) FT_VH_V(5, 5);
    else if (g->kv == 3 && g->kh == 3) FT_VH_V(3, 3);
    else FT_VH_V(g->kv, g->kh);
#undef FT_VH_V
}

static void ft_vh_forward_image(const fl_op *op, const ft_vh_geom *g, const float *wbuf, const float *x, float *y,
                                float *scr) {
    const float *wht = wbuf + g->kv * g->Cp, *bhp = wht + g->kh * g->Cp + g->Cp;
    float *pp = scr, *tp = pp + g->Hp * g->W * FP_VL;
    int relu = (int)op->relu;
    for (long c = 0; c < g->C; c += FP_VL) {
        int cw = (int)fp_min(FP_VL, g->C - c);
        ft_vh_vertical(g, wbuf, x, c, cw, pp, tp);
#define FT_VH_H(KH) ft_vh_horizontal_block(tp, y + c, wht + c, fp_load(bhp + c), g->Cp, g->C, g->Hm, g->Wo, KH, cw, relu)
        if (g->kh == 5) FT_VH_H(5);
        else if (g->kh == 3) FT_VH_H(3);
        else FT_VH_H(g->kh);
#undef FT_VH_H
    }
}

/* One image's backward: dx (if not NULL) from dy (masked here by the op's ReLU, whose output is y), and its
 * partial gradient sums part = [dwv (kv, C), dbv (C), dwh (kh, C), dbh (C)]. */
static void ft_vh_backward_image(const fl_op *op, const ft_vh_geom *g, const float *wbuf, const float *x,
                                 const float *y, const float *dy, float *dx, float *scr, float *part) {
    const float *wvt = wbuf, *wht = wvt + g->kv * g->Cp;
    long Ld = g->L + g->kh - 1;
    float *pp = scr, *tp = pp + g->Hp * g->W * FP_VL, *dp = tp + g->Hm * g->L * FP_VL, *qp = dp + g->Hm * Ld * FP_VL;
    for (long c = 0; c < g->C; c += FP_VL) {
        int cw = (int)fp_min(FP_VL, g->C - c);
        ft_vh_vertical(g, wbuf, x, c, cw, pp, tp);  /* v again: cheaper than keeping it in memory */
        for (long i = 0; i < g->Hm; i++) {
            float *row = dp + i * Ld * FP_VL;
            ft_zero_vectors(row, g->kh - 1);
            ft_gather(dy + i * g->Wo * g->C + c, op->relu ? y + i * g->Wo * g->C + c : NULL, g->C, g->Wo, cw,
                      row + (g->kh - 1) * FP_VL);
            ft_zero_vectors(row + (g->kh - 1 + g->Wo) * FP_VL, g->kh - 1);
        }
#define FT_VH_BWD(KV, KH) ft_vh_backward_block(pp, tp, dp, qp, dx ? dx + c : NULL, wvt + c, wht + c, g->Cp, g->C, \
                                               g->H, g->W, g->Hm, g->Wo, g->x0, g->x1, g->vb, g->hb, KV, KH, cw, \
                                               part + c)
        if (g->kv == 5 && g->kh == 5) FT_VH_BWD(5, 5);
        else if (g->kv == 3 && g->kh == 3) FT_VH_BWD(3, 3);
        else FT_VH_BWD(g->kv, g->kh);
#undef FT_VH_BWD
    }
}

/* floats of the filters in wbuf, and of one thread's scratch */
static long ft_vh_wbuf_floats(const fl_op *op) { return (op->kv + op->kh + 2) * ft_vh_vectors(op) * FP_VL; }
static long ft_vh_scratch_floats(const fl_op *op) {  /* pp, tp, dp and qp of ft_vh_backward_image */
    ft_vh_geom g = ft_vh_geometry(op);
    return (g.Hp * g.W + g.Hm * g.L + g.Hm * (g.L + g.kh - 1) + (g.H + g.kv - 1) * g.W) * FP_VL;
}

static void ft_vh_forward(const fl_op *op, const float *x, long n, ft_ctx *c) {
    ft_vh_geom g = ft_vh_geometry(op);
    long in_sz = ft_in_size(op), out_sz = ft_out_size(op);
    ft_vh_filters(op, c->wbuf);
    float *y = fl_ptr(op->out);
    FT_PER_IMAGE(c, n, ft_vh_forward_image(op, &g, c->wbuf, x + i * in_sz, y + i * out_sz, scr));
}

static void ft_vh_backward(const fl_op *op, const float *x, const float *dy, float *dx, long n, ft_ctx *c) {
    ft_vh_geom g = ft_vh_geometry(op);
    long C = op->c_in, kv = op->kv, kh = op->kh;
    long in_sz = ft_in_size(op), out_sz = ft_out_size(op);
    ft_vh_filters(op, c->wbuf);
    const float *y = fl_cptr(op->out);
    FT_PER_IMAGE(c, n, ft_vh_backward_image(op, &g, c->wbuf, x + i * in_sz, y + i * out_sz, dy + i * out_sz,
                                            dx ? dx + i * in_sz : NULL, scr, c->part + i * c->part_floats));
    /* gradients in the master layouts: dwv, dwh (C, k); dbv, dbh (C) */
    float *dwv = fl_ptr(op->dwv), *dwh = fl_ptr(op->dwh);
    for (long t = 0; t < kv; t++) ft_reduce(c, n, t * C, C, dwv + t, kv);
    ft_reduce(c, n, kv * C, C, fl_ptr(op->dbv), 1);
    for (long t = 0; t < kh; t++) ft_reduce(c, n, (kv + 1 + t) * C, C, dwh + t, kh);
    ft_reduce(c, n, (kv + 1 + kh) * C, C, fl_ptr(op->dbh), 1);
}

/* ---------------------------------------------------------------- max-pooling */

/* Whether element (p, ch) of image img (C channels, HW pixels) is kept by a dropout: the hash of
 * dropout_hash.h on the element's index in the NCHW tensor of the layer path. */
static inline int ft_keep(const fl_op *op, long img, long C, long HW, long p, long ch) {
    uint64_t idx = (uint64_t)((img * C + ch) * HW + p);
    return (fl_splitmix64((uint64_t)op->seed, idx) >> 32) >= (uint64_t)op->thresh;
}

/* 1 / (1 - p), stored as its float32 bits */
static inline float ft_dropout_scale(const fl_op *op) {
    float scale;
    int32_t bits = (int32_t)op->scale;
    memcpy(&scale, &bits, sizeof scale);
    return scale;
}

/* y (an image's C x HW channels-last output) dropped out in place: the forward of a folded dropout, and
 * its backward on the output gradient. */
static void ft_drop_in_place(const fl_op *op, long img, long C, long HW, float *y) {
    float scale = ft_dropout_scale(op);
    for (long p = 0; p < HW; p++)
        for (long ch = 0; ch < C; ch++)
            y[p * C + ch] = ft_keep(op, img, C, HW, p, ch) ? y[p * C + ch] * scale : 0.f;
}

/* One image: k x k windows, stride s, clipped at the border; the first maximum in row-major
 * order wins ties and a NaN is always taken (as the layer path). argmax: the input position
 * (iy * W + ix) of each output element.
 * With a dropout folded in (op->thresh != 0, lowering.layout), its output is then dropped out in place,
 * while the image is in cache, as the DROPOUT op would (ft_dropout_forward_image) but with no mask stored. */
static void ft_pool_forward_image(const fl_op *op, long img, const float *x, float *y, int32_t *arg) {
    long C = op->c_in, H = op->h_in, W = op->w_in, Ho = op->h_out, Wo = op->w_out, k = op->k, s = op->stride;
    for (long oy = 0; oy < Ho; oy++)
        for (long ox = 0; ox < Wo; ox++) {
            long y0 = oy * s, y1 = y0 + k < H ? y0 + k : H, x0 = ox * s, x1 = x0 + k < W ? x0 + k : W;
            float *o = y + (oy * Wo + ox) * C;
            int32_t *a = arg + (oy * Wo + ox) * C;
            const float *first = x + (y0 * W + x0) * C;
            for (long ch = 0; ch < C; ch++) { o[ch] = first[ch]; a[ch] = (int32_t)(y0 * W + x0); }
            for (long iy = y0; iy < y1; iy++)
                for (long ix = x0; ix < x1; ix++) {
                    if (iy == y0 && ix == x0) continue;
                    const float *in = x + (iy * W + ix) * C;
                    int32_t pos = (int32_t)(iy * W + ix);
                    for (long ch = 0; ch < C; ch++) {
                        float v = in[ch];
                        int take = (v > o[ch]) | (v != v);
                        o[ch] = take ? v : o[ch];
                        a[ch] = take ? pos : a[ch];
                    }
                }
            if (op->relu)
                for (long ch = 0; ch < C; ch++) o[ch] = o[ch] < 0.f ? 0.f : o[ch];
        }
    if (op->thresh) ft_drop_in_place(op, img, C, Ho * Wo, y);
}

/* dx from dy through the argmaxes; with a folded dropout, dy is first masked and scaled (in place) by the hash. */
/* dx (the pooling's input gradient) from dy through the argmaxes: each input element sums, in the order of
 * the windows, dy of the windows (at most ceil(k/s)^2) whose argmax it is. Written once, a vector of
 * channels at a time, instead of scattered into a zeroed image. */
static void ft_pool_scatter(const fl_op *op, const float *dy, const int32_t *arg, float *dx) {
    long C = op->c_in, H = op->h_in, W = op->w_in, Ho = op->h_out, Wo = op->w_out, k = op->k, s = op->stride;
    long cv = C / FP_VL * FP_VL;
    for (long iy = 0; iy < H; iy++) {
        long oy0 = iy < k ? 0 : (iy - k) / s + 1, oy1 = fp_min(Ho - 1, iy / s);  /* the windows over row iy */
        for (long ix = 0; ix < W; ix++) {
            long ox0 = ix < k ? 0 : (ix - k) / s + 1, ox1 = fp_min(Wo - 1, ix / s);
            int32_t pix = (int32_t)(iy * W + ix);
            float *o = dx + pix * C;
            fp_vi pv = {0};
            pv += pix;
            for (long c = 0; c < cv; c += FP_VL) {
                fp_v acc = {0};
                for (long oy = oy0; oy <= oy1; oy++)
                    for (long ox = ox0; ox <= ox1; ox++) {
                        long q = (oy * Wo + ox) * C + c;
                        fp_vi a;
                        memcpy(&a, arg + q, sizeof a);
                        acc += (fp_v)((fp_vi)fp_load(dy + q) & (a == pv));
                    }
                fp_store(o + c, acc);
            }
            for (long c = cv; c < C; c++) {
                float acc = 0.f;
                for (long oy = oy0; oy <= oy1; oy++)
                    for (long ox = ox0; ox <= ox1; ox++) {
                        long q = (oy * Wo + ox) * C + c;
                        acc += arg[q] == pix ? dy[q] : 0.f;
                    }
                o[c] = acc;
            }
        }
    }
}

static void ft_pool_backward_image(const fl_op *op, long img, float *dy, const int32_t *arg, float *dx) {
    if (op->thresh) ft_drop_in_place(op, img, op->c_in, op->h_out * op->w_out, dy);
    ft_pool_scatter(op, dy, arg, dx);
}

/* The same, for a pooling that takes the ReLU of the op before it (ft_pool_takes_relu): dy is masked by the
 * pooled output y (> 0) before the scatter, and part (C floats) gets the masked gradient's sums per channel. */
static void ft_pool_relu_backward_image(const fl_op *op, long img, float *restrict dy, const float *restrict y,
                                        const int32_t *arg, float *dx, float *restrict part) {
    long C = op->c_in, P = op->h_out * op->w_out;
    if (op->thresh) ft_drop_in_place(op, img, C, P, dy);
    memset(part, 0, C * sizeof(float));
    for (long p = 0; p < P; p++)  /* the mask and the sums, on the pooled gradient (vectors of channels) */
        for (long ch = 0; ch < C; ch++) {
            float g = y[p * C + ch] > 0.f ? dy[p * C + ch] : 0.f;
            dy[p * C + ch] = g;
            part[ch] += g;
        }
    ft_pool_scatter(op, dy, arg, dx);
}

/* ---------------------------------------------------------------- dropout */

/* The mask of one image, by the element's index in the NCHW tensor of the layer path (the
 * hash of dropout_hash.h, as _kernels.dropout_mask and the CUDA kernel), for
 * a channels-last (H, W, C) activation (H = W = 1 for a flat one). */
static void ft_dropout_forward_image(const fl_op *op, long img, const float *x, float *y, uint8_t *mask) {
    long C = op->c_in, HW = op->h_in * op->w_in;
    float scale = ft_dropout_scale(op);
    for (long p = 0; p < HW; p++)
        for (long ch = 0; ch < C; ch++) {
            uint8_t m = (uint8_t)ft_keep(op, img, C, HW, p, ch);
            mask[p * C + ch] = m;
            y[p * C + ch] = m ? x[p * C + ch] * scale : 0.f;
        }
}

static void ft_mask_scale(const fl_op *op, const float *dy, const uint8_t *mask, float *dx, long len) {
    float scale = ft_dropout_scale(op);
    for (long j = 0; j < len; j++) dx[j] = mask[j] ? dy[j] * scale : 0.f;
}

/* ---------------------------------------------------------------- a convolution and its pooling */

/* The forward of a CONV (im2col) and the max-pooling `pool` after it (op->pooled), image by image: the
 * columns go to the CONV's own buffer (op->aux, kept for backward), its output to the thread's scratch
 * (Ho x Wo x F), and the pooling reads it there while it is in cache. The output is not stored: nothing
 * reads it (the pooling's backward takes the ReLU, ft_pool_takes_relu; without a ReLU the bias gradient
 * reads only dy). Each output element is the same tile sum as in ft_conv_forward. */
static void ft_conv_pool_forward(const fl_op *op, const fl_op *pool, const float *x, long n, ft_ctx *c) {
    long F = op->c_out, KKC = op->k * op->k * op->c_in, P = op->h_out * op->w_out, in_sz = ft_in_size(op);
    long pool_sz = ft_out_size(pool);
    const float *bias = ft_conv_weights(op, c);
    float *cols = fl_ptr(op->aux), *y = fl_ptr(pool->out);
    int32_t *arg = (int32_t *)fl_ptr(pool->aux);
    FT_PER_IMAGE(c, n, {
        float *ci = cols + i * P * KKC;
        ft_im2col(op, x + i * in_sz, ci);
        ft_gemm_packed_serial(P, F, KKC, ci, c->wpack, bias, scr, (int)op->relu);
        ft_pool_forward_image(pool, i, scr, y + i * pool_sz, arg + i * pool_sz);
    });
}

/* ---------------------------------------------------------------- the step */

/* Forward of n images x (NCHW, in_size floats each) through every op; outputs stay in the
 * ops' buffers (the last op's is the logits). Returns the thread count of the last loop. */
static int ft_forward(const fl_op *ops, int nops, const float *x, long n, ft_ctx *c) {
    FT_FTZ_ON();
    double t_prev = c->times ? ft_now() : 0.0;
    for (int o = 0; o < nops; o++) {
        const fl_op *op = ops + o;
        const float *in = o ? fl_cptr(ops[o - 1].out) : x;
        float *y = fl_ptr(op->out);
        long in_sz = ft_in_size(op), out_sz = ft_out_size(op), P = op->h_out * op->w_out;
        switch (op->kind) {
        case FL_TO_NHWC:
            FT_PER_IMAGE(c, n, ft_to_nhwc(in + i * in_sz, y + i * out_sz, op->c_in, op->h_in * op->w_in));
            break;
        case FL_TO_NCHW:
            FT_PER_IMAGE(c, n, ft_to_nchw(in + i * in_sz, y + i * out_sz, op->c_in, op->h_in * op->w_in));
            break;
        case FL_GEMM:
        case FL_LINEAR:  /* (n P, C) x (F, C)^T, then bias (and ReLU) */
            ft_pack(c, fl_cptr(op->w), 1, op->c_in, op->c_out, c->wpack);
            ft_gemm_packed(c, n * P, op->c_out, op->c_in, in, c->wpack, ft_pad_bias(fl_cptr(op->b), op->c_out, c->bpad),
                           y, (int)op->relu);
            break;
        case FL_CONV:
            if (op->tile) ft_wino_forward(op, in, n, c);
            else if (op->pooled) ft_conv_pool_forward(op, op + 1, in, n, c);
            else ft_conv_forward(op, in, n, c);
            break;
        case FL_VH:
            ft_vh_forward(op, in, n, c);
            break;
        case FL_POOL:
            if (o > 0 && ops[o - 1].pooled) break;  /* ran in the CONV's forward */
            FT_PER_IMAGE(c, n, ft_pool_forward_image(op, i, in + i * in_sz, y + i * out_sz,
                                                     (int32_t *)fl_ptr(op->aux) + i * out_sz));
            break;
        case FL_DROPOUT:
            FT_PER_IMAGE(c, n, ft_dropout_forward_image(op, i, in + i * in_sz, y + i * out_sz,
                                                        (uint8_t *)(intptr_t)op->aux + i * out_sz));
            break;
        case FL_RELU:
            FT_PER_IMAGE(c, n, for (long j = 0; j < out_sz; j++) {
                float v = in[i * out_sz + j];
                y[i * out_sz + j] = v < 0.f ? 0.f : v;
            });
            break;
        }
        if (c->times) {
            double t = ft_now();
            c->times[o] += t - t_prev;
            t_prev = t;
        }
    }
    FT_FTZ_OFF();
    return c->team;
}

/* Backward from dlogits (n x the last op's output) through the ops in reverse: parameter
 * gradients go to the ops' gradient arrays. Nothing needs the gradient of the input: the
 * first op with parameters computes none, and the ops before it are not run.
 *
 * In parts: this call runs ops upper-1 down to lower only. The first part (upper = nops) starts
 * from dlogits; a later part continues from the output gradient the part before left (op o reads
 * it from g0 when nops-1-o is even, else from g1), so parts [lower_k, upper_k) that tile [0, nops)
 * from the top, called in that order, compute what one call with upper = nops, lower = 0 does. */
static int ft_backward(const fl_op *ops, int nops, const float *x, const float *dlogits, long n, ft_ctx *c,
                       int upper, int lower) {
    FT_FTZ_ON();
    double t_prev = c->times ? ft_now() : 0.0;
    int even = (nops - upper) % 2 == 0;  /* op upper-1 reads g0 */
    float *dy = even ? c->g0 : c->g1, *dx = even ? c->g1 : c->g0;
    if (upper == nops)
        memcpy(dy, dlogits, n * ft_out_size(ops + nops - 1) * sizeof(float));
    int first = 0;  /* the first op with parameters (gradient arrays): nothing below it needs a gradient */
    while (first < nops - 1 && !ops[first].dw && !ops[first].dwv && !ops[first].dwh)
        first++;
    for (int o = upper - 1; o >= first && o >= lower; o--) {
        const fl_op *op = ops + o;
        const float *in = o ? fl_cptr(ops[o - 1].out) : x, *y = fl_cptr(op->out);
        long in_sz = ft_in_size(op), out_sz = ft_out_size(op), P = op->h_out * op->w_out;
        float *d = o > first ? dx : NULL;
        int summed = ft_pool_takes_relu(ops, nops, o + 1);  /* the pooling after op o did its ReLU and sums */
        int masks_itself = op->kind == FL_GEMM || op->kind == FL_LINEAR || op->kind == FL_CONV || op->kind == FL_VH;
        if (op->relu && !masks_itself)
            FT_PER_IMAGE(c, n, ft_relu_mask(dy + i * out_sz, y + i * out_sz, out_sz));
        switch (op->kind) {
        case FL_TO_NHWC:
            if (d) FT_PER_IMAGE(c, n, ft_to_nchw(dy + i * out_sz, d + i * in_sz, op->c_in, op->h_in * op->w_in));
            break;
        case FL_TO_NCHW:
            if (d) FT_PER_IMAGE(c, n, ft_to_nhwc(dy + i * out_sz, d + i * in_sz, op->c_in, op->h_in * op->w_in));
            break;
        case FL_GEMM:
        case FL_LINEAR: {
            long C = op->c_in, F = op->c_out;
            if (!summed)
                FT_PER_IMAGE(c, n, ft_colsum(dy + i * out_sz, y + i * out_sz, (int)op->relu, P, F,
                                             c->part + i * c->part_floats));
            ft_reduce(c, n, 0, F, fl_ptr(op->db), 1);
            ft_gemm_wgrad(c, n * P, F, C, dy, in, fl_ptr(op->dw), 0);
            if (d) {
                ft_pack(c, fl_cptr(op->w), 0, F, C, c->wpack);
                ft_gemm_packed(c, n * P, C, F, dy, c->wpack, c->bpad + c->bpad_floats / 2, d, 0);
            }
            break;
        }
        case FL_CONV:
            if (op->tile) ft_wino_backward(op, dy, d, n, c, summed);
            else ft_conv_backward(op, in, dy, d, n, c, summed);
            break;
        case FL_VH:
            ft_vh_backward(op, in, dy, d, n, c);
            break;
        case FL_POOL:
            if (d && ft_pool_takes_relu(ops, nops, o))
                FT_PER_IMAGE(c, n, ft_pool_relu_backward_image(op, i, dy + i * out_sz, y + i * out_sz,
                                                               (const int32_t *)fl_cptr(op->aux) + i * out_sz,
                                                               d + i * in_sz, c->part + i * c->part_floats));
            else if (d)
                FT_PER_IMAGE(c, n, ft_pool_backward_image(op, i, dy + i * out_sz,
                                                          (const int32_t *)fl_cptr(op->aux) + i * out_sz,
                                                          d + i * in_sz));
            break;
        case FL_DROPOUT:
            if (d) FT_PER_IMAGE(c, n, ft_mask_scale(op, dy + i * out_sz, (const uint8_t *)(intptr_t)op->aux + i * out_sz,
                                                    d + i * in_sz, out_sz));
            break;
        case FL_RELU:  /* the mask above did it */
            if (d) memcpy(d, dy, n * out_sz * sizeof(float));
            break;
        }
        float *t = dy; dy = dx; dx = t;
        if (c->times) {
            double now = ft_now();
            c->times[nops + o] += now - t_prev;
            t_prev = now;
        }
    }
    FT_FTZ_OFF();
    return c->team;
}

/* SGD with momentum as Torch7's optim.sgd, in place, for each parameter row of `tab`
 * (w, g, v, size, decay, first): d = g + wd w (rows with decay); v = d on the first step
 * (first = 1), else momentum v + (1 - dampening) d; w -= lr v, or with `nesterov`
 * w -= lr (d + momentum v). */
#define FT_SGD_COLS 6
static void ft_sgd(const int64_t *tab, int nparams, float lr, float momentum, float dampening, float wd,
                   int nesterov, int threads) {
    for (int r = 0; r < nparams; r++) {
        const int64_t *row = tab + FT_SGD_COLS * r;
        float *w = fl_ptr(row[0]), *v = fl_ptr(row[2]);
        const float *g = fl_cptr(row[1]);
        long size = row[3];
        float decay = row[4] ? wd : 0.f;
        int first = (int)row[5];
        #pragma omp parallel for schedule(static) num_threads(threads) if (size > 65536)
        for (long j = 0; j < size; j++) {
            float d = decay != 0.f ? g[j] + decay * w[j] : g[j];
            float vj = first ? d : momentum * v[j] + (1.f - dampening) * d;
            v[j] = vj;
            w[j] -= nesterov ? lr * (d + momentum * vj) : lr * vj;
        }
    }
}

/* The machine's float32 peak on `threads` threads, in GFLOP/s: each thread runs chains of
 * independent fused multiply-adds on whole SIMD vectors (enough chains to cover the FMA
 * latency), `iters` rounds of them; the best of `repeat` runs. The benchmark quotes its
 * achieved rates as fractions of this figure. */
static double ft_peak(int threads, long iters, int repeat) {
    double best = 0.0;
    for (int r = 0; r < repeat; r++) {
        double t0 = ft_now();
        float sink = 0.f;
        #pragma omp parallel num_threads(threads) reduction(+ : sink)
        {
            fp_v a[12], m, s;
            for (int j = 0; j < FP_VL; j++) { m[j] = 1.0f + 1e-7f * j; s[j] = 1e-8f; }
            for (int i = 0; i < 12; i++) a[i] = s * (float)(i + 1);
            for (long it = 0; it < iters; it++)
                for (int i = 0; i < 12; i++) a[i] = a[i] * m + s;
            for (int i = 0; i < 12; i++) sink += a[i][0];
        }
        double t = ft_now() - t0, gf = (double)threads * iters * 12 * FP_VL * 2 / t / 1e9;
        if (gf > best && sink == sink) best = gf;
    }
    return best;
}
