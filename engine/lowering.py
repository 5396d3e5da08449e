"""One description of a network's operations, shared by every executor.

    ops = lower(net, in_shape)     # [Op(kind, name, layer, in_shape, out_shape), ...], one per layer
    ops = fuse(ops)                # the same with V+H pairs as one "vh" op and ReLUs folded

``lower`` is the one place that maps each layer type to an operation kind and works
out the per-image shapes; ``fuse`` the one place that decides what the compiled
executors fuse. The executors are built from these lists, each in one place: the
compiled inference plan (engine/plan.py) and the compiled training step
(engine/trainstep.py) from ``fuse(lower(...))``, the ONNX export (engine/export.py)
from ``lower(...)``. A new layer type needs one line in ``KIND_OF`` here and one case
per executor that supports it.

The compiled executors pass their ops to C as rows of an int64 table whose columns are
the fields of the C struct ``fl_op`` (engine/_ops.h). ``op_table(rows)`` builds that
table by field name, with the names read from the compiled module, so the Python and
C sides of the format are declared once, in the header.
"""
from dataclasses import dataclass

import numpy as np

from . import _kernels
from .layers import Sequential

IMAGE_KINDS = ("conv", "lateral", "vertical", "horizontal", "pool")  # ops that take (C, H, W) input

FIELDS = tuple(_kernels.op_fields())                    # the columns of a C op row, in order (engine/_ops.h)
COL = {name: i for i, name in enumerate(FIELDS)}
CKIND = {name: i for i, name in enumerate(_kernels.op_kinds())}  # C op kinds by name: GEMM, CONV, VH, ...


class UnsupportedNetwork(ValueError):
    """The network holds a layer (or a dtype, backend or shape) a compiled executor does not handle."""


@dataclass
class Op:
    """One operation: `layer` applied to per-image input of `in_shape`, giving `out_shape`.

    Shapes leave out the batch: (C, H, W) for images, (n,) after Flatten. After ``fuse``:
    `relu` says a ReLU is applied to the output, and a "vh" op (layer None) runs its
    `parts`, (vertical op or None, horizontal op or None), one after the other."""
    kind: str
    name: str
    layer: object
    in_shape: tuple
    out_shape: tuple
    relu: bool = False
    parts: tuple = ()


FUSES_RELU = ("conv", "lateral", "vh", "pool", "linear")  # ops that apply a ReLU to their output themselves


def leaves(layer, name=""):
    """(name, layer) of the network's layers in order, Sequential/Flattened containers opened."""
    if isinstance(layer, Sequential):
        for cname, child in layer.children:
            yield from leaves(child, f"{name}.{cname}" if name else cname)
    else:
        yield name, layer


def lower(net, in_shape):
    """The ops of `net` for per-image inputs of `in_shape` (C, H, W), with every shape checked."""
    shape = tuple(int(v) for v in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UnsupportedNetwork(f"in_shape must be (C, H, W) of positive sizes, got {in_shape}")
    ops = []
    for name, layer in leaves(net):
        kind = layer.kind
        if kind is None:
            raise UnsupportedNetwork(f"{name}: no compiled op for {type(layer).__name__}")
        if kind in IMAGE_KINDS and len(shape) != 3:
            raise UnsupportedNetwork(f"{name}: {layer!r} after Flatten is not supported")
        if layer.in_channels is not None and shape[0] != layer.in_channels:
            raise UnsupportedNetwork(f"{name}: {layer!r} expects {layer.in_channels} channels, gets {shape[0]}")
        if kind == "linear" and int(np.prod(shape)) != layer.n_in:
            raise UnsupportedNetwork(f"{name}: {layer!r} gets {int(np.prod(shape))} inputs")
        if kind == "linear":
            out = (layer.n_out,)
        elif kind == "flatten":
            out = (int(np.prod(shape)),)
        else:
            out = tuple(int(v) for v in layer.output_shape((1, *shape))[1:])
        if min(out) < 1:
            raise UnsupportedNetwork(f"{name}: {layer!r}: input {shape} too small")
        ops.append(Op(kind, name, layer, shape, out))
        shape = out
    if not ops:
        raise UnsupportedNetwork("the network has no layers")
    return ops


def fuse(ops):
    """The ops for the compiled executors: each vertical op with a horizontal op right after it
    on the same channels, or a lone vertical or horizontal op, becomes one "vh" op (the vertical
    convolution's output never leaves the op's scratch), and each ReLU right after an op that can
    apply it is folded into that op."""
    out, i = [], 0
    while i < len(ops):
        op = ops[i]
        if op.kind in ("vertical", "horizontal"):
            v, hz = (op, None) if op.kind == "vertical" else (None, op)
            if v is not None and i + 1 < len(ops) and ops[i + 1].kind == "horizontal" \
                    and ops[i + 1].in_shape == op.out_shape:
                hz = ops[i + 1]
                i += 1
            name = f"{op.name}+horizontal" if v is not None and hz is not None else op.name
            out.append(Op("vh", name, None, op.in_shape, (hz or v).out_shape, parts=(v, hz)))
        elif op.kind == "relu" and out and out[-1].kind in FUSES_RELU:
            out[-1] = Op(**dict(out[-1].__dict__, relu=True, name=f"{out[-1].name}+{op.name}"))
        else:
            out.append(op)
        i += 1
    return out


def op_row(kind, in_shape, out_shape, **fields):
    """A C op row as a dict of field -> int: kind by name, shapes padded to (C, H, W)."""
    (c, h, w), (f, ho, wo) = (tuple(in_shape) + (1, 1))[:3], (tuple(out_shape) + (1, 1))[:3]
    return dict(kind=CKIND[kind], c_in=c, h_in=h, w_in=w, c_out=f, h_out=ho, w_out=wo, **fields)


def op_table(rows):
    """The (n_ops, n_fields) int64 table of C op rows (dicts of field -> int; fields left out are 0)."""
    table = np.zeros((len(rows), len(FIELDS)), np.int64)
    for r, row in enumerate(rows):
        for name, v in row.items():
            table[r, COL[name]] = int(v)
    return table
