// CUDA kernels of the compiled GPU executor (engine/runtime/cuda_step.py): the rows of the shared
// lowering (engine/lowering.py, layout) on channels-last float32 activations, forward and backward,
// the loss and the SGD update, so that a whole training step is a fixed list of these launches and
// cuBLAS calls on fixed buffers, captured once as a CUDA graph.
//
// Compiled at run time by CuPy (RawModule, NVRTC); the tests compile it to PTX with nvcc where it is
// installed, and as C++ with tests/cuda_emulation.h on the CPU (tests/test_cuda_step.py).
//
// As in cuda_kernels.cu, every kernel is a grid-stride loop in which one thread computes one output
// element from its inputs (a gather) in a fixed order: no atomics, no shared memory, and any launch
// shape gives the same bits. Reductions over the batch (weight and bias gradients) are partial sums in
// double over fixed segments of rows, then one kernel adds the segments in order.
// Activations are (N, H, W, C) channels-last; a flat activation is (N, C) (H = W = 1).
// Everything a step changes from one step to the next (the dropout seeds, the learning rate, the label
// smoothing) is read from device memory, never passed as an argument, so a captured graph replays it.

#include "dropout_hash.h"  // the dropout mask's hash, shared with the CPU kernels

#ifndef FLATNET_EMULATION
#define KERNEL extern "C" __global__ void
#endif

typedef long long ll;
typedef unsigned long long ull;

#define GRID_STRIDE(i, n) \
    for (ll i = (ll)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (ll)blockDim.x * gridDim.x)
#define LMIN(a, b) ((a) < (b) ? (a) : (b))
#define LMAX(a, b) ((a) > (b) ? (a) : (b))

// The hyper-parameters' slots in the device array `hyper` (engine/runtime/cuda_step.py, HYPER).
#define H_LR 0
#define H_MOMENTUM 1
#define H_DAMPENING 2
#define H_DECAY 3
#define H_SMOOTHING 4
#define H_NESTEROV 5

// --------------------------------------------------------------------------- layout changes
// (N, C, HW) -> (N, HW, C)
KERNEL st_to_nhwc(const float* __restrict__ x, float* __restrict__ y, ll N, ll C, ll HW)
{
    GRID_STRIDE(i, N * C * HW) {
        const ll c = i % C, p = (i / C) % HW, n = i / (C * HW);
        y[i] = x[(n * C + c) * HW + p];
    }
}

// (N, HW, C) -> (N, C, HW)
KERNEL st_to_nchw(const float* __restrict__ x, float* __restrict__ y, ll N, ll C, ll HW)
{
    GRID_STRIDE(i, N * C * HW) {
        const ll p = i % HW, c = (i / HW) % C, n = i / (C * HW);
        y[i] = x[(n * HW + p) * C + c];
    }
}

// A Linear layer's weight (F, C*HW) with columns in NCHW order, its columns put in channels-last
// order (F, HW*C): an inference plan's Linear reading a channels-last activation flattened.
KERNEL st_permute_columns(const float* __restrict__ w, float* __restrict__ wp, ll F, ll C, ll HW)
{
    GRID_STRIDE(i, F * C * HW) {
        const ll c = i % C, p = (i / C) % HW, f = i / (C * HW);
        wp[i] = w[(f * C + c) * HW + p];
    }
}

// --------------------------------------------------------------------------- element-wise
// y (rows, C) += b[c], then max(y, 0) with relu: the epilogue of a GEMM.
KERNEL st_bias_act(float* __restrict__ y, const float* __restrict__ b, ll rows, ll C, ll relu)
{
    GRID_STRIDE(i, rows * C) {
        const float v = y[i] + b[i % C];
        y[i] = relu && v < 0.f ? 0.f : v;
    }
}

KERNEL st_relu(const float* __restrict__ x, float* __restrict__ y, ll n)
{
    GRID_STRIDE(i, n) y[i] = x[i] < 0.f ? 0.f : x[i];
}

