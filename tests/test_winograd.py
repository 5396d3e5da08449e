"""engine.winograd against scipy.signal's direct correlation in float64, and the rounding error of each tile
size in float32 against float64 direct convolution."""
import numpy as np
import pytest
from scipy import signal

from engine.winograd import conv2d, direct_conv2d, multiplications, transforms


def scipy_conv2d(x, w, padding):
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    return np.stack([np.stack([sum(signal.correlate2d(xp[i, c], w[k, c], mode="valid") for c in range(x.shape[1]))
                               for k in range(w.shape[0])]) for i in range(x.shape[0])])


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (2, 5), (3, 5), (4, 5), (6, 3)])
def test_one_dimensional_transforms_compute_the_correlation_exactly(m, r):
    at, g, bt = transforms(m, r)
    n = m + r - 1
    assert at.shape == (m, n) and g.shape == (n, r) and bt.shape == (n, n)
    rng = np.random.default_rng(m * 10 + r)
    for _ in range(5):
        d, f = rng.integers(-9, 10, n).astype(float), rng.integers(-9, 10, r).astype(float)
        expected = [sum(f[k] * d[i + k] for k in range(r)) for i in range(m)]
        np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), expected, atol=1e-9)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("shape,k,padding", [
    ((1, 3, 11, 13), 5, 2),    # batch 1, odd sizes, 'same' padding, sizes not divisible by the tile
    ((2, 17, 8, 8), 3, 0),     # 'valid', channel counts off the vector width
    ((2, 4, 5, 9), 2, 0),      # an output one row high
    ((1, 2, 16, 16), 6, 2),
])
def test_winograd_equals_direct_correlation_in_float64(m, shape, k, padding):
    rng = np.random.default_rng(m)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((k, shape[1], 5, 5))
    expected = scipy_conv2d(x, w, padding)
    got = conv2d(x, w, m, padding, dtype=np.float64)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(direct_conv2d(x, w, padding), expected, atol=1e-10 * np.abs(expected).max())


def test_3x3_filters_and_the_multiplication_counts():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 3, 9, 10)), rng.standard_normal((4, 3, 3, 3))
    np.testing.assert_allclose(conv2d(x, w, 4, 1, np.float64), scipy_conv2d(x, w, 1), atol=1e-9)
    assert multiplications(2, 5) == 9 and multiplications(4, 5) == 4  # 36/4 and 64/16, against 25 directly


def test_float32_error_grows_with_the_tile():
    """The rounding error of F(m, 5) in float32 against float64 grows with m, and F(2, 5) stays within a small
    multiple of float32 direct convolution's own error (random data; trained data: bench winograd)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((16, 32, 5, 5)) * 0.05).astype(np.float32)
    exact = direct_conv2d(x, w, 2)

    def err(y):
        return float(np.sqrt(np.mean((y - exact) ** 2)) / np.sqrt(np.mean(exact ** 2)))
    direct = err(direct_conv2d(x, w, 2, np.float32))
    wino = [err(conv2d(x, w, m, 2)) for m in (2, 3, 4)]
    assert wino[0] < wino[1] < wino[2]
    assert direct < wino[0] < 10 * direct and wino[2] < 1e-4


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        conv2d(np.zeros((1, 3, 8, 8)), np.zeros((2, 4, 5, 5)), 2)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(np.zeros((1, 3, 4, 4)), np.zeros((2, 3, 5, 5)), 2)
    with pytest.raises(ValueError, match="finite points"):
        transforms(9, 5)


def test_bench_winograd_reports_every_layer_pass_and_tile_with_errors_above_direct():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "engine.bench", "winograd", "--batch", "2", "--tiles", "2,4"],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("conv")]
    assert [(row[0], row[1], row[2]) for row in rows[:3]] == [
        ("conv2", "forward", "direct"), ("conv2", "forward", "F(2x2,5x5)"), ("conv2", "forward", "F(4x4,5x5)")]
    assert {(row[0], row[1]) for row in rows} == {(c, p) for c in ("conv2", "conv3")
                                                  for p in ("forward", "input-grad", "weight-grad")}
    for i in range(0, len(rows), 3):
        direct, f2, f4 = (float(row[-2]) for row in rows[i:i + 3])
        assert 0 < direct < f2 <= f4 < 1e-4  # fewer multiplications, more rounding; all far below float32 noise


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("shape,k,padding,r", [((2, 3, 11, 13), 5, 2, 5), ((1, 17, 8, 9), 3, 0, 5),
                                               ((2, 4, 7, 10), 6, 1, 3)])
def test_weight_gradient_in_the_transformed_domain_equals_finite_differences_and_the_direct_one(m, shape, k, padding,
                                                                                                 r):
    from engine.winograd import direct_weight_grad, weight_grad
    rng = np.random.default_rng(m + r)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((k, shape[1], r, r))
    dy = rng.standard_normal(direct_conv2d(x, w, padding).shape)
    got = weight_grad(x, dy, m, r, padding, dtype=np.float64)
    np.testing.assert_allclose(got, direct_weight_grad(x, dy, r, padding), atol=1e-9 * np.abs(got).max())
    # d(sum dy * conv(x, w)) / dw along a random direction, by central differences of the float64 forward
    d, h = rng.standard_normal(w.shape), 1e-3
    numeric = (np.sum(dy * scipy_conv2d(x, w + h * d, padding)) - np.sum(dy * scipy_conv2d(x, w - h * d, padding))) / (
        2 * h)
    assert float(np.sum(got * d)) == pytest.approx(numeric, rel=1e-8)
