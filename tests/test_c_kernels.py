"""The C kernels (engine/_infer.h, _train.h, dropout_hash.h) built without Python by tests/c_kernels_check.c,
for each CPU target this machine runs and, under user-mode emulation, for aarch64 (the generic vector
path that NEON runs; Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from engine import _kernels

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "c_kernels_check.c"
# setup.py's flags for each x86 target, and the floats per vector of the micro-kernel they give
X86 = {"baseline": ("-march=x86-64", 4), "avx2": ("-march=x86-64-v3", 8), "avx512": ("-march=x86-64-v4", 16)}
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")


def build(cc, flags, out):
    done = subprocess.run([cc, "-O3", "-fopenmp", *flags, f"-I{ROOT / 'engine'}", str(SOURCE), "-o", str(out), "-lm"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("target", [
    pytest.param(t, marks=pytest.mark.skipif(t not in _kernels.RUNNABLE or not _kernels.cpu_features(),
                                             reason=f"needs an x86 CPU that runs the {t} target"))
    for t in X86])
def test_the_c_kernels_on_each_target_of_this_cpu(target, tmp_path):
    flag, vl = X86[target]
    exe = build("gcc", [flag], tmp_path / f"check-{target}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"VL={vl} ok", out.stdout


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None
                    or not AARCH64_SYSROOT.is_dir(),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (Debian: apt-get install gcc-aarch64-linux-gnu "
                           "qemu-user)")
def test_the_c_kernels_on_aarch64_under_qemu(tmp_path):
    exe = build("aarch64-linux-gnu-gcc", [], tmp_path / "check-aarch64")
    header = exe.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    out = subprocess.run(["qemu-aarch64", "-L", str(AARCH64_SYSROOT), str(exe)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "VL=4 ok", out.stdout + out.stderr
