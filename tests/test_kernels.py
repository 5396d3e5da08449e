"""Each compiled kernel against an independent reference (scipy.signal or plain numpy loops)."""
import numpy as np
import pytest
from conftest import TOL
from reference import conv1d_ref, conv2d_ref, im2col_ref, maxpool_ref

from engine import _kernels
from engine.layers import conv1d_padding

# (N, C, H, W, K): 1x1 images, K larger than the image, batch 1, non-square,
# channel counts that are not multiples of the SIMD width.
SHAPES_1D = [
    (1, 1, 1, 1, 3),
    (2, 3, 2, 5, 7),
    (1, 5, 9, 4, 5),
    (3, 17, 6, 11, 3),
    (2, 2, 13, 1, 4),
    (2, 2, 37, 70, 5),   # planes larger than a cache block: several row blocks
    (1, 1, 300, 4, 3),   # many short rows
]
MODES = ["full", "same", "valid", (3, 1), (-1, 2), (-1, -1)]


def nonempty_1d(modes):
    """(axis, shape, mode) for every combination whose output is not empty (the others would test nothing)."""
    def output_size(axis, shape, mode):
        before, after = conv1d_padding(shape[4], mode)
        return shape[axis] + before + after - shape[4] + 1
    return [pytest.param(axis, shape, mode, id=f"axis{axis}-{'x'.join(map(str, shape))}-{mode}".replace(" ", ""))
            for axis in (2, 3) for shape in SHAPES_1D for mode in modes if output_size(axis, shape, mode) >= 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape,mode", nonempty_1d(MODES))
def test_conv1d_forward_and_input_grad(dtype, axis, shape, mode, rng):
    N, C, H, W, K = shape
    before, after = conv1d_padding(K, mode)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((C, K)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    ref = conv1d_ref(x, w, b, axis, before, after)
    f = _kernels.vconv_forward if axis == 2 else _kernels.hconv_forward
    y = np.full(ref.shape, np.nan, dtype=dtype)
    f(x, w, b, before, False, y, 2)
    np.testing.assert_allclose(y, ref, **TOL[dtype])

    # input gradient: the adjoint, checked through <A x, dy> = <x, A^T dy> against the
    # reference operator applied to basis-free random vectors, and directly against
    # the dense Jacobian of the reference on the smallest shapes.
    dy = rng.standard_normal(ref.shape).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype=dtype)
    f(dy, w, None, K - 1 - before, True, dx, 2)
    lhs = np.vdot(conv1d_ref(x, w, None, axis, before, after), dy.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), dx.astype(np.float64))
    np.testing.assert_allclose(rhs, lhs, rtol=1e-4 if dtype == np.float32 else 1e-10)
    if x.size <= 200:
        jac = np.zeros((ref.size, x.size))
        for i in range(x.size):
            e = np.zeros(x.size)
            e[i] = 1
            jac[:, i] = conv1d_ref(e.reshape(x.shape), w, None, axis, before, after).ravel()
        np.testing.assert_allclose(dx.ravel(), jac.T @ dy.ravel().astype(np.float64), **TOL[dtype])


