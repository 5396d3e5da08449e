// CUDA kernels of flatnet's CuPy backend (engine/runtime/cuda.py), mirroring the CPU kernels (engine/kernels/*.pxi).
//
// Compiled at run time by CuPy (RawModule, NVRTC) once per element type, with -DFLATNET_REAL=float
// or -DFLATNET_REAL=double. The tests compile this same file to PTX with nvcc (syntax and types), and as
// C++ with tests/cuda_emulation.h on the CPU, where each kernel is checked against the
// independent references of tests/reference.py.
//
// Every kernel is a grid-stride loop over its output elements: one thread computes one
// output from its inputs (a gather), so no kernel needs atomics, shared memory or
// synchronization, and any launch shape gives the same result. Sums run in the order of
// the CPU kernels, except the weight gradients: partial sums over bands of rows, accumulated
// and stored in double, added up by the caller.
// Integer arguments are 64-bit (long long); pointers are to C-contiguous arrays.

#ifndef FLATNET_REAL
#define FLATNET_REAL float
#endif
typedef FLATNET_REAL real;

#include "dropout_hash.h"  // the dropout mask's hash, shared with the CPU kernels

#ifndef FLATNET_EMULATION
#define KERNEL extern "C" __global__ void
#endif

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)
#define LMIN(a, b) ((a) < (b) ? (a) : (b))
#define LMAX(a, b) ((a) > (b) ? (a) : (b))

// --------------------------------------------------------------------------- 1D convolutions
// Per-channel correlation along H (along_h=1) or W (along_h=0), zero padding `pad` before:
//   y[n,c,o,q] = b[c] + sum_k w[c,k'] * x[n,c,o+k-pad,q]   (along H; along W likewise on q)
// with k' = K-1-k when flip (the input gradient) else k. x is (N,C,H,W); y is
// (N,C,L_out,W) along H or (N,C,H,L_out) along W.
KERNEL conv1d_forward(const real* __restrict__ x, const real* __restrict__ w, const real* __restrict__ b,
                      real* __restrict__ y, long long N, long long C, long long H, long long W, long long K,
                      long long L_out, long long along_h, long long pad, long long flip, long long has_bias)
{
    const long long Ho = along_h ? L_out : H, Wo = along_h ? W : L_out;
    const long long L_in = along_h ? H : W;
    GRID_STRIDE(idx, N * C * Ho * Wo) {
        const long long q = idx % Wo, o = (idx / Wo) % Ho, plane = idx / (Wo * Ho);  // plane = n*C + c
        const long long c = plane % C;
        const real* xp = x + plane * H * W;
        const long long pos = along_h ? o : q;
        real acc = has_bias ? b[c] : (real)0;
        for (long long k = LMAX(0LL, pad - pos); k < LMIN(K, L_in + pad - pos); ++k) {
            const long long i = pos + k - pad;
            const real wk = w[c * K + (flip ? K - 1 - k : k)];
            acc += wk * (along_h ? xp[i * W + q] : xp[o * W + i]);
        }
        y[idx] = acc;
    }
}

