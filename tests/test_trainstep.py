"""The compiled training step (engine.trainstep, engine/_train.h) against the layer path and float64 references.

The layer path (LayerStep) is the engine's reference step; it is tested on its own
against plain-loop and scipy references in test_layers.py / test_kernels.py. Here the
compiled step must give the same loss, logits, gradients, updated weights and momentum
buffers on the paper's models and on small networks that hit the kernels' edges, its
gradients must match float64 finite differences of an independent reference forward
(test_plan.ref_forward), and its results must not depend on the thread count.
"""
import copy

import numpy as np
import pytest

import engine
from engine import Conv2d, Dropout, Flatten, Flattened, Horizontal, Lateral, Linear, MaxPool2d, ReLU, Sequential, \
    Vertical
from engine._kernels import train_wgrad_slices
from engine.lowering import CKIND, COL, UnsupportedNetwork, leaves
from engine.trainer import Trainer
from engine.trainstep import CompiledStep, LayerStep, make_step
from models.paper import build
from test_plan import SMALL, ref_forward


def assert_close(got, want, what, rtol=2e-4):
    scale = max(1e-6, float(np.abs(want).max()))
    err = float(np.abs(np.asarray(got, np.float64) - want).max()) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def routing_differences(step, twin, n):
    """How many max-pooling argmaxes and ReLU on/off decisions differ between the last forwards of the
    compiled step and the layer network `twin`. Where a float32 rounding difference lands on the other
    side of such a decision the two gradients legitimately differ at that position (a kink)."""
    kinds = step.table[:, COL["kind"]]
    pools = [layer for _, layer in leaves(twin) if isinstance(layer, MaxPool2d)]
    relus = [layer for _, layer in leaves(twin) if isinstance(layer, ReLU)]
    pool_rows = [i for i in range(len(kinds)) if kinds[i] == CKIND["POOL"]]
    relu_rows = [i for i in range(len(kinds)) if step.table[i, COL["relu"]]]
    assert len(pools) == len(pool_rows) and len(relus) == len(relu_rows)
    differ = 0
    for row, layer in zip(pool_rows, pools):
        _, argmax = step.testing_saved(row, n)
        differ += int(np.sum(argmax.transpose(0, 3, 1, 2) != layer._argmax))
    order = [layer for _, layer in leaves(twin)]
    for row, layer in zip(relu_rows, relus):
        out, _ = step.testing_saved(row, n)
        if out is None:  # a convolution whose pooling ran in its forward: its ReLU decides only at the argmaxes
            pooled, argmax = step.testing_saved(row + 1, n)
            on = pooled.transpose(0, 3, 1, 2).reshape(n, pooled.shape[3], -1) > 0
            at = argmax.transpose(0, 3, 1, 2).reshape(on.shape)
            layer_on = np.take_along_axis(layer._y.reshape(*on.shape[:2], -1), at, axis=2) > 0
            after = order[order.index(pools[pool_rows.index(row + 1)]) + 1:][:1]  # a dropout folded into it
            kept = (after[0]._mask.reshape(on.shape) > 0 if after and isinstance(after[0], Dropout)
                    and after[0]._mask is not None else np.ones(on.shape, bool))
            differ += int(np.sum((on != layer_on) & kept))
            continue
        on = out > 0
        on = on.transpose(0, 3, 1, 2) if on.ndim == 4 and on.shape[1:] != layer._y.shape[1:] else on
        differ += int(np.sum(on.reshape(layer._y.shape) != (layer._y > 0)))
    return differ


