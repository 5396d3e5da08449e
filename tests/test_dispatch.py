"""Run-time CPU dispatch (engine/_kernels.py): the kernels are built once per CPU target (baseline,
avx2, avx512) and the best one this CPU runs is chosen at import; FLATNET_CPU_TARGET forces one.

For every target this machine runs, a fresh interpreter with the target forced reports it (engine,
the benchmark header, the selftest description) and computes the kernels' results on fixed inputs
(tests/dispatch_outputs.py); they are checked against the float64 references of tests/reference.py
and against each other:

* bit-identical between all targets: kernels without multiply-adds (im2col, col2im, max-pooling and
  its argmax, ReLU, the dropout mask, mask-and-scale, bias gradients: sums in a fixed order) and the
  GEMM (scipy's BLAS, the same library whatever our target);
* bit-identical between avx2 and avx512: both contract a*b+c into one FMA in the same places and
  keep each output's summation order, so every kernel but the compiled inference plan agrees (the
  plan's micro-kernel tiles and horizontal sums follow the vector width: 8 or 16 floats);
* the baseline (SSE2, no FMA: a product is rounded before it is added) against the FMA targets, and
  the plan between any two: for a 1D convolution or a GEMM, a sum of n terms, any evaluation order
  with or without FMA is within gamma_n * sum|terms| of the exact value (gamma_n = n u / (1 - n u),
  u the unit roundoff), so two targets are within twice that; the kernels are held to exactly this
  bound against a direct sum in long double (plus that sum's own bound, in long double's u). Whole networks (the plan, a training step) compound many such
  sums; there the tolerance is the one the float32 kernel tests accept (conftest.TOL: 2e-5 of the
  array's largest magnitude), about 20x the differences seen between targets (under 1e-6).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TOL
from reference import im2col_ref, maxpool_ref, splitmix64

import engine
from engine import _kernels

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = Path(__file__).resolve().parent / "dispatch_outputs.py"
sys.path.insert(0, str(OUTPUTS.parent))
import dispatch_outputs  # noqa: E402

LAYOUT = {"baseline": (8, 4), "avx2": (16, 8), "avx512": (32, 16)}  # (NR, VL) of the float32 micro-kernel
COMPILED_FEATURES = {"baseline": set(), "avx2": {"avx", "avx2", "fma"}, "avx512": {"avx", "avx2", "fma", "avx512f"}}
AVX2_CPU = frozenset({"sse2", "avx", "avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "movbe"})
AVX512_CPU = AVX2_CPU | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def runnable_param(target):
    return pytest.param(target, marks=pytest.mark.skipif(
        target not in _kernels.RUNNABLE, reason=f"this machine cannot run (or did not build) the {target} target"))


TARGETS = [runnable_param(t) for t in _kernels.TARGETS]


def forced(target, **extra):
    env = dict(os.environ, FLATNET_CPU_TARGET=target, **extra)
    env.pop("FLATNET_TEST_EMULATED_CUPY", None)
    return env


def gamma(n, dtype):
    u = np.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def conv1d_ref(x, w, b, axis, before, after):
    """The 1D correlation of tests/reference.py's conv1d_ref, as a direct sum in long double (no FFT),
    so that its own error is far below the float64 kernels' bound."""
    x, w = x.astype(np.longdouble), w.astype(np.longdouble)
    k = w.shape[1]
    pads = [(0, 0)] * 4
    pads[axis] = (max(before, 0), max(after, 0))
    xp = np.pad(x, pads)
    crop = max(-before, 0)
    n_out = x.shape[axis] + before + after - k + 1
    shape = [1] * 4
    shape[1] = w.shape[0]
    y = np.zeros([n_out if d == axis else x.shape[d] for d in range(4)], np.longdouble)
    for j in range(k):
        y += w[:, j].reshape(shape) * np.take(xp, np.arange(crop + j, crop + j + n_out), axis=axis)
    return y + (0 if b is None else b.astype(np.longdouble).reshape(shape))


def within(got, ref, n, dtype, absolute):
    """|got - ref| <= gamma_n * sum|terms| (the kernel's bound) + the long double reference's own bound."""
    return np.all(np.abs(got - ref) <= (gamma(n, dtype) + gamma(n, np.longdouble)) * absolute)


# --- the choice, without compiling anything: select() is what the import runs ---

