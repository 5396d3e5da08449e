/* Fused float32 inference of a compiled network (engine/plan.py builds the op table).
 *
 * One call runs a whole batch through every op inside a single OpenMP parallel region:
 *   - batch >= 2 x threads: each thread takes whole images (private buffers, no waiting);
 *   - smaller batches: all threads work on each op of one image together, claiming
 *     chunks of output tiles, rows or channels (see "work sharing"). Waking a sleeping
 *     thread costs tens of microseconds on these machines, more than most ops of a
 *     single image, so the threads are woken once per call, not once per op.
 *
 * Activations between ops are channels-last, (H, W, C) per image: every per-channel op
 * (vertical/horizontal 1D convolution, pooling) is then a loop over whole SIMD vectors
 * of channels, however narrow the image, and a 1x1 convolution is a plain GEMM
 * (positions x channels) @ (channels x filters). The input image comes in NCHW and
 * the first op transposes it.
 *
 * The GEMMs use a register-blocked micro-kernel (FP_MR positions x 2 vectors of
 * filters) over weights packed at compile time in panels of FP_NR filters (k-major,
 * zero filters past the end), with the bias and an optional ReLU applied before the
 * store. Vectors are GCC/Clang vector extensions, so the same source compiles to
 * AVX-512, AVX2, SSE or NEON, whatever -march gives. Every output element is computed
 * by one thread with a fixed summation order: results do not depend on the thread count.
 */
#ifndef FLATNET_INFER_H
#define FLATNET_INFER_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <time.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#define FP_VL 16
#define FP_MR 8
#elif defined(__AVX__) || defined(__AVX2__)
#define FP_VL 8
#define FP_MR 6
#else
#define FP_VL 4
#define FP_MR 6
#endif
#define FP_NR (2 * FP_VL)
#if FP_VL >= 8
#include <immintrin.h>
#endif

typedef float fp_v __attribute__((vector_size(FP_VL * sizeof(float))));
typedef int32_t fp_vi __attribute__((vector_size(FP_VL * sizeof(float))));

#include "_ops.h"

static int fp_nr(void) { return FP_NR; }
static int fp_vl(void) { return FP_VL; }

static inline fp_v fp_load(const float *p) { fp_v v; memcpy(&v, p, sizeof v); return v; }
static inline void fp_store(float *p, fp_v v) { memcpy(p, &v, sizeof v); }
static inline fp_v fp_relu(fp_v v) { fp_v z = {0}; return (fp_v)((fp_vi)v & (v > z)); }
static inline float fp_relu1(int relu, float s) { return relu && s < 0.f ? 0.f : s; }  /* ReLU if asked, one value */
static inline fp_v fp_vmax(fp_v a, fp_v b) {
#if FP_VL == 16
    return (fp_v)_mm512_max_ps((__m512)a, (__m512)b);
#elif FP_VL == 8
    return (fp_v)_mm256_max_ps((__m256)a, (__m256)b);
#else
    fp_vi m = a > b;
    return (fp_v)(((fp_vi)a & m) | ((fp_vi)b & ~m));
#endif
}
static inline float fp_hsum(fp_v v) {
    float s = 0.f;
    for (int i = 0; i < FP_VL; i++) s += v[i];
    return s;
}
static inline long fp_min(long a, long b) { return a < b ? a : b; }
static inline long fp_max(long a, long b) { return a > b ? a : b; }


/* ---------------------------------------------------------------- work sharing
 * The work of a phase (an op, or one of its steps) is cut into units: GEMM tiles, rows,
 * vectors of channels. Threads claim chunks of units from the phase's counter (about
 * eight chunks per thread), add what they finished to its `done` count, and go on to the
 * next phase once every unit of this one is done. A thread waits only for chunks other
 * threads are working on, never for a thread that has not arrived: when the machine
 * delays one thread, the others do its share (a barrier would make every op wait for it),
 * and the late thread, when it comes, skips the phases already finished. Each output
 * element is still computed by one thread in a fixed order. */

typedef struct {
    long next, done;  /* units claimed, units finished */
    char pad[48];     /* one phase per cache line */
} fp_phase;