def run_both(net, in_shape, rng, batch=4, steps=2, lr=0.05, weight_decay=1e-3, dampening=None, nesterov=False):
    """`steps` SGD steps with the compiled and the layer step from the same weights; checks they agree.

    Inputs whose forward passes fall on different sides of a ReLU or pooling decision in the
    two paths (float32 rounding next to a kink, rare) are drawn again, up to three times."""
    n_out = net.output_shape((1, *in_shape))[1]
    for attempt in range(4):
        mine, twin = copy.deepcopy(net), copy.deepcopy(net)
        compiled, layers = CompiledStep(mine, in_shape, batch_size=batch), LayerStep(twin)
        vc, vl = {}, {}
        clean = True
        for s in range(steps):
            x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
            y = rng.integers(0, n_out, batch)
            lc, gc = compiled.step(x, y, lr, 0.9, weight_decay, dampening, vc, nesterov)
            ll, gl = layers.step(x, y, lr, 0.9, weight_decay, dampening, vl, nesterov)
            assert lc == pytest.approx(ll, rel=1e-5, abs=1e-6), f"loss of step {s}"
            assert_close(gc, gl, f"logits of step {s}")
            if routing_differences(compiled, twin, batch):
                clean = False
                break
        if clean:
            break
    assert clean, "every draw fell next to a kink"
    for name in twin.params:
        assert_close(mine.grads[name], twin.grads[name], f"gradient {name}")
        assert_close(mine.params[name], twin.params[name], f"weight {name}", rtol=1e-5)
        assert_close(vc[name], vl[name], f"velocity {name}")
    return compiled


def with_logits(net, in_shape, rng, classes=3):
    """`net` followed by Flatten and a Linear layer, so that it ends in logits."""
    n = int(np.prod(net.output_shape((1, *in_shape))[1:]))
    return Sequential(net, Flatten(), Linear(n, classes, rng=rng))