// dy zeroed where the ReLU's output y is not positive, in place.
KERNEL st_relu_mask(float* __restrict__ dy, const float* __restrict__ y, ll n)
{
    GRID_STRIDE(i, n) dy[i] = y[i] > 0.f ? dy[i] : 0.f;
}

KERNEL st_copy(const float* __restrict__ x, float* __restrict__ y, ll n)
{
    GRID_STRIDE(i, n) y[i] = x[i];
}

// Whether element (n, p, c) of a channels-last (N, HW, C) activation is kept by a dropout whose seed
// is seeds[at]: the hash on the element's index in the NCHW tensor of the layer path (as _train.h).
#ifdef __CUDACC__
__device__
#endif
static inline int st_keep(const ull* seeds, ll at, ll thresh, ll n, ll C, ll HW, ll p, ll c)
{
    const ull idx = (ull)((n * C + c) * HW + p);
    return (fl_splitmix64(seeds[at], idx) >> 32) >= (ull)thresh;
}

// y = x * scale where kept, else 0: a dropout's forward, and (applied to dy) its backward.
KERNEL st_dropout(const float* __restrict__ x, float* __restrict__ y, ll N, ll C, ll HW,
                  const ull* __restrict__ seeds, ll at, ll thresh, float scale)
{
    GRID_STRIDE(i, N * HW * C) {
        const ll c = i % C, p = (i / C) % HW, n = i / (C * HW);
        y[i] = st_keep(seeds, at, thresh, n, C, HW, p, c) ? x[i] * scale : 0.f;
    }
}

// --------------------------------------------------------------------------- 1D convolutions
// Per-channel correlation along H (along_h) or W of a channels-last x (N, H, W, C), `before` zeros
// of padding before:  y[n,o,q,c] = b[c] + sum_k w[c,k] x[n,o+k-before,q,c]  (along W: on q),
// then ReLU with relu. y is (N, L_out, W, C) along H, (N, H, L_out, C) along W.
KERNEL st_conv1d(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                 float* __restrict__ y, ll N, ll H, ll W, ll C, ll K, ll before, ll L_out, ll along_h, ll relu)
{
    const ll Ho = along_h ? L_out : H, Wo = along_h ? W : L_out, L_in = along_h ? H : W;
    GRID_STRIDE(i, N * Ho * Wo * C) {
        const ll c = i % C, q = (i / C) % Wo, o = (i / (C * Wo)) % Ho, n = i / (C * Wo * Ho);
        const ll pos = along_h ? o : q;
        float acc = b[c];
        for (ll k = LMAX(0LL, before - pos); k < LMIN(K, L_in + before - pos); ++k) {
            const ll j = pos + k - before;
            acc += w[c * K + k] * x[((n * H + (along_h ? j : o)) * W + (along_h ? q : j)) * C + c];
        }
        y[i] = relu && acc < 0.f ? 0.f : acc;
    }
}

// The input gradient of st_conv1d: dx[n,i,q,c] = sum_k w[c,k] dy[n,i-k+before,q,c] over the
// outputs that read input row i (along W likewise). dx is (N, H, W, C).
KERNEL st_conv1d_dx(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                    ll N, ll H, ll W, ll C, ll K, ll before, ll L_out, ll along_h)
{
    const ll Ho = along_h ? L_out : H, Wo = along_h ? W : L_out;
    GRID_STRIDE(i, N * H * W * C) {
        const ll c = i % C, q = (i / C) % W, o = (i / (C * W)) % H, n = i / (C * W * H);
        const ll pos = along_h ? o : q;
        float acc = 0.f;
        for (ll k = LMAX(0LL, pos + before - L_out + 1); k < LMIN(K, pos + before + 1); ++k) {
            const ll j = pos - k + before;
            acc += w[c * K + k] * dy[((n * Ho + (along_h ? j : o)) * Wo + (along_h ? q : j)) * C + c];
        }
        dx[i] = acc;
    }
}

