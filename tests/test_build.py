"""The build falls back to serial kernels, with a warning, when the compiler has no OpenMP."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_serial_build_without_openmp(tmp_path):
    pytest.importorskip("Cython")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "engine", tmp_path / "engine",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=shutil.ignore_patterns("__pycache__"))
    cc = str(ROOT / ".ci" / "cc-without-openmp")
    env = dict(os.environ, CC=cc, LDSHARED=f"{cc} -shared", FLATNET_PORTABLE="1")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "no working OpenMP" in build.stderr + build.stdout
    check = subprocess.run(
        [sys.executable, "-c",
         "import engine, numpy as np; print(engine.kernels_path()); print(engine.openmp_enabled(), "
         "engine.get_num_threads()); f = engine.Flattened(3, 4, 3); print(f.forward(np.ones((1,3,5,5))).shape)"],
        cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert check.returncode == 0, check.stderr
    path, flags, shape = check.stdout.splitlines()
    assert path.startswith(str(tmp_path))
    assert flags == "False 1"
    assert shape == "(1, 4, 5, 5)"