@pytest.mark.parametrize("axis", [2, 3])
@pytest.mark.parametrize("before,after", [(10, -5), (-4, 9), (6, -5)])
def test_conv1d_extreme_padding(axis, before, after, rng):
    """Padding larger than the input on one side and cropping on the other (any (before, after) pair)."""
    x = rng.standard_normal((2, 3, 2, 2))
    w, b = rng.standard_normal((3, 3)), rng.standard_normal(3)
    ref = conv1d_ref(x, w, b, axis, before, after)
    assert ref.shape[axis] >= 1
    f = _kernels.vconv_forward if axis == 2 else _kernels.hconv_forward
    y = np.full(ref.shape, np.nan)
    f(x, w, b, before, False, y, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(ref.shape)
    dx = np.full(x.shape, np.nan)
    f(dy, w, None, 2 - before, True, dx, 1)  # the input gradient: flipped filter, pad' = K-1-before
    np.testing.assert_allclose(np.vdot(x, dx), np.vdot(conv1d_ref(x, w, None, axis, before, after), dy), rtol=1e-10)
    g = _kernels.vconv_grad_params if axis == 2 else _kernels.hconv_grad_params
    dw, db = np.empty((3, 3)), np.empty(3)
    g(x, dy, before, dw, db, 1)
    want = [[(dy[:, c] * conv1d_ref(x, np.eye(3)[[j] * 3], None, axis, before, after)[:, c]).sum() for j in range(3)]
            for c in range(3)]
    np.testing.assert_allclose(dw, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape,mode", nonempty_1d(["full", "same", "valid", (-1, 2)]))
def test_conv1d_param_grads(dtype, axis, shape, mode, rng):
    N, C, H, W, K = shape
    before, after = conv1d_padding(K, mode)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    out_shape = conv1d_ref(x, np.ones((C, K)), None, axis, before, after).shape
    dy = rng.standard_normal(out_shape).astype(dtype)
    # reference: the forward is linear in w, so dL/dw[c,k] = <dy, forward with unit filter e_k on c>
    dw_ref = np.zeros((C, K))
    for k in range(K):
        e = np.zeros((C, K))
        e[:, k] = 1
        dw_ref[:, k] = (conv1d_ref(x, e, None, axis, before, after) * dy).sum(axis=(0, 2, 3))
    db_ref = dy.astype(np.float64).sum(axis=(0, 2, 3))
    dw = np.full((C, K), np.nan, dtype=dtype)
    db = np.full(C, np.nan, dtype=dtype)
    f = _kernels.vconv_grad_params if axis == 2 else _kernels.hconv_grad_params
    f(x, dy, before, dw, db, 2)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else TOL[dtype]
    np.testing.assert_allclose(dw, dw_ref, **tol)
    np.testing.assert_allclose(db, db_ref, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,C,H,W,k,stride,pad", [
    (1, 1, 1, 1, 1, 1, 0), (2, 3, 5, 7, 3, 1, 1), (1, 2, 6, 5, 2, 2, 0), (3, 5, 7, 7, 5, 2, 2),
    (2, 1, 4, 9, 3, 3, 2),
])
def test_im2col_col2im(dtype, N, C, H, W, k, stride, pad, rng):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    ref = im2col_ref(x, k, k, stride, pad)
    cols = np.full((N - 1, *ref.shape[1:]), np.nan, dtype=dtype) if N > 1 else None
    # a chunk starting at image 1 (the batch processed in pieces)
    if N > 1:
        _kernels.im2col(x, 1, k, k, stride, pad, cols, 2)
        np.testing.assert_array_equal(cols, ref[1:])
    full = np.empty(ref.shape, dtype=dtype)
    _kernels.im2col(x, 0, k, k, stride, pad, full, 2)
    np.testing.assert_array_equal(full, ref)
    # col2im is the adjoint: <im2col(x), c> = <x, col2im(c)>, and equals a loop scatter
    c = rng.standard_normal(ref.shape).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype=dtype)
    _kernels.col2im(c, 0, k, k, stride, pad, dx, 2)
    np.testing.assert_allclose(np.vdot(ref.astype(np.float64), c), np.vdot(x.astype(np.float64), dx),
                               rtol=1e-4 if dtype == np.float32 else 1e-10)
    scatter = np.zeros((N, C, H, W))
    for i in range(x.size):
        e = np.zeros(x.size, dtype=dtype)
        e[i] = 1
        scatter.reshape(-1)[i] = (im2col_ref(e.reshape(x.shape), k, k, stride, pad) * c).sum()
    np.testing.assert_allclose(dx, scatter, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [4, 1])  # m = 1 takes the GEMV path
