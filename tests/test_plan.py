"""The compiled inference path (engine.plan) against independent float64 references.

The references (tests/reference.py: scipy.signal correlations, plain-loop pooling,
numpy einsum/matmul) share no code with the engine. The small networks below hit the
compiled kernels' edges: filter counts that are not a multiple of the packed panel
width, position counts that are not a multiple of the micro-kernel's rows, channel
counts with a scalar remainder after whole SIMD vectors, every 1D padding mode
including crops, clipped pooling windows, and the layout changes (channels-last
inside, NCHW order for Linear weights and for outputs).
"""
import numpy as np
import pytest

import engine
from engine import (Conv2d, Dropout, Flatten, Flattened, Horizontal, Lateral, Layer, Linear, MaxPool2d, ReLU,
                    Sequential, Vertical)
from engine.model import Model
from engine.lowering import leaves as _leaves
from engine.plan import UnsupportedNetwork, compile_network
from models.paper import build
from reference import conv1d_ref, conv2d_np, conv2d_ref, maxpool_ref


def ref_forward(net, x):
    """Eval-mode forward of an engine network in float64, from the reference functions only."""
    y = np.asarray(x, np.float64)
    for _, layer in _leaves(net):  # the layers in order (the maths below is the reference's own)
        p = {k: np.asarray(v, np.float64) for k, v in layer.params.items()}
        if isinstance(layer, Conv2d):
            y = conv2d_np(y, p["weight"], p["bias"], layer.stride, layer.padding)
        elif isinstance(layer, Lateral):
            y = np.einsum("fc,nchw->nfhw", p["weight"], y) + p["bias"][None, :, None, None]
        elif isinstance(layer, (Vertical, Horizontal)):
            y = conv1d_ref(y, p["weight"], p["bias"], 2 if isinstance(layer, Vertical) else 3,
                           layer.before, layer.after)
        elif isinstance(layer, MaxPool2d):
            _, _, ho, wo = layer.output_shape(y.shape)
            y = maxpool_ref(y, layer.k, layer.stride, ho, wo)[0]
        elif isinstance(layer, ReLU):
            y = np.maximum(y, 0.0)
        elif isinstance(layer, Flatten):
            y = y.reshape(len(y), -1)
        elif isinstance(layer, Linear):
            y = y @ p["weight"].T + p["bias"]
        elif not isinstance(layer, Dropout):
            raise TypeError(type(layer))
    return y


def randomize(net, rng):
    """Non-zero biases everywhere (several layers start with zero biases)."""
    for name, v in net.params.items():
        if name.endswith("bias"):
            v[...] = rng.uniform(-0.5, 0.5, v.shape)
    return net.eval()