// Partial weight and bias gradients of st_conv1d over segment s of R output lines (a line: one
// (image, output row) pair, all Wo positions): part (S, K+1, C), in double,
//   part[s,k,c] = sum over the segment of dy[n,o,q,c] x[n,o+k-before,q,c]  (k < K; along W on q)
//   part[s,K,c] = sum over the segment of dy[n,o,q,c]
// st_sum_segments adds the S segments in order.
KERNEL st_conv1d_dw_partial(const float* __restrict__ x, const float* __restrict__ dy, double* __restrict__ part,
                            ll N, ll H, ll W, ll C, ll K, ll before, ll L_out, ll along_h, ll R, ll S)
{
    const ll Ho = along_h ? L_out : H, Wo = along_h ? W : L_out, L_in = along_h ? H : W;
    GRID_STRIDE(i, S * (K + 1) * C) {
        const ll c = i % C, k = (i / C) % (K + 1), s = i / (C * (K + 1));
        double acc = 0.0;
        for (ll line = s * R; line < LMIN((s + 1) * R, N * Ho); ++line) {
            const ll n = line / Ho, o = line % Ho;
            const float* g = dy + (line * Wo) * C + c;
            for (ll q = 0; q < Wo; ++q) {
                if (k == K) {
                    acc += g[q * C];
                    continue;
                }
                const ll j = (along_h ? o : q) + k - before;
                if (j < 0 || j >= L_in)
                    continue;
                acc += (double)(g[q * C] * x[((n * H + (along_h ? j : o)) * W + (along_h ? q : j)) * C + c]);
            }
        }
        part[i] = acc;
    }
}

// part[s, c] = sum of dy[r, c] over rows r of segment s (R rows each): a bias gradient's partial sums.
KERNEL st_colsum_partial(const float* __restrict__ dy, double* __restrict__ part, ll rows, ll C, ll R, ll S)
{
    GRID_STRIDE(i, S * C) {
        const ll c = i % C, s = i / C;
        double acc = 0.0;
        for (ll r = s * R; r < LMIN((s + 1) * R, rows); ++r)
            acc += dy[r * C + c];
        part[i] = acc;
    }
}

// The segments of part (S, K+1, C) added in order: dw[c, k] for k < K, db[c] for k = K
// (K = 0: part (S, 1, C) is a bias gradient alone, dw unused).
KERNEL st_sum_segments(const double* __restrict__ part, float* __restrict__ dw, float* __restrict__ db,
                       ll S, ll K, ll C)
{
    const ll M = (K + 1) * C;
    GRID_STRIDE(j, M) {
        double acc = 0.0;
        for (ll s = 0; s < S; ++s)
            acc += part[s * M + j];
        const ll c = j % C, k = j / C;
        if (k == K) db[c] = (float)acc;
        else dw[c * K + k] = (float)acc;
    }
}

// --------------------------------------------------------------------------- convolution (im2col)
// cols (N*Ho*Wo, C*k*k): row (n, oy, ox), column c*k*k + ky*k + kx (the order of a (F, C, k, k)
// weight), from a channels-last x (N, H, W, C) with zero padding.
KERNEL st_im2col(const float* __restrict__ x, float* __restrict__ cols, ll N, ll H, ll W, ll C, ll k,
                 ll stride, ll pad, ll Ho, ll Wo)
{
    const ll KK = C * k * k;
    GRID_STRIDE(i, N * Ho * Wo * KK) {
        const ll col = i % KK, r = i / KK;
        const ll c = col / (k * k), ky = (col / k) % k, kx = col % k;
        const ll ox = r % Wo, oy = (r / Wo) % Ho, n = r / (Wo * Ho);
        const ll iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
        cols[i] = iy >= 0 && iy < H && ix >= 0 && ix < W ? x[((n * H + iy) * W + ix) * C + c] : 0.f;
    }
}

