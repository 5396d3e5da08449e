"""Data-dependent initialization: layer-sequential unit-variance scaling (LSUV).

Mishkin & Matas, "All you need is a good init" (ICLR 2016): after the usual random
draw, run one batch of training images through the network and, from the input up,
rescale each layer's weights until its output has unit standard deviation. A flattened
layer is a chain of six 1D convolutions (V, H, L twice) with no non-linearity between
them; the paper (section 3) blames the chain for slow, vanishing gradients. LSUV
rescales every link of the chain on its own, so the signal leaves each 1D filter at the
scale it came in.

`train.py --init lsuv` applies it to the paper's initialization (Glorot for flattened
layers, LeCun's heuristic elsewhere) before the first step; docs/results.md has the
runs that compare the two.
"""
import numpy as np

from .backend import ops_for, to_numpy
from .layers import Sequential

LSUV_BATCH = 256  # images whose activations set the scale (the original paper used one mini-batch)


def lsuv(net, x, target_std=1.0, tol=0.02, max_iter=10):
    """Rescale, in place, the weights of every layer of `net` that has a 'weight' parameter
    so that its output on the batch `x` has standard deviation `target_std` (within
    `tol`, relative), layer by layer from the input up. Biases are left as they are.

    Dropout is off during the passes (the network is put back in its mode afterwards).
    Returns one (layer name, output std before, total scale applied) per rescaled layer.
    Raises ValueError on an empty batch or a layer whose output is constant (std 0),
    which no scaling can fix.
    """
    if len(x) == 0:
        raise ValueError("lsuv: needs at least one image")
    ops = ops_for(net.backend)
    training = net.training
    net.eval()
    report = []
    try:
        _scale_sequence(net, ops.asarray(np.ascontiguousarray(x, dtype=net.dtype)), "", target_std, tol, max_iter,
                        report)
    finally:
        net.train(training)
    return report


def _scale_sequence(seq, x, prefix, target_std, tol, max_iter, report):
    for name, layer in seq.children:
        full = f"{prefix}{name}"
        if isinstance(layer, Sequential):
            x = _scale_sequence(layer, x, f"{full}.", target_std, tol, max_iter, report)
            continue
        weight = layer._params.get("weight")
        y = layer.forward(x)
        if weight is not None:
            before = std = float(to_numpy(y).std())
            total = 1.0
            for _ in range(max_iter):
                if not np.isfinite(std) or std == 0.0:
                    raise ValueError(f"lsuv: layer {full} gives output std {std} on this batch; cannot rescale it")
                if abs(std / target_std - 1.0) <= tol:
                    break
                scale = target_std / std
                weight *= weight.dtype.type(scale)
                total *= scale
                y = layer.forward(x)
                std = float(to_numpy(y).std())
            report.append((full, before, total))
        x = y.copy()  # (a layer may reuse its output buffer on the next call)
    return x
