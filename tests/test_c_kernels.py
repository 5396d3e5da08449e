"""The C kernels (engine/_infer.h, _train.h, dropout_hash.h) built without Python by tests/c_kernels_check.c,
for each CPU target this machine runs and, under user-mode emulation, for aarch64 (the generic vector
path that NEON runs; Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine import _kernels
from engine.lowering import COL, FIELDS

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


# ----------------------------------------------------------------------------- the whole training step on aarch64

RUNNER = ROOT / "tests" / "c_step_runner.c"
STEP_MAGIC = 0x31504554534C46  # tests/c_step_runner.c
ADDRESS_FIELDS = ("w", "b", "wv", "bv", "wh", "bh", "dw", "db", "dwv", "dbv", "dwh", "dbh", "out", "mid", "aux", "wt",
                  "tv", "tm")  # the fields of an op row that hold addresses (engine/_ops.h)


def write_step(step, x, dlogits, threads, path):
    """The compiled step's op table and every array it reads or writes, in c_step_runner.c's format; returns the
    memory regions [(address, bytes)] in the file's order."""
    work = [step._cols_buf, step._wbuf_buf, step._wpack_buf, step._bpad_buf, step._part_buf, step._scratch_buf,
            *step._g, step._wpart_buf, x, dlogits]
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in [*step._keep, *work] if a.nbytes)
    regions = []
    for lo, hi in spans:  # overlapping arrays (views) go in one region
        if regions and lo < regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], hi)
        else:
            regions.append([lo, hi])

    def encode(address):
        if not address:
            return 0
        r = next(r for r, (lo, hi) in enumerate(regions) if lo <= address < hi)  # StopIteration: in no array
        return ((r + 1) << 40) | (address - regions[r][0])

    table = step.table.copy()
    is_address = np.array([name in ADDRESS_FIELDS for name in FIELDS], np.int64)
    for j in np.flatnonzero(is_address):
        table[:, j] = [encode(int(v)) for v in table[:, j]]
    a = lambda arr: encode(arr.ctypes.data)  # noqa: E731
    ctx = [a(step._cols_buf), step._cols_buf.size, a(step._wbuf_buf), a(step._wpack_buf), a(step._bpad_buf),
           step._bpad_buf.size, a(step._part_buf), step._part_buf.shape[1], a(step._scratch_buf),
           step._scratch_buf.shape[1], a(step._g[0]), a(step._g[1]), a(step._wpart_buf), step._wpart_buf.size, a(x),
           a(dlogits)]
    with open(path, "wb") as f:
        f.write(np.array([STEP_MAGIC, len(regions), *table.shape, len(x), threads], "<i8").tobytes())
        f.write(np.array([hi - lo for lo, hi in regions], "<i8").tobytes())
        for lo, hi in regions:
            f.write(ctypes.string_at(lo, hi - lo) + b"\0" * (-(hi - lo) % 8))
        f.write(is_address.astype("<i8").tobytes())
        f.write(table.astype("<i8").tobytes())
        f.write(np.array(ctx, "<i8").tobytes())
    return [(lo, hi - lo) for lo, hi in regions]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None
                    or not AARCH64_SYSROOT.is_dir(),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (Debian: apt-get install gcc-aarch64-linux-gnu "
                           "qemu-user)")
def test_the_compiled_training_step_on_aarch64_under_qemu(tmp_path, monkeypatch):
    """A step that CompiledStep built here (a direct first convolution, a Winograd F(4x4, 3x3) one, a direct
    one with its input gradient, a flattened layer: lateral GEMM and fused V+H, ReLUs, max-pooling, dropout, a
    Linear layer) run by the aarch64 build on two threads: its logits and every gradient equal the layer
    path's (the engine's reference) to float32 rounding."""
    import copy

    from engine import Conv2d, Dropout, Flatten, Flattened, Linear, MaxPool2d, ReLU, Sequential
    from engine.losses import SoftmaxCrossEntropy
    from engine.trainstep import CompiledStep
    monkeypatch.setenv("FLATNET_CONV", "auto")
    rng = np.random.default_rng(4)
    net = Sequential(Conv2d(3, 16, 3, padding=1, rng=rng), ReLU(), Conv2d(16, 16, 3, padding=1, rng=rng), ReLU(),
                     MaxPool2d(2), Conv2d(16, 12, 3, padding=1, rng=rng), ReLU(), Flattened(12, 18, 3, rng=rng),
                     ReLU(), Dropout(0.5, rng=np.random.default_rng(9)), Flatten(), Linear(18 * 5 * 5, 5, rng=rng))
    x, y = rng.standard_normal((3, 3, 10, 10)).astype(np.float32), rng.integers(0, 5, 3)
    twin, loss = copy.deepcopy(net), SoftmaxCrossEntropy()
    want = twin.forward(x)  # the layer path (its dropout seeds come from the same generator state)
    loss(want, y)
    dlogits = np.ascontiguousarray(loss.backward(), np.float32)
    twin.backward(dlogits)
    step = CompiledStep(net, (3, 10, 10), batch_size=3)
    assert (step.table[:, COL["tile"]] == 4).sum() == 1  # one convolution by Winograd, the others direct
    step._threads(2)  # per-thread scratch for two threads
    step.forward(x)  # draws the dropout seeds into the table
    for g in net.grads.values():
        g[...] = np.nan  # whatever comes back was computed on aarch64
    step._last_out[...] = np.nan
    regions = write_step(step, step._x, dlogits, 2, tmp_path / "step.in")
    exe = tmp_path / "step-aarch64"
    done = subprocess.run(["aarch64-linux-gnu-gcc", "-O3", "-fopenmp", f"-I{ROOT / 'engine'}", str(RUNNER), "-o",
                           str(exe), "-lm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = subprocess.run(["qemu-aarch64", "-L", str(AARCH64_SYSROOT), str(exe), str(tmp_path / "step.in"),
                          str(tmp_path / "step.out")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "VL=4 ok", out.stdout + out.stderr
    data = (tmp_path / "step.out").read_bytes()
    assert len(data) == sum(n for _, n in regions)
    at = 0
    for address, n in regions:
        ctypes.memmove(address, data[at:at + n], n)
        at += n
    got = step._last_out[:want.size].reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    for name, g in twin.grads.items():
        scale = float(np.abs(g).max())
        assert scale > 0 and np.isfinite(net.grads[name]).all(), name
        np.testing.assert_allclose(net.grads[name], g, rtol=1e-3, atol=2e-4 * scale, err_msg=name)