@pytest.mark.parametrize("model,in_shape", [("flattened", (3, 32, 32)), ("flattened", (1, 28, 28))])
def test_nesterov_steps_like_the_layer_path(model, in_shape, rng):
    net = build(model, in_shape, 10, seed=3)
    step = run_both(net, in_shape, rng, steps=3, dampening=0.0, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov momentum needs"):
        step.update({}, 0.1, 0.9, 0.0, None, nesterov=True)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_networks_step_like_the_layer_path(name, rng):
    make, in_shape = SMALL[name]
    run_both(with_logits(make(rng), in_shape, rng), in_shape, rng)


@pytest.mark.parametrize("model,in_shape,kw", [
    ("flattened", (3, 32, 32), {}), ("baseline", (3, 32, 32), {}), ("flattened", (1, 28, 28), {}),
    ("baseline", (1, 28, 28), {}), ("flattened", (3, 32, 32), dict(flatten_first=True)),
    ("flattened", (3, 32, 32), dict(stages=1)), ("flattened", (1, 28, 28), dict(stages=3)),
])
def test_paper_models_step_like_the_layer_path(model, in_shape, kw, rng):
    run_both(build(model, in_shape, 10, seed=5, **kw), in_shape, rng, batch=3)


@pytest.mark.parametrize("batch", [1, 5])
def test_awkward_network_and_batch_sizes(batch, rng):
    """Channels off the vector width, odd sizes, clipped ceil-mode pooling, dropout, 3 threads on 5 images."""
    net = Sequential(Conv2d(3, 13, 3, stride=2, padding=1, rng=rng), ReLU(), MaxPool2d(3, 2, ceil_mode=True),
                     Dropout(0.3, rng=rng), Flattened(13, 11, 3, rng=rng), ReLU(), Dropout(0.0), Flatten(),
                     Linear(11 * 3 * 3, 7, rng=rng), ReLU(), Dropout(0.5, rng=rng), Linear(7, 4, rng=rng))
    engine.set_num_threads(3)
    try:
        run_both(net, (3, 11, 13), rng, batch=batch, steps=3)
    finally:
        engine.set_num_threads(None)


def test_long_weight_gradient_sums_are_cut_in_slices_the_same_on_any_thread_count(rng):
    """Weight gradients summed over more than 2 x FT_WG_SLICE_ROWS rows (a first layer's columns, a lateral on
    many pixels) run in slices with partial sums: equal to the layer path, and bit for bit the same on 1, 2
    and 3 threads."""
    from engine._kernels import train_wgrad_slices
    in_shape, batch = (3, 20, 23), 10
    assert train_wgrad_slices(batch * 20 * 23) == 2 and train_wgrad_slices(batch * 10 * 12) == 1
    net = Sequential(Conv2d(3, 9, 3, padding=1, rng=rng), ReLU(), Lateral(9, 21, rng=rng), ReLU(), MaxPool2d(2),
                     Lateral(21, 5, rng=rng), Flatten(), Linear(5 * 10 * 11, 4, rng=rng))
    step = run_both(net, in_shape, rng, batch=batch)
    assert step._wpart_buf.size >= 2 * 21 * 9  # the slices' partial sums have room
    x, y = rng.standard_normal((batch, *in_shape)).astype(np.float32), rng.integers(0, 4, batch)
    grads = []
    for threads in (1, 2, 3):
        mine = copy.deepcopy(net)
        engine.set_num_threads(threads)
        try:
            CompiledStep(mine, in_shape, batch_size=batch).step(x, y, 0.05, 0.9, 1e-4, None, {})
        finally:
            engine.set_num_threads(None)
        grads.append({k: v.copy() for k, v in mine.grads.items()})
    for other in grads[1:]:
        for name in grads[0]:
            np.testing.assert_array_equal(other[name], grads[0][name], err_msg=name)


@pytest.mark.parametrize("k,pad,c_in", [(5, 2, 13), (4, 0, 7), (3, 2, 33), (3, 3, 5), (2, 5, 4)])
def test_input_gradient_of_a_later_convolution(k, pad, c_in, rng):
    """A stride-1 convolution after the first computes its input gradient as a convolution of the output
    gradient with the flipped filters (padding k - 1 - pad: none when pad = k - 1; the column path when
    pad > k - 1, also past a whole window); channels off the panel width, no padding, an output larger than the
    input."""
    net = Sequential(Conv2d(3, c_in, 3, padding=1, rng=rng), ReLU(), Conv2d(c_in, 9, k, padding=pad, rng=rng), ReLU())
    run_both(with_logits(net, (3, 7, 9), rng), (3, 7, 9), rng, batch=3)


def reference_loss(net64, x, y):
    logits = ref_forward(net64, x)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def test_convolutions_that_run_their_pooling_step_like_the_layer_path(rng):
    """A direct convolution runs the max-pooling after it in its forward and keeps no output: with and without a
    ReLU, with a folded dropout, as the first layer and as a later one (whose input gradient is needed), clipped
    ceil-mode windows; and the rows say so."""
    net = Sequential(Conv2d(3, 8, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2), Dropout(0.4, rng=rng),
                     Conv2d(8, 6, 3, padding=1, rng=rng), MaxPool2d(3, 2, ceil_mode=True))
    step = run_both(with_logits(net, (3, 10, 9), rng), (3, 10, 9), rng, batch=3, steps=3)
    pooled = [r for r, row in enumerate(step.table) if row[COL["pooled"]]]
    assert len(pooled) == 2 and all(step.table[r, COL["kind"]] == CKIND["CONV"] for r in pooled), step.names
    assert all(step.table[r + 1, COL["kind"]] == CKIND["POOL"] for r in pooled)
    assert step.testing_saved(pooled[0], 3)[0] is None
    # a first layer whose weight gradient is a long sum, cut into slices (5 x 33 x 31 rows)
    first = Sequential(Conv2d(3, 8, 5, padding=2, rng=rng), ReLU(), MaxPool2d(3, 2, ceil_mode=True), Dropout(0.3, rng=rng))
    assert train_wgrad_slices(5 * 33 * 31) > 1
    run_both(with_logits(first, (3, 33, 31), rng), (3, 33, 31), rng, batch=5, steps=2)


def test_longest_1d_filters_step_like_the_layer_path(rng):
    """The 1D kernels' longest filters (16 taps), on channels off the vector width and an image narrower than
    the filter."""
    net = Sequential(Vertical(19, 16, "same", rng=rng), Horizontal(19, 16, "full", rng=rng), ReLU())
    run_both(with_logits(net, (19, 18, 5), rng), (19, 18, 5), rng, batch=3)


def test_gradients_match_float64_finite_differences(rng):
    """Each parameter's gradient along a random direction, against central differences of a float64
    reference forward that shares no code with the kernels (no dropout: its masks are random)."""
    net = Sequential(Conv2d(2, 6, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2), Flattened(6, 9, 3, rng=rng), ReLU(),
                     Vertical(9, 2, "same", rng=rng), Flatten(), Linear(9 * 3 * 3, 5, rng=rng))
    x = rng.standard_normal((3, 2, 7, 6)).astype(np.float32)
    y = rng.integers(0, 5, 3)
    step = CompiledStep(net, (2, 7, 6), batch_size=3)
    assert_gradients_match_finite_differences(step, net, x, y, rng)


def assert_gradients_match_finite_differences(step, net, x, y, rng):
    """The compiled step's gradient of each parameter along a random direction, against central differences of
    the float64 reference loss; the biases are drawn non-zero first (several layers start with zero biases)."""
    for name, v in net.params.items():
        if name.endswith("bias"):
            v[...] = rng.uniform(-0.3, 0.3, v.shape)
    step.loss_fn(step.forward(x), y)
    step.backward(step.loss_fn.backward())
    net64 = copy.deepcopy(net).astype(np.float64)
    h = 1e-7  # small: a ReLU or pooling kink within h of the point would spoil the difference
    for name, w in net64.params.items():
        d = rng.standard_normal(w.shape)
        w0 = w.copy()
        w[...] = w0 + h * d
        up = reference_loss(net64, x, y)
        w[...] = w0 - h * d
        down = reference_loss(net64, x, y)
        w[...] = w0
        numeric, analytic = (up - down) / (2 * h), float(np.sum(net.grads[name] * d))
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-5), name


