"""A GPU check in one command, for a machine that is only briefly available:

    pip install -e '.[gpu]' pytest && python -m engine.selftest --backend cupy

It prints the device and the CuPy/CUDA versions, compiles both kernel modules (float32,
float64) and the compiled GPU executor's, runs the kernel reference tests and the layer suite
on the device (pytest's `cupy` cases of tests/test_cuda.py, test_cuda_step.py, test_layers.py
and test_backend.py; test_cuda_step.py checks the compiled GPU step and plan against the CPU's
and the float64 layer path), checks that the CPU and the device give the same predictions and
the same dropout masks, times the layer benchmark (Figure 7), the training step and inference
(the compiled GPU executor of engine/runtime/cuda_step.py beside the layer-by-layer path, with
the fraction of the device's measured fp32 rate) and one training epoch of the default CIFAR-10
recipe on synthetic data of CIFAR-10's size, and ends with one line: PASS or FAIL. Where CuPy
cannot run it says why and exits non-zero.

`--backend cpu` is a dry run of the same steps on the CPU. With tests/emulated_cupy.py
installed as `cupy`, `--backend cupy` runs on the emulation (the pytest step too).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .common import Parser

ROOT = Path(__file__).resolve().parents[2]
TEST_FILES = ("tests/test_cuda.py", "tests/test_cuda_step.py", "tests/test_layers.py", "tests/test_backend.py")
BENCH = {  # (layers arguments, model arguments) per --bench
    "full": (["--sizes", "16,32,48,64,80", "--batch", "128", "--channels", "128", "--repeat", "5"],
             ["--dataset", "cifar10", "--batch", "128", "--repeat", "5"]),
    "tiny": (["--sizes", "8", "--batch", "2", "--channels", "4", "--repeat", "1"],
             ["--dataset", "mnist", "--batch", "2", "--repeat", "1"]),
}


def describe(backend):
    """(lines naming the device and the versions the results depend on, the device's name)."""
    import engine
    device = f"CPU, {engine.get_num_threads()} threads"
    lines = [f"python {sys.version.split()[0]}, numpy {np.__version__}, flatnet {engine.__version__}",
             f"CPU kernels {engine.kernels_path()} (CPU target {engine.cpu_target()}, "
             f"OpenMP {'on' if engine.openmp_enabled() else 'off'}, {engine.get_num_threads()} threads)"]
    if backend == "cupy":
        import cupy
        rt = cupy.cuda.runtime
        name = rt.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        emulated = " (tests/emulated_cupy.py: CPU emulation, not a GPU)" if _emulated() else ""
        device = f"{name}{emulated}"
        lines += [f"device 0: {device}; {rt.getDeviceCount()} device(s)",
                  f"CuPy {cupy.__version__}, CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}"]
    return lines, device


def _emulated():
    return getattr(sys.modules.get("cupy"), "__flatnet_emulated__", False)


def compile_modules(backend):
    """Compile both kernel modules and look up every kernel in them; returns what was done."""
    if backend == "cpu":
        return "nothing to compile on the CPU (the kernels are the built extension)"
    from ..runtime import cuda as bc
    from ..runtime.cuda_step import STEP_SOURCE
    names = re.findall(r"^KERNEL (\w+)\(", bc.SOURCE_PATH.read_text(), re.M)
    for dtype in (np.float32, np.float64):
        for name in names:
            bc.kernel(name, dtype)
    step_names = re.findall(r"^KERNEL (\w+)\(", STEP_SOURCE.read_text(), re.M)
    for name in step_names:
        bc.kernel(name, np.float32, STEP_SOURCE)
    return f"{len(names)} kernels x float32, float64; {len(step_names)} kernels of the compiled GPU executor"


def run_tests(backend):
    """pytest's cases of `backend` in the kernel, layer and backend tests; fails unless some ran and none failed."""
    missing = [f for f in TEST_FILES if not (ROOT / f).is_file()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: run the check from a clone of the repository")
    env = dict(os.environ)
    if backend == "cupy" and _emulated():
        env["FLATNET_TEST_EMULATED_CUPY"] = "1"  # the pytest process takes the emulation as `cupy` too
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", f"{backend} and not emulated",
               f"--junitxml={report}", *TEST_FILES]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if not report.is_file():
            raise RuntimeError(f"pytest did not run (is it installed? pip install pytest):\n{r.stdout}{r.stderr}")
        cases = ET.parse(report).getroot().iter("testcase")
        counts = dict(passed=0, failed=0, skipped=0)
        for case in cases:  # count the cases parametrized on this backend
            name = case.get("name", "")
            if f"[{backend}]" not in name and f"[{backend}-" not in name:
                continue
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            counts["passed" if kind == "passed" else "skipped" if kind == "skipped" else "failed"] += 1
    summary = f"{counts['passed']} {backend} cases passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if r.returncode != 0 or counts["failed"] or not counts["passed"]:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-40:])
        raise RuntimeError(f"{summary} (pytest exit {r.returncode}):\n{tail}")
    return summary


def compare_with_cpu(backend):
    """The same models give the same predictions, and Dropout the same masks, on the CPU and on `backend`."""
    from engine.models.paper import build

    from ..layers import Dropout
    from ..runtime import ops_for, to_numpy
    ops = ops_for(backend)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    worst = 0.0
    for name in ("baseline", "flattened"):
        cpu = build(name, (3, 32, 32), 10, seed=0).eval()
        dev = build(name, (3, 32, 32), 10, seed=0).to(backend).eval()
        want, got = cpu.forward(x), to_numpy(dev.forward(ops.asarray(x)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{name}: predictions differ")
        if not np.array_equal(got.argmax(1), want.argmax(1)):
            raise AssertionError(f"{name}: predicted classes differ")
        worst = max(worst, float(np.abs(got - want).max()))
    ones = np.ones((4, 3, 10, 10), np.float32)
    want = Dropout(0.4, rng=11).forward(ones)
    got = to_numpy(Dropout(0.4, rng=11).forward(ops.asarray(ones)))
    if not np.array_equal(got, want):
        raise AssertionError("dropout masks differ between the CPU and the device")
    return f"logits agree (largest difference {worst:.2e}); dropout masks identical"


def run_benchmarks(backend, size, json_path):
    from . import bench
    layers, model = BENCH[size]
    extra = ["--json", json_path] if json_path else []
    bench.main(["layers", "--backend", backend, *layers, *extra])
    bench.main(["model", "--backend", backend, "--model", "flattened", *model])
    bench.main(["model", "--backend", backend, "--model", "baseline", *model])
    return f"{size} sizes timed on {backend}"


def time_epoch(backend, size):
    """One epoch of train.py's default CIFAR-10 recipe (flattened model) with its evaluation, on synthetic data of
    CIFAR-10's size (50,000 training and 10,000 test images; --bench tiny: 64 and 32), run by the trainer with the
    compiled step and plan, then layer by layer; returns the wall times."""
    from engine.models.paper import build
    from engine.models.recipes import DEFAULT_RECIPE, recipe

    from ..trainer import Trainer
    (n_train, n_test), batch = ((50_000, 10_000), None) if size == "full" else ((64, 32), 16)
    rng = np.random.default_rng(0)
    data = dict(train_x=rng.standard_normal((n_train, 3, 32, 32), dtype=np.float32),
                train_y=rng.integers(0, 10, n_train),
                test_x=rng.standard_normal((n_test, 3, 32, 32), dtype=np.float32), test_y=rng.integers(0, 10, n_test))
    cfg = dict(recipe(DEFAULT_RECIPE, "cifar10", "flattened"), seed=0, epochs=1)
    if batch:
        cfg["batch_size"] = batch
    seconds = {}
    for step in ("compiled", "layers"):
        with tempfile.TemporaryDirectory() as tmp:
            t = Trainer(build("flattened", (3, 32, 32), 10, seed=0).to(backend), data, dict(cfg, step=step), tmp,
                        log=lambda m: None, progress=False)
            t0 = time.perf_counter()
            if t.run() != "done":
                raise RuntimeError(f"the {step} epoch did not finish")
            seconds[step] = time.perf_counter() - t0
            if step == "compiled" and t.step.name != "compiled":
                raise RuntimeError(f"the trainer did not run the compiled step: {t.step_note}")
    return (f"one epoch of {n_train:,} images at batch {cfg['batch_size']} and {n_test:,} evaluated: compiled "
            f"{seconds['compiled']:.2f} s, layer by layer {seconds['layers']:.2f} s "
            f"({seconds['layers'] / seconds['compiled']:.1f}x)")


def main(argv=None):
    p = Parser(prog="python -m engine.selftest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["cupy", "cpu"], default="cupy",
                   help="the backend to check (cpu: a dry run of the same steps)")
    p.add_argument("--bench", choices=["full", "tiny", "none"], default="full",
                   help="benchmark sizes: full (Figure 7's sizes, batch 128), tiny (a smoke run), none")
    p.add_argument("--json", default=None, help="also write the layer benchmark's records to this JSON file")
    args = p.parse_args(argv)

    from ..runtime.select import BackendUnavailable, select_backend
    print(f"# flatnet self-test, backend {args.backend}")
    try:
        select_backend(args.backend)
    except BackendUnavailable as e:
        print(f"# {e}")
        print(f"selftest FAIL: the {args.backend} backend cannot run here (see above)")
        return 1
    lines, device = describe(args.backend)
    for line in lines:
        print(f"# {line}")
    steps = [("compile both kernel modules", lambda: compile_modules(args.backend)),
             ("kernel reference tests and layer suite (pytest)", lambda: run_tests(args.backend)),
             ("CPU and device agree", lambda: compare_with_cpu(args.backend))]
    if args.bench != "none":
        steps.append(("benchmarks", lambda: run_benchmarks(args.backend, args.bench, args.json)))
        steps.append(("a training epoch", lambda: time_epoch(args.backend, args.bench)))
    failed = []
    t_start = time.perf_counter()
    for what, step in steps:
        t0 = time.perf_counter()
        print(f"# --- {what}", flush=True)
        try:
            result = step()
            print(f"# ok   {what}: {result} ({time.perf_counter() - t0:.0f}s)", flush=True)
        except Exception as e:  # report every step, then one verdict
            failed.append(what)
            print(f"# FAIL {what}: {type(e).__name__}: {e}", flush=True)
    total = f"{time.perf_counter() - t_start:.0f}s"
    if failed:
        print(f"selftest FAIL ({args.backend}, {device}; {total}): {'; '.join(failed)}")
        return 1
    dry = " (dry run)" if args.backend == "cpu" or _emulated() else ""
    print(f"selftest PASS{dry} ({args.backend}, {device}; {len(steps)} steps, {total})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