typedef struct {
    fp_phase *ph;        /* shared phase counters, in order, zeroed before the run */
    long cur;            /* this thread's current phase */
    long units, chunk;   /* of the current phase */
    long pending;        /* units of this thread's last chunk, not yet added to done */
} fp_sync;

static inline void fp_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Add this thread's last chunk to the phase's done count (release: its outputs are written). */
static inline void fp_report(fp_sync *s, fp_phase *ph) {
    if (s->pending) {
        __atomic_add_fetch(&ph->done, s->pending, __ATOMIC_RELEASE);
        s->pending = 0;
    }
}

/* Claim the next chunk [lo, hi) of n items of the current phase, in whole units of `unit`
 * items (the previous chunk is reported done first); 0 when none is left. */
static inline int fp_claim(fp_sync *s, long n, long unit, int nt, long *lo, long *hi) {
    fp_phase *ph = s->ph + s->cur;
    fp_report(s, ph);
    s->units = (n + unit - 1) / unit;
    s->chunk = fp_max(1, s->units / (8 * nt));
    long u = __atomic_fetch_add(&ph->next, s->chunk, __ATOMIC_RELAXED);
    if (u >= s->units) return 0;
    s->pending = fp_min(s->chunk, s->units - u);
    *lo = u * unit;
    *hi = fp_min(n, (u + s->chunk) * unit);
    return 1;
}

/* End of the current phase: wait until all its units are done (by whichever threads). */
static void fp_phase_end(fp_sync *s) {
    fp_phase *ph = s->ph + s->cur;
    fp_report(s, ph);
    long spins = 0;
    while (__atomic_load_n(&ph->done, __ATOMIC_ACQUIRE) < s->units) {
        fp_pause();
        if (++spins > 20000) sched_yield();  /* the thread with the last chunk was descheduled */
    }
    s->cur++;
}

/* ---------------------------------------------------------------- GEMM
 * C[M, N] = A[M, K] B[K, N] + bias[N] (+ ReLU), C row-major with leading dimension ldc.
 * B is packed: panel p holds columns p*NR .. p*NR+NR-1 as Bp[p][k][j], zero past N; the
 * bias is padded likewise. Row i of A is read in place, as nseg segments of seg_len
 * contiguous floats, segment g starting g*seg_stride after the row's start (arow[i]):
 *   1x1 convolution: one segment, the position's C channels;
 *   k x k convolution on the zero-padded channels-last input (no im2col): segment ky is
 *   the k*C floats of taps (ky, 0..k-1) in input row oy*stride + ky.
 */