@pytest.mark.parametrize("model", ["flattened", "baseline"])
def test_bit_identical_for_any_thread_count(model, rng):
    """Forward, gradients and update do not depend on the thread count, and the loops really ran on
    that many threads."""
    base = build(model, (3, 32, 32), 10, seed=2)
    x = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 6)
    results = []
    for threads in (1, 2, 3):
        net = copy.deepcopy(base)
        step, velocity = CompiledStep(net, batch_size=6), {}
        engine.set_num_threads(threads)
        try:
            for _ in range(2):
                loss, logits = step.step(x, y, 0.05, 0.9, 1e-4, None, velocity)
        finally:
            engine.set_num_threads(None)
        if engine.openmp_enabled():
            assert step.last_threads == threads
        results.append((loss, logits.copy(), {k: v.copy() for k, v in net.grads.items()},
                        {k: v.copy() for k, v in net.params.items()}))
    for loss, logits, grads, params in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(logits, results[0][1])
        for name in grads:
            np.testing.assert_array_equal(grads[name], results[0][2][name], err_msg=name)
            np.testing.assert_array_equal(params[name], results[0][3][name], err_msg=name)


@pytest.mark.parametrize("model,conv", [("flattened", "auto"), ("baseline", "winograd4"), ("baseline", "direct")])
def test_backward_in_parts_reports_each_gradient_once_from_the_last_layer(model, conv, rng, monkeypatch):
    """backward(ready=...) runs one part per op with parameters and hands over each op's gradients as it
    finishes them: every gradient array once, the layers in reverse order, results bit for bit those of
    one call (what the distributed step's overlapped reduction relies on)."""
    monkeypatch.setenv("FLATNET_CONV", conv)
    base = build(model, (3, 32, 32), 10, seed=3)
    x, y = rng.standard_normal((5, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 5)
    grads = []
    for parts in (False, True):
        net = copy.deepcopy(base)
        step, seen = CompiledStep(net, batch_size=5), []
        step.loss(x, y)
        step.backward(ready=(lambda g: seen.append([a.ctypes.data for a in g])) if parts else None)
        grads.append({k: v.copy() for k, v in net.grads.items()})
    for name in grads[0]:
        np.testing.assert_array_equal(grads[1][name], grads[0][name], err_msg=name)
    reported = [a for op in seen for a in op]
    addresses = {g.ctypes.data: name for name, g in net.grads.items()}
    assert sorted(reported) == sorted(addresses)  # each once, nothing else (the identity halves' scratch)
    order = list(net.grads)  # the layers' order
    firsts = [min(order.index(addresses[a]) for a in op) for op in seen]
    assert firsts == sorted(firsts, reverse=True) and len(set(firsts)) == len(firsts)


def test_dropout_masks_are_the_layer_paths(rng):
    """The same generator state draws the same seed and the same mask, element for element (NCHW order)."""
    net = Sequential(Lateral(4, 6, rng=rng), Dropout(0.5, rng=np.random.default_rng(7)), Flatten(),
                     Linear(6 * 3 * 2, 2, rng=rng))
    twin = copy.deepcopy(net)
    x = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    step = CompiledStep(net, (4, 3, 2), batch_size=5)
    for _ in range(2):  # two steps: two seeds drawn in turn from the same generator
        step.forward(x)
        twin.forward(x)
        row = [i for i, name in enumerate(step.names) if name == "1"][0]
        addr = int(step.table[row, COL["aux"]])
        mask = next(a for a in step._keep if a.ctypes.data == addr)[:5 * 6 * 3 * 2].reshape(5, 3, 2, 6)
        want = twin.layers[1]._mask
        assert 0.3 < want.mean() < 0.7
        np.testing.assert_array_equal(mask.transpose(0, 3, 1, 2), want)


def test_make_step_falls_back_with_the_reason(rng):
    net64 = build("flattened", (1, 28, 28), 10, seed=0).astype(np.float64)
    step, note = make_step(net64, "auto")
    assert isinstance(step, LayerStep) and "float32" in note
    with pytest.raises(UnsupportedNetwork, match="float32"):
        make_step(net64, "compiled")
    step, note = make_step(build("baseline", (1, 28, 28), 10), "auto")
    assert isinstance(step, CompiledStep) and note is None
    with pytest.raises(UnsupportedNetwork, match="not flat"):
        CompiledStep(Sequential(Lateral(3, 4, rng=rng)), (3, 4, 4))
    long_taps = with_logits(Sequential(Vertical(3, 17, "same", rng=rng)), (3, 20, 4), rng)
    step, note = make_step(long_taps, "auto", in_shape=(3, 20, 4))
    assert isinstance(step, LayerStep) and "17 taps" in note
    short_taps = with_logits(Sequential(Vertical(3, 16, "same", rng=rng)), (3, 20, 4), rng)
    assert isinstance(make_step(short_taps, "auto", in_shape=(3, 20, 4))[0], CompiledStep)
    with pytest.raises(ValueError, match="unknown step"):
        make_step(net64, "fast")


def test_bad_input_is_refused(rng):
    step = CompiledStep(build("flattened", (1, 28, 28), 10), batch_size=2)
    with pytest.raises(ValueError, match="NaN"):
        step.forward(np.full((2, 1, 28, 28), np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        step.forward(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(TypeError, match="floating"):
        step.forward(np.zeros((2, 1, 28, 28), np.int32))
    big = rng.standard_normal((5, 1, 28, 28)).astype(np.float32)  # more than the buffers were built for
    assert step.forward(big).shape == (5, 10) and step.capacity == 5


def _data(n=48, seed=0, shape=(1, 28, 28), n_test=16):
    """Random training and test images (10 classes), as a trainer takes them."""
    r = np.random.default_rng(seed)
    return dict(train_x=r.standard_normal((n, *shape)).astype(np.float32), train_y=r.integers(0, 10, n),
                test_x=r.standard_normal((n_test, *shape)).astype(np.float32), test_y=r.integers(0, 10, n_test))


def _trainer(data, out, step):
    cfg = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_drop_epochs=[1], seed=1,
               step=step)
    return Trainer(build("flattened", (1, 28, 28), 10, seed=1), data, cfg, out, log=lambda m: None, progress=False)


def _stop_midway(t):
    if t.epoch == 0 and t.step_in_epoch == 2:
        t.stop_requested = True


@pytest.mark.parametrize("first,then", [("compiled", "compiled"), ("compiled", "layers"), ("layers", "compiled")])
def test_interrupted_run_resumes_on_either_step(first, then, tmp_path):
    """Compiled then compiled: bit-identical to an uninterrupted compiled run. Across the two
    steps (a checkpoint of one resumed on the other): equal to float32 rounding."""
    data = _data()
    straight = _trainer(data, tmp_path / "a", first)
    assert straight.run() == "done" and straight.step.name == first
    part = _trainer(data, tmp_path / "b", first)
    part.on_step = _stop_midway
    assert part.run() == "interrupted"
    rest = _trainer(data, tmp_path / "b", then)
    rest.resume()
    assert rest.run() == "done" and rest.step.name == then
    for name, w in straight.model.params.items():
        if first == then:
            np.testing.assert_array_equal(w, rest.model.params[name], err_msg=name)
        else:
            assert_close(rest.model.params[name], w, name, rtol=1e-4)


def test_a_baseline_run_by_winograd_resumes_exactly(tmp_path, monkeypatch):
    """The MNIST baseline (conv2 and conv3 by Winograd F(4x4, 5x5)): interrupted mid-epoch and resumed, it ends
    bit-identical to an uninterrupted run."""
    monkeypatch.delenv("FLATNET_CONV", raising=False)
    data = _data(n=32)

    def trainer(out):
        cfg = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_drop_epochs=[1], seed=1)
        return Trainer(build("baseline", (1, 28, 28), 10, seed=1), data, cfg, out, log=lambda m: None, progress=False)
    straight = trainer(tmp_path / "a")
    tiles = straight.step.table[straight.step.table[:, COL["kind"]] == CKIND["CONV"], COL["tile"]]
    assert list(tiles) == [0, 4, 4]
    assert straight.run() == "done"
    part = trainer(tmp_path / "b")
    part.on_step = _stop_midway
    assert part.run() == "interrupted"
    rest = trainer(tmp_path / "b")
    rest.resume()
    assert rest.run() == "done"
    for name, w in straight.model.params.items():
        np.testing.assert_array_equal(w, rest.model.params[name], err_msg=name)


def test_evaluation_runs_compiled_and_agrees_with_the_layer_path(rng):
    """evaluate() runs the compiled inference plan on a float32 CPU network; the float64 copy runs layer
    by layer: the same accuracy, the loss to float32 rounding, and the network's mode is restored."""
    from engine.trainer import evaluate
    net = build("flattened", (1, 28, 28), 10, seed=4)
    x = rng.standard_normal((37, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 37)
    calls = []
    import engine.plan as plan
    real = plan.Plan.__call__
    plan.Plan.__call__ = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        loss32, acc32 = evaluate(net, x, y, batch_size=16)
    finally:
        plan.Plan.__call__ = real
    assert len(calls) == 3 and net.training  # three batches through the plan; training mode restored
    loss64, acc64 = evaluate(copy.deepcopy(net).astype(np.float64), x.astype(np.float64), y, batch_size=16)
    assert acc32 == acc64 and loss32 == pytest.approx(loss64, rel=1e-5)


# ----------------------------------------------------------------------------- Winograd convolutions

@pytest.mark.parametrize("tile", ["winograd2", "winograd3", "winograd4"])
@pytest.mark.parametrize("k,pad,c_mid,size,batch", [
    (5, 2, 17, (11, 13), 3),   # 'same', odd sizes not divisible by the tile, channels off the vector width
    (5, 0, 16, (12, 9), 1),    # 'valid', batch 1
    (3, 1, 33, (7, 10), 2),    # 3x3
    (5, 4, 16, (6, 6), 2),     # padding k - 1: an output larger than the input
])
def test_winograd_convolutions_step_like_the_layer_path(tile, k, pad, c_mid, size, batch, rng, monkeypatch):
    monkeypatch.setenv("FLATNET_CONV", tile)
    in_shape = (3, *size)
    net = Sequential(Conv2d(3, c_mid, 3, padding=1, rng=rng), ReLU(), Conv2d(c_mid, 19, k, padding=pad, rng=rng),
                     ReLU(), Conv2d(19, 16, k, padding=pad, rng=rng))
    net = with_logits(net, in_shape, rng)
    step = run_both(net, in_shape, rng, batch=batch, steps=2)
    # the first layer's 3 channels: direct
    assert list(step.table[step.table[:, COL["kind"]] == CKIND["CONV"], COL["tile"]]) == [0] + [int(tile[-1])] * 2


def test_winograd_gradients_match_float64_finite_differences(rng, monkeypatch):
    monkeypatch.setenv("FLATNET_CONV", "winograd4")
    net = Sequential(Conv2d(2, 16, 3, padding=1, rng=rng), ReLU(), Conv2d(16, 17, 5, padding=2, rng=rng), ReLU(),
                     Conv2d(17, 16, 5, padding=1, rng=rng), ReLU(), Flatten(), Linear(16 * 7 * 6, 5, rng=rng))
    x = rng.standard_normal((2, 2, 9, 8)).astype(np.float32)
    y = rng.integers(0, 5, 2)
    step = CompiledStep(net, (2, 9, 8), batch_size=2)
    assert list(step.table[step.table[:, COL["kind"]] == CKIND["CONV"], COL["tile"]]) == [0, 4, 4]
    assert_gradients_match_finite_differences(step, net, x, y, rng)


@pytest.mark.parametrize("tile", ["winograd2", "winograd4"])
def test_winograd_is_bit_identical_for_any_thread_count(tile, rng, monkeypatch):
    monkeypatch.setenv("FLATNET_CONV", tile)
    base = with_logits(Sequential(Conv2d(3, 20, 3, padding=1, rng=rng), ReLU(), Conv2d(20, 24, 5, padding=2, rng=rng),
                                  ReLU()), (3, 10, 9), rng)
    x = rng.standard_normal((5, 3, 10, 9)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    results = []
    for threads in (1, 2, 3):
        net = copy.deepcopy(base)
        step, velocity = CompiledStep(net, (3, 10, 9), batch_size=5), {}
        engine.set_num_threads(threads)
        try:
            for _ in range(2):
                loss, logits = step.step(x, y, 0.05, 0.9, 1e-4, None, velocity)
        finally:
            engine.set_num_threads(None)
        results.append((loss, logits.copy(), {k: v.copy() for k, v in net.params.items()}))
    for loss, logits, params in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(logits, results[0][1])
        for name in params:
            np.testing.assert_array_equal(params[name], results[0][2][name], err_msg=name)


def test_which_convolutions_run_by_winograd(monkeypatch):
    from engine.lowering import conv_tile
    monkeypatch.delenv("FLATNET_CONV", raising=False)
    rng = np.random.default_rng(0)
    assert conv_tile(Conv2d(3, 64, 5, padding=2, rng=rng), (3, 32, 32)) == 0  # a first layer: direct
    assert conv_tile(Conv2d(64, 64, 5, padding=2, rng=rng), (64, 16, 16)) == 4
    assert conv_tile(Conv2d(64, 64, 5, stride=2, padding=2, rng=rng), (64, 16, 16)) == 0  # strided
    assert conv_tile(Conv2d(64, 64, 4, padding=2, rng=rng), (64, 16, 16)) == 0  # an even filter
    assert conv_tile(Conv2d(64, 64, 5, rng=rng), (64, 4, 4)) == 0  # the filter does not fit
    assert conv_tile(Conv2d(64, 8, 5, padding=2, rng=rng), (64, 16, 16)) == 0  # few output channels
    monkeypatch.setenv("FLATNET_CONV", "direct")
    assert conv_tile(Conv2d(64, 64, 5, padding=2, rng=rng), (64, 16, 16)) == 0
    monkeypatch.setenv("FLATNET_CONV", "winograd2")
    assert conv_tile(Conv2d(64, 64, 5, padding=2, rng=rng), (64, 16, 16)) == 2
    assert conv_tile(Conv2d(3, 64, 5, padding=2, rng=rng), (3, 32, 32)) == 0
    monkeypatch.setenv("FLATNET_CONV", "fft")
    with pytest.raises(ValueError, match="FLATNET_CONV='fft'"):
        conv_tile(Conv2d(64, 64, 5, padding=2, rng=rng), (64, 16, 16))
