"""The CUDA kernels of the CuPy backend, on a GPU where CuPy works, and without one.

* nvcc compiles engine/cuda_kernels.cu to PTX for float and double (syntax and types), and
  every kernel the CuPy backend launches is in it.
* Every kernel runs through CupyOps and is checked against the independent references of
  tests/reference.py and against the CPU kernels: on the real device (`cupy` cases, with
  small grids so the grid-stride loops wrap), and on the CPU with the same source compiled as
  C++ (tests/emulated_cupy.py, `cupy-emulated` cases) as several emulated blocks and threads.
"""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import small_launches
from reference import conv1d_ref, im2col_ref, maxpool_ref

from engine import MaxPool2d

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "engine" / "cuda_kernels.cu"


def launched_kernels():
    return set(re.findall(r'_launch\("(\w+)"', (ROOT / "engine" / "runtime" / "cuda.py").read_text()))


@pytest.mark.parametrize("real", ["float", "double"])
def test_kernel_source_compiles_to_ptx(real, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH (the CUDA toolkit: NVIDIA's cuda-toolkit package, or Debian's "
                    "nvidia-cuda-toolkit)")
    out = tmp_path / f"kernels_{real}.ptx"
    r = subprocess.run([nvcc, "--ptx", f"-DFLATNET_REAL={real}", "-o", str(out), str(SOURCE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries = set(re.findall(r"^\.visible \.entry (\w+)\(", out.read_text(), re.M))
    assert launched_kernels() <= entries, f"launched but not compiled: {launched_kernels() - entries}"
    assert len(launched_kernels()) >= 10


@pytest.fixture(params=["cupy", "cupy-emulated"])
def ops(request, monkeypatch):
    """CupyOps on the real CuPy where a GPU is usable, else on the emulation, with small launches
    (conftest.small_launches; emulated, 3 blocks of 5 threads)."""
    for _ in small_launches(request.param, monkeypatch, (3, 5)):
        from engine.runtime import ops_for
        yield ops_for("cupy")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [2, 3])
@pytest.mark.parametrize("k,before,after", [(3, 2, 2), (4, 1, 2), (3, 0, 0), (5, -1, 1)])
def test_conv1d_kernels_against_scipy(ops, monkeypatch, dtype, axis, k, before, after):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 7)).astype(dtype)
    w = rng.standard_normal((3, k)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    want = conv1d_ref(x, w, b, axis, before, after)
    cp = ops.xp
    y = cp.empty(want.shape, dtype=dtype)
    ops.conv1d(axis, cp.asarray(x), cp.asarray(w), cp.asarray(b), before, False, y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(y), want, **tol)
    # the flipped filter without bias (the input-gradient form)
    y0 = cp.empty(want.shape, dtype=dtype)
    ops.conv1d(axis, cp.asarray(x), cp.asarray(w), None, before, True, y0)
    np.testing.assert_allclose(cp.asnumpy(y0), conv1d_ref(x, w[:, ::-1], None, axis, before, after), **tol)
    # weight and bias gradients: dw[c, j] = <dy[:, c], correlation of x[:, c] with the unit filter e_j>
    dy = rng.standard_normal(want.shape).astype(dtype)
    want_dw = np.array([[(dy[:, c] * conv1d_ref(x, np.eye(k)[[j] * 3], None, axis, before, after)[:, c]).sum()
                         for j in range(k)] for c in range(3)])
    import engine.runtime.cuda as bc
    for segment in (1, 10, 256):  # bands of one row, of one or two rows, the whole plane
        monkeypatch.setattr(bc, "GRAD_SEGMENT", segment)
        dw, db = cp.empty((3, k), dtype=dtype), cp.empty(3, dtype=dtype)
        ops.conv1d_grad_params(axis, cp.asarray(x), cp.asarray(dy), before, dw, db)
        np.testing.assert_allclose(cp.asnumpy(dw), want_dw, **tol)
        np.testing.assert_allclose(cp.asnumpy(db), dy.sum(axis=(0, 2, 3)), **tol)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 2), (2, 3, 0)])
