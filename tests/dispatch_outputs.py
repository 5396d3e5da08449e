"""Run by tests/test_dispatch.py in a fresh interpreter per CPU target (FLATNET_CPU_TARGET forced):
writes what the target reports and the outputs of the kernels on fixed inputs to an .npz file.

    python tests/dispatch_outputs.py OUT.npz

Inputs come from fixed seeds, so every target computes on the same numbers; the test compares
the targets with each other and with the float64 references of tests/reference.py.
"""
import copy
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from engine import _kernels  # noqa: E402
from engine.cli.bench.timing import environment  # noqa: E402
from engine.cli.selftest import describe  # noqa: E402
from engine.plan import compile_network  # noqa: E402
from engine.trainstep import CompiledStep  # noqa: E402
from models.paper import build  # noqa: E402

# (name, shape (N, C, H, W), K, before): 1D convolutions with channels that are not a multiple of
# any vector width, K larger than some rows, padding on both sides and cropped.
CONV = [("a", (2, 5, 13, 11), 5, 2), ("b", (3, 17, 9, 40), 3, 1), ("c", (1, 3, 2, 7), 4, 3), ("d", (2, 2, 37, 70), 7, -1)]


def inputs(dtype, seed=7):
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape).astype(dtype), rng.standard_normal((shape[1], k)).astype(dtype),
                   rng.standard_normal(shape[1]).astype(dtype), k, before) for name, shape, k, before in CONV}


def conv_out_shape(x, k, before, axis):
    after = k - 1 - before  # the 'same'-like window: as many outputs as inputs along the axis
    shape = list(x.shape)
    shape[axis] += before + after - k + 1
    return tuple(shape)


def main(path):
    out = {}
    for dtype in (np.float32, np.float64):
        tag = np.dtype(dtype).name
        for name, (x, w, b, k, before) in inputs(dtype).items():
            for axis, fwd, grad in ((2, _kernels.vconv_forward, _kernels.vconv_grad_params),
                                    (3, _kernels.hconv_forward, _kernels.hconv_grad_params)):
                y = np.full(conv_out_shape(x, k, before, axis), np.nan, dtype)
                fwd(x, w, b, before, False, y, 2)
                out[f"conv_{tag}_{name}_{axis}"] = y
                dy = np.random.default_rng(11).standard_normal(y.shape).astype(dtype)
                dx = np.full(x.shape, np.nan, dtype)
                fwd(dy, w, None, k - 1 - before, True, dx, 2)
                out[f"convgrad_{tag}_{name}_{axis}"] = dx
                dw, db = np.full(w.shape, np.nan, dtype), np.full(b.shape, np.nan, dtype)
                grad(x, dy, before, dw, db, 2)
                out[f"convdw_{tag}_{name}_{axis}"], out[f"convdb_{tag}_{name}_{axis}"] = dw, db
        rng = np.random.default_rng(3)
        x = rng.standard_normal((3, 5, 9, 8)).astype(dtype)
        cols = np.empty((3, 5 * 3 * 3, 9 * 8), dtype)  # 3x3 windows, stride 1, pad 1
        _kernels.im2col(x, 0, 3, 3, 1, 1, cols, 2)
        out[f"im2col_{tag}"] = cols
        dx = np.full(x.shape, np.nan, dtype)
        _kernels.col2im(rng.standard_normal(cols.shape).astype(dtype), 0, 3, 3, 1, 1, dx, 2)
        out[f"col2im_{tag}"] = dx
        pooled = np.empty((3, 5, 4, 3), dtype)
        argmax = np.empty(pooled.shape, np.int32)
        _kernels.maxpool_forward(x, 3, 2, pooled, argmax, 2)
        out[f"maxpool_{tag}"], out[f"maxpool_argmax_{tag}"] = pooled, argmax
        v = rng.standard_normal(50_001).astype(dtype)
        relu = np.empty_like(v)
        _kernels.relu_forward(v, relu, 2)
        out[f"relu_{tag}"] = relu
        mask = np.empty(v.size, np.uint8)
        _kernels.dropout_mask(mask, 99, int(0.3 * 2**32), 2)
        out["dropout_mask"] = mask
        scaled = np.empty_like(v)
        _kernels.mask_scale(v, mask, dtype(2.5), scaled, 2)
        out[f"mask_scale_{tag}"] = scaled
        a, bm = rng.standard_normal((33, 70)).astype(dtype), rng.standard_normal((70, 19)).astype(dtype)
        c = np.zeros((33, 19), dtype)
        _kernels.gemm(False, False, 1.0, a, bm, 0.0, c)
        out[f"gemm_{tag}"] = c

    # the compiled inference plan and training step on a paper model (float32)
    net = build("flattened", (3, 16, 16), 10, seed=4).eval()
    x = np.random.default_rng(5).random((6, 3, 16, 16)).astype(np.float32)
    out["plan"] = compile_network(net)(x, num_threads=2)
    out["layers"] = net.forward(x)
    train = build("flattened", (3, 16, 16), 10, seed=4)
    step, velocity = CompiledStep(copy.deepcopy(train), batch_size=6), {}
    y = np.random.default_rng(6).integers(0, 10, 6)
    loss, logits = step.step(x, y, 0.05, 0.9, 1e-4, None, velocity)
    out["step_loss"], out["step_logits"] = np.float64(loss), logits.copy()
    for name, g in step.net.grads.items():
        out[f"step_grad_{name}"] = g.copy()

    report = dict(cpu_target=engine.cpu_target(), kernels_path=engine.kernels_path(),
                  compiled_target=_kernels.compiled_target(), compiled_features=sorted(_kernels.compiled_features()),
                  layout=list(_kernels.infer_layout()), runnable=list(_kernels.RUNNABLE),
                  bench_header=environment(1)["cpu_target"], selftest=describe("cpu")[0][1],
                  openmp=engine.openmp_enabled())
    out["report"] = np.array(json.dumps(report))
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
