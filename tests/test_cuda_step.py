"""The compiled GPU executor (engine/runtime/cuda_step.py, engine/cuda_step.cu) against the CPU's compiled
step and plan, the layer path and float64 references.

Every case runs on the real device where CuPy works (`cupy`) and on the CPU emulation of CuPy
(`cupy-emulated`, tests/emulated_cupy.py), where each kernel is the same CUDA source compiled as C++ and a
stream capture records only kernel launches and cuBLAS calls (anything else raises). Launches are smaller
than their work, so every grid-stride loop wraps.

What is checked: the same loss, logits, gradients, updated weights and momentum buffers as the CPU's
compiled step (built from the same lowering) on the paper's models and on small networks at the kernels'
edges; the same dropout masks bit for bit; gradients against the float64 layer path; replayed graphs
bit-identical to direct launches while the inputs, labels, seeds and learning rate change; the inference
plan against the CPU's; one-line errors; exact resume of a training run.
"""
import copy
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import emulated_cupy
from conftest import small_launches
from engine import Conv2d, Dropout, Flatten, Flattened, Linear, MaxPool2d, ReLU, Sequential
from engine.lowering import UnsupportedNetwork
from engine.plan import compile_network
from engine.trainer import Trainer
from engine.trainstep import CompiledStep, LayerStep
from models.paper import build
from test_plan import SMALL
from test_trainstep import _data

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "engine" / "cuda_step.cu"


@pytest.fixture(params=["cupy", "cupy-emulated"])
def gpu(request, monkeypatch):
    """The cupy module with engine.runtime.cuda_step importable: the real one where a GPU is usable, else the
    emulation (2 blocks of 3 emulated threads a launch); conftest.small_launches."""
    yield from small_launches(request.param, monkeypatch, (2, 3))


def gpu_step(net, in_shape=None, batch_size=4):
    from engine.runtime.cuda_step import GpuStep
    return GpuStep(net, in_shape, batch_size)