def test_im2col_and_its_adjoint(ops, k, stride, pad):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 7, 6))
    want = im2col_ref(x, k, k, stride, pad)
    cp = ops.xp
    cols = cp.empty((2,) + want.shape[1:], dtype=np.float64)
    ops.im2col(cp.asarray(x), 1, k, k, stride, pad, cols)  # images 1 and 2 (n0 = 1)
    np.testing.assert_array_equal(cp.asnumpy(cols), want[1:])
    c = rng.standard_normal(cols.shape)
    dx = cp.asarray(np.full(x.shape, 7.0))
    ops.col2im(cp.asarray(c), 1, k, k, stride, pad, dx)
    dx = cp.asnumpy(dx)
    np.testing.assert_array_equal(dx[0], 7.0)  # images outside the chunk untouched
    # adjoint: <im2col(v), c> = <v, col2im(c)> for every v, so col2im(c) = sum over the columns that read each pixel
    for trial in range(3):
        v = rng.standard_normal(x.shape)
        assert np.isclose((im2col_ref(v, k, k, stride, pad)[1:] * c).sum(), (v[1:] * dx[1:]).sum(), rtol=1e-12)


@pytest.mark.parametrize("k,stride,hw", [(3, 2, (7, 6)), (2, 2, (5, 5)), (3, 1, (4, 5))])
def test_maxpool_kernels_against_loops(ops, k, stride, hw):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, *hw)).astype(np.float32)
    x[0, 0, 0, :2] = 1.5  # a tie: the first maximum (row-major) wins
    x[1, 2, 1, 1] = np.nan  # NaN propagates
    _, _, ho, wo = MaxPool2d(k, stride, ceil_mode=True).output_shape(x.shape)  # windows clipped at the border
    want, backward = maxpool_ref(np.nan_to_num(x, nan=1e9), k, stride, ho, wo)
    cp = ops.xp
    y, arg = cp.empty((2, 3, ho, wo), dtype=np.float32), cp.empty((2, 3, ho, wo), dtype=np.int32)
    ops.maxpool_forward(cp.asarray(x), k, stride, y, arg)
    y = cp.asnumpy(y)
    nan = want == 1e9
    assert np.isnan(y[nan]).all() and nan.any()
    np.testing.assert_array_equal(y[~nan], want[~nan])
    dy = rng.standard_normal((2, 3, ho, wo)).astype(np.float32)
    dx = cp.empty(x.shape, dtype=np.float32)
    ops.maxpool_backward(cp.asarray(dy), arg, dx, k, stride)
    np.testing.assert_allclose(cp.asnumpy(dx), backward(dy), rtol=1e-6, atol=1e-6)


def test_elementwise_kernels(ops):
    rng = np.random.default_rng(6)
    cp = ops.xp
    x = rng.standard_normal(1000).astype(np.float32)
    x[3] = np.nan
    y = cp.asnumpy(ops.relu_forward(cp.asarray(x), cp.empty(1000, dtype=np.float32)))
    np.testing.assert_array_equal(y, np.where(x < 0, 0, x))  # NaN stays NaN
    dy = rng.standard_normal(1000).astype(np.float32)
    dx = cp.asnumpy(ops.relu_backward(cp.asarray(y), cp.asarray(dy), cp.empty(1000, dtype=np.float32)))
    np.testing.assert_array_equal(dx, np.where(y > 0, dy, 0))
    mask = cp.empty(200_000, dtype=np.uint8)
    m1 = cp.asnumpy(ops.dropout_mask(np.random.default_rng(1), 0.3, mask)).copy()
    assert set(np.unique(m1)) == {0, 1} and abs(m1.mean() - 0.7) < 0.005
    m2 = cp.asnumpy(ops.dropout_mask(np.random.default_rng(1), 0.3, mask))
    np.testing.assert_array_equal(m1, m2)  # the mask depends only on the generator's state
    assert cp.asnumpy(ops.dropout_mask(np.random.default_rng(1), 0.0, mask)).all()
    out = cp.asnumpy(ops.mask_scale(cp.asarray(x[:10]), cp.asarray(m1[:10]), 2.0, cp.empty(10, dtype=np.float32)))
    np.testing.assert_array_equal(out, np.where(m1[:10] == 1, x[:10] * 2, 0))


def test_gemms(ops):
    rng = np.random.default_rng(7)
    cp = ops.xp
    a, b, c = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal((4, 5))
    out = cp.asarray(c)
    ops.gemm(False, True, 2.0, cp.asarray(a), cp.asarray(b), 0.5, out)
    np.testing.assert_allclose(cp.asnumpy(out), 2 * a @ b.T + 0.5 * c, rtol=1e-12)
    A, B = rng.standard_normal((1, 4, 3)), rng.standard_normal((6, 3, 5))
    out = cp.empty((6, 4, 5), dtype=np.float64)
    ops.batched_gemm(False, False, 1.0, cp.asarray(A), cp.asarray(B), 0.0, out, shared_a=True)
    np.testing.assert_allclose(cp.asnumpy(out), A @ B, rtol=1e-12)
    dy, cols = rng.standard_normal((6, 4, 5)), rng.standard_normal((6, 3, 5))
    acc = cp.empty((1, 4, 3), dtype=np.float64)
    ops.batched_gemm(False, True, 1.0, cp.asarray(dy), cp.asarray(cols), 0.0, acc)
    np.testing.assert_allclose(cp.asnumpy(acc)[0], sum(dy[i] @ cols[i].T for i in range(6)), rtol=1e-12)