static inline void fp_tile(long nseg, long seg_len, long seg_stride, const float *const *arow, const float *bp,
                           const float *bias, float *C, long ldc, int mr, int nr, int relu) {
    fp_v acc[FP_MR][2];
    fp_v b0 = fp_load(bias), b1 = fp_load(bias + FP_VL);
    for (int i = 0; i < FP_MR; i++) { acc[i][0] = b0; acc[i][1] = b1; }
    for (long g = 0; g < nseg; g++) {
        const float *bk = bp + g * seg_len * FP_NR;
        long off = g * seg_stride;
        for (long k = 0; k < seg_len; k++) {
            fp_v v0 = fp_load(bk + k * FP_NR), v1 = fp_load(bk + k * FP_NR + FP_VL);
            for (int i = 0; i < FP_MR; i++) {
                float a = arow[i][off + k];
                acc[i][0] += a * v0;
                acc[i][1] += a * v1;
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        fp_v r0 = relu ? fp_relu(acc[i][0]) : acc[i][0], r1 = relu ? fp_relu(acc[i][1]) : acc[i][1];
        float *c = C + i * ldc;
        if (nr == FP_NR) {
            fp_store(c, r0);
            fp_store(c + FP_VL, r1);
        } else {
            for (int j = 0; j < nr; j++) c[j] = j < FP_VL ? r0[j] : r1[j - FP_VL];
        }
    }
}

/* The tiles of one GEMM this thread claims. Output position p = (p / Wo, p % Wo) reads
 * row A + (p / Wo) * row_stride + (p % Wo) * col_stride. */
static void fp_gemm(long M, long N, long Wo, const float *A, long row_stride, long col_stride,
                    long nseg, long seg_len, long seg_stride, const float *Bp, const float *bias,
                    float *C, long ldc, int relu, fp_sync *sync, int nt) {
    long mp = (M + FP_MR - 1) / FP_MR, np_ = (N + FP_NR - 1) / FP_NR, t0, t1, K = nseg * seg_len;
    const float *arow[FP_MR];
    while (fp_claim(sync, mp * np_, 1, nt, &t0, &t1)) {
        for (long t = t0; t < t1; t++) {
            long jp = t / mp, ip = t % mp;  /* filter panel outer: its packed weights stay in L1 */
            long i0 = ip * FP_MR, j0 = jp * FP_NR;
            int mr = (int)fp_min(FP_MR, M - i0), nr = (int)fp_min(FP_NR, N - j0);
            for (int i = 0; i < FP_MR; i++) {
                long p = i0 + (i < mr ? i : 0);
                arow[i] = A + (p / Wo) * row_stride + (p % Wo) * col_stride;
            }
            fp_tile(nseg, seg_len, seg_stride, arow, Bp + jp * K * FP_NR, bias + j0, C + i0 * ldc + j0, ldc, mr,
                    nr, relu);
        }
    }
}

/* y[m] = b[m] + W[m, :] . x (+ ReLU) for rows [m0, m1); W row-major (M, K). */
static void fp_gemv(long m0, long m1, long K, const float *W, const float *b, const float *x, float *y, int relu) {
    long kv = K - K % FP_VL;
    for (long m = m0; m < m1; m++) {
        const float *w = W + m * K;
        fp_v a0 = {0}, a1 = {0};
        long k = 0;
        for (; k + 2 * FP_VL <= kv; k += 2 * FP_VL) {
            a0 += fp_load(w + k) * fp_load(x + k);
            a1 += fp_load(w + k + FP_VL) * fp_load(x + k + FP_VL);
        }
        for (; k < kv; k += FP_VL) a0 += fp_load(w + k) * fp_load(x + k);
        float s = fp_hsum(a0 + a1);
        for (; k < K; k++) s += w[k] * x[k];
        s += b[m];
        y[m] = fp_relu1(relu, s);
    }
}

/* ---------------------------------------------------------------- Winograd tiles
 * F(m x m, k x k) (engine/winograd.py): a tile's input transform V = BT d B and output transform
 * Y = AT M A, shared by the inference plan (fp_wino_image) and the training step (_train.h). The
 * transforms (AT m x n, G n x k, BT n x n, n = m + k - 1, at most 8) follow each other at op->wt. Channels
 * are innermost (channels-last): each coefficient multiplies a contiguous vector of channels. */
typedef struct { long m, k, n; const float *at, *g, *bt; } fp_wino;

static inline fp_wino fp_wino_of(const fl_op *op) {
    fp_wino t;
    t.m = op->tile; t.k = op->k; t.n = t.m + t.k - 1;
    t.at = fl_cptr(op->wt); t.g = t.at + t.m * t.n; t.bt = t.g + t.n * t.k;
    return t;
}

/* V[e][row][c] = (BT d B)[e], e = a n + b, for the tile (ty, tx) of a channels-last image x (H x W x C): d is
 * the n x n x C patch at (ty m - pad, tx m - pad), zero outside the image. V's blocks are R rows of C; scr
 * holds 2 n^2 C floats. */
static void fp_wino_in_tile(const fp_wino *t, const float *x, long H, long W, long C, long pad, long ty, long tx,
                            float *V, long R, long row, float *scr) {
    long n = t->n, m = t->m;
    float *d = scr, *tmp = scr + n * n * C;
    for (long a = 0; a < n; a++) {
        long iy = ty * m + a - pad;
        for (long b = 0; b < n; b++) {
            long ix = tx * m + b - pad;
            float *dst = d + (a * n + b) * C;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) memset(dst, 0, C * sizeof(float));
            else memcpy(dst, x + (iy * W + ix) * C, C * sizeof(float));
        }
    }
    for (long a = 0; a < n; a++)  /* tmp[a][b] = sum_u BT[a][u] d[u][b] */
        for (long b = 0; b < n; b++) {
            float *o = tmp + (a * n + b) * C;
            memset(o, 0, C * sizeof(float));
            for (long u = 0; u < n; u++) {
                float f = t->bt[a * n + u];
                if (f == 0.f) continue;
                const float *s = d + (u * n + b) * C;
                for (long ch = 0; ch < C; ch++) o[ch] += f * s[ch];
            }
        }
    for (long a = 0; a < n; a++)  /* V[a][b] = sum_u tmp[a][u] BT[b][u] */
        for (long b = 0; b < n; b++) {
            float *o = V + ((a * n + b) * R + row) * C;
            memset(o, 0, C * sizeof(float));
            for (long u = 0; u < n; u++) {
                float f = t->bt[b * n + u];
                if (f == 0.f) continue;
                const float *s = tmp + (a * n + u) * C;
                for (long ch = 0; ch < C; ch++) o[ch] += f * s[ch];
            }
        }
}

/* The outputs of tile (ty, tx) in y (Ho x Wo x F, channels-last): AT M[.][row] A + bias (NULL: none), and ReLU;
 * positions past the output's edges are not written. M's blocks are R rows of F; scr holds (m n + 1) F floats. */
static void fp_wino_out_tile(const fp_wino *t, const float *M, long R, long row, long ty, long tx, long F, long Ho,
                             long Wo, const float *bias, int relu, float *y, float *scr) {
    long n = t->n, m = t->m;
    float *tmp = scr, *acc = scr + m * n * F;
    for (long a = 0; a < m; a++)  /* tmp[a][b] = sum_u AT[a][u] M[u][b] */
        for (long b = 0; b < n; b++) {
            float *o = tmp + (a * n + b) * F;
            memset(o, 0, F * sizeof(float));
            for (long u = 0; u < n; u++) {
                float f = t->at[a * n + u];
                if (f == 0.f) continue;
                const float *s = M + ((u * n + b) * R + row) * F;
                for (long j = 0; j < F; j++) o[j] += f * s[j];
            }
        }
    for (long a = 0; a < m; a++) {
        long oy = ty * m + a;
        if (oy >= Ho) break;
        for (long b = 0; b < m; b++) {
            long ox = tx * m + b;
            if (ox >= Wo) break;
            for (long j = 0; j < F; j++) acc[j] = bias ? bias[j] : 0.f;
            for (long u = 0; u < n; u++) {
                float f = t->at[b * n + u];
                if (f == 0.f) continue;
                const float *s = tmp + (a * n + u) * F;
                for (long j = 0; j < F; j++) acc[j] += f * s[j];
            }
            float *o = y + (oy * Wo + ox) * F;
            if (relu) for (long j = 0; j < F; j++) o[j] = acc[j] > 0.f ? acc[j] : 0.f;
            else memcpy(o, acc, F * sizeof(float));
        }
    }
}

/* ---------------------------------------------------------------- zero padding */

/* Rows [r0, r1) of the (H + 2 pad, W + 2 pad, C) zero-padded copy of an (H, W, C) image. */
static void fp_pad(const float *x, long C, long H, long W, long pad, float *xp, long r0, long r1) {
    long Wp = W + 2 * pad;
    for (long r = r0; r < r1; r++) {
        float *o = xp + r * Wp * C;
        long ir = r - pad;
        if (ir < 0 || ir >= H) { memset(o, 0, Wp * C * sizeof(float)); continue; }
        memset(o, 0, pad * C * sizeof(float));
        memcpy(o + pad * C, x + ir * W * C, W * C * sizeof(float));
        memset(o + (pad + W) * C, 0, pad * C * sizeof(float));
    }
}

/* ---------------------------------------------------------------- per-channel ops (channels-last) */

#define FP_KMAX 8  /* longest 1D filter of the vector path; longer ones take the scalar path */

/* The two passes over one gathered vector of channels (see fp_vh); inlined with constant
 * taps for the common filter sizes. */
static inline __attribute__((always_inline)) void fp_vh_plane(
        const float *pp, float *tp, float *y, const float *wv, fp_v bv, const float *wh, fp_v bh,
        long C, long W, long Hm, long Wo, long L, long x0, long x1, long hb, long kv, long kh, int relu) {
    fp_v wvr[FP_KMAX], whr[FP_KMAX];  /* the taps stay in registers */
    for (long t = 0; t < kv; t++) wvr[t] = fp_load(wv + t * C);
    for (long t = 0; t < kh; t++) whr[t] = fp_load(wh + t * C);
    for (long i = 0; i < Hm; i++) {
        const float *s = pp + (i * W + x0) * FP_VL;
        float *o = tp + (i * L + x0 + hb) * FP_VL;
        for (long xx = 0; xx < x1 - x0; xx++) {
            fp_v acc = bv;
            for (long t = 0; t < kv; t++) acc += wvr[t] * fp_load(s + (t * W + xx) * FP_VL);
            fp_store(o + xx * FP_VL, acc);
        }
    }
    for (long i = 0; i < Hm; i++) {
        const float *s = tp + i * L * FP_VL;
        float *o = y + i * Wo * C;
        for (long j = 0; j < Wo; j++) {
            fp_v acc = bh;
            for (long t = 0; t < kh; t++) acc += whr[t] * fp_load(s + (j + t) * FP_VL);
            fp_store(o + j * C, relu ? fp_relu(acc) : acc);
        }
    }
}

/* Vertical then horizontal per-channel correlation of channels [c0, c1), with biases:
 * v[i, x] = bv + sum_t wv[t] in[i + t - vb, x]   (rows outside the input are zero)
 * y[i, j] = bh + sum_t wh[t] v[i, j + t - hb]    (columns likewise)
 * wv is (kv, C), wh (kh, C). One vector of channels at a time, on contiguous planes in
 * this thread's scratch: the input plane is gathered with its zero rows (`pp`,
 * (Hm + kv - 1) x W vectors), v goes to `tp` with its zero columns (Hm x (Wo + kh - 1)),
 * and the output is scattered back. Working on the channels-last activation directly
 * would stride by C floats, which for C = 128 or 256 puts every access of a pass in a
 * few cache sets; on the gathered planes every tap is a fixed offset. */
static void fp_vh(const fl_op *op, const float *x, float *y, float *scratch, long c0, long c1) {
    long C = op->c_in, H = op->h_in, W = op->w_in, Hm = op->h_mid, Wo = op->w_out;
    long kv = op->kv, vb = op->vbefore, kh = op->kh, hb = op->hbefore;
    const float *wv = fl_cptr(op->wv), *bv = fl_cptr(op->bv), *wh = fl_cptr(op->wh), *bh = fl_cptr(op->bh);
    int relu = (int)op->relu;
    long Hp = Hm + kv - 1, L = Wo + kh - 1;
    long x0 = fp_max(0, -hb), x1 = fp_min(W, L - hb);  /* v columns that land in tp */
    float *pp = scratch, *tp = scratch + Hp * W * FP_VL;
    long cv = kv <= FP_KMAX && kh <= FP_KMAX ? c0 + (c1 - c0) / FP_VL * FP_VL : c0;
    if (cv > c0) {  /* the zero rows of pp and zero columns of tp: nothing below writes them */
        for (long r = 0; r < Hp; r++)
            if (r < vb || r >= vb + H) memset(pp + r * W * FP_VL, 0, W * FP_VL * sizeof(float));
        for (long i = 0; i < Hm; i++) {
            float *row = tp + i * L * FP_VL;
            memset(row, 0, fp_max(0, fp_min(L, hb + x0)) * FP_VL * sizeof(float));
            long p1 = fp_max(0, hb + x1);
            if (p1 < L) memset(row + p1 * FP_VL, 0, (L - p1) * FP_VL * sizeof(float));
        }
    }
    for (long c = c0; c < cv; c += FP_VL) {
        for (long ir = fp_max(0, -vb); ir < fp_min(H, Hp - vb); ir++) {  /* pp row ir + vb = input row ir */
            float *o = pp + (ir + vb) * W * FP_VL;
            const float *s = x + ir * W * C + c;
            for (long xx = 0; xx < W; xx++) fp_store(o + xx * FP_VL, fp_load(s + xx * C));
        }
        /* constant taps for the common filter sizes, so the tap loops unroll */
#define FP_VH_PLANE(KV, KH) fp_vh_plane(pp, tp, y + c, wv + c, fp_load(bv + c), wh + c, fp_load(bh + c), \
                                         C, W, Hm, Wo, L, x0, x1, hb, KV, KH, relu)
        if (kv == 5 && kh == 5) FP_VH_PLANE(5, 5);
        else if (kv == 3 && kh == 3) FP_VH_PLANE(3, 3);
        else FP_VH_PLANE(kv, kh);
#undef FP_VH_PLANE
    }
    for (long c = cv; c < c1; c++) {  /* channels left over after whole vectors: scalar, same sums */
        for (long i = 0; i < Hm; i++) {
            float *v = scratch;  /* row i of v, zero-padded: L floats */
            for (long p = 0; p < L; p++) v[p] = 0.f;
            for (long xx = x0; xx < x1; xx++) {
                float acc = bv[c];
                for (long t = 0; t < kv; t++) {
                    long r = i + t - vb;
                    acc += wv[t * C + c] * ((r >= 0 && r < H) ? x[(r * W + xx) * C + c] : 0.f);
                }
                v[xx + hb] = acc;
            }
            for (long j = 0; j < Wo; j++) {
                float acc = bh[c];
                for (long t = 0; t < kh; t++) acc += wh[t * C + c] * v[j + t];
                y[(i * Wo + j) * C + c] = fp_relu1(relu, acc);
            }
        }
    }
}