// Partial weight and bias gradients of conv1d_forward, per image and per band of `rows` output
// rows (so the threads split each plane's reduction, not only the (n, c, k) triples):
// part is (N, C, S, K+1), in double, with S = ceil(Ho / rows) bands, band s = rows [s*rows, (s+1)*rows):
//   part[n,c,s,k] = sum over the band of dy[n,c,o,q] * x[n,c,o+k-pad,q]  (k < K; along W likewise)
//   part[n,c,s,K] = sum of dy[n,c] over the band
// The caller sums over (n, s) (dw = part.sum((0, 2))[:, :K], db = ...[:, K]): one thread per
// partial, each in a fixed order, so the result does not depend on the launch shape.
KERNEL conv1d_grad_partial(const real* __restrict__ x, const real* __restrict__ dy, double* __restrict__ part,
                           long long N, long long C, long long H, long long W, long long K,
                           long long L_out, long long along_h, long long pad, long long rows, long long S)
{
    const long long Ho = along_h ? L_out : H, Wo = along_h ? W : L_out;
    GRID_STRIDE(idx, N * C * S * (K + 1)) {
        const long long k = idx % (K + 1), s = (idx / (K + 1)) % S, plane = idx / ((K + 1) * S);
        const long long o0 = s * rows, o1 = LMIN(Ho, o0 + rows);
        const real* xp = x + plane * H * W;
        const real* dp = dy + plane * Ho * Wo;
        double acc = 0.0;
        if (k == K) {
            for (long long e = o0 * Wo; e < o1 * Wo; ++e) acc += dp[e];
        } else if (along_h) {
            for (long long o = LMAX(o0, pad - k); o < LMIN(o1, H + pad - k); ++o) {
                const real* xr = xp + (o + k - pad) * W;
                const real* dr = dp + o * W;
                for (long long q = 0; q < W; ++q) acc += (double)dr[q] * xr[q];
            }
        } else {
            const long long q0 = LMAX(0LL, pad - k), q1 = LMIN(Wo, W + pad - k);
            for (long long o = o0; o < o1; ++o) {
                const real* xr = xp + o * W + k - pad;
                const real* dr = dp + o * Wo;
                for (long long q = q0; q < q1; ++q) acc += (double)dr[q] * xr[q];
            }
        }
        part[idx] = acc;
    }
}

// --------------------------------------------------------------------------- im2col / col2im
// cols[i, (c*kh + a)*kw + bb, oy*Wo + ox] = x[n0+i, c, oy*stride + a - pad, ox*stride + bb - pad] (0 outside)
KERNEL im2col(const real* __restrict__ x, real* __restrict__ cols, long long n0, long long n, long long C,
              long long H, long long W, long long kh, long long kw, long long stride, long long pad,
              long long Ho, long long Wo)
{
    GRID_STRIDE(idx, n * C * kh * kw * Ho * Wo) {
        long long t = idx;
        const long long ox = t % Wo; t /= Wo;
        const long long oy = t % Ho; t /= Ho;
        const long long bb = t % kw; t /= kw;
        const long long a = t % kh; t /= kh;
        const long long c = t % C, i = t / C;
        const long long iy = oy * stride + a - pad, ix = ox * stride + bb - pad;
        cols[idx] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((n0 + i) * C + c) * H * W + iy * W + ix] : (real)0;
    }
}

// Adjoint of im2col: dx[n0+i, c, iy, ix] = sum of the columns that read that pixel (images
// n0..n0+n overwritten), gathered per pixel in (a, bb) order as the CPU kernel adds them.
KERNEL col2im(const real* __restrict__ cols, real* __restrict__ dx, long long n0, long long n, long long C,
              long long H, long long W, long long kh, long long kw, long long stride, long long pad,
              long long Ho, long long Wo)
{
    GRID_STRIDE(idx, n * C * H * W) {
        long long t = idx;
        const long long ix = t % W; t /= W;
        const long long iy = t % H; t /= H;
        const long long c = t % C, i = t / C;
        real acc = 0;
        for (long long a = 0; a < kh; ++a) {
            const long long ty = iy + pad - a;  // = oy * stride
            if (ty < 0 || ty % stride != 0 || ty / stride >= Ho) continue;
            for (long long bb = 0; bb < kw; ++bb) {
                const long long tx = ix + pad - bb;
                if (tx < 0 || tx % stride != 0 || tx / stride >= Wo) continue;
                acc += cols[(((i * C + c) * kh + a) * kw + bb) * Ho * Wo + (ty / stride) * Wo + tx / stride];
            }
        }
        dx[((n0 + i) * C + c) * H * W + iy * W + ix] = acc;
    }
}

