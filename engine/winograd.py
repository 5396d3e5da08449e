"""Winograd's minimal filtering F(m x m, r x r) for stride-1 convolutions: the transforms, and a numpy
reference used to measure each tile size's rounding error before a kernel uses it.

An m x m output tile of an r x r filter takes (m + r - 1)^2 multiplications instead of m^2 r^2
(Winograd 1980; Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"):

    Y = AT [ (G g GT) * (BT d B) ] A        d: an (m+r-1)^2 input tile, g: the filter, * elementwise

The transforms come from the Cook-Toom construction on the interpolation points 0, 1, -1, 2, -2,
1/2, -1/2, 3, -3, ... and the point at infinity (the choice of Lavin & Gray's wincnn, which keeps
the entries small); BT is solved exactly from AT and G (``transforms``). Larger tiles save more
multiplications and round more: ``conv2d`` computes in a chosen dtype so that the error of each
tile size can be measured against float64 direct convolution (``python -m engine.bench winograd``).
"""
from fractions import Fraction
from functools import cache

import numpy as np

POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2),
          Fraction(3), Fraction(-3), Fraction(1, 3), Fraction(-1, 3))


def _solve(rows, rhs):
    """The exact solution x of rows @ x = rhs (Fractions; rows may be more than the unknowns, consistent)."""
    n = len(rows[0])
    a = [list(r) + [b] for r, b in zip(rows, rhs)]
    pivots, r = [], 0
    for c in range(n):
        p = next((i for i in range(r, len(a)) if a[i][c] != 0), None)
        if p is None:
            continue
        a[r], a[p] = a[p], a[r]
        inv = 1 / a[r][c]
        a[r] = [v * inv for v in a[r]]
        for i in range(len(a)):
            if i != r and a[i][c] != 0:
                f = a[i][c]
                a[i] = [u - f * v for u, v in zip(a[i], a[r])]
        pivots.append(c)
        r += 1
    if len(pivots) != n or any(row[-1] != 0 for row in a[r:]):
        raise ArithmeticError("no exact transform for these points")
    return [a[i][-1] for i in range(n)]