def test_the_best_target_this_cpu_runs_is_chosen():
    if os.environ.get(_kernels.ENV):
        pytest.skip(f"{_kernels.ENV} is set for this run")
    assert engine.cpu_target() == _kernels.RUNNABLE[-1] == _kernels.TARGET
    assert _kernels.compiled_target() == engine.cpu_target()
    assert Path(engine.kernels_path()).name.startswith(f"_kernels_{engine.cpu_target()}.")
    assert tuple(_kernels.infer_layout()) == LAYOUT[engine.cpu_target()]
    assert "baseline" in _kernels.BUILT and set(_kernels.RUNNABLE) <= set(_kernels.BUILT)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or _kernels.cpu_features() is None,
                    reason="needs Linux's /proc/cpuinfo and an x86 build that asks the CPU")
def test_the_cpus_features_agree_with_proc_cpuinfo():
    """The two ways of asking (the compiler's __builtin_cpu_supports, /proc/cpuinfo's flags) agree here."""
    assert _kernels.cpu_features() == _kernels.cpuinfo_features()
    assert "sse2" in _kernels.cpu_features()


def test_cpuinfo_flags_are_read_with_the_kernels_spelling(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c bmi1 bmi2 abm movbe avx512f\n"
                    "processor\t: 1\nflags\t\t: fpu sse2\n")
    assert _kernels.cpuinfo_features(str(info)) == AVX2_CPU | {"avx512f"}
    assert _kernels.cpuinfo_features(str(tmp_path / "missing")) == frozenset()


def test_select_takes_the_best_or_the_forced_target():
    built = ("baseline", "avx2", "avx512")
    assert _kernels.select("", built, AVX512_CPU) == "avx512"
    assert _kernels.select("", built, AVX2_CPU) == "avx2"
    assert _kernels.select("", built, frozenset({"sse2"})) == "baseline"
    assert _kernels.select("", ("baseline", "avx2"), AVX512_CPU) == "avx2"  # only what was built
    assert _kernels.select(" avx2 ", built, AVX512_CPU) == "avx2"
    assert _kernels.select("baseline", built, AVX512_CPU) == "baseline"
    assert _kernels.select("", ("baseline",), frozenset()) == "baseline"  # e.g. aarch64: the generic build


@pytest.mark.parametrize("requested,built,features,message", [
    ("avx512", ("baseline", "avx2", "avx512"), AVX2_CPU,
     "FLATNET_CPU_TARGET=avx512: this CPU cannot run it (no avx512f, avx512cd, avx512bw, avx512dq, avx512vl); "
     "choose one of baseline, avx2"),
    ("avx2", ("baseline", "avx2", "avx512"), AVX2_CPU - {"fma"},
     "FLATNET_CPU_TARGET=avx2: this CPU cannot run it (no fma); choose one of baseline"),
    ("avx1024", ("baseline", "avx2"), AVX512_CPU,
     "FLATNET_CPU_TARGET='avx1024' is not a CPU target: choose one of baseline, avx2"),
    ("avx512", ("baseline", "avx2"), AVX512_CPU,
     "FLATNET_CPU_TARGET=avx512: this installation has no 'avx512' build (built: baseline, avx2); "
     "choose one of baseline, avx2"),
])
def test_a_target_above_the_cpu_or_unknown_is_refused(requested, built, features, message):
    with pytest.raises(_kernels.CpuTargetError) as err:
        _kernels.select(requested, built, features)
    assert str(err.value) == message


def run(code, env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_unknown_target_stops_the_import_with_one_line():
    out = run("import engine", forced("avx1024"))
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: FLATNET_CPU_TARGET='avx1024' is not a CPU target: "
        f"choose one of {', '.join(_kernels.RUNNABLE)}"]
    # a program that catches it gets the exception, with its reason
    caught = run("try:\n    import engine\nexcept RuntimeError as e:\n    print(type(e).__name__, e)", forced("avx1024"))
    assert caught.returncode == 0 and caught.stdout.startswith("CpuTargetError FLATNET_CPU_TARGET='avx1024'")


@pytest.mark.parametrize("command", [["train.py", "--model", "flattened", "--summary"],
                                     ["-m", "engine.bench", "model", "--model", "flattened"],
                                     ["-m", "engine.evaluate", "model.npz"]])
