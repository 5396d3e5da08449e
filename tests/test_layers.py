"""Layers: gradients against float64 central differences, Table 1 counts, the rank-one identity,
thread-count independence and input validation."""
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import numerical_grad

import engine
from engine import (Conv2d, Dropout, Flatten, Flattened, Horizontal, Lateral, Linear, MaxPool2d, ReLU,
                    Sequential, SoftmaxCrossEntropy, Vertical)


def check_gradients(layer, x, rng, backend, reseed=None, rtol=1e-6, atol=1e-8):
    """Compare layer.backward on `backend` with central differences of L = <forward(x), R>, all in float64.

    The differences perturb host copies of x and of the parameters, loaded into the layer
    before every evaluation, so they work the same on every backend.
    """
    backend.to(layer.astype(np.float64))
    x = x.astype(np.float64)
    if reseed:
        reseed(layer)
    y = backend.get(layer.forward(backend.put(x)))
    r = rng.standard_normal(y.shape)
    dx = backend.get(layer.backward(backend.put(r)))
    grads = {k: backend.get(v).copy() for k, v in layer.grads.items()}
    params = {k: backend.get(v).copy() for k, v in layer.params.items()}

    def loss():
        if reseed:
            reseed(layer)
        layer.load_params(params)
        return float((backend.get(layer.forward(backend.put(x))) * r).sum())

    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=rtol, atol=atol, err_msg="input gradient")
    for name, p in params.items():
        np.testing.assert_allclose(grads[name], numerical_grad(loss, p), rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {name}")
    return y


def away_from_zero(rng, shape):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.05, 0.5, x)


@pytest.mark.parametrize("make,shape", [
    (lambda r: Conv2d(3, 4, 3, padding=1, rng=r), (2, 3, 5, 4)),
    (lambda r: Conv2d(2, 3, 3, stride=2, padding=2, rng=r), (1, 2, 6, 7)),
    (lambda r: Conv2d(1, 2, 1, rng=r), (2, 1, 1, 1)),
    (lambda r: Lateral(5, 3, rng=r), (2, 5, 3, 2)),
    (lambda r: Lateral(1, 1, rng=r), (1, 1, 1, 1)),
    (lambda r: Vertical(3, 3, "full", rng=r), (2, 3, 4, 5)),
    (lambda r: Vertical(2, 5, "full", rng=r), (1, 2, 2, 3)),
    (lambda r: Vertical(2, 3, "same", rng=r), (2, 2, 4, 3)),
    (lambda r: Vertical(2, 2, "valid", rng=r), (1, 2, 5, 2)),
    (lambda r: Horizontal(3, 3, "full", rng=r), (2, 3, 5, 4)),
    (lambda r: Horizontal(2, 4, "same", rng=r), (1, 2, 3, 6)),
    (lambda r: Horizontal(2, 3, (-1, 1), rng=r), (1, 2, 2, 5)),
    (lambda r: Flattened(3, 4, 3, rng=r), (2, 3, 5, 4)),
    (lambda r: Flattened(2, 3, 3, stages=1, rng=r), (1, 2, 4, 4)),
    (lambda r: Flattened(2, 2, 3, stages=3, rng=r), (1, 2, 4, 5)),
    (lambda r: MaxPool2d(3, 2), (2, 2, 7, 6)),
    (lambda r: MaxPool2d(2, 2, ceil_mode=True), (1, 2, 5, 5)),
    (lambda r: Linear(6, 4, rng=r), (3, 6)),
    (lambda r: Flatten(), (2, 3, 2, 2)),
    (lambda r: ReLU(), (2, 3, 4, 4)),
])
def test_layer_gradients(make, shape, rng, backend):
    check_gradients(make(rng), away_from_zero(rng, shape), rng, backend)


def test_sequential_and_dropout_gradients(rng, backend):
    model = Sequential(Conv2d(2, 3, 3, padding=1, rng=rng), ReLU(), Dropout(0.3, rng=5), MaxPool2d(2),
                       Flatten(), Linear(12, 2, rng=rng))

    def reseed(m):  # the same dropout mask at every evaluation
        m[2].rng = np.random.default_rng(7)

    y = check_gradients(model, away_from_zero(rng, (2, 2, 4, 4)), rng, backend, reseed=reseed)
    assert y.shape == (2, 2)