/* Max-pooling of output rows [r0, r1): windows k x k, stride s, clipped at the border (ceil mode). */
static void fp_pool(const fl_op *op, const float *x, float *y, long r0, long r1) {
    long C = op->c_in, H = op->h_in, W = op->w_in, Wo = op->w_out, k = op->k, s = op->stride;
    int relu = (int)op->relu;
    long cv = C / FP_VL * FP_VL;
    for (long oy = r0; oy < r1; oy++) {
        long y0 = oy * s, y1 = fp_min(y0 + k, H);
        for (long ox = 0; ox < Wo; ox++) {
            long x0 = ox * s, x1 = fp_min(x0 + k, W);
            float *o = y + (oy * Wo + ox) * C;
            const float *first = x + (y0 * W + x0) * C;
            for (long c = 0; c < cv; c += FP_VL) {
                fp_v m = fp_load(first + c);
                for (long iy = y0; iy < y1; iy++)
                    for (long ix = x0; ix < x1; ix++) m = fp_vmax(fp_load(x + (iy * W + ix) * C + c), m);
                fp_store(o + c, relu ? fp_relu(m) : m);
            }
            for (long c = cv; c < C; c++) {
                float m = first[c];
                for (long iy = y0; iy < y1; iy++)
                    for (long ix = x0; ix < x1; ix++) {
                        float v = x[(iy * W + ix) * C + c];
                        m = v > m ? v : m;
                    }
                o[c] = fp_relu1(relu, m);
            }
        }
    }
}