def test_commands_end_with_one_line_for_a_bad_target(command):
    out = subprocess.run([sys.executable, *command], cwd=ROOT, env=forced("avx1024"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: FLATNET_CPU_TARGET='avx1024' is not a CPU target: choose one of {', '.join(_kernels.RUNNABLE)}"]


# A CPU without AVX-512, simulated: the baseline build's probe is replaced before engine is imported.
SIMULATED_AVX2_CPU = (
    "import importlib.machinery, sys, types\n"
    "probe = types.ModuleType('engine._kernels_baseline')\n"
    "probe.__spec__ = importlib.machinery.ModuleSpec('engine._kernels_baseline', None)\n"
    f"probe.cpu_features = lambda: frozenset({sorted(AVX2_CPU)!r})\n"
    "sys.modules['engine._kernels_baseline'] = probe\n"
    "import engine; print(engine.cpu_target(), engine.kernels_path())\n"
)


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(_kernels.RUNNABLE), reason="needs the avx2 and avx512 builds")
def test_on_a_cpu_without_avx512_the_import_picks_avx2_and_refuses_avx512():
    env = forced("")
    picked = run(SIMULATED_AVX2_CPU, env)
    assert picked.returncode == 0, picked.stderr
    target, path = picked.stdout.split()
    assert target == "avx2" and Path(path).name.startswith("_kernels_avx2.")
    refused = run(SIMULATED_AVX2_CPU, forced("avx512"))
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        "error: FLATNET_CPU_TARGET=avx512: this CPU cannot run it "
        "(no avx512f, avx512cd, avx512bw, avx512dq, avx512vl); choose one of baseline, avx2"]


@pytest.mark.skipif(shutil.which("objdump") is None or "avx512" not in _kernels.BUILT,
                    reason="needs objdump and an x86 build with every target")
def test_only_the_avx_targets_hold_avx_instructions():
    """The baseline build runs on any x86-64 (no ymm/zmm register anywhere); the flags reach each target."""
    def registers(target):
        path = Path(engine.kernels_path()).with_name(Path(engine.kernels_path()).name.replace(
            f"_kernels_{engine.cpu_target()}.", f"_kernels_{target}."))
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                              check=True).stdout
        return {r: text.count(f"%{r}mm") for r in "xyz"}
    base, avx2, avx512 = registers("baseline"), registers("avx2"), registers("avx512")
    assert base["x"] > 0 and base["y"] == base["z"] == 0
    assert avx2["y"] > 0 and avx2["z"] == 0
    assert avx512["z"] > 0


# --- every target this machine runs, forced in a fresh interpreter ---

