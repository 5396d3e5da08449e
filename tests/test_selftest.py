"""The one-command GPU check (engine/cli/selftest.py), and the suite as a machine where CuPy works runs it.

No GPU here: the check runs as a dry run on the CPU and on the emulation (tests/emulated_cupy.py),
with tiny benchmark sizes (no timing is asserted). Where CuPy cannot run it must say why and fail.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import emulated_cupy
from engine.cli import selftest

ROOT = Path(__file__).resolve().parents[1]


def test_without_cupy_it_says_why_and_fails(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    assert selftest.main(["--backend", "cupy", "--bench", "none"]) == 1
    out = capsys.readouterr().out
    assert "CuPy is not installed" in out and "cupy-cuda12x[ctk]" in out
    assert out.splitlines()[-1].startswith("selftest FAIL: the cupy backend cannot run here")


def test_dry_run_on_the_cpu(capsys):
    assert selftest.main(["--backend", "cpu", "--bench", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "cpu cases passed, 0 failed" in out and "dropout masks identical" in out
    assert "train step       2 cpu" in out and "flattened     8 forward   cpu" in out
    assert "a training epoch: one epoch of 64 images at batch 16 and 32 evaluated: compiled" in out
    assert out.splitlines()[-1].startswith("selftest PASS (dry run) (cpu, CPU,")


def test_on_the_emulation_every_step_runs_on_the_device(emulated, capsys, tmp_path):
    """With the emulation as `cupy`: both modules compile, the `cupy` test cases run (none skipped), the
    logits and masks agree with the CPU, and the benchmarks time the device."""
    rc = selftest.main(["--backend", "cupy", "--bench", "tiny", "--json", str(tmp_path / "layers.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "device 0: emulated (CPU)" in out and "CuPy emulated" in out
    assert "10 kernels x float32, float64; 21 kernels of the compiled GPU executor" in out
    passed = int(out.split(" cupy cases passed")[0].rsplit(" ", 1)[-1])
    assert passed >= 50 and "0 failed, 0 skipped" in out
    assert "flattened     8 forward   cupy" in out and "train step       2 cupy" in out
    assert "train step       2 cupy compiled" in out and "GPU layer by layer / GPU compiled" in out
    assert "of the device's measured fp32 peak" in out and "; 2 graphs captured" in out
    assert "a training epoch: one epoch of 64 images at batch 16 and 32 evaluated: compiled" in out
    assert (tmp_path / "layers.json").stat().st_size > 100
    assert out.splitlines()[-1].startswith("selftest PASS (dry run) (cupy, emulated (CPU)")


def test_a_failing_step_fails_the_check(monkeypatch, capsys):
    def broken():
        raise AssertionError("predictions differ")

    monkeypatch.setattr(selftest, "run_tests", lambda backend: "skipped here")
    monkeypatch.setattr(selftest, "compare_with_cpu", lambda backend: broken())
    assert selftest.main(["--backend", "cpu", "--bench", "none"]) == 1
    out = capsys.readouterr().out
    assert "# FAIL CPU and device agree: AssertionError: predictions differ" in out
    last = out.splitlines()[-1]
    assert last.startswith("selftest FAIL (cpu") and last.endswith("CPU and device agree")


@pytest.mark.slow
def test_the_suite_with_the_emulation_as_cupy():
    """As on a machine where CuPy works: the emulation is `cupy` for a whole pytest run, so `auto`
    selects it (the benchmark's default then times it beside the CPU). The backend, benchmark and
    kernel tests pass; the layer suite's `cupy` cases run in the emulated self-test above."""
    if os.environ.get("FLATNET_TEST_EMULATED_CUPY") == "1":
        pytest.skip("already inside such a run")
    if emulated_cupy.available():
        pytest.skip(emulated_cupy.available())
    env = dict(os.environ, FLATNET_TEST_EMULATED_CUPY="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_backend.py",
                        "tests/test_bench.py", "tests/test_cuda.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "no usable GPU" not in r.stdout  # the `cupy` cases ran: auto and --backend cupy took the emulation
    assert " passed" in r.stdout.splitlines()[-1] and "failed" not in r.stdout.splitlines()[-1]