def test_dropout_train_and_eval(rng, backend):
    layer = Dropout(0.25, rng=3)
    x = backend.put(np.ones((64, 100), np.float32))
    y = backend.get(layer.forward(x)).copy()
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(backend.get(layer.backward(x)), y)
    again = backend.get(Dropout(0.25, rng=3).forward(x))
    np.testing.assert_array_equal(again, y)  # seeded: reproducible
    other = backend.get(Dropout(0.25, rng=4).forward(x))
    assert (other != y).any()  # another seed, another mask
    layer.eval()
    np.testing.assert_array_equal(backend.get(layer.forward(x)), backend.get(x))


def test_softmax_cross_entropy(rng, backend):
    logits = rng.standard_normal((5, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2])
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn(backend.put(logits), backend.put(labels))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.isclose(loss, -np.log(p[np.arange(5), labels]).mean())
    g = backend.get(loss_fn.backward())
    num = numerical_grad(lambda: SoftmaxCrossEntropy()(backend.put(logits), backend.put(labels)), logits)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)
    big = np.array([[1000.0, 0.0], [-1000.0, 1000.0]], dtype=np.float32)
    assert np.isfinite(SoftmaxCrossEntropy()(big, np.array([1, 0])))
    with pytest.raises(ValueError, match="labels must lie"):
        loss_fn(logits, np.array([0, 4, 1, 1, 2]))


# ----------------------------------------------------------------------------- Flattened

def weight_count(layer):
    return sum(v.size for k, v in layer.params.items() if k.endswith("weight"))


def test_table1_weight_counts():
    assert weight_count(Conv2d(3, 96, 5)) == 7_200
    assert weight_count(Conv2d(96, 128, 5)) == 307_200
    assert weight_count(Conv2d(128, 256, 5)) == 819_200
    assert weight_count(Flattened(96, 128, 5)) == 30_912
    assert weight_count(Flattened(128, 256, 5)) == 102_144


