/* A check of the C kernels on their own, without Python: tests/test_c_kernels.py compiles it for every
 * CPU target of this machine and, where a cross compiler and qemu-user are installed, for aarch64
 * (the generic vector path, NEON), and runs it.
 *
 * It includes the engine's headers (engine/ on the include path) and checks, on pseudo-random
 * inputs: the register-blocked GEMM (fp_gemm, with a bias and with ReLU, sizes that are not
 * multiples of the tile) and the dot-product GEMV (fp_gemv) against double-precision sums, each
 * element within gamma_n * sum|terms| (n terms, any order, with or without FMA); the vector
 * maximum; the dropout hash against splitmix64's published first output. Prints "VL=<floats per
 * vector> ok" and exits 0, or names the first failure and exits 1.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "_infer.h"
#include "_train.h"
#include "dropout_hash.h"

static unsigned long long state = 42;
static float next_float(void) {  /* uniform in [-1, 1) */
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((state >> 40) / (double)(1ULL << 24) * 2.0 - 1.0);
}

static int failures = 0;
static void fail(const char *what, long i, double got, double want, double bound) {
    if (failures++ < 5) printf("FAIL %s[%ld]: %.9g, expected %.9g within %.3g\n", what, i, got, want, bound);
}

static double gamma_n(long n) {
    double u = 0x1p-24;
    return n * u / (1 - n * u);
}

static void check_gemm(long M, long N, long K, int relu) {
    long panels = (N + FP_NR - 1) / FP_NR;
    float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
    float *Bp = calloc(panels * K * FP_NR, sizeof(float)), *bias = calloc(panels * FP_NR, sizeof(float));
    float *C = malloc(sizeof(float) * M * N);
    for (long i = 0; i < M * K; i++) A[i] = next_float();
    for (long i = 0; i < K * N; i++) B[i] = next_float();
    for (long j = 0; j < N; j++) bias[j] = next_float();
    for (long p = 0; p < panels; p++)
        for (long k = 0; k < K; k++)
            for (long j = 0; j < FP_NR && p * FP_NR + j < N; j++) Bp[(p * K + k) * FP_NR + j] = B[k * N + p * FP_NR + j];
    for (long i = 0; i < M * N; i++) C[i] = NAN;
    fp_phase phase[1];
    memset(phase, 0, sizeof phase);
    fp_sync sync = {phase, 0, 0, 0, 0};
    fp_gemm(M, N, 1, A, K, 0, 1, K, 0, Bp, bias, C, N, relu, &sync, 1);
    for (long i = 0; i < M; i++)
        for (long j = 0; j < N; j++) {
            double want = bias[j], sum = fabs(bias[j]);
            for (long k = 0; k < K; k++) {
                want += (double)A[i * K + k] * B[k * N + j];
                sum += fabs((double)A[i * K + k] * B[k * N + j]);
            }
            if (relu && want < 0) want = 0;
            double bound = gamma_n(K + 1) * sum;
            if (!(fabs(C[i * N + j] - want) <= bound)) fail(relu ? "gemm+relu" : "gemm", i * N + j, C[i * N + j], want, bound);
        }
    free(A); free(B); free(Bp); free(bias); free(C);
}

static void check_gemv(long M, long K) {
    float *W = malloc(sizeof(float) * M * K), *x = malloc(sizeof(float) * K), *b = malloc(sizeof(float) * M);
    float *y = malloc(sizeof(float) * M);
    for (long i = 0; i < M * K; i++) W[i] = next_float();
    for (long i = 0; i < K; i++) x[i] = next_float();
    for (long i = 0; i < M; i++) b[i] = next_float();
    fp_gemv(0, M, K, W, b, x, y, 0);
    for (long m = 0; m < M; m++) {
        double want = b[m], sum = fabs(b[m]);
        for (long k = 0; k < K; k++) {
            want += (double)W[m * K + k] * x[k];
            sum += fabs((double)W[m * K + k] * x[k]);
        }
        double bound = gamma_n(K + 1) * sum;
        if (!(fabs(y[m] - want) <= bound)) fail("gemv", m, y[m], want, bound);
    }
    free(W); free(x); free(b); free(y);
}

static void check_vmax(void) {
    float a[FP_VL], b[FP_VL], out[FP_VL];
    for (int t = 0; t < 100; t++) {
        for (int i = 0; i < FP_VL; i++) { a[i] = next_float(); b[i] = next_float(); }
        fp_store(out, fp_vmax(fp_load(a), fp_load(b)));
        for (int i = 0; i < FP_VL; i++)
            if (out[i] != (a[i] > b[i] ? a[i] : b[i])) fail("vmax", i, out[i], a[i] > b[i] ? a[i] : b[i], 0);
        fp_store(out, fp_relu(fp_load(a)));
        for (int i = 0; i < FP_VL; i++)
            if (out[i] != (a[i] > 0 ? a[i] : 0.f)) fail("relu", i, out[i], a[i] > 0 ? a[i] : 0.f, 0);
    }
}

int main(void) {
    if (fl_splitmix64(0, 0) != 0xE220A8397B1DCDAFULL) fail("splitmix64(0, 0)", 0, 0, 0, 0);
    check_gemm(37, 45, 29, 0);
    check_gemm(37, 45, 29, 1);
    check_gemm(1, 3 * FP_NR, 300, 0);
    check_gemm(FP_MR * 3, FP_NR, 1, 1);
    check_gemv(19, 3 * FP_VL + 5);
    check_gemv(3, 1);
    check_vmax();
    if (failures) {
        printf("%d failures\n", failures);
        return 1;
    }
    printf("VL=%d ok\n", FP_VL);
    return 0;
}