// dx (N, H, W, C) from the columns' gradient: each input element gathers the column entries that read it.
KERNEL st_col2im(const float* __restrict__ dcols, float* __restrict__ dx, ll N, ll H, ll W, ll C, ll k,
                 ll stride, ll pad, ll Ho, ll Wo)
{
    const ll KK = C * k * k;
    GRID_STRIDE(i, N * H * W * C) {
        const ll c = i % C, ix = (i / C) % W, iy = (i / (C * W)) % H, n = i / (C * W * H);
        float acc = 0.f;
        for (ll ky = 0; ky < k; ++ky) {
            const ll ty = iy + pad - ky;
            if (ty < 0 || ty % stride || ty / stride >= Ho)
                continue;
            for (ll kx = 0; kx < k; ++kx) {
                const ll tx = ix + pad - kx;
                if (tx < 0 || tx % stride || tx / stride >= Wo)
                    continue;
                acc += dcols[((n * Ho + ty / stride) * Wo + tx / stride) * KK + c * k * k + ky * k + kx];
            }
        }
        dx[i] = acc;
    }
}

// --------------------------------------------------------------------------- max-pooling
// k x k windows, stride s, clipped at the border; the first maximum in row-major order wins ties and
// a NaN is always taken (as the layer path); arg: the input position iy * W + ix of each output. Then
// ReLU (relu) and a folded dropout (thresh != 0; its seed seeds[at]) on the pooled value.
KERNEL st_maxpool(const float* __restrict__ x, float* __restrict__ y, int* __restrict__ arg, ll N, ll H, ll W,
                  ll C, ll Ho, ll Wo, ll k, ll s, ll relu, const ull* __restrict__ seeds, ll at, ll thresh,
                  float scale)
{
    GRID_STRIDE(i, N * Ho * Wo * C) {
        const ll c = i % C, ox = (i / C) % Wo, oy = (i / (C * Wo)) % Ho, n = i / (C * Wo * Ho);
        const ll y0 = oy * s, y1 = LMIN(y0 + k, H), x0 = ox * s, x1 = LMIN(x0 + k, W);
        const float* xp = x + n * H * W * C + c;
        float best = xp[(y0 * W + x0) * C];
        int a = (int)(y0 * W + x0);
        for (ll iy = y0; iy < y1; ++iy)
            for (ll ix = x0; ix < x1; ++ix) {
                const float v = xp[(iy * W + ix) * C];
                if (v > best || v != v) {  // (the first element takes itself: the same value and position)
                    best = v;
                    a = (int)(iy * W + ix);
                }
            }
        if (relu && best < 0.f) best = 0.f;
        if (thresh) best = st_keep(seeds, at, thresh, n, C, Ho * Wo, oy * Wo + ox, c) ? best * scale : 0.f;
        y[i] = best;
        arg[i] = a;
    }
}

// dx (N, H, W, C): each input element gathers the output gradients whose window's maximum it was,
// in output order; with a folded dropout, each dy is first masked and scaled by the same hash.
KERNEL st_maxpool_dx(const float* __restrict__ dy, const int* __restrict__ arg, float* __restrict__ dx, ll N,
                     ll H, ll W, ll C, ll Ho, ll Wo, ll k, ll s, const ull* __restrict__ seeds, ll at, ll thresh,
                     float scale)
{
    GRID_STRIDE(i, N * H * W * C) {
        const ll c = i % C, ix = (i / C) % W, iy = (i / (C * W)) % H, n = i / (C * W * H);
        const int pos = (int)(iy * W + ix);
        float acc = 0.f;
        for (ll oy = iy < k ? 0 : (iy - k) / s + 1; oy <= LMIN(Ho - 1, iy / s); ++oy)
            for (ll ox = ix < k ? 0 : (ix - k) / s + 1; ox <= LMIN(Wo - 1, ix / s); ++ox) {
                const ll o = ((n * Ho + oy) * Wo + ox) * C + c;
                if (arg[o] != pos)
                    continue;
                float g = dy[o];
                if (thresh) g = st_keep(seeds, at, thresh, n, C, Ho * Wo, oy * Wo + ox, c) ? g * scale : 0.f;
                acc += g;
            }
        dx[i] = acc;
    }
}