/* ---------------------------------------------------------------- one image */

/* A CONV by Winograd for one image (plan.py packs U, the transformed filters, at op->w: n^2 blocks of
 * panels(F) x C x FP_NR; op->aux: panels(F) zeros, the GEMMs' bias): the input transforms into V (n^2 x T x C at
 * cols), then n^2 GEMMs M_e (T x F) = V_e U_e into cols after V, then the output transforms, each phase's work
 * claimed by the threads (tiles, then (point, tile, panel) units). The caller ends the last phase. */
static void fp_wino_image(const fl_op *op, const float *in, float *dst, float *cols, float *scratch, int nt,
                          fp_sync *sync) {
    fp_wino t = fp_wino_of(op);
    long C = op->c_in, F = op->c_out, Ho = op->h_out, Wo = op->w_out, nn = t.n * t.n;
    long th = (Ho + t.m - 1) / t.m, tw = (Wo + t.m - 1) / t.m, T = th * tw, lo, hi;
    long mp = (T + FP_MR - 1) / FP_MR, np_ = (F + FP_NR - 1) / FP_NR, per_e = np_ * C * FP_NR;
    float *V = cols, *M = cols + nn * T * C;
    const float *U = fl_cptr(op->w), *zeros = fl_cptr(op->aux), *arow[FP_MR];
    while (fp_claim(sync, T, 1, nt, &lo, &hi))
        for (long q = lo; q < hi; q++) fp_wino_in_tile(&t, in, op->h_in, op->w_in, C, op->pad, q / tw, q % tw, V, T, q,
                                                       scratch);
    fp_phase_end(sync);
    while (fp_claim(sync, nn * mp * np_, 1, nt, &lo, &hi))
        for (long u = lo; u < hi; u++) {
            long e = u / (mp * np_), r = u % (mp * np_), jp = r / mp, ip = r % mp, i0 = ip * FP_MR, j0 = jp * FP_NR;
            int mr = (int)fp_min(FP_MR, T - i0), nr = (int)fp_min(FP_NR, F - j0);
            for (int i = 0; i < FP_MR; i++) arow[i] = V + (e * T + i0 + (i < mr ? i : 0)) * C;
            fp_tile(1, C, 0, arow, U + e * per_e + jp * C * FP_NR, zeros + j0, M + (e * T + i0) * F + j0, F, mr, nr,
                    0);
        }
    fp_phase_end(sync);
    while (fp_claim(sync, T, 1, nt, &lo, &hi))
        for (long q = lo; q < hi; q++)
            fp_wino_out_tile(&t, M, T, q, q / tw, q % tw, F, Ho, Wo, fl_cptr(op->b), (int)op->relu, dst, scratch);
}