@cache
def transforms(m, r):
    """(AT (m, n), G (n, r), BT (n, n)) of F(m, r), n = m + r - 1, as float64 arrays whose entries are exact
    fractions: for every 1D signal d of n values and filter g of r, AT @ ((G @ g) * (BT @ d)) is the
    correlation y[i] = sum_k g[k] d[i + k], i < m."""
    if m < 1 or r < 1 or m + r - 2 > len(POINTS):
        raise ValueError(f"F({m}, {r}) needs {m + r - 2} finite points; {len(POINTS)} are defined")
    n = m + r - 1
    pts = POINTS[:n - 1]
    at = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(pts):
        scale = Fraction(1)
        for q in pts[:j] + pts[j + 1:]:
            scale *= p - q
        g.append([p ** k / scale for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    # BT column by column: sum_j AT[i, j] G[j, k] BT[j, l] = [l == i + k] for every i < m, k < r
    rows = [[at[i][j] * g[j][k] for j in range(n)] for i in range(m) for k in range(r)]
    cols = [_solve(rows, [Fraction(int(l == i + k)) for i in range(m) for k in range(r)]) for l in range(n)]
    bt = [[cols[l][j] for l in range(n)] for j in range(n)]
    return tuple(np.array([[float(v) for v in row] for row in mat]) for mat in (at, g, bt))


def multiplications(m, r):
    """Multiplications per output pixel and channel pair: ((m + r - 1) / m)^2, against r^2 directly."""
    return ((m + r - 1) / m) ** 2


def _tiles(x, m, r, padding, th, tw, dtype):
    """The (N, C, th, tw, n, n) view of x's overlapping input patches, n = m + r - 1, one per m x m output tile
    (x zero-padded by `padding`, and with zeros past its bottom and right edges for the last tiles), in `dtype`."""
    n_img, c, h, wd = x.shape
    n = m + r - 1
    xp = np.zeros((n_img, c, th * m + r - 1, tw * m + r - 1), dtype)
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    s = xp.strides
    return np.lib.stride_tricks.as_strided(xp, (n_img, c, th, tw, n, n), (*s[:2], s[2] * m, s[3] * m, *s[2:]))


def conv2d(x, w, m, padding=0, dtype=np.float32):
    """Stride-1 cross-correlation of x (N, C, H, W) with w (K, C, r, r) by F(m x m, r x r), every operation in
    `dtype` (the transforms, the channel sums and the output transform): (N, K, H + 2p - r + 1, W + 2p - r + 1).

    Tiles overhanging the output's bottom and right edges read zeros and are cropped."""
    n_img, c, h, wd = x.shape
    k, c2, r, r2 = w.shape
    if c2 != c or r2 != r:
        raise ValueError(f"conv2d: filters {w.shape} do not fit input {x.shape}")
    oh, ow = h + 2 * padding - r + 1, wd + 2 * padding - r + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"conv2d: a {r}x{r} filter does not fit input {x.shape} with padding {padding}")
    at, g, bt = (t.astype(dtype) for t in transforms(m, r))
    n = m + r - 1
    th, tw = -(-oh // m), -(-ow // m)
    v = np.einsum("ia,nctuab,jb->ijcntu", bt, _tiles(x, m, r, padding, th, tw, dtype), bt,
                  optimize=True).astype(dtype, copy=False)
    u = np.einsum("ia,kcab,jb->ijkc", g, w.astype(dtype), g, optimize=True).astype(dtype, copy=False)
    prod = np.matmul(u, v.reshape(n, n, c, -1)).reshape(n, n, k, n_img, th, tw)  # a GEMM per transformed point
    y = np.einsum("ai,ijkntu,bj->nktaub", at, prod, at, optimize=True).astype(dtype, copy=False)
    return y.reshape(n_img, k, th * m, tw * m)[:, :, :oh, :ow]


def direct_conv2d(x, w, padding=0, dtype=np.float64):
    """Stride-1 cross-correlation computed directly (im2col and one matrix product) in `dtype`: the reference."""
    n_img, c = x.shape[:2]
    r = w.shape[-1]
    xp = np.pad(x.astype(dtype), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = xp.shape[2] - r + 1, xp.shape[3] - r + 1
    s = xp.strides
    cols = np.lib.stride_tricks.as_strided(xp, (n_img, c, r, r, oh, ow), (*s[:2], *s[2:], *s[2:]))
    return np.einsum("kcab,ncabhw->nkhw", w.astype(dtype), cols, optimize=True).astype(dtype, copy=False)


def weight_grad(x, dy, m, r, padding=0, dtype=np.float32):
    """The gradient of a stride-1 correlation's r x r filters, (K, C, r, r), from its input x (N, C, H, W) and output
    gradient dy (N, K, Ho, Wo), in the transformed domain as the training step computes it: per tile, V = BT d B and
    dM = A dY AT; dU_e = sum over tiles and images of dM_e^T V_e; dg = GT dU G. Every operation in `dtype`."""
    n_img, c = x.shape[:2]
    _, k, oh, ow = dy.shape
    at, g, bt = (t.astype(dtype) for t in transforms(m, r))
    n = m + r - 1
    th, tw = -(-oh // m), -(-ow // m)
    v = np.einsum("ia,nctuab,jb->ijntuc", bt, _tiles(x, m, r, padding, th, tw, dtype), bt,
                  optimize=True).astype(dtype, copy=False)
    dyp = np.zeros((n_img, k, th * m, tw * m), dtype)
    dyp[:, :, :oh, :ow] = dy
    dyt = dyp.reshape(n_img, k, th, m, tw, m)
    dm = np.einsum("ai,nktaub,bj->ijntuk", at, dyt, at, optimize=True).astype(dtype, copy=False)
    du = np.matmul(dm.reshape(n, n, -1, k).transpose(0, 1, 3, 2), v.reshape(n, n, -1, c))  # (n, n, K, C)
    return np.einsum("ai,abkc,bj->kcij", g, du.astype(dtype, copy=False), g, optimize=True).astype(dtype, copy=False)


def direct_weight_grad(x, dy, r, padding=0, dtype=np.float64):
    """The same gradient computed directly in `dtype`: dW[f, c, y, x] = sum over images and outputs of dy times the
    input at the tap's offset."""
    xp = np.pad(x.astype(dtype), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    _, _, oh, ow = dy.shape
    s = xp.strides
    cols = np.lib.stride_tricks.as_strided(xp, (x.shape[0], x.shape[1], r, r, oh, ow), (*s[:2], *s[2:], *s[2:]))
    return np.einsum("nkhw,ncabhw->kcab", dy.astype(dtype), cols, optimize=True).astype(dtype, copy=False)