def check(net, in_shape, rng, batch=3, threads=2):
    randomize(net, rng)
    x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
    got = compile_network(net, in_shape)(x, num_threads=threads)
    want = ref_forward(net, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_conv2d_np_reference_agrees_with_scipy_reference(rng):
    x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    np.testing.assert_allclose(conv2d_np(x, w, b, 2, 1), conv2d_ref(x, w, b, 2, 1), rtol=1e-12, atol=1e-12)


SMALL = {
    # convolutions: F below / above the panel width, P not a multiple of the tile rows, stride, 1x1
    "conv-stride": (lambda r: Sequential(Conv2d(3, 5, 3, stride=2, padding=1, rng=r)), (3, 9, 7)),
    "conv-33-filters": (lambda r: Sequential(Conv2d(5, 33, 5, padding=2, rng=r), ReLU()), (5, 6, 11)),
    "conv-no-padding": (lambda r: Sequential(Conv2d(2, 7, 4, rng=r)), (2, 5, 9)),
    "conv-1x1": (lambda r: Sequential(Conv2d(4, 6, 1, rng=r)), (4, 3, 5)),
    "conv-then-conv": (lambda r: Sequential(Conv2d(3, 20, 3, padding=1, rng=r), ReLU(),
                                            Conv2d(20, 9, 3, stride=2, rng=r)), (3, 8, 8)),
    "lateral-odd": (lambda r: Sequential(Lateral(17, 40, rng=r)), (17, 5, 3)),
    # 1D convolutions: channels with a scalar remainder, every mode, unequal taps, alone
    "vh-full": (lambda r: Sequential(Vertical(19, 5, "full", rng=r), Horizontal(19, 5, "full", rng=r)), (19, 4, 6)),
    "vh-same-even": (lambda r: Sequential(Vertical(21, 4, "same", rng=r), Horizontal(21, 4, "same", rng=r)),
                     (21, 5, 7)),
    "vh-valid": (lambda r: Sequential(Vertical(32, 3, "valid", rng=r), Horizontal(32, 3, "valid", rng=r), ReLU()),
                 (32, 6, 5)),
    "vh-crop-and-pad": (lambda r: Sequential(Vertical(7, 3, (-1, 2), rng=r), Horizontal(7, 5, (6, -1), rng=r)),
                        (7, 6, 8)),
    "vh-unequal-taps": (lambda r: Sequential(Vertical(16, 2, "full", rng=r), Horizontal(16, 7, "same", rng=r)),
                        (16, 5, 9)),
    "vertical-alone": (lambda r: Sequential(Vertical(5, 3, "full", rng=r), ReLU()), (5, 4, 4)),
    "horizontal-alone": (lambda r: Sequential(Horizontal(5, 3, "valid", rng=r)), (5, 4, 6)),
    "horizontal-then-vertical": (lambda r: Sequential(Horizontal(6, 3, "full", rng=r), Vertical(6, 3, "same", rng=r)),
                                 (6, 3, 4)),
    "flattened-3-stages": (lambda r: Sequential(Flattened(6, 10, 3, stages=3, rng=r)), (6, 7, 5)),
    # pooling: ceil mode with clipped windows, floor mode, non-overlapping
    "pool-ceil": (lambda r: Sequential(MaxPool2d(3, 2, ceil_mode=True)), (5, 9, 8)),
    "pool-floor": (lambda r: Sequential(MaxPool2d(2)), (18, 7, 9)),
    "pool-3-3": (lambda r: Sequential(MaxPool2d(3, 3, ceil_mode=True), ReLU()), (3, 10, 10)),
    # ReLU alone / twice; Linear on channels-last activations (weights permuted); flat outputs
    "relu-first": (lambda r: Sequential(ReLU(), ReLU(), Lateral(3, 4, rng=r)), (3, 2, 5)),
    "conv-flatten-linear": (lambda r: Sequential(Conv2d(2, 3, 3, padding=1, rng=r), ReLU(), Dropout(0.5),
                                                 Flatten(), Linear(60, 7, rng=r), ReLU(), Linear(7, 2, rng=r)),
                            (2, 4, 5)),
    "flatten-last": (lambda r: Sequential(Lateral(3, 5, rng=r), Flatten()), (3, 2, 3)),
    "linear-on-image": (lambda r: Sequential(Flatten(), Linear(12, 3, rng=r)), (3, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_networks_match_reference(name, rng):
    make, in_shape = SMALL[name]
    check(make(rng), in_shape, rng)


@pytest.mark.parametrize("model,in_shape,first", [("flattened", (3, 32, 32), False), ("baseline", (1, 28, 28), False),
                                                  ("flattened", (1, 28, 28), False), ("flattened", (3, 32, 32), True)])
def test_paper_models_match_reference(model, in_shape, first, rng):
    check(build(model, in_shape, 10, seed=3, flatten_first=first), in_shape, rng, batch=2)


def test_same_results_for_every_thread_count_and_batch_split(rng):
    """Each output element is summed in one fixed order: thread count and batch mode change nothing."""
    net = randomize(build("flattened", (3, 32, 32), 10, seed=1), rng)
    plan = compile_network(net)
    x = rng.standard_normal((7, 3, 32, 32)).astype(np.float32)
    one = plan(x, num_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(plan(x, num_threads=threads), one)        # whole images per thread
        np.testing.assert_array_equal(plan(x[:2], num_threads=threads), one[:2])  # threads share each op
        if engine.openmp_enabled():
            assert plan.last_threads == threads
    np.testing.assert_array_equal(plan(x[3], num_threads=2), one[3:4])  # one (C, H, W) image


def test_matches_layer_by_layer_forward(rng):
    net = randomize(build("flattened", (3, 32, 32), 10, seed=2), rng)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(compile_network(net)(x), net.forward(x), rtol=1e-4, atol=1e-5)


def test_softmax_op_matches_numpy(rng):
    net = randomize(build("flattened", (3, 32, 32), 10), rng)
    x = 5 * rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    logits = ref_forward(net, x)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    for threads in (1, 2):
        probs = compile_network(net, softmax=True)(x, num_threads=threads)
        np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(UnsupportedNetwork, match="flat"):
        compile_network(Sequential(Lateral(3, 4)), (3, 2, 2), softmax=True)


def test_plan_keeps_weights_of_compile_time(rng):
    net = randomize(build("flattened", (3, 32, 32), 10), rng)
    plan = compile_network(net)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    before = plan(x)
    net.params["out.bias"][...] += 1.0
    np.testing.assert_array_equal(plan(x), before)
    np.testing.assert_allclose(compile_network(net)(x), before + 1.0, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused(rng):
    plan = compile_network(build("flattened", (3, 32, 32), 10))
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\)"):
        plan(np.zeros((2, 32, 32, 3), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((3, 3, 32, 32), np.float32)
        x[2, 1, 5, 7] = bad
        with pytest.raises(ValueError, match="NaN"):
            plan(x)
    with pytest.raises(TypeError, match="floating"):
        plan(np.zeros((1, 3, 32, 32), np.int64))
    with pytest.raises(ValueError, match="empty"):
        plan(np.zeros((0, 3, 32, 32), np.float32))
    np.testing.assert_allclose(plan(np.ones((1, 3, 32, 32))), plan(np.ones((1, 3, 32, 32), np.float32)))


class Scale(Layer):
    def forward(self, x):
        return 2 * x

    def output_shape(self, s):
        return s


def test_unsupported_networks_are_refused_and_models_fall_back(rng):
    with pytest.raises(UnsupportedNetwork, match="Scale"):
        compile_network(Sequential(Lateral(3, 4), Scale()), (3, 4, 4))
    with pytest.raises(UnsupportedNetwork, match="in_shape"):
        compile_network(Sequential(Lateral(3, 4)))
    with pytest.raises(UnsupportedNetwork, match="channels"):
        compile_network(Sequential(Lateral(3, 4)), (2, 4, 4))
    net = Sequential(Flatten(), Linear(12, 3), Scale())
    meta = dict(classes=["a", "b", "c"], input_shape=[3, 2, 2], preprocessing={})
    model = Model(net, meta)
    assert model.plan is None and "Scale" in model.why_not_compiled
    assert Model(Sequential(Flatten(), Linear(12, 3)), meta, compiled=False).why_not_compiled == "compiled=False"
    x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, preprocessed=True),
                               engine.softmax(2 * ref_forward(Sequential(*net.layers[:2]), x)), rtol=1e-5)


def test_profile_names_every_op(rng):
    plan = compile_network(build("flattened", (3, 32, 32), 10))
    prof = plan.profile(rng.standard_normal((1, 3, 32, 32)), repeat=3, num_threads=2)
    names = [n for n, _ in prof]
    assert names[0] == "(to channels-last)" and "conv1+relu1" in names and names[-1] == "out"
    assert "conv2.stage1.vertical+horizontal" in names and "conv2.stage2.lateral+relu2" in names
    assert len(prof) == len(plan.ops) and all(t >= 0 for _, t in prof)


def test_copies_own_their_weights_and_pickling_is_refused(rng):
    """The op table holds raw pointers: a copy must point into its own arrays, not the original's."""
    import copy
    import gc
    import pickle
    net = randomize(build("flattened", (3, 32, 32), 10), rng)
    plan = compile_network(net, softmax=True)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    want = plan(x)
    twin, shallow = copy.deepcopy(plan), copy.copy(plan)
    for a in plan._keep:
        a[...] = np.nan  # the original's weights, overwritten: the copies must not see it
    del plan
    gc.collect()
    np.testing.assert_array_equal(twin(x), want)
    np.testing.assert_array_equal(shallow(x), want)
    meta = dict(classes=[str(i) for i in range(10)], input_shape=[3, 32, 32], preprocessing={})
    model = Model(net, meta)
    np.testing.assert_array_equal(copy.deepcopy(model).predict(x, preprocessed=True),
                                  model.predict(x, preprocessed=True))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(compile_network(net))


@pytest.mark.parametrize("tile", ["winograd2", "winograd3", "winograd4"])
@pytest.mark.parametrize("k,pad,size,batch", [(5, 2, (11, 13), 1), (5, 0, (12, 9), 5), (3, 1, (7, 10), 2),
                                              (5, 4, (6, 6), 3)])
def test_winograd_convolutions_match_the_float64_reference(tile, k, pad, size, batch, rng, monkeypatch):
    """Winograd convolutions (lowering.conv_tile) in the plan: odd sizes not divisible by the tile, 'same' and 'valid'
    padding, padding k - 1, channels off the vector width, one image (threads share each op) and several."""
    monkeypatch.setenv("FLATNET_CONV", tile)
    net = Sequential(Conv2d(3, 17, 3, padding=1, rng=rng), ReLU(), Conv2d(17, 19, k, padding=pad, rng=rng), ReLU(),
                     Conv2d(19, 16, k, padding=pad, rng=rng))
    in_shape = (3, *size)
    plan = compile_network(net, in_shape)
    from engine.lowering import COL, CKIND
    assert list(plan.ops[plan.ops[:, COL["kind"]] == CKIND["CONV"], COL["tile"]]) == [0] + [int(tile[-1])] * 2
    check(net, in_shape, rng, batch=batch)
    x = rng.standard_normal((5, *in_shape)).astype(np.float32)
    one = plan(x, num_threads=1)
    for threads in (2, 3):  # whole images per thread, and threads sharing each op of one image
        np.testing.assert_array_equal(plan(x, num_threads=threads), one)
        np.testing.assert_array_equal(plan(x[:1], num_threads=threads), one[:1])


def test_the_baseline_model_runs_its_later_convolutions_by_winograd(rng, monkeypatch):
    monkeypatch.delenv("FLATNET_CONV", raising=False)
    net = build("baseline", (3, 32, 32), 10, seed=3)
    from engine.lowering import COL, CKIND
    tiles = compile_network(net, (3, 32, 32)).ops
    assert list(tiles[tiles[:, COL["kind"]] == CKIND["CONV"], COL["tile"]]) == [0, 4, 4]
    check(net, (3, 32, 32), rng, batch=2)