@pytest.mark.parametrize("axis", [2, 3])
def test_weight_gradient_bands_against_the_cpu_kernels(ops, monkeypatch, axis):
    """conv1d_grad_params split over bands of rows and images equals the CPU kernel (an independent implementation)."""
    import engine.runtime.cuda as bc
    from engine.runtime.cpu import CpuOps
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 9, 11))
    k, pad = 5, 4  # full mode: 13 output rows or columns
    out_shape = list(x.shape)
    out_shape[axis] += 2 * pad - k + 1
    dy = rng.standard_normal(out_shape)
    want_dw, want_db = np.empty((4, k)), np.empty(4)
    CpuOps.conv1d_grad_params(axis, x, dy, pad, want_dw, want_db)
    cp = ops.xp
    monkeypatch.setattr(bc, "GRAD_SEGMENT", 20)  # 1 or 2 rows a band: 7 to 9 bands a plane
    dw, db = cp.empty((4, k)), cp.empty(4)
    ops.conv1d_grad_params(axis, cp.asarray(x), cp.asarray(dy), pad, dw, db)
    np.testing.assert_allclose(cp.asnumpy(dw), want_dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(db), want_db, rtol=1e-12, atol=1e-12)


def test_launch_refuses_strided_views_and_widens_integers(ops):
    import engine.runtime.cuda as bc
    cp = ops.xp
    x = cp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(ValueError, match=r"relu_forward: argument 0 is a strided view"):
        ops.relu_forward(x[:, ::2], cp.empty((3, 2), dtype=np.float32))
    with pytest.raises(TypeError, match=r"argument 2 is a float"):
        bc._launch("mask_scale", np.float32, 4, x, x, 2.0, x, 4)
    for v in (7, np.int32(7), np.uint8(7), True):
        assert type(bc._kernel_arg("k", 0, v)) is np.int64 and bc._kernel_arg("k", 0, v) == int(v)
    assert bc.kernel("relu_forward", np.float32) is bc.kernel("relu_forward", np.float32)  # looked up once
    assert bc.kernel("relu_forward", np.float64) is not bc.kernel("relu_forward", np.float32)


def test_gemms_with_shared_and_transposed_operands(ops):
    """Every form the layers use goes through one strided batched cuBLAS call: a shared operand
    (stride 0) and transposes (cuBLAS's flags), with alpha and beta, in float32 and float64."""
    rng = np.random.default_rng(9)
    cp = ops.xp
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        W, D, c0 = (rng.standard_normal(s).astype(dtype) for s in ((1, 3, 4), (6, 3, 5), (6, 4, 5)))
        out = cp.asarray(c0)
        ops.batched_gemm(True, False, 0.5, cp.asarray(W), cp.asarray(D), 1.0, out, shared_a=True)
        np.testing.assert_allclose(cp.asnumpy(out), 0.5 * W[0].T @ D + c0, rtol=tol, atol=tol)
        A, B = rng.standard_normal((6, 4, 3)).astype(dtype), rng.standard_normal((1, 5, 3)).astype(dtype)
        out = cp.asarray(np.full((6, 4, 5), np.nan, dtype))  # beta = 0: the old contents are not read
        ops.batched_gemm(False, True, 1.0, cp.asarray(A), cp.asarray(B), 0.0, out, shared_b=True)
        np.testing.assert_allclose(cp.asnumpy(out), A @ B[0].T, rtol=tol, atol=tol)
        a, b, c = (rng.standard_normal(s).astype(dtype) for s in ((3, 4), (5, 3), (4, 5)))
        out = cp.asarray(c)
        ops.gemm(True, True, -1.0, cp.asarray(a), cp.asarray(b), 2.0, out)
        np.testing.assert_allclose(cp.asnumpy(out), -a.T @ b.T + 2 * c, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"gemm: shapes .* do not match"):
        ops.gemm(False, False, 1.0, cp.asarray(a), cp.asarray(b), 0.0, cp.empty((4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"gemm: operand 1 .* expected C-contiguous"):
        strided_b = cp.asarray(np.ascontiguousarray(b.T)).T  # b's shape, not its layout
        ops.gemm(True, True, 1.0, cp.asarray(a), strided_b, 0.0, cp.empty((4, 5), dtype=np.float32))