def test_gemm_against_numpy(dtype, m, rng):
    for ta in (False, True):
        for tb in (False, True):
            for beta in (2.0, 0.0):
                a = rng.standard_normal((m, 3) if not ta else (3, m)).astype(dtype)
                b = rng.standard_normal((3, 5) if not tb else (5, 3)).astype(dtype)
                c = rng.standard_normal((m, 5)).astype(dtype)
                expect = 0.5 * (a.T if ta else a).astype(np.float64) @ (b.T if tb else b) + beta * c
                if beta == 0.0:
                    c[...] = np.nan  # beta = 0 must not read C
                _kernels.gemm(ta, tb, 0.5, a, b, beta, c)
                np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-5)
    a = rng.standard_normal((6, 4, 3)).astype(dtype)
    b = rng.standard_normal((6, 5, 3)).astype(dtype)
    acc = np.zeros((1, 4, 5), dtype=dtype)
    _kernels.batched_gemm(False, True, 1.0, a, b, 0.0, acc, False, False)
    np.testing.assert_allclose(acc[0], np.einsum("nij,nkj->ik", a, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes do not match"):
        _kernels.gemm(False, False, 1.0, a[0], a[0], 0.0, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H,W,k,stride,ceil", [
    (1, 1, 1, 1, False), (7, 7, 3, 2, False), (8, 8, 3, 2, True), (8, 8, 3, 2, False),
    (5, 9, 2, 3, True), (32, 32, 3, 2, False), (6, 4, 2, 2, True), (4, 4, 4, 1, False),
])
def test_maxpool(dtype, H, W, k, stride, ceil, rng):
    from engine import MaxPool2d
    layer = MaxPool2d(k, stride, ceil_mode=ceil, dtype=dtype)
    x = rng.standard_normal((2, 3, H, W)).astype(dtype)
    y = layer.forward(x)
    _, _, ho, wo = y.shape
    # output sizes by the floor/ceil formulas of Torch/PyTorch
    import math
    if ceil:
        exp_h = math.ceil((H - k) / stride) + 1
        exp_h -= (exp_h - 1) * stride >= H
    else:
        exp_h = (H - k) // stride + 1
    assert ho == exp_h
    ref, back = maxpool_ref(x, k, stride, ho, wo)
    np.testing.assert_array_equal(y, ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(layer.backward(dy), back(dy), **TOL[dtype])


@pytest.mark.parametrize("k,stride,ceil", [(3, 2, True), (2, 1, False), (3, 3, True)])
def test_maxpool_ties_go_to_the_first_maximum(k, stride, ceil, rng):
    """Many equal values (as after a ReLU): the gradient goes to the first maximum in row-major order."""
    from engine import MaxPool2d
    layer = MaxPool2d(k, stride, ceil_mode=ceil)
    x = rng.integers(0, 3, (2, 3, 11, 10)).astype(np.float32)
    y = layer.forward(x)
    ref, back = maxpool_ref(x, k, stride, *y.shape[2:])
    np.testing.assert_array_equal(y, ref)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_allclose(layer.backward(dy), back(dy), rtol=1e-6, atol=1e-6)


def test_dropout_mask_is_splitmix64(threads):
    """Each element is kept when the top 32 bits of splitmix64(seed, i) reach p * 2^32, on any thread count."""
    from reference import splitmix64
    assert splitmix64(0, 0) == 0xE220A8397B1DCDAF  # the published first output for seed 0
    seed, n, threshold = 123456789, 50_000, int(0.3 * 2**32)
    want = np.array([splitmix64(seed, i) >> 32 >= threshold for i in range(n)], np.uint8)
    for t in (1, 2):
        mask = np.empty(n, np.uint8)
        _kernels.dropout_mask(mask, seed, threshold, t)
        np.testing.assert_array_equal(mask, want)
    assert abs(want.mean() - 0.7) < 0.01


def test_maxpool_propagates_nan():
    from engine import MaxPool2d
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = np.nan
    assert np.isnan(MaxPool2d(2).forward(x)[0, 0, 0, 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_mask(dtype, rng):
    x = rng.standard_normal(50_001).astype(dtype)
    y = np.empty_like(x)
    _kernels.relu_forward(x, y, 2)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    dy = rng.standard_normal(x.size).astype(dtype)
    dx = np.empty_like(x)
    _kernels.relu_backward(y, dy, dx, 2)
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))
    mask = (rng.random(x.size) > 0.3).astype(np.uint8)
    out = np.empty_like(x)
    _kernels.mask_scale(x, mask, dtype(2.5), out, 2)
    np.testing.assert_allclose(out, np.where(mask == 1, x * dtype(2.5), 0), **TOL[dtype])


def test_conv2d_layer_against_scipy(rng):
    from engine import Conv2d
    for (N, C, F, H, W, k, stride, pad) in [(2, 3, 4, 7, 6, 3, 1, 1), (1, 2, 3, 9, 9, 5, 2, 2),
                                             (3, 5, 2, 4, 4, 4, 1, 0), (1, 1, 1, 1, 1, 1, 1, 0)]:
        layer = Conv2d(C, F, k, stride, pad, rng=rng)
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        y = layer.forward(x)
        ref = conv2d_ref(x, layer.params["weight"], layer.params["bias"], stride, pad)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
