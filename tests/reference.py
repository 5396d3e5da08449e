"""Independent references for the kernels: plain numpy loops and scipy.signal, no engine code."""
import numpy as np
from scipy import signal


def conv1d_ref(x, w, b, axis, before, after):
    """Per-channel correlation along `axis` (2 or 3) with zero padding (before, after); negative crops.

    Zero-pad explicitly, correlate in scipy's 'valid' mode, then crop what negative padding removes.
    """
    N, C = x.shape[:2]
    k = w.shape[1]
    pads = [(0, 0)] * 2
    pads[axis - 2] = (max(before, 0), max(after, 0))
    out = []
    for n in range(N):
        planes = []
        for c in range(C):
            filt = w[c].reshape((k, 1) if axis == 2 else (1, k)).astype(np.float64)
            xp = np.pad(x[n, c].astype(np.float64), pads)
            v = signal.correlate(xp, filt, mode="valid")
            sl = [slice(None), slice(None)]
            sl[axis - 2] = slice(max(-before, 0), v.shape[axis - 2] - max(-after, 0))
            planes.append(v[tuple(sl)] + (b[c] if b is not None else 0.0))
        out.append(planes)
    return np.array(out)


def conv2d_ref(x, w, b, stride, pad):
    """Multi-channel 2D correlation (Conv2d) by scipy.signal.correlate2d per (output, input) channel."""
    N, C, H, W = x.shape
    F, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho = (H + 2 * pad - kh) // stride + 1
    Wo = (W + 2 * pad - kw) // stride + 1
    y = np.zeros((N, F, Ho, Wo))
    for n in range(N):
        for f in range(F):
            acc = np.zeros((H + 2 * pad - kh + 1, W + 2 * pad - kw + 1))
            for c in range(C):
                acc += signal.correlate2d(xp[n, c], w[f, c].astype(np.float64), mode="valid")
            y[n, f] = acc[::stride, ::stride][:Ho, :Wo] + b[f]
    return y


def im2col_ref(x, kh, kw, stride, pad):
    N, C, H, W = x.shape
    Ho = (H + 2 * pad - kh) // stride + 1
    Wo = (W + 2 * pad - kw) // stride + 1
    cols = np.zeros((N, C * kh * kw, Ho * Wo), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for a in range(kh):
                for bb in range(kw):
                    for oy in range(Ho):
                        for ox in range(Wo):
                            iy, ix = oy * stride + a - pad, ox * stride + bb - pad
                            if 0 <= iy < H and 0 <= ix < W:
                                cols[n, (c * kh + a) * kw + bb, oy * Wo + ox] = x[n, c, iy, ix]
    return cols


def maxpool_ref(x, k, stride, ho, wo):
    """Plain-loop max-pooling with windows clipped at the border; returns (y, dx_fn)."""
    N, C, H, W = x.shape
    y = np.zeros((N, C, ho, wo), dtype=x.dtype)
    arg = {}
    for n in range(N):
        for c in range(C):
            for oy in range(ho):
                for ox in range(wo):
                    win = x[n, c, oy * stride:min(oy * stride + k, H), ox * stride:min(ox * stride + k, W)]
                    i = np.argmax(win)  # first maximum in row-major order
                    y[n, c, oy, ox] = win.flat[i]
                    arg[n, c, oy, ox] = (oy * stride + i // win.shape[1], ox * stride + i % win.shape[1])

    def backward(dy):
        dx = np.zeros_like(x, dtype=np.float64)
        for (n, c, oy, ox), (iy, ix) in arg.items():
            dx[n, c, iy, ix] += dy[n, c, oy, ox]
        return dx

    return y, backward


def numerical_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every element of x (float64, in place)."""
    g = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def splitmix64(seed, i):
    """The i-th output (from 0) of Vigna's splitmix64 generator started at state `seed`, in plain Python."""
    m = 2**64 - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def conv2d_np(x, w, b, stride, pad):
    """Conv2d in float64 from numpy's sliding windows and einsum (fast enough for whole networks)."""
    kh, kw = w.shape[2:]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,fcij->nfhw", win, w.astype(np.float64)) + b.astype(np.float64)[None, :, None, None]