static inline double fp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* times (optional, thread 0 only): seconds spent in each op are added to times[o] */
static void fp_image(const fl_op *ops, int nops, const float *x, float *out, float *buf0, float *buf1,
                     float *cols, float *scratch, int nt, fp_sync *sync, double *times) {
    const float *in = x;
    double t_prev = times ? fp_now() : 0.0;
    for (int o = 0; o < nops; o++) {
        const fl_op *op = ops + o;
        float *dst = o == nops - 1 ? out : (o % 2 == 0 ? buf0 : buf1);
        long C = op->c_in, H = op->h_in, W = op->w_in, F = op->c_out, Ho = op->h_out, Wo = op->w_out;
        const float *w = fl_cptr(op->w), *b = fl_cptr(op->b);
        int relu = (int)op->relu;
        long lo, hi;
        switch (op->kind) {
        case FL_GEMM:  /* 1x1 convolution: position p reads its C channels */
            fp_gemm(H * W, F, W, in, W * C, C, 1, C, 0, w, b, dst, F, relu, sync, nt);
            break;
        case FL_CONV: {  /* k x k convolution as a GEMM reading the zero-padded input in place, or by Winograd */
            if (op->tile) {
                fp_wino_image(op, in, dst, cols, scratch, nt, sync);
                break;
            }
            long k = op->k, s = op->stride, pad = op->pad, Wp = W + 2 * pad;
            const float *xp = in;
            if (pad > 0) {
                while (fp_claim(sync, H + 2 * pad, 1, nt, &lo, &hi))
                    fp_pad(in, C, H, W, pad, cols, lo, hi);
                fp_phase_end(sync);
                xp = cols;
            }
            fp_gemm(Ho * Wo, F, Wo, xp, s * Wp * C, s * C, k, k * C, Wp * C, w, b, dst, F, relu, sync, nt);
            break;
        }
        case FL_VH:
            while (fp_claim(sync, C, FP_VL, nt, &lo, &hi))
                fp_vh(op, in, dst, scratch, lo, hi);
            break;
        case FL_POOL:
            while (fp_claim(sync, Ho, 1, nt, &lo, &hi))
                fp_pool(op, in, dst, lo, hi);
            break;
        case FL_LINEAR:
            while (fp_claim(sync, F, 1, nt, &lo, &hi))
                fp_gemv(lo, hi, C * H * W, w, b, in, dst, relu);
            break;
        case FL_RELU:
            while (fp_claim(sync, C * H * W, FP_VL, nt, &lo, &hi))
                for (long i = lo; i < hi; i++) dst[i] = fp_relu1(1, in[i]);
            break;
        case FL_TO_NHWC:  /* (C, H, W) -> (H, W, C), by positions */
            while (fp_claim(sync, H * W, 1, nt, &lo, &hi))
                for (long p = lo; p < hi; p++)
                    for (long c = 0; c < C; c++) dst[p * C + c] = in[c * H * W + p];
            break;
        case FL_SOFTMAX:  /* over C values, by one thread: exp(v - max) / sum */
            while (fp_claim(sync, 1, 1, nt, &lo, &hi)) {
                long n = C * H * W;
                float m = in[0], sum = 0.f;
                for (long i = 1; i < n; i++) m = in[i] > m ? in[i] : m;
                for (long i = 0; i < n; i++) sum += (dst[i] = expf(in[i] - m));
                for (long i = 0; i < n; i++) dst[i] /= sum;
            }
            break;
        case FL_TO_NCHW:  /* (H, W, C) -> (C, H, W), by channels */
            while (fp_claim(sync, C, 1, nt, &lo, &hi))
                for (long c = lo; c < hi; c++)
                    for (long p = 0; p < H * W; p++) dst[c * H * W + p] = in[p * C + c];
            break;
        }
        fp_phase_end(sync);
        if (times) {
            double t = fp_now();
            times[o] += t - t_prev;
            t_prev = t;
        }
        in = dst;
    }
}