// --------------------------------------------------------------------------- max-pooling
// Max over the k x k window at (oy*stride, ox*stride), clipped at the border; the first
// maximum in row-major order wins ties and a NaN is taken (it propagates). argmax holds
// the flat index of the maximum inside its (H, W) plane.
KERNEL maxpool_forward(const real* __restrict__ x, real* __restrict__ y, int* __restrict__ argmax, long long planes,
                       long long H, long long W, long long Ho, long long Wo, long long k, long long stride)
{
    GRID_STRIDE(idx, planes * Ho * Wo) {
        const long long ox = idx % Wo, oy = (idx / Wo) % Ho, plane = idx / (Wo * Ho);
        const real* xp = x + plane * H * W;
        const long long y0 = oy * stride, x0 = ox * stride;
        real best = xp[y0 * W + x0];
        long long arg = y0 * W + x0;
        for (long long iy = y0; iy < LMIN(y0 + k, H); ++iy) {
            for (long long ix = x0; ix < LMIN(x0 + k, W); ++ix) {
                const real v = xp[iy * W + ix];
                if (v > best || v != v) {
                    best = v;
                    arg = iy * W + ix;
                }
            }
        }
        y[idx] = best;
        argmax[idx] = (int)arg;
    }
}

// dx[plane, iy, ix] = sum of dy over the windows whose maximum is (iy, ix).
KERNEL maxpool_backward(const real* __restrict__ dy, const int* __restrict__ argmax, real* __restrict__ dx,
                        long long planes, long long H, long long W, long long Ho, long long Wo, long long k,
                        long long stride)
{
    GRID_STRIDE(idx, planes * H * W) {
        const long long ix = idx % W, iy = (idx / W) % H, plane = idx / (W * H);
        const int me = (int)(iy * W + ix);
        // windows oy with oy*stride <= iy < oy*stride + k
        const long long oy0 = iy >= k ? (iy - k) / stride + 1 : 0, oy1 = LMIN(iy / stride, Ho - 1);
        const long long ox0 = ix >= k ? (ix - k) / stride + 1 : 0, ox1 = LMIN(ix / stride, Wo - 1);
        real acc = 0;
        for (long long oy = oy0; oy <= oy1; ++oy) {
            for (long long ox = ox0; ox <= ox1; ++ox) {
                const long long o = (plane * Ho + oy) * Wo + ox;
                if (argmax[o] == me) acc += dy[o];
            }
        }
        dx[idx] = acc;
    }
}

// --------------------------------------------------------------------------- element-wise
KERNEL relu_forward(const real* __restrict__ x, real* __restrict__ y, long long n)
{
    GRID_STRIDE(i, n) y[i] = x[i] < 0 ? (real)0 : x[i];  // NaN stays NaN
}

KERNEL relu_backward(const real* __restrict__ y, const real* __restrict__ dy, real* __restrict__ dx, long long n)
{
    GRID_STRIDE(i, n) dx[i] = y[i] > 0 ? dy[i] : (real)0;
}

// out = x * scale where mask is set, else 0 (inverted dropout, forward and backward).
KERNEL mask_scale(const real* __restrict__ x, const unsigned char* __restrict__ mask, real scale, real* __restrict__ out,
                  long long n)
{
    GRID_STRIDE(i, n) out[i] = mask[i] ? x[i] * scale : (real)0;
}

// Dropout mask: mask[i] = 1 when the top 32 bits of fl_splitmix64(seed, i) (dropout_hash.h) are >= threshold
// (threshold = p * 2^32, so an element is kept with probability 1 - p). A counter-based
// hash: the mask depends only on (seed, i), whatever the launch shape, and the seed comes
// from the layer's numpy Generator, so checkpoints hold the same state on every backend.
KERNEL dropout_mask(unsigned char* __restrict__ mask, long long n, unsigned long long seed,
                    unsigned long long threshold)
{
    GRID_STRIDE(i, n) {
        mask[i] = (fl_splitmix64(seed, (unsigned long long)i) >> 32) >= threshold ? 1 : 0;
    }
}
