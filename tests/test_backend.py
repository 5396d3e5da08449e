"""Backend selection: the CPU always works; CuPy is used only when it imports and a device passes a smoke test."""
import os
import sys
import types

import pytest

from engine.runtime.select import BackendUnavailable, select_backend


def test_cpu_is_always_available():
    assert select_backend("cpu") == ("cpu", None)
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("tpu")


def test_without_cupy_auto_falls_back_and_cupy_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    name, why = select_backend("auto")
    assert name == "cpu" and "not installed" in why
    with pytest.raises(BackendUnavailable, match=r"not installed.*pip install 'cupy-cuda12x\[ctk\]'"):
        select_backend("cupy")
    monkeypatch.setenv("FLATNET_BACKEND", "cupy")
    with pytest.raises(BackendUnavailable):
        select_backend()


def test_cupy_installed_but_no_device(monkeypatch):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert select_backend("auto")[0] == "cpu"
    with pytest.raises(BackendUnavailable, match=r"no usable CUDA device.*cudaErrorNoDevice"):
        select_backend("cupy")


def test_train_py_backend_flag(tmp_path):
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]

    def train_py_without_cupy(*args):
        code = (f"import sys, runpy; sys.modules['cupy'] = None; sys.argv = ['train.py'] + {list(map(str, args))!r};"
                f" runpy.run_path({str(root / 'train.py')!r}, run_name='__main__')")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)

    r = train_py_without_cupy("--backend", "cupy", "--data-dir", tmp_path, "--no-download", "--out", tmp_path / "run")
    assert r.returncode == 1 and "--backend cupy: CuPy is not installed" in r.stderr
    r = train_py_without_cupy("--backend", "cupy", "--summary")  # a summary needs no device
    assert r.returncode == 0 and "30,912" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- every backend (conftest's `backend`)

def test_same_model_same_predictions_on_every_device_backend(device_backend):
    import numpy as np
    backend = device_backend
    from models.paper import build
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    cpu = build("flattened", (3, 32, 32), 10, seed=0).eval()
    dev = backend.to(build("flattened", (3, 32, 32), 10, seed=0).eval())
    want = cpu.forward(x).copy()
    got = backend.get(dev.forward(backend.put(x)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32, different summation orders


def test_training_on_a_backend_gives_files_the_cpu_reads(backend, tmp_path):
    """Train a few steps on `backend`; the checkpoint and model file load on the CPU with the same outputs."""
    import numpy as np
    import engine
    from engine.checkpoint import load_checkpoint
    from engine.trainer import Trainer

    from models.paper import build
    rng = np.random.default_rng(1)
    data = dict(train_x=rng.standard_normal((24, 1, 28, 28)).astype(np.float32), train_y=rng.integers(0, 10, 24),
                test_x=rng.standard_normal((8, 1, 28, 28)).astype(np.float32), test_y=rng.integers(0, 10, 8))
    net = backend.to(build("flattened", (1, 28, 28), 10, seed=0))
    cfg = dict(epochs=1, batch_size=8, lr=0.01, momentum=0.9, weight_decay=1e-4, lr_drop_epochs=[], seed=0)
    trainer = Trainer(net, data, cfg, tmp_path, progress=False, log=lambda *a: None)
    assert trainer.run() == "done"
    assert np.isfinite(trainer.history[0]["train_loss"]) and trainer.history[0]["test_acc"] >= 0
    params, velocity, _, _, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert all(type(v) is np.ndarray for v in list(params.values()) + list(velocity.values()))
    cpu = build("flattened", (1, 28, 28), 10, seed=5).eval()
    cpu.load_params(params)
    net.eval()
    want = backend.get(net.forward(backend.put(data["test_x"])))
    np.testing.assert_allclose(cpu.forward(data["test_x"]), want, rtol=1e-4, atol=1e-4)
    engine.save_model(tmp_path / "model.npz", net, (1, 28, 28), [str(i) for i in range(10)])
    model = engine.load(tmp_path / "model.npz")  # on the CPU
    np.testing.assert_allclose(model.predict(data["test_x"], preprocessed=True),
                               engine.losses.softmax(want.astype(np.float64)), rtol=1e-3, atol=1e-5)
    again = engine.load(tmp_path / "model.npz", backend=backend.name)  # and back on the backend
    np.testing.assert_array_equal(again.classify(data["test_x"], preprocessed=True), want.argmax(axis=1))


def test_dropout_draws_the_same_masks_on_every_device_backend(device_backend):
    import numpy as np
    backend = device_backend
    from engine import Dropout
    x = np.ones((4, 3, 10, 10), np.float32)
    want = Dropout(0.4, rng=11).forward(x).copy()
    got = backend.get(Dropout(0.4, rng=11).forward(backend.put(x)))
    np.testing.assert_array_equal(got, want)


def test_layers_refuse_arrays_of_another_backend(device_backend):
    import numpy as np
    from engine import Linear, ReLU
    backend = device_backend
    layer = backend.to(Linear(3, 2))
    with pytest.raises(TypeError, match=r"input is a cpu array but the layer's parameters are on cupy"):
        layer.forward(np.ones((1, 3), np.float32))
    relu = ReLU()  # no parameters: follows its input
    assert backend.get(relu.forward(backend.put(-np.ones((2, 2), np.float32)))).sum() == 0
    assert relu.forward(np.ones((2, 2), np.float32)).sum() == 4


def test_emulated_cupy_passes_selection_and_is_timed_by_the_benchmark(emulated, capsys, threads):
    from engine.cli import bench
    assert select_backend("auto") == ("cupy", None)  # the smoke test runs our kernels and CuPy's
    bench.main(["layers", "--sizes", "6", "--batch", "2", "--channels", "3", "--repeat", "1"])
    bench.main(["model", "--dataset", "mnist", "--batch", "2", "--repeat", "1", "--backend", "cupy"])
    text = capsys.readouterr().out
    assert "flattened     6 forward   cupy" in text and "flattened     6 forward   cpu" in text
    assert "train step       2 cupy" in text


def test_smoke_test_needs_cupys_own_kernels(emulated, monkeypatch):
    """A driver-only machine: cuBLAS and our kernels work, CuPy's run-time compiled kernels do not."""
    def no_headers(*args, **kwargs):
        raise RuntimeError('CompileException: catastrophic error: cannot open source file "cuda_fp16.h"')

    monkeypatch.setattr(sys.modules["cupy"], "exp", no_headers)
    name, why = select_backend("auto")
    assert name == "cpu" and "cannot find a CUDA toolkit library or header" in why and "cuda_fp16.h" in why
    assert "cupy-cuda12x[ctk]" in why and "driver" not in why.split(";")[0]
    monkeypatch.undo()
    assert select_backend("auto") == ("cupy", None)


def test_smoke_test_compiles_the_float64_module_and_checks_results(emulated, monkeypatch):
    cupy = sys.modules["cupy"]
    real_module = cupy.RawModule

    def float_only(code=None, options=()):
        if "-DFLATNET_REAL=double" in options:
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return real_module(code, options)

    monkeypatch.setattr(cupy, "RawModule", float_only)
    with pytest.raises(BackendUnavailable, match=r"smoke test: the NVIDIA driver is older than this CuPy"):
        select_backend("cupy")
    monkeypatch.setattr(cupy, "RawModule", real_module)
    sys.modules.pop("engine.runtime.cuda")  # its compiled-module cache
    monkeypatch.setattr(cupy, "isfinite", lambda x: cupy.zeros(x.shape, bool))
    with pytest.raises(BackendUnavailable, match=r"computed a wrong broadcast assignment or finite check"):
        select_backend("cupy")


def test_a_training_step_reads_nothing_back_from_the_device(emulated, tmp_path):
    """Batches are checked on the host; the loss and the count stay on the device and are read
    back once every READ_EVERY steps (a read is a blocking device-to-host copy on a GPU)."""
    import numpy as np
    from engine import trainer as tr
    from models.paper import build
    rng = np.random.default_rng(2)
    steps = tr.READ_EVERY + 5
    data = dict(train_x=rng.standard_normal((2 * steps, 1, 28, 28)).astype(np.float32),
                train_y=rng.integers(0, 10, 2 * steps),
                test_x=rng.standard_normal((4, 1, 28, 28)).astype(np.float32), test_y=rng.integers(0, 10, 4))
    cfg = dict(epochs=1, batch_size=2, lr=0.01, momentum=0.9, weight_decay=1e-4, lr_drop_epochs=[], seed=0)
    reads = []
    t = tr.Trainer(build("flattened", (1, 28, 28), 10, seed=0).to("cupy"), data, cfg, tmp_path, progress=False,
                   log=lambda *a: None, on_step=lambda t: reads.append(emulated.reads))
    start = emulated.reads
    assert t.run() == "done"
    per_step = np.diff([start] + reads)
    read_steps = [i + 1 for i, n in enumerate(per_step) if n]
    assert read_steps == [tr.READ_EVERY, steps] and per_step.max() == 2, per_step  # the losses, the counts
    assert round(t.history[0]["train_acc"] * len(data["train_y"])) == t.running["correct"] > 0
    # the running loss is the mean of the steps' losses, as the CPU computes it
    cpu = tr.Trainer(build("flattened", (1, 28, 28), 10, seed=0), data, cfg, tmp_path / "cpu", progress=False,
                     log=lambda *a: None)
    cpu.run()
    assert np.isclose(t.history[0]["train_loss"], cpu.history[0]["train_loss"], rtol=1e-5)
    assert t.running["seen"] == cpu.running["seen"] == 2 * steps
    assert t.model.check_finite  # restored after the epoch


def test_host_labels_are_checked_on_the_host(emulated):
    import numpy as np
    from engine.losses import SoftmaxCrossEntropy
    cp = sys.modules["cupy"]
    logits = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 2, 3])
    loss_fn = SoftmaxCrossEntropy()
    before = emulated.reads
    loss = loss_fn(cp.asarray(logits), labels, as_array=True)
    assert emulated.reads == before and isinstance(loss, cp.ndarray) and isinstance(loss_fn.labels, cp.ndarray)
    assert np.isclose(float(loss), SoftmaxCrossEntropy()(logits, labels))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got \[0, 4\]"):
        loss_fn(cp.asarray(logits), np.array([0, 4, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got \[-1, 3\]"):
        loss_fn(cp.asarray(logits), cp.asarray(np.array([0, -1, 1, 2, 3])))  # device labels: checked there


def test_train_py_help_describes_the_backends():
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "train.py"), "--help"], capture_output=True, text=True, cwd=root)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "not implemented" not in text and "auto always runs on the CPU" not in text
    assert "engine.selftest" in text and ".[gpu-cuda13]" in text


def test_the_emulation_puts_back_the_cupy_it_replaced(monkeypatch):
    import emulated_cupy
    real = types.ModuleType("cupy")  # stands for an imported real CuPy
    monkeypatch.setitem(sys.modules, "cupy", real)
    assert emulated_cupy.real_cupy_installed()  # seen even once imported (not only through the path)
    emulated_cupy.install()
    emulated_cupy.install()  # nested, as a fixture inside an emulated test run
    assert emulated_cupy.is_emulated(sys.modules["cupy"])
    emulated_cupy.uninstall()
    assert emulated_cupy.is_emulated(sys.modules["cupy"])
    emulated_cupy.uninstall()
    assert sys.modules["cupy"] is real


# ---- the default thread count gives way to other processes (issue 16, item 7) ----

def _share(readings, cores=2):
    from engine.runtime.threads import CpuShare
    import itertools
    it = itertools.chain(readings, itertools.repeat(readings[-1]))  # then time stands still
    now = [None]

    def clock():
        now[0] = next(it)
        return now[0][0]
    return CpuShare(window=0.25, read=lambda: now[0][1:], clock=clock, cores=cores)


def test_cpu_share_counts_what_others_use():
    # (seconds, machine busy core-seconds, this process's core-seconds)
    share = _share([(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (1.1, 2.2, 1.1), (2.0, 2.1 + 2.0, 1.1 + 2.0)])
    assert share.update() == 0.0                   # first reading: nothing to compare yet
    assert share.update() == pytest.approx(1.0)     # 2 cores busy, 1 of them ours: one core is others'
    assert share.update() == pytest.approx(1.0)     # under a window: the last estimate stands
    assert share.update() == pytest.approx(0.0)     # all the busy time since was ours


def test_cpu_share_thread_choice():
    busy_other = _share([(0.0, 0.0, 0.0), (1.0, 1.9, 1.0)])   # another process on 0.9 of a core
    busy_other.update()
    assert busy_other.threads(2) == 1
    quiet = _share([(0.0, 0.0, 0.0), (1.0, 2.0, 1.95)])       # our two threads had both cores
    quiet.update()
    assert quiet.threads(2) == 2
    stolen = _share([(0.0, 0.0, 0.0), (1.0, 0.6, 0.4)], cores=8)  # others take 0.2: 7.8 free, capped
    stolen.update()
    assert stolen.threads(4) == 4 and stolen.threads(8) == 8


def test_cpu_share_without_proc_stat_assumes_the_machine_is_ours():
    def read():
        raise OSError("no /proc")
    from engine.runtime.threads import CpuShare
    share = CpuShare(read=read, cores=4)
    assert share.threads(4) == 4 and share.threads(4) == 4


def test_a_chosen_thread_count_is_used_as_is(monkeypatch):
    import engine
    from engine.runtime import threads as backend
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(backend, "_num_threads", None)
    monkeypatch.setattr(backend, "cpu_share", _share([(0.0, 0.0, 0.0), (1.0, 1.0, 0.0)]))
    monkeypatch.setattr(backend, "get_num_threads", lambda: 2)
    backend.cpu_share.update()
    assert backend.run_threads() == 1             # default: one core is taken by others
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert backend.run_threads() == 2             # chosen in the environment
    monkeypatch.delenv("OMP_NUM_THREADS")
    engine.set_num_threads(2)
    try:
        assert backend.run_threads() == 2         # chosen in code
    finally:
        engine.set_num_threads(None)


def test_compiled_paths_run_on_the_threads_the_default_leaves(monkeypatch):
    """With the machine shared, the compiled step and single-image inference run on fewer threads;
    batches of whole images per thread keep them all; the results are unchanged."""
    import numpy as np
    import engine
    import engine.plan
    from engine.runtime import threads as backend
    from engine.plan import compile_network
    from engine.trainstep import CompiledStep
    from models.paper import build
    if not engine.openmp_enabled():
        pytest.skip("built without OpenMP: one thread only")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(backend, "_num_threads", None)
    monkeypatch.setattr(backend, "get_num_threads", lambda: 2)
    monkeypatch.setattr(engine.plan, "get_num_threads", lambda: 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 4)
    plan = compile_network(build("flattened", in_shape=(1, 28, 28)).eval())
    results = {}
    for busy in (0.0, 1.0):
        monkeypatch.setattr(backend, "cpu_share", _share([(0.0, 0.0, 0.0), (1.0, busy, 0.0)]))
        backend.cpu_share.update()
        step = CompiledStep(build("flattened", in_shape=(1, 28, 28)), batch_size=4)  # same weights, same seeds
        step.forward(x)
        step_threads = step.last_threads
        one = plan(x[:1]).copy()
        one_threads = plan.last_threads
        plan(x)
        results[busy] = (step_threads, one_threads, plan.last_threads, step._last_out.copy(), one)
    assert results[0.0][:3] == (2, 2, 2)
    assert results[1.0][:3] == (1, 1, 2)
    np.testing.assert_array_equal(results[0.0][3], results[1.0][3])
    np.testing.assert_array_equal(results[0.0][4], results[1.0][4])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not os.path.exists("/proc/stat")
                    or not 2 <= (os.cpu_count() or 1) <= 8, reason="needs Linux's /proc/stat and 2-8 cores")
def test_busy_processes_beside_us_are_seen():
    """Real counters: with a busy process on every core but one, the default goes down to one thread."""
    import subprocess
    import time
    from engine.runtime.threads import CpuShare
    n = os.cpu_count() - 1
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        share = CpuShare(window=0.5)
        time.sleep(0.3)
        share.update()
        time.sleep(0.8)
        assert share.threads(n + 1) == 1, f"others use {share.update():.2f} cores of {n + 1}"
    finally:
        for p in procs:
            p.kill()
            p.wait()
