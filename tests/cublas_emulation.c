/* A stand-in for libcublas on the CPU, for tests/emulated_cupy.py: the entry points that
 * engine/runtime/cuda.py (GraphBlas) calls through ctypes on the libcublas a process has loaded.
 * The library is named libcublas.so.emulated, so that the engine finds it among the process's
 * loaded libraries as it finds the real one. Each GEMM is handed, with the stream the handle was
 * set to, to a function that emulated_cupy.py registers (it computes the product, or records it
 * while that stream captures a graph) and returns the call's status (0: CUBLAS_STATUS_SUCCESS). */
#include <stddef.h>

typedef int (*flatnet_gemm_fn)(int is_double, long long stream, int transa, int transb, int m, int n, int k,
                                const void *alpha, const void *A, int lda, long long strideA, const void *B, int ldb,
                                long long strideB, const void *beta, void *C, int ldc, long long strideC, int batch);

static flatnet_gemm_fn gemm_fn;
static long long handle_stream;
static int math_mode;  /* what cublasSetMathMode set (the products here are float32 whatever it is) */

void flatnet_set_gemm(flatnet_gemm_fn f) { gemm_fn = f; }

int cublasCreate_v2(void **handle) { *handle = (void *)&handle_stream; return 0; }
int cublasSetStream_v2(void *handle, void *stream) { (void)handle; handle_stream = (long long)(size_t)stream; return 0; }
int cublasSetMathMode(void *handle, int mode) { (void)handle; math_mode = mode; return 0; }
int flatnet_math_mode(void) { return math_mode; }
int cublasSetWorkspace_v2(void *handle, void *workspace, size_t bytes) { (void)handle; (void)workspace; (void)bytes; return 0; }

int cublasSgemmStridedBatched(void *h, int ta, int tb, int m, int n, int k, const float *alpha, const float *A, int lda,
                              long long sA, const float *B, int ldb, long long sB, const float *beta, float *C, int ldc,
                              long long sC, int batch)
{
    (void)h;
    if (!gemm_fn) return 1;  /* CUBLAS_STATUS_NOT_INITIALIZED */
    return gemm_fn(0, handle_stream, ta, tb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
}

int cublasDgemmStridedBatched(void *h, int ta, int tb, int m, int n, int k, const double *alpha, const double *A,
                              int lda, long long sA, const double *B, int ldb, long long sB, const double *beta,
                              double *C, int ldc, long long sC, int batch)
{
    (void)h;
    if (!gemm_fn) return 1;
    return gemm_fn(1, handle_stream, ta, tb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
}