def assert_close(got, want, what, rtol=2e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1e-6, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def host(cp, a):
    return cp.asnumpy(a)


def routing_differences(gpu_step_, cpu_step, n):
    """How many pooling argmaxes and ReLU on/off decisions differ between the last forwards of the two steps
    (both keep each row's output in the layout's shape): where float32 rounding lands a value on the other
    side of such a kink, the gradients legitimately differ there."""
    differ = 0
    for r, row in enumerate(gpu_step_._rows.rows):
        if row.kind == "POOL" or row.relu:
            (g_out, g_arg), (c_out, c_arg) = gpu_step_.testing_saved(r, n), cpu_step.testing_saved(r, n)
            if c_out is None:  # the CPU ran the pooling after it in its forward: the pooled outputs show its ReLU
                continue
            differ += int(np.sum((g_out > 0) != (c_out > 0)))
            if row.kind == "POOL":
                differ += int(np.sum(g_arg != c_arg))
    return differ


def run_both(cp, net, in_shape, rng, batch=4, steps=3, weight_decay=1e-3, nesterov=False):
    """`steps` SGD steps of the GPU and the CPU compiled step from the same weights, the learning rate changing
    each step; checks loss, logits, dropout masks, gradients, weights and momentum. Inputs that fall next to a
    kink in the two paths are drawn again (up to three times)."""
    n_out = net.output_shape((1, *in_shape))[1]
    for attempt in range(4):
        mine, twin = copy.deepcopy(net).to("cupy"), copy.deepcopy(net)
        g, c = gpu_step(mine, in_shape, batch), CompiledStep(twin, in_shape, batch_size=batch)
        vg, vc = {}, {}
        clean = True
        for s in range(steps):
            x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
            y = rng.integers(0, n_out, batch)
            lg, rg = g.loss(cp.asarray(x), y)
            lc, rc = c.loss(x, y)
            if routing_differences(g, c, batch):
                clean = False
                break
            assert float(lg) == pytest.approx(lc, rel=1e-5, abs=1e-6), f"loss of step {s}"
            assert int(float(rg)) == rc, f"number right at step {s}"
            assert_close(host(cp, g.logits), c.logits, f"logits of step {s}")
            for r, row in enumerate(g._rows.rows):  # dropout masks: the same elements zeroed, bit for bit
                if row.kind == "DROPOUT" or row.kind == "POOL" and row.dropout is not None:
                    np.testing.assert_array_equal(g.testing_saved(r, batch)[0] == 0, c.testing_saved(r, batch)[0] == 0,
                                                  err_msg=f"dropout mask of {row.name}, step {s}")
            lr = 0.05 / (s + 1)
            damp = 0.0 if nesterov else None
            g.apply(vg, lr, 0.9, weight_decay, damp, nesterov)
            c.apply(vc, lr, 0.9, weight_decay, damp, nesterov)
        if clean:
            break
    assert clean, "every draw fell next to a kink"
    for name in twin.params:
        assert_close(host(cp, mine.grads[name]), twin.grads[name], f"gradient {name}")
        assert_close(host(cp, mine.params[name]), twin.params[name], f"weight {name}", rtol=1e-5)
        assert_close(host(cp, vg[name]), vc[name], f"velocity {name}")
    return g


def with_logits(net, in_shape, rng, classes=3):
    n = int(np.prod(net.output_shape((1, *in_shape))[1:]))
    return Sequential(net, Flatten(), Linear(n, classes, rng=rng))


def awkward(rng):
    """Channels off any vector width, a strided padded first convolution, clipped ceil-mode pooling with its
    dropout folded in, a flattened layer, dropout between Linear layers."""
    return Sequential(Conv2d(3, 13, 3, stride=2, padding=1, rng=rng), ReLU(), MaxPool2d(3, 2, ceil_mode=True),
                      Dropout(0.3, rng=rng), Flattened(13, 11, 3, rng=rng), ReLU(), Flatten(),
                      Linear(11 * 3 * 3, 7, rng=rng), ReLU(), Dropout(0.5, rng=rng), Linear(7, 4, rng=rng))


@pytest.mark.parametrize("model", ["flattened", "baseline"])
def test_paper_models_step_like_the_cpu_compiled_step(gpu, model, rng):
    g = run_both(gpu, build(model, (3, 32, 32), 10, seed=5), (3, 32, 32), rng, batch=3)
    assert g.captures == 2  # forward+loss and backward+update, each captured once, then replayed


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_networks_step_like_the_cpu_compiled_step(gpu, name, rng):
    make, in_shape = SMALL[name]
    run_both(gpu, with_logits(make(rng), in_shape, rng), in_shape, rng, steps=2)


@pytest.mark.parametrize("batch", [1, 5])
def test_awkward_network_and_batch_sizes(gpu, batch, rng):
    run_both(gpu, awkward(rng), (3, 11, 13), rng, batch=batch)


def test_nesterov_momentum_like_the_cpu_compiled_step(gpu, rng):
    g = run_both(gpu, awkward(rng), (3, 11, 13), rng, steps=4, nesterov=True)
    assert g.captures == 2  # the rule is read from `hyper`: the replays follow it


def test_a_relu_on_a_flat_activation(gpu, rng):
    net = Sequential(Conv2d(2, 3, 3, rng=rng), Flatten(), ReLU(), Dropout(0.25, rng=rng), Linear(3 * 3 * 4, 5, rng=rng))
    run_both(gpu, net, (2, 5, 6), rng)


def test_gradients_match_the_float64_layer_path(gpu, rng):
    """Without dropout, the GPU step's gradients against the layer path run in float64 on the CPU."""
    net = Sequential(Conv2d(3, 6, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2), Flattened(6, 9, 3, rng=rng), ReLU(),
                     MaxPool2d(3, 2, ceil_mode=True), Flatten(), Linear(9 * 2 * 2, 5, rng=rng))
    in_shape = (3, 9, 10)
    x, y = rng.standard_normal((4, *in_shape)).astype(np.float32), rng.integers(0, 5, 4)
    ref = copy.deepcopy(net).astype(np.float64)
    ref_step = LayerStep(ref)
    ref_step.loss(x.astype(np.float64), y)
    ref_step.backward()
    mine = copy.deepcopy(net).to("cupy")
    g = gpu_step(mine, in_shape)
    g.loss(gpu.asarray(x), y)
    g.backward()
    for name in ref.params:
        assert_close(host(gpu, mine.grads[name]), ref.grads[name], f"gradient {name}", rtol=1e-4)


def test_replayed_graphs_equal_direct_launches(gpu, rng):
    """Replays read what changes between steps from device memory (images, labels, dropout seeds, learning rate):
    five steps replayed end bit-identical to the same five steps launched directly."""
    nets = [build("flattened", (3, 16, 16), 10, seed=2).to("cupy") for _ in range(2)]
    steps = [gpu_step(net, batch_size=4) for net in nets]
    steps[1]._graphs.failed = "direct launches, for the comparison"
    velocity = [{}, {}]
    losses = [[], []]
    reads = emulated_cupy.reads
    for s in range(5):
        x, y = rng.standard_normal((4, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, 4)
        for i in range(2):
            loss, _ = steps[i].loss(gpu.asarray(x), y)
            steps[i].apply(velocity[i], 0.1 * 0.7 ** s, 0.9, 5e-4)
            losses[i].append(loss)
    if emulated_cupy.is_emulated(gpu):
        assert emulated_cupy.reads == reads  # no step reads anything back from the device
    losses = [[float(v) for v in run] for run in losses]
    assert steps[0].captures == 2 and steps[1].captures == 0
    assert losses[0] == losses[1] and len(set(losses[0])) == 5
    for name in nets[0].params:
        np.testing.assert_array_equal(host(gpu, nets[0].params[name]), host(gpu, nets[1].params[name]), name)
        np.testing.assert_array_equal(host(gpu, velocity[0][name]), host(gpu, velocity[1][name]), name)


def test_a_larger_batch_grows_the_buffers_and_captures_again(gpu, rng):
    net = build("flattened", (3, 16, 16), 10, seed=2).to("cupy")
    g, v = gpu_step(net, batch_size=2), {}
    for n in (2, 2, 2, 6, 6, 6, 3):
        g.loss(gpu.asarray(rng.standard_normal((n, 3, 16, 16)).astype(np.float32)), rng.integers(0, 10, n))
        g.apply(v, 0.01, 0.9, 0.0)
    assert g._rows.capacity == 6 and g.captures == 4  # batch 2 and batch 6, two graphs each; 3: run directly


def test_without_direct_cublas_the_step_runs_without_graphs(gpu, rng, monkeypatch):
    """Where libcublas cannot be called directly, the step takes CuPy's cuBLAS, whose calls a capture refuses:
    it then runs its launches directly, with the same results, and says why."""
    import engine.runtime.cuda as bc
    import engine.runtime.cuda_step as cs

    def missing(name):
        raise OSError(f"{name} is not loaded in this process")

    monkeypatch.setattr(bc.GraphBlas, "_instance", None)
    monkeypatch.setattr(bc, "_loaded_library", missing)
    monkeypatch.setattr(cs, "_graph_blas_problem", [])
    nets = [build("flattened", (3, 16, 16), 10, seed=2).to("cupy") for _ in range(2)]
    g = gpu_step(nets[0], batch_size=4)
    velocity = [{}, {}]
    batches = [(rng.standard_normal((4, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, 4)) for _ in range(3)]
    for x, y in batches:
        g.loss(gpu.asarray(x), y)
        g.apply(velocity[0], 0.05, 0.9, 5e-4)
    assert g.captures == 0 and "cuBLAS cannot be called directly (OSError: libcublas.so" in g.capture_failed
    monkeypatch.setattr(bc, "_loaded_library", lambda name: pytest.fail("not asked again"))
    ref = CompiledStep(build("flattened", (3, 16, 16), 10, seed=2), batch_size=4)
    for x, y in batches:
        ref.loss(x, y)
        ref.apply(velocity[1], 0.05, 0.9, 5e-4)
    for name, w in nets[0].params.items():
        assert_close(host(gpu, w), ref.net.params[name], name, rtol=1e-5)


def test_a_diverged_step_leaves_the_weights(gpu, rng):
    net = build("flattened", (3, 16, 16), 10, seed=2).to("cupy")
    g, v = gpu_step(net), {}
    before = {k: host(gpu, w) for k, w in net.params.items()}
    x = np.full((4, 3, 16, 16), 3e38, np.float32)  # logits overflow: the loss is not finite
    loss, _ = g.loss(gpu.asarray(x), np.arange(4))
    assert not np.isfinite(float(loss))
    g.apply(v, 0.1, 0.9, 5e-4)
    for k, w in net.params.items():
        np.testing.assert_array_equal(host(gpu, w), before[k], err_msg=k)


def test_bad_input_is_refused_in_one_line(gpu, rng):
    g = gpu_step(build("flattened", (1, 28, 28), 10, seed=0).to("cupy"))
    good = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    for x, y, err, match in [
            (good[:, :, :27], [0, 1], ValueError, r"expected images of shape \(N, 1, 28, 28\), got \(2, 1, 27, 28\)"),
            (good.astype(np.int32), [0, 1], TypeError, "floating"),
            (good, [0, 10], ValueError, r"labels must lie in \[0, 10\)"),
            (good, [0.5, 1.0], ValueError, "integer labels"),
            (good, [0, 1, 2], ValueError, r"labels of shape \(2,\)")]:
        with pytest.raises(err, match=match) as e:
            g.loss(gpu.asarray(x), np.asarray(y))
        assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedNetwork, match="float32"):
        gpu_step(build("flattened", (1, 28, 28), 10).astype(np.float64).to("cupy"))
    with pytest.raises(UnsupportedNetwork, match="cupy backend"):
        gpu_step(build("flattened", (1, 28, 28), 10))


@pytest.mark.parametrize("model", ["flattened", "baseline"])
def test_inference_plan_matches_the_cpu_plan(gpu, model, rng):
    from engine.runtime.cuda_step import GpuPlan
    net = build(model, (3, 32, 32), 10, seed=3).eval()
    mine = copy.deepcopy(net).to("cupy")
    plan, cpu_plan = GpuPlan(mine, softmax=True), compile_network(net, softmax=True)
    for n in (1, 7, 7, 7, 1, 1):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        got = host(gpu, plan(gpu.asarray(x)))
        assert got.shape == (n, 10)
        assert_close(got, cpu_plan(x), f"batch {n}", rtol=1e-4)
    assert plan.captures == 2
    mine.params[next(iter(mine.params))][...] = 0  # the plan reads the weights at each call, replays included
    net.params[next(iter(net.params))][...] = 0
    x = rng.standard_normal((7, 3, 32, 32)).astype(np.float32)
    assert_close(host(gpu, plan(gpu.asarray(x))), compile_network(net, softmax=True)(x), "changed weights", rtol=1e-4)


def test_awkward_inference_plan(gpu, rng):
    """A Linear reading a channels-last activation (its weight columns permuted on the device) and a flat output."""
    from engine.runtime.cuda_step import GpuPlan
    net = awkward(rng).eval()
    x = rng.standard_normal((5, 3, 11, 13)).astype(np.float32)
    got = host(gpu, GpuPlan(copy.deepcopy(net).to("cupy"), (3, 11, 13))(gpu.asarray(x)))
    assert_close(got, compile_network(net, (3, 11, 13))(x), "logits", rtol=1e-4)


def test_capture_holds_only_kernels_and_cublas(gpu):
    """The emulation's capture refuses other device work, CuPy's cuBLAS functions (as CuPy does) and a direct
    cuBLAS call on another stream (the guards the tests above rely on); on a device the step's own captures are
    the test."""
    if not emulated_cupy.is_emulated(gpu):
        pytest.skip("the refusals are the emulation's: on a device the step's own captures are the test")
    from engine.runtime.cuda import GraphBlas, strided_gemm
    GraphBlas.get()  # its handle and workspace are made outside a capture, as the executors' first direct run does
    a, c = gpu.ones((3, 3), dtype=gpu.float32), gpu.zeros((3, 3), dtype=gpu.float32)
    s = gpu.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        with pytest.raises(RuntimeError, match="capturing"):
            a[...] = 1
        with pytest.raises(RuntimeError, match="capturing"):
            a.get()
        with pytest.raises(NotImplementedError, match="stream capture"):
            strided_gemm(False, False, 1.0, a, a, 0.0, c)  # CuPy's cuBLAS functions
        strided_gemm(False, False, 1.0, a, a, 0.0, c, capturable=True)  # recorded
    with pytest.raises(RuntimeError, match="cuBLAS status 14"):
        strided_gemm(False, False, 1.0, a, a, 0.0, c, capturable=True)  # the current stream is not the capturing one
    assert "other than the capturing one" in str(emulated_cupy.libcublas_errors.pop())
    graph = s.end_capture()
    assert float(c.sum()) == 0.0
    graph.launch()
    assert float(c.sum()) == 27.0


def _trainer(data, out, backend):
    cfg = dict(epochs=2, batch_size=8, lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, lookahead=3,
               weight_decay=1e-4, lr_drop_epochs=[1], seed=1, step="compiled", augment="flip,crop2")
    net = build("flattened", (1, 12, 12), 10, seed=1, pool=(2, 2))
    return Trainer(net.to(backend), data, cfg, out, log=lambda m: None, progress=False)


def test_training_on_the_gpu_resumes_exactly_and_agrees_with_the_cpu(gpu, tmp_path):
    data = _data(40, shape=(1, 12, 12), n_test=9)
    straight = _trainer(data, tmp_path / "a", "cupy")
    assert straight.run() == "done" and type(straight.step).__name__ == "GpuStep"
    part = _trainer(data, tmp_path / "b", "cupy")
    part.on_step = lambda t: setattr(t, "stop_requested", t.epoch == 0 and t.step_in_epoch == 2)
    assert part.run() == "interrupted"
    rest = _trainer(data, tmp_path / "b", "cupy")
    rest.resume()
    assert rest.run() == "done"
    cpu = _trainer(data, tmp_path / "c", "cpu")
    assert cpu.run() == "done"
    on_cpu = _trainer(data, tmp_path / "b", "cpu")  # the resumed GPU run's last checkpoint, read on the CPU
    on_cpu.resume()
    for name, w in straight.model.params.items():
        np.testing.assert_array_equal(host(gpu, w), host(gpu, rest.model.params[name]), err_msg=name)
        assert_close(host(gpu, w), cpu.model.params[name], name, rtol=1e-4)
        np.testing.assert_array_equal(on_cpu.model.params[name], host(gpu, w), err_msg=name)
    assert [h["train_loss"] for h in straight.history] == pytest.approx([h["train_loss"] for h in cpu.history],
                                                                        rel=1e-4)


def test_the_trainer_keeps_one_gpu_plan_for_its_evaluations(gpu, tmp_path, monkeypatch):
    """The plan is built at the first evaluation and replayed at the next ones; it reads the weights of the moment,
    so each epoch's figures equal those of a plan built afresh on the weights after that epoch."""
    import engine.runtime.cuda_step as cs
    from engine.trainer import evaluate
    data = _data(40, shape=(1, 12, 12), n_test=9)
    built, checked = [], []

    class Counted(cs.GpuPlan):
        def __init__(self, *args, **kw):
            built.append(1)
            super().__init__(*args, **kw)
    monkeypatch.setattr(cs, "GpuPlan", Counted)
    t = _trainer(data, tmp_path, "cupy")
    t.cfg["epochs"] = 3

    def check(trainer):  # after the epoch's evaluation: a fresh plan on the weights evaluated gives the same figures
        with trainer.final_weights():  # Lookahead's slow weights
            fresh = evaluate(trainer.model, data["test_x"], data["test_y"], forward=Counted(trainer.model))
        checked.append(fresh == (trainer.history[-1]["test_loss"], trainer.history[-1]["test_acc"]))
    t.on_epoch = check
    assert t.run() == "done"
    assert checked == [True] * 3 and len(built) == 1 + 3  # the trainer's one plan, and one per check


@pytest.mark.parametrize("tf32", [None, "1"])
def test_tf32_only_when_asked(gpu, tf32, monkeypatch):
    """GraphBlas's handle gets cuBLAS's TF32 math mode (3) with $FLATNET_TF32=1 only (the default math mode is 0)."""
    if not emulated_cupy.is_emulated(gpu):
        pytest.skip("the handle's math mode is read back from the emulation's libcublas")
    import engine.runtime.cuda as bc
    if tf32:
        monkeypatch.setenv("FLATNET_TF32", tf32)
    else:
        monkeypatch.delenv("FLATNET_TF32", raising=False)
    monkeypatch.setattr(bc.GraphBlas, "_instance", None)
    lib = emulated_cupy._libcublas[0]
    lib.cublasSetMathMode(None, 0)
    assert bc.GraphBlas.get().tf32 == bool(tf32)
    assert lib.flatnet_math_mode() == (3 if tf32 else 0)


def test_kernel_source_compiles_to_ptx(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH (the CUDA toolkit: NVIDIA's cuda-toolkit package, or Debian's "
                    "nvidia-cuda-toolkit)")
    out = tmp_path / "step.ptx"
    r = subprocess.run([nvcc, "--ptx", "-o", str(out), str(SOURCE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries = set(re.findall(r"^\.visible \.entry (\w+)\(", out.read_text(), re.M))
    launched = set(re.findall(r'_k\("(\w+)"', (ROOT / "engine" / "runtime" / "cuda_step.py").read_text()))
    assert len(launched) >= 15 and launched <= entries, f"launched but not compiled: {launched - entries}"
