/* Fused float32 inference of a compiled network (engine/plan.py builds the op table).
 *
 * One call runs a whole batch through every op inside a single OpenMP parallel region:
 *   - batch >= 2 x threads: each thread takes whole images (private buffers, no barriers);
 *   - smaller batches: all threads work on each op of one image together, split over
 *     output tiles or channels, with a spinning barrier between ops. Waking a sleeping
 *     thread costs tens of microseconds on these machines, more than most ops of a
 *     single image, so the threads are woken once per call, not once per op.
 * The GEMMs (convolutions through im2col, lateral 1x1 convolutions) use a register-
 * blocked micro-kernel over weights packed at compile time in panels of FP_MR rows
 * (k-major), with the bias and an optional ReLU applied before the store. Vectors are
 * GCC/Clang vector extensions, so the same source compiles to AVX-512, AVX2, SSE or
 * NEON, whatever -march gives. Every output element is computed by one thread with a
 * fixed summation order, so results do not depend on the thread count.
 */
#include <stdint.h>
#include <string.h>
#include <sched.h>
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

typedef float fp_v __attribute__((vector_size(FP_VL * sizeof(float))));
typedef int32_t fp_vi __attribute__((vector_size(FP_VL * sizeof(float))));

/* op kinds and the columns of one row of the op table (int64) */
enum { FP_GEMM = 0, FP_CONV = 1, FP_VH = 2, FP_POOL = 3, FP_LINEAR = 4, FP_RELU = 5 };
enum {
    F_KIND, F_RELU, F_CIN, F_HIN, F_WIN, F_COUT, F_HOUT, F_WOUT,
    F_K, F_STRIDE, F_PAD, F_KV, F_VBEFORE, F_KH, F_HBEFORE, F_HMID,
    F_W, F_B, F_WV, F_BV, F_WH, F_BH
};
#define FP_NFIELDS 24  /* columns per op (a few spare) */

static int fp_mr(void) { return FP_MR; }
static int fp_vl(void) { return FP_VL; }
static int fp_nfields(void) { return FP_NFIELDS; }

static inline fp_v fp_load(const float *p) { fp_v v; memcpy(&v, p, sizeof v); return v; }
static inline void fp_store(float *p, fp_v v) { memcpy(p, &v, sizeof v); }
static inline fp_v fp_splat(float s) { fp_v z = {0}; return z + s; }
static inline fp_v fp_relu(fp_v v) { fp_v z = {0}; return (fp_v)((fp_vi)v & (v > z)); }
static inline float fp_hsum(fp_v v) {
    float s = 0.f;
    for (int i = 0; i < FP_VL; i++) s += v[i];
    return s;
}
static inline long fp_min(long a, long b) { return a < b ? a : b; }
static inline long fp_max(long a, long b) { return a > b ? a : b; }

/* ---------------------------------------------------------------- barrier */

typedef struct { int count; int gen; } fp_barrier;

static inline void fp_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void fp_barrier_wait(fp_barrier *b, int nt) {
    if (nt <= 1) return;
    int gen = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->gen, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    long spins = 0;
    while (__atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) == gen) {
        fp_pause();
        if (++spins > 20000) sched_yield();  /* the other thread was descheduled: let it run */
    }
}

/* ---------------------------------------------------------------- GEMM
 * C[M, N] = A[M, K] B[K, N] + bias (+ ReLU). A is packed: panel p holds rows
 * p*MR .. p*MR+MR-1 as Ap[p][k][i] (zero rows past M). B and C are row-major with
 * leading dimensions ldb and ldc.
 */