@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{target: the .npz that tests/dispatch_outputs.py wrote with that target forced}."""
    folder = tmp_path_factory.mktemp("dispatch")
    found = {}
    for target in _kernels.RUNNABLE:
        path = folder / f"{target}.npz"
        out = subprocess.run([sys.executable, str(OUTPUTS), str(path)], cwd=ROOT, env=forced(target),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        found[target] = dict(np.load(path))
    return found


@pytest.mark.parametrize("target", TARGETS)
def test_the_forced_target_is_reported(target, outputs):
    report = json.loads(str(outputs[target]["report"]))
    assert report["cpu_target"] == report["compiled_target"] == report["bench_header"] == target
    assert Path(report["kernels_path"]).name.startswith(f"_kernels_{target}.")
    assert report["kernels_path"].endswith((".so", ".pyd"))
    assert f"(CPU target {target}, OpenMP" in report["selftest"]
    assert tuple(report["layout"]) == LAYOUT[target]
    assert set(report["compiled_features"]) == COMPILED_FEATURES[target]
    assert report["openmp"] == engine.openmp_enabled()


@pytest.mark.parametrize("target", TARGETS)
def test_the_forced_target_computes_the_reference_results(target, outputs):
    got = outputs[target]
    for dtype in (np.float32, np.float64):
        tag = np.dtype(dtype).name
        for name, (x, w, b, k, before) in dispatch_outputs.inputs(dtype).items():
            after = k - 1 - before
            for axis in (2, 3):
                key = f"{tag}_{name}_{axis}"
                y = got[f"conv_{key}"]
                ref = conv1d_ref(x, w, b, axis, before, after)
                sums = conv1d_ref(abs(x), abs(w), abs(b), axis, before, after)
                assert y.dtype == dtype and within(y, ref, k + 1, dtype, sums), f"conv {key}"
                dy = np.random.default_rng(11).standard_normal(y.shape).astype(dtype)
                ref = conv1d_ref(dy, w[:, ::-1], None, axis, k - 1 - before, before)
                sums = conv1d_ref(abs(dy), abs(w[:, ::-1]), None, axis, k - 1 - before, before)
                assert within(got[f"convgrad_{key}"], ref, k, dtype, sums), f"input gradient {key}"
                n_terms = y.shape[0] * y.shape[2] * y.shape[3]
                for j in range(k):
                    e = np.zeros(w.shape)
                    e[:, j] = 1
                    shifted = conv1d_ref(x, e, None, axis, before, after)  # x moved by j - before: exact
                    ref, sums = (shifted * dy).sum(axis=(0, 2, 3)), (abs(shifted) * abs(dy)).sum(axis=(0, 2, 3))
                    assert within(got[f"convdw_{key}"][:, j], ref, n_terms, dtype, sums), f"weight gradient {key}"
                dyl = dy.astype(np.longdouble)
                assert within(got[f"convdb_{key}"], dyl.sum(axis=(0, 2, 3)), n_terms, dtype,
                              abs(dyl).sum(axis=(0, 2, 3))), f"bias gradient {key}"
        rng = np.random.default_rng(3)
        x = rng.standard_normal((3, 5, 9, 8)).astype(dtype)
        np.testing.assert_array_equal(got[f"im2col_{tag}"], im2col_ref(x, 3, 3, 1, 1))
        np.testing.assert_array_equal(got[f"maxpool_{tag}"], maxpool_ref(x, 3, 2, 4, 3)[0])
        rng.standard_normal((3, 45, 72))  # the cotangent col2im took (compared between targets below)
        v = rng.standard_normal(50_001).astype(dtype)
        np.testing.assert_array_equal(got[f"relu_{tag}"], np.maximum(v, 0))
        mask = got["dropout_mask"]
        want = [splitmix64(99, i) >> 32 >= int(0.3 * 2**32) for i in range(5000)]
        np.testing.assert_array_equal(mask[:5000], want)
        np.testing.assert_array_equal(got[f"mask_scale_{tag}"], np.where(mask == 1, v * dtype(2.5), 0))
        a, bm = rng.standard_normal((33, 70)).astype(dtype), rng.standard_normal((70, 19)).astype(dtype)
        al, bl = a.astype(np.longdouble), bm.astype(np.longdouble)
        assert within(got[f"gemm_{tag}"], al @ bl, 70, dtype, abs(al) @ abs(bl)), f"gemm {tag}"
    # whole networks: the compiled plan against the same target's layer path
    scale = np.abs(got["layers"]).max()
    assert np.abs(got["plan"] - got["layers"]).max() <= TOL[np.float32]["rtol"] * scale


def differing(a, b, keys):
    return sorted(k for k in keys if not np.array_equal(a[k], b[k]))


EXACT_EVERYWHERE = ("im2col_", "col2im_", "maxpool_", "relu_", "dropout_mask", "mask_scale_", "gemm_", "convdb_")


@pytest.mark.parametrize("first,second", [("baseline", "avx2"), ("avx2", "avx512"), ("baseline", "avx512")])
def test_the_targets_agree(first, second, outputs):
    for t in (first, second):
        if t not in outputs:
            pytest.skip(f"this machine cannot run (or did not build) the {t} target")
    a, b = outputs[first], outputs[second]
    keys = [k for k in a if k != "report"]
    assert len(keys) > 100 and set(keys) == set(b) - {"report"}
    assert differing(a, b, [k for k in keys if k.startswith(EXACT_EVERYWHERE)]) == []
    fma = {first, second} <= {"avx2", "avx512"}
    if fma:  # the same arithmetic: only the plan's tiles follow the vector width
        assert differing(a, b, keys) in ([], ["plan"])
    for dtype in (np.float32, np.float64):
        tag = np.dtype(dtype).name
        for name, (x, w, b_, k, before) in dispatch_outputs.inputs(dtype).items():
            for axis in (2, 3):
                key = f"conv_{tag}_{name}_{axis}"
                bound = 2 * gamma(k + 1, dtype) * conv1d_ref(abs(x), abs(w), abs(b_), axis, before, k - 1 - before)
                assert np.all(np.abs(a[key].astype(np.longdouble) - b[key]) <= bound), key
    for key in [k for k in keys if k == "plan" or k == "layers" or k.startswith("step_")]:
        scale = max(1e-30, float(np.abs(a[key]).max()))
        assert float(np.abs(a[key].astype(np.float64) - b[key]).max()) <= TOL[np.float32]["rtol"] * scale, key
    np.testing.assert_array_equal(a["plan"].argmax(axis=1), b["plan"].argmax(axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_the_kernel_tests_pass_with_the_target_forced(target):
    """tests/test_kernels.py, test_plan.py and test_trainstep.py in a fresh interpreter with `target` forced."""
    code = ("import sys, pytest, engine\n"
            "rc = pytest.main(['-q', '-x', '-p', 'no:cacheprovider', 'tests/test_kernels.py', 'tests/test_plan.py', "
            "'tests/test_trainstep.py'])\n"
            "print('target:', engine.cpu_target())\n"
            "sys.exit(int(rc))\n")
    out = run(code, forced(target))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"target: {target}"
    assert " passed" in out.stdout and " failed" not in out.stdout