@pytest.mark.parametrize("k", [3, 4, 5])
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("hw", [(1, 1), (5, 8), (12, 7)])
def test_flattened_output_size_matches_baseline(k, stages, hw, rng):
    x = rng.standard_normal((1, 2, *hw)).astype(np.float32)
    base = Conv2d(2, 3, k, padding=k // 2)
    assert Flattened(2, 3, k, stages=stages).forward(x).shape == base.output_shape(x.shape)


def test_rank_one_identity(rng, backend):
    """L -> V -> H with filters from alpha, beta, gamma equals Conv2d with alpha x beta x gamma."""
    C, F, k, H, W = 3, 4, 3, 5, 6
    alpha = rng.standard_normal((F, C))
    beta = rng.standard_normal((F, k))
    gamma = rng.standard_normal((F, k))
    stage = Sequential(Lateral(C, F), Vertical(F, k, "full"), Horizontal(F, k, "full")).astype(np.float64)
    stage.load_params({"0.weight": alpha, "0.bias": np.zeros(F), "1.weight": beta, "1.bias": np.zeros(F),
                       "2.weight": gamma, "2.bias": np.zeros(F)})
    conv = Conv2d(C, F, k, padding=k - 1, dtype=np.float64)
    conv.load_params({"weight": np.einsum("fc,fy,fx->fcyx", alpha, beta, gamma), "bias": np.zeros(F)})
    backend.to(stage), backend.to(conv)
    x = backend.put(rng.standard_normal((2, C, H, W)))
    y1, y2 = backend.get(stage.forward(x)), backend.get(conv.forward(x))
    np.testing.assert_allclose(y1, y2, rtol=1e-10, atol=1e-10)
    dy = backend.put(rng.standard_normal(y1.shape))
    np.testing.assert_allclose(backend.get(stage.backward(dy)), backend.get(conv.backward(dy)), rtol=1e-10, atol=1e-10)
    g = {k: backend.get(v) for k, v in stage.grads.items()}
    dW = backend.get(conv.grads["weight"])
    # project the 3D filter gradient back onto each 1D factor (chain rule through the outer product)
    np.testing.assert_allclose(g["0.weight"], np.einsum("fcyx,fy,fx->fc", dW, beta, gamma), rtol=1e-9)
    np.testing.assert_allclose(g["1.weight"], np.einsum("fcyx,fc,fx->fy", dW, alpha, gamma), rtol=1e-9)
    np.testing.assert_allclose(g["2.weight"], np.einsum("fcyx,fc,fy->fx", dW, alpha, beta), rtol=1e-9)
    np.testing.assert_allclose(g["2.bias"], backend.get(conv.grads["bias"]), rtol=1e-10)


# ----------------------------------------------------------------------------- the 'delta' initialization

@pytest.mark.parametrize("k", [3, 5])
def test_delta_init_makes_a_flattened_layer_the_product_of_its_laterals(k, rng):
    """V and H start as identities, so each stage is its lateral alone: y = L2 (L1 x) pixel by pixel."""
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    layer = Flattened(3, 4, k, init="delta", rng=0)
    p = layer.params
    for name in ("stage1.vertical", "stage1.horizontal", "stage2.vertical", "stage2.horizontal"):
        centre = np.zeros(k)
        centre[k // 2] = 1.0
        np.testing.assert_array_equal(p[f"{name}.weight"], np.tile(centre, (p[f"{name}.weight"].shape[0], 1)))
    l1, l2 = p["stage1.lateral.weight"].astype(np.float64), p["stage2.lateral.weight"].astype(np.float64)
    want = np.einsum("gf,fc,nchw->nghw", l2, l1, x.astype(np.float64))
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c_in, c_out", [(3, 5), (6, 4), (4, 4)])
def test_delta_lateral_is_the_orthogonal_matrix_nearest_its_glorot_draw(c_in, c_out):
    import scipy.linalg
    draw = Lateral(c_in, c_out, init="glorot", rng=7).params["weight"].astype(np.float64)
    w = Lateral(c_in, c_out, init="delta", rng=7).params["weight"].astype(np.float64)
    small = min(c_in, c_out)
    gram = w.T @ w if c_out >= c_in else w @ w.T
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-6)  # orthonormal columns (or rows)
    if c_in == c_out:  # the polar factor of the draw: the nearest orthogonal matrix
        np.testing.assert_allclose(w, scipy.linalg.polar(draw)[0], atol=1e-6)
    else:  # nearest among matrices with orthonormal columns (rows): no other such matrix is closer
        others = [np.linalg.qr(np.random.default_rng(s).standard_normal((max(c_in, c_out), small)))[0]
                  for s in range(20)]
        others = [q if c_out >= c_in else q.T for q in others]
        assert all(np.linalg.norm(w - draw) <= np.linalg.norm(q - draw) + 1e-9 for q in others)


def test_delta_init_keeps_the_papers_draw_elsewhere_and_is_refused_where_it_has_no_meaning():
    from models.paper import build
    auto, delta = build("flattened", init="auto", seed=5), build("flattened", init="delta", seed=5)
    for name in ("conv1.weight", "conv1.bias", "fc1.weight", "out.weight"):
        np.testing.assert_array_equal(auto.params[name], delta.params[name])
    assert auto.rng.random() == delta.rng.random()  # the same numbers drawn: the same dropout masks follow
    assert not np.array_equal(auto.params["conv2.stage1.lateral.weight"], delta.params["conv2.stage1.lateral.weight"])
    with pytest.raises(ValueError, match="unknown init 'delta'"):
        Conv2d(2, 3, 3, init="delta")
    with pytest.raises(ValueError, match="unknown init 'delta'"):
        Linear(2, 3, init="delta")


# ----------------------------------------------------------------------------- threads

def _run_all(rng_seed):
    rng = np.random.default_rng(rng_seed)
    model = Sequential(Flattened(3, 8, 5, rng=rng), ReLU(), MaxPool2d(3, 2), Conv2d(8, 6, 3, padding=1, rng=rng),
                       Dropout(0.2, rng=1), Flatten(), Linear(6 * 7 * 7, 5, rng=rng))
    x = np.random.default_rng(9).standard_normal((4, 3, 16, 16)).astype(np.float32)
    y = model.forward(x)
    dx = model.backward(np.ones_like(y))
    return [y, dx] + [g.copy() for g in model.grads.values()]


@pytest.mark.skipif(not engine.openmp_enabled(), reason="kernels built without OpenMP")
def test_two_threads_equal_one(threads, monkeypatch):
    assert engine._kernels.testing_threads_seen(2) == 2, "OpenMP did not start a second thread"
    monkeypatch.setattr(engine.runtime.threads, "SERIAL_BELOW", 0)  # small test shapes must still run in parallel
    engine.set_num_threads(1)
    one = _run_all(0)
    engine.set_num_threads(2)
    two = _run_all(0)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_thread_count_follows_omp_num_threads():
    code = "import engine; print(engine.get_num_threads(), engine._kernels.testing_threads_seen(engine.get_num_threads()))"
    for n in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        expect = n if engine.openmp_enabled() else 1
        assert out.stdout.split() == [str(expect), str(expect)]


def test_set_num_threads(threads):
    engine.set_num_threads(1)
    assert engine.get_num_threads() == 1
    with pytest.raises(ValueError):
        engine.set_num_threads(0)


def test_compiled_extension_is_imported():
    path = engine.kernels_path()
    assert path.endswith((".so", ".pyd")), path
    if os.environ.get("FLATNET_REQUIRE_OPENMP") == "1":
        assert engine.openmp_enabled(), "CI requires the kernels to be built with OpenMP"


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("layer,good", [
    (Conv2d(3, 4, 3), (2, 3, 5, 5)), (Lateral(3, 4), (2, 3, 5, 5)), (Vertical(3, 3), (2, 3, 5, 5)),
    (Horizontal(3, 3), (2, 3, 5, 5)), (Flattened(3, 4, 3), (2, 3, 5, 5)), (Linear(3, 2), (2, 3)),
])
def test_bad_input_is_refused_clearly(layer, good, rng):
    name = type(layer).__name__
    bad_rank = rng.standard_normal(good[1:]).astype(np.float32)
    with pytest.raises(ValueError, match=rf"{name}.*expected input of shape"):
        layer.forward(bad_rank)
    wrong_c = rng.standard_normal((good[0], good[1] + 1, *good[2:])).astype(np.float32)
    with pytest.raises(ValueError, match=rf"{name}.*{good[1]}"):
        layer.forward(wrong_c)
    with pytest.raises(TypeError, match=rf"{name}.*floating-point"):
        layer.forward(np.ones(good, dtype=np.int64))
    with pytest.raises(RuntimeError, match="before forward"):
        type(layer)(**layer.config()).backward(np.ones(good, np.float32))
    y = layer.forward(rng.standard_normal(good).astype(np.float32))
    with pytest.raises(ValueError, match=rf"{name}.*does not match the last forward"):
        layer.backward(np.ones((y.shape[0] + 1, *y.shape[1:]), np.float32))


def test_noncontiguous_and_float64_input_are_converted(rng):
    layer = Flattened(3, 4, 3, rng=rng)
    big = rng.standard_normal((2, 3, 10, 12))
    view = big[:, :, ::2, 1::2]  # non-contiguous float64
    y = layer.forward(view).copy()  # outputs are layer-owned buffers: keep a copy
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, layer.forward(np.ascontiguousarray(view).astype(np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        Sequential(ReLU(), check_finite=True).forward(np.array([[np.nan]]))


def test_params_and_grads_dicts(rng):
    f = Flattened(4, 6, 3, rng=rng)
    names = list(f.params)
    assert names[:3] == ["stage1.vertical.weight", "stage1.vertical.bias", "stage1.horizontal.weight"]
    assert set(f.grads) == set(names)
    y = f.forward(rng.standard_normal((2, 4, 5, 5)).astype(np.float32))
    f.backward(np.ones_like(y))
    assert all(np.any(g != 0) for g in f.grads.values())
    f.params["stage1.lateral.weight"][...] = 0  # params are live views: in-place updates reach the layer
    assert np.all(f[2].params["weight"] == 0)


@pytest.mark.parametrize("first", [lambda r: Conv2d(2, 3, 3, padding=1, rng=r), lambda r: Flattened(2, 3, 3, rng=r),
                                   lambda r: Lateral(2, 3, rng=r)])
def test_first_layer_can_skip_the_input_gradient(first, rng):
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    grads = []
    for input_grad in (True, False):
        net = Sequential(first(np.random.default_rng(1)), ReLU(), Flatten())
        net.input_grad = input_grad
        y = net.forward(x)
        dx = net.backward(np.ones_like(y))
        assert (dx is None) == (not input_grad)
        grads.append({k: v.copy() for k, v in net.grads.items()})
    for k in grads[0]:
        np.testing.assert_array_equal(grads[0][k], grads[1][k])
