"""Backend selection: the CPU always works; CuPy is used only when it imports and a device passes a smoke test."""
import sys
import types

import pytest

from engine.backend import BackendUnavailable, select_backend


def test_cpu_is_always_available():
    assert select_backend("cpu") == ("cpu", None)
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("tpu")


def test_without_cupy_auto_falls_back_and_cupy_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    name, why = select_backend("auto")
    assert name == "cpu" and "not installed" in why
    with pytest.raises(BackendUnavailable, match=r"not installed.*pip install cupy-cuda12x"):
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
    code = ("import sys, runpy; sys.modules['cupy'] = None; sys.argv = ['train.py', '--backend', 'cupy', '--summary'];"
            f" runpy.run_path({str(root / 'train.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert r.returncode == 1 and "--backend cupy: CuPy is not installed" in r.stderr