// --------------------------------------------------------------------------- loss
// Softmax cross-entropy of each row of logits (N, K) against labels, smoothed by hyper[H_SMOOTHING]
// (e): rowloss[n] = -(1-e) log p[label] - e/K sum_k log p[k]; right[n] = 1 when the first maximum is
// the label; dlogits = (p - e/K - (1-e) onehot) / N. In float as the layer path, the loss in double.
KERNEL st_xent_rows(const float* __restrict__ logits, const int* __restrict__ labels, ll N, ll K,
                    const float* __restrict__ hyper, double* __restrict__ rowloss, double* __restrict__ right,
                    float* __restrict__ dlogits)
{
    GRID_STRIDE(n, N) {
        const float* z = logits + n * K;
        const float e = hyper[H_SMOOTHING];
        const ll label = labels[n];
        float m = z[0];
        ll best = 0;
        for (ll k = 1; k < K; ++k)
            if (z[k] > m) { m = z[k]; best = k; }
        float sum = 0.f;
        for (ll k = 0; k < K; ++k) sum += expf(z[k] - m);
        const float lse = logf(sum);
        double logp_label = 0.0, logp_sum = 0.0;
        for (ll k = 0; k < K; ++k) {
            const float logp = (z[k] - m) - lse;
            logp_sum += logp;
            if (k == label) logp_label = logp;
            const float p = expf(logp);
            dlogits[n * K + k] = ((p - e / (float)K) - (k == label ? 1.f - e : 0.f)) / (float)N;
        }
        rowloss[n] = -(1.0 - e) * logp_label - (double)e / K * logp_sum;
        right[n] = best == label ? 1.0 : 0.0;
    }
}

// out[0] = the mean of rowloss, out[1] = the number right: the rows added in order.
KERNEL st_xent_total(const double* __restrict__ rowloss, const double* __restrict__ right, ll N,
                     double* __restrict__ out)
{
    GRID_STRIDE(i, 1) {
        double loss = 0.0, count = 0.0;
        for (ll n = 0; n < N; ++n) { loss += rowloss[n]; count += right[n]; }
        out[0] = loss / N;
        out[1] = count;
    }
}

// --------------------------------------------------------------------------- SGD
// SGD with momentum as Torch7's optim.sgd (engine/optim.py): d = g + decay w (decay: a weight);
// v = d on the first step, else momentum v + (1 - dampening) d; w -= lr v, or with Nesterov momentum
// (hyper[H_NESTEROV] not 0) w -= lr (d + momentum v). Nothing changes when the
// step's loss (loss[0]) is not finite, so a diverged step leaves the weights as they were.
KERNEL st_sgd(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ v, ll n,
              const float* __restrict__ hyper, ll decay, ll first, const double* __restrict__ loss)
{
    const double l = loss[0];
    if (!(l - l == 0.0)) return;
    const float lr = hyper[H_LR], momentum = hyper[H_MOMENTUM], dampening = hyper[H_DAMPENING];
    const float wd = decay ? hyper[H_DECAY] : 0.f;
    const bool nesterov = hyper[H_NESTEROV] != 0.f;
    GRID_STRIDE(i, n) {
        const float d = wd != 0.f ? g[i] + wd * w[i] : g[i];
        const float vi = first ? d : momentum * v[i] + (1.f - dampening) * d;
        v[i] = vi;
        w[i] -= nesterov ? lr * (d + momentum * vi) : lr * vi;
    }
}

// --------------------------------------------------------------------------- the device's peak
// `iters` rounds of 8 independent fused multiply-add chains per thread; out[i] keeps the result alive.
// Timed by the self-test to give the device's measured fp32 rate (2 * 8 * iters flops a thread).
KERNEL st_fma_peak(float* __restrict__ out, ll iters)
{
    GRID_STRIDE(i, (ll)gridDim.x * blockDim.x) {
        float a[8];
        const float m = 1.0f + 1e-7f * (float)(i & 7), s = 1e-8f;
        for (int j = 0; j < 8; ++j) a[j] = s * (float)(j + 1);
        for (ll it = 0; it < iters; ++it)
            for (int j = 0; j < 8; ++j) a[j] = fmaf(a[j], m, s);
        out[i] = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
    }
}