#define FP_TILE(NAME, NV)                                                                       \
static inline void NAME(long K, const float *Ap, const float *B, long ldb, float *C, long ldc,  \
                        const float *bias, int mr, int relu) {                                  \
    fp_v acc[FP_MR][NV];                                                                        \
    for (int i = 0; i < FP_MR; i++)                                                             \
        for (int v = 0; v < NV; v++) acc[i][v] = fp_splat(bias[i]);                             \
    for (long k = 0; k < K; k++) {                                                              \
        fp_v bv[NV];                                                                            \
        for (int v = 0; v < NV; v++) bv[v] = fp_load(B + k * ldb + v * FP_VL);                  \
        const float *a = Ap + k * FP_MR;                                                        \
        for (int i = 0; i < FP_MR; i++)                                                         \
            for (int v = 0; v < NV; v++) acc[i][v] += a[i] * bv[v];                             \
    }                                                                                           \
    for (int i = 0; i < mr; i++)                                                                \
        for (int v = 0; v < NV; v++)                                                            \
            fp_store(C + i * ldc + v * FP_VL, relu ? fp_relu(acc[i][v]) : acc[i][v]);           \
}
FP_TILE(fp_tile2, 2)
FP_TILE(fp_tile1, 1)

/* columns left over after the vector tiles: plain loops */
static void fp_tile_rest(long K, const float *Ap, const float *B, long ldb, float *C, long ldc,
                         const float *bias, int mr, int nr, int relu) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float s = bias[i];
            for (long k = 0; k < K; k++) s += Ap[k * FP_MR + i] * B[k * ldb + j];
            C[i * ldc + j] = relu && s < 0.f ? 0.f : s;
        }
}

/* This thread's share (tid of nt) of the tiles of one GEMM. */
static void fp_gemm(long M, long N, long K, const float *Ap, const float *bias, const float *B, long ldb,
                    float *C, long ldc, int relu, int tid, int nt) {
    long mp = (M + FP_MR - 1) / FP_MR, np_ = (N + FP_NR - 1) / FP_NR, tiles = mp * np_;
    long t0 = tiles * tid / nt, t1 = tiles * (tid + 1) / nt;
    for (long t = t0; t < t1; t++) {
        long jp = t / mp, ip = t % mp;  /* column panel outer: its B panel stays in L1 */
        long i0 = ip * FP_MR, j0 = jp * FP_NR;
        int mr = (int)fp_min(FP_MR, M - i0);
        long nr = fp_min(FP_NR, N - j0);
        const float *a = Ap + ip * K * FP_MR, *bs = bias + i0;
        float *c = C + i0 * ldc + j0;
        const float *b = B + j0;
        if (nr == FP_NR) {
            fp_tile2(K, a, b, ldb, c, ldc, bs, mr, relu);
        } else {
            long j = 0;
            if (nr >= FP_VL) { fp_tile1(K, a, b, ldb, c, ldc, bs, mr, relu); j = FP_VL; }
            if (nr > j) fp_tile_rest(K, a, b + j, ldb, c + j, ldc, bs, mr, (int)(nr - j), relu);
        }
    }
}

/* y[m] = b[m] + W[m, :] . x (+ ReLU) for this thread's rows; W row-major (M, K). */
static void fp_gemv(long M, long K, const float *W, const float *b, const float *x, float *y, int relu,
                    int tid, int nt) {
    long m0 = M * tid / nt, m1 = M * (tid + 1) / nt, kv = K - K % FP_VL;
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
        y[m] = relu && s < 0.f ? 0.f : s;
    }
}

/* ---------------------------------------------------------------- other ops */

/* im2col rows [r0, r1) of the (C*k*k, Ho*Wo) column matrix of one image (C, H, W). */
static void fp_im2col(const float *x, long C, long H, long W, long k, long stride, long pad, long Ho, long Wo,
                      float *cols, long r0, long r1) {
    (void)C;
    long P = Ho * Wo;
    for (long r = r0; r < r1; r++) {
        long c = r / (k * k), ky = (r / k) % k, kx = r % k;
        const float *xc = x + c * H * W;
        float *row = cols + r * P;
        for (long oy = 0; oy < Ho; oy++) {
            long iy = oy * stride + ky - pad;
            float *o = row + oy * Wo;
            if (iy < 0 || iy >= H) { memset(o, 0, Wo * sizeof(float)); continue; }
            const float *xr = xc + iy * W;
            if (stride == 1) {
                long lo = fp_max(0, pad - kx), hi = fp_min(Wo, W + pad - kx);  /* ox with 0 <= ix < W */
                if (hi < lo) hi = lo;
                for (long ox = 0; ox < lo; ox++) o[ox] = 0.f;
                if (hi > lo) memcpy(o + lo, xr + lo + kx - pad, (hi - lo) * sizeof(float));
                for (long ox = hi; ox < Wo; ox++) o[ox] = 0.f;
            } else {
                for (long ox = 0; ox < Wo; ox++) {
                    long ix = ox * stride + kx - pad;
                    o[ox] = (ix >= 0 && ix < W) ? xr[ix] : 0.f;
                }
            }
        }
    }
}