/* Run n images (each in_size floats at x) through the ops; outputs (out_size floats
 * each) go to out. arena (64-byte aligned): `threads` contexts of ctx_floats (two
 * activation buffers of act_floats, then the column buffer), then `threads` private
 * scratch areas of scratch_floats; all sizes multiples of 16 floats, so every buffer
 * starts on a cache line. times: NULL, or per-op seconds (accumulated by thread 0,
 * which waits at the end of every phase until all its work is done: wall times).
 * Returns the number of threads that ran (OpenMP may give fewer than asked), or without
 * running: -1 when the input holds NaN or infinity, -2 when memory for the counters ran out. */
static int fp_run(const fl_op *ops, int nops, const float *x, long n, long in_size, float *out, long out_size,
                  float *arena, long act_floats, long ctx_floats, long scratch_floats, int threads, double *times) {
    int per_image = n >= 2L * threads, team = 1;
    float finite = 0.f;  /* stays 0 unless some input is NaN or infinite (then x * 0 is NaN) */
    for (long i = 0; i < n * in_size; i++) finite += x[i] * 0.f;
    if (finite != 0.f) return -1;
    /* phase counters: at most three phases per op (a Winograd CONV's); shared by the threads of a cooperative
     * run (all its images in a row), one set per thread when threads take whole images */
    long phases = 3L * nops, sets = per_image ? threads : 1, per_set = per_image ? phases : phases * n;
    fp_phase *ph = (fp_phase *)calloc((size_t)(sets * per_set), sizeof(fp_phase));
    if (!ph) return -2;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int tid = 0, nt = 1;
#endif
        float *scratch = arena + (long)threads * ctx_floats + (long)tid * scratch_floats;
        fp_sync sync = {ph + (per_image ? tid * per_set : 0), 0, 0, 0, 0};
        if (tid == 0) team = nt;
        if (per_image) {
            float *ctx = arena + (long)tid * ctx_floats;
#ifdef _OPENMP
            #pragma omp for schedule(dynamic, 1)
#endif
            for (long i = 0; i < n; i++) {
                memset(sync.ph, 0, per_set * sizeof(fp_phase));  /* this thread's counters, fresh per image */
                sync.cur = 0;
                fp_image(ops, nops, x + i * in_size, out + i * out_size, ctx, ctx + act_floats,
                         ctx + 2 * act_floats, scratch, 1, &sync, tid == 0 ? times : NULL);
            }
        } else {
            for (long i = 0; i < n; i++)
                fp_image(ops, nops, x + i * in_size, out + i * out_size, arena, arena + act_floats,
                         arena + 2 * act_floats, scratch, nt, &sync, tid == 0 ? times : NULL);
        }
    }
    free(ph);
    return team;
}
#endif
