"""Builds other than this machine's default: serial (no OpenMP) and fewer CPU targets.

Each builds a copy of the project in a temporary directory and runs a small check in a
fresh interpreter: the CPU target the dispatcher chose, the layers, and the compiled inference
path against the layer-by-layer forward (its vector width and tile shape depend on the target's
instruction set).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = (
    "import engine, numpy as np; print(engine.kernels_path()); print(engine.cpu_target()); print(engine.openmp_enabled(), "
    "engine.get_num_threads()); f = engine.Flattened(3, 4, 3); print(f.forward(np.ones((1,3,5,5))).shape); "
    "from engine.plan import compile_network; from models.paper import build; "
    "net = build('flattened', (3, 16, 16), 10).eval(); x = np.random.default_rng(0).random((3, 3, 16, 16)); "
    "p = compile_network(net); print(np.abs(p(x, num_threads=2) - net.forward(x)).max() < 1e-5, p.last_threads); "
    "print(engine._kernels.infer_layout()[1])"  # floats per SIMD vector of the compiled path
)


def build_copy(tmp_path, env):
    pytest.importorskip("Cython")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "engine", tmp_path / "engine",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           env=dict(os.environ, **env), capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    check = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert check.returncode == 0, check.stderr
    path, target, flags, shape, compiled, vector = check.stdout.splitlines()
    assert path.startswith(str(tmp_path))
    assert Path(path).name.startswith(f"_kernels_{target}.")  # the file of the target in use
    assert shape == "(1, 4, 5, 5)"
    return build.stdout + build.stderr, target, flags, compiled, int(vector)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_serial_build_without_openmp(tmp_path):
    cc = str(ROOT / ".ci" / "cc-without-openmp")
    # the baseline target only: plain x86-64 (SSE2), so the compiled path runs with 4-float vectors and 6-row tiles
    log, target, flags, compiled, vector = build_copy(
        tmp_path, dict(CC=cc, LDSHARED=f"{cc} -shared", FLATNET_BUILD_TARGETS="baseline"))
    assert "no working OpenMP" in log and "CPU targets: baseline\n" in log
    assert target == "baseline"
    assert flags == "False 1"
    assert compiled == "True 1"  # same outputs, on the one thread a serial build has
    assert vector == 4


def cpu_flags():
    try:
        return set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return set()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None or not {"avx2", "fma"} <= cpu_flags(),
                    reason="needs gcc and a CPU with AVX2 and FMA")
def test_avx2_build(tmp_path):
    """A build without the avx512 target: the dispatcher picks avx2 (8-float vectors, 6-row tiles; AVX-512 has
    16-float vectors, 8-row tiles)."""
    log, target, flags, compiled, vector = build_copy(tmp_path, dict(FLATNET_BUILD_TARGETS="baseline,avx2"))
    assert "OpenMP ON" in log and "CPU targets: baseline, avx2\n" in log
    assert target == "avx2" and vector == 8
    assert ("-march=x86-64-v3" in log or "-mavx2" in log) and "-march=native" not in log
    assert compiled == ("True 2" if flags.startswith("True") else "True 1")