/* Vertical then horizontal per-channel correlation of channels [c0, c1), with biases:
 * tmp[i, :] = bv + sum_t wv[t] x[i + t - vb, :]   (rows outside the input are zero)
 * y[i, j]   = bh + sum_t wh[t] tmp[i, j + t - hb] (columns likewise)
 * scratch: Hm*W + Wo + kh floats. */
static void fp_vh(const int64_t *op, const float *x, float *y, float *scratch, long c0, long c1) {
    long H = op[F_HIN], W = op[F_WIN], Hm = op[F_HMID], Wo = op[F_WOUT];
    long kv = op[F_KV], vb = op[F_VBEFORE], kh = op[F_KH], hb = op[F_HBEFORE];
    const float *wv = (const float *)(intptr_t)op[F_WV], *bv = (const float *)(intptr_t)op[F_BV];
    const float *wh = (const float *)(intptr_t)op[F_WH], *bh = (const float *)(intptr_t)op[F_BH];
    int relu = (int)op[F_RELU];
    float *tmp = scratch, *line = scratch + Hm * W;
    long L = Wo + kh - 1;
    for (long c = c0; c < c1; c++) {
        const float *xc = x + c * H * W;
        const float *wvc = wv + c * kv, *whc = wh + c * kh;
        float bvc = bv[c], bhc = bh[c];
        long n = Hm * W;
        for (long i = 0; i < n; i++) tmp[i] = bvc;
        for (long t = 0; t < kv; t++) {  /* output rows i with 0 <= i + t - vb < H: one contiguous span */
            long i0 = fp_max(0, vb - t), i1 = fp_min(Hm, H + vb - t);
            if (i1 <= i0) continue;
            float w = wvc[t];
            const float *src = xc + (i0 + t - vb) * W;
            float *dst = tmp + i0 * W;
            long len = (i1 - i0) * W;
            for (long i = 0; i < len; i++) dst[i] += w * src[i];
        }
        float *yc = y + c * Hm * Wo;
        for (long r = 0; r < Hm; r++) {
            const float *tr = tmp + r * W;
            for (long j = 0; j < L; j++) {  /* the row with its zero padding: line[j] = tmp[r, j - hb] */
                long s = j - hb;
                line[j] = (s >= 0 && s < W) ? tr[s] : 0.f;
            }
            float *o = yc + r * Wo;
            for (long j = 0; j < Wo; j++) o[j] = bhc;
            for (long t = 0; t < kh; t++) {
                float w = whc[t];
                const float *l = line + t;
                for (long j = 0; j < Wo; j++) o[j] += w * l[j];
            }
            if (relu)
                for (long j = 0; j < Wo; j++) o[j] = o[j] < 0.f ? 0.f : o[j];
        }
    }
}

/* Max-pooling of channels [c0, c1): windows k x k, stride s, clipped at the border
 * (ceil mode); a row pass then a column pass. scratch: H * Wo floats. */
static void fp_pool(const int64_t *op, const float *x, float *y, float *scratch, long c0, long c1) {
    long H = op[F_HIN], W = op[F_WIN], Ho = op[F_HOUT], Wo = op[F_WOUT], k = op[F_K], s = op[F_STRIDE];
    int relu = (int)op[F_RELU];
    for (long c = c0; c < c1; c++) {
        const float *xc = x + c * H * W;
        float *yc = y + c * Ho * Wo;
        for (long r = 0; r < H; r++) {
            const float *xr = xc + r * W;
            float *h = scratch + r * Wo;
            for (long ox = 0; ox < Wo; ox++) {
                long x0 = ox * s, x1 = fp_min(x0 + k, W);
                float m = xr[x0];
                for (long i = x0 + 1; i < x1; i++) m = xr[i] > m ? xr[i] : m;
                h[ox] = m;
            }
        }
        for (long oy = 0; oy < Ho; oy++) {
            long y0 = oy * s, y1 = fp_min(y0 + k, H);
            float *o = yc + oy * Wo;
            memcpy(o, scratch + y0 * Wo, Wo * sizeof(float));
            for (long r = y0 + 1; r < y1; r++) {
                const float *h = scratch + r * Wo;
                for (long ox = 0; ox < Wo; ox++) o[ox] = h[ox] > o[ox] ? h[ox] : o[ox];
            }
            if (relu)
                for (long ox = 0; ox < Wo; ox++) o[ox] = o[ox] < 0.f ? 0.f : o[ox];
        }
    }
}

/* ---------------------------------------------------------------- one image */

static void fp_image(const int64_t *ops, int nops, const float *x, float *out, float *buf0, float *buf1,
                     float *cols, float *scratch, int tid, int nt, fp_barrier *bar) {
    const float *in = x;
    for (int o = 0; o < nops; o++) {
        const int64_t *op = ops + (long)o * FP_NFIELDS;
        float *dst = o == nops - 1 ? out : (o % 2 == 0 ? buf0 : buf1);
        long C = op[F_CIN], H = op[F_HIN], W = op[F_WIN], F = op[F_COUT], Ho = op[F_HOUT], Wo = op[F_WOUT];
        const float *w = (const float *)(intptr_t)op[F_W], *b = (const float *)(intptr_t)op[F_B];
        int relu = (int)op[F_RELU];
        switch (op[F_KIND]) {
        case FP_GEMM:
            fp_gemm(F, H * W, C, w, b, in, H * W, dst, H * W, relu, tid, nt);
            break;
        case FP_CONV: {
            long k = op[F_K], rows = C * k * k;
            fp_im2col(in, C, H, W, k, op[F_STRIDE], op[F_PAD], Ho, Wo, cols, rows * tid / nt, rows * (tid + 1) / nt);
            fp_barrier_wait(bar, nt);
            fp_gemm(F, Ho * Wo, rows, w, b, cols, Ho * Wo, dst, Ho * Wo, relu, tid, nt);
            break;
        }
        case FP_VH:
            fp_vh(op, in, dst, scratch, C * tid / nt, C * (tid + 1) / nt);
            break;
        case FP_POOL:
            fp_pool(op, in, dst, scratch, C * tid / nt, C * (tid + 1) / nt);
            break;
        case FP_LINEAR:
            fp_gemv(F, C * H * W, w, b, in, dst, relu, tid, nt);
            break;
        case FP_RELU: {
            long n = C * H * W, i0 = n * tid / nt, i1 = n * (tid + 1) / nt;
            for (long i = i0; i < i1; i++) dst[i] = in[i] < 0.f ? 0.f : in[i];
            break;
        }
        }
        fp_barrier_wait(bar, nt);
        in = dst;
    }
}

/* Run n images (each in_size floats at x) through the ops; outputs (out_size floats
 * each) go to out. arena: `threads` contexts of ctx_floats (two activation buffers of
 * act_floats, then the column buffer), then `threads` scratch areas of scratch_floats. */
static void fp_run(const int64_t *ops, int nops, const float *x, long n, long in_size, float *out, long out_size,
                   float *arena, long act_floats, long ctx_floats, long scratch_floats, int threads) {
    int per_image = n >= 2L * threads;
    fp_barrier bar = {0, 0};
    float *scratch0 = arena + (long)threads * ctx_floats;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int tid = 0, nt = 1;
#endif
        float *scratch = scratch0 + (long)tid * scratch_floats;
        if (per_image) {
            float *ctx = arena + (long)tid * ctx_floats;
#ifdef _OPENMP
            #pragma omp for schedule(dynamic, 1)
#endif
            for (long i = 0; i < n; i++)
                fp_image(ops, nops, x + i * in_size, out + i * out_size, ctx, ctx + act_floats,
                         ctx + 2 * act_floats, scratch, 0, 1, &bar);
        } else {
            for (long i = 0; i < n; i++)
                fp_image(ops, nops, x + i * in_size, out + i * out_size, arena, arena + act_floats,
                         arena + 2 * act_floats, scratch, tid, nt, &bar);
        }
    }
}
