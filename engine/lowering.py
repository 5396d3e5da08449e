"""One description of a network's operations, shared by every executor.

    ops = lower(net, in_shape)       # [Op(kind, name, layer, in_shape, out_shape), ...], one per layer
    ops = fuse(ops)                  # the same with V+H pairs as one "vh" op and ReLUs folded
    rows = layout(ops, training)     # the C rows: GEMM forms, NCHW/NHWC changes, identity V/H halves

``lower`` reads each layer's declared ``kind`` (engine/layers.py) and works out the per-image
shapes; ``fuse`` is the one place that decides what the compiled executors fuse; ``layout`` the
one place that decides how they run it: which ops are GEMMs, which convolutions run by Winograd's
algorithm (``conv_tile``), where activations change between NCHW and channels-last, what an absent
V or H half is, which dropouts the pooling before them applies. The executors only size buffers and fill
in pointers: the compiled inference plan (engine/plan.py) from ``layout(..., training=False)``,
the compiled training step (engine/trainstep.py) from ``layout(..., training=True)``; the ONNX
export (engine/onnx_export.py) takes ``lower(...)`` as it is, since ONNX keeps NCHW and its own ops.

The compiled executors pass their ops to C as rows of an int64 table whose columns are
the fields of the C struct ``fl_op`` (engine/_ops.h). ``op_table(rows)`` builds that
table by field name, with the names read from the compiled module, so the Python and
C sides of the format are declared once, in the header.
"""
import os
from dataclasses import dataclass, field

import numpy as np

from ._kernels import op_fields, op_kinds
from .layers import Sequential

FIELDS = tuple(op_fields())                    # the columns of a C op row, in order (engine/_ops.h)
COL = {name: i for i, name in enumerate(FIELDS)}
CKIND = {name: i for i, name in enumerate(op_kinds())}  # C op kinds by name: GEMM, CONV, VH, ...


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


CONV_ENV = "FLATNET_CONV"  # auto (default), direct, or winogradM: how a stride-1 k x k convolution runs
CONV_CHOICES = ("auto", "direct", "winograd2", "winograd3", "winograd4")
AUTO_TILE = 4  # F(4x4, k x k): see conv_tile
WINOGRAD_MIN_CHANNELS = 16


def conv_tile(layer, in_shape, choice=None):
    """The Winograd output tile m with which a CONV op runs in the compiled executors, or 0 for direct convolution.

    Winograd applies to a stride-1 convolution with 3x3 or 5x5 filters, padding below k, and at least
    WINOGRAD_MIN_CHANNELS input and output channels: a first layer's 3 input channels leave the transforms
    nothing to save (its GEMMs are short and the transforms' memory passes dominate). Where it applies, `choice`
    (default: $FLATNET_CONV, else auto) picks the tile: auto AUTO_TILE, winogradM m = M, direct none. The float32
    error of each tile size on the trained baseline is `python -m engine.bench winograd`, its speed
    `FLATNET_CONV=... python -m engine.bench model --model baseline` (docs/benchmarks.md)."""
    choice = choice or os.environ.get(CONV_ENV) or "auto"
    if choice not in CONV_CHOICES:
        raise ValueError(f"{CONV_ENV}={choice!r}: expected one of {', '.join(CONV_CHOICES)}")
    k, pad = layer.k, layer.padding
    c, h, w = in_shape
    if (choice == "direct" or layer.stride != 1 or k not in (3, 5) or pad > k - 1 or min(h, w) + 2 * pad < k
            or min(c, layer.c_out) < WINOGRAD_MIN_CHANNELS):
        return 0
    return AUTO_TILE if choice == "auto" else int(choice[-1])


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
        if layer.image_input and len(shape) != 3:
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
        elif op.kind == "relu" and out and all(p.layer.fuses_relu for p in (out[-1].parts or (out[-1],)) if p):
            out[-1] = Op(**dict(out[-1].__dict__, relu=True, name=f"{out[-1].name}+{op.name}"))
        else:
            out.append(op)
        i += 1
    return out


@dataclass
class Placed:
    """One row of a compiled executor's op table, as the layout pass decides it.

    `kind` is the C op kind (engine/_ops.h: GEMM, CONV, VH, POOL, LINEAR, RELU, DROPOUT, TO_NHWC,
    TO_NCHW); `op` the lowered op it runs (None for a layout change); shapes are per image as the
    C row reads them ((C, H, W), or (n, 1, 1) for LINEAR and a flat DROPOUT); `fields` the C fields
    that follow from the shapes (kernel sizes, strides, padding, taps). A LINEAR with `nhwc_from`
    reads a channels-last (C, H, W) activation flattened: its weight columns must be permuted to it.
    A VH op whose `op.parts` half is None runs the identity filter there (one tap, no padding). A POOL
    with `dropout` (training) applies that dropout op to its output itself: the pooled image is still
    in cache, and its backward recomputes the mask instead of reading one."""
    kind: str
    name: str
    in_shape: tuple
    out_shape: tuple
    op: Op = None
    relu: bool = False
    fields: dict = field(default_factory=dict)
    nhwc_from: tuple = None
    channels_last: bool = False  # the row's output is an (H, W, C) activation
    dropout: Op = None  # a POOL's folded dropout


def is_gemm(op):
    """True for an op that is one GEMM over channels-last pixels: a lateral or a 1x1, stride-1, unpadded convolution."""
    layer = op.layer
    return op.kind == "lateral" or (op.kind == "conv" and layer.k == 1 and layer.stride == 1 and layer.padding == 0)


def vh_taps(op):
    """The C fields of a "vh" op: taps and leading padding of each half (the identity: 1 and 0) and the rows of v."""
    v, hz = op.parts
    kv, vb = (v.layer.k, v.layer.before) if v is not None else (1, 0)
    kh, hb = (hz.layer.k, hz.layer.before) if hz is not None else (1, 0)
    return dict(kv=kv, vbefore=vb, kh=kh, hbefore=hb, h_mid=v.out_shape[1] if v is not None else op.in_shape[1])


def identity_half(c):
    """The parameters of an absent V or H half of a "vh" op on `c` channels: one tap of 1, no bias."""
    return {"weight": np.ones((c, 1), np.float32), "bias": np.zeros(c, np.float32)}


def layout(ops, training):
    """The rows of a compiled executor for `ops` (from ``fuse``), with every layout decision made here, once.

    Every image op (GEMM, CONV, VH, POOL, and DROPOUT on images) reads and writes channels-last
    activations, so the input is transposed (TO_NHWC) before the first one. A 1x1 convolution and a
    lateral are one GEMM. In training (``training=True``) dropout runs (a dropout right after a POOL is
    folded into it: the POOL row's ``dropout``) and an activation is turned back
    to NCHW before Flatten, so a Linear layer reads the engine's flattening order; for inference
    dropout is the identity and is dropped, Flatten is free (the next Linear's weight columns are
    permuted instead, ``nhwc_from``), and an image-shaped output is turned back to NCHW at the end.
    """
    rows, shape, nhwc, flat_from = [], ops[0].in_shape, False, None

    def put(row):
        row.channels_last = nhwc and len(row.out_shape) == 3 and row.kind != "LINEAR"
        rows.append(row)

    def change(kind, at):
        nonlocal nhwc
        nhwc = kind == "TO_NHWC"
        put(Placed(kind, "(to channels-last)" if nhwc else "(to NCHW)", at, at))

    for op in ops:
        layer, relu = op.layer, op.relu
        if op.kind == "dropout":
            if training and layer.p > 0 and rows and rows[-1].kind == "POOL" and rows[-1].dropout is None:
                rows[-1].dropout = op  # folded into the pooling that produced its input
                rows[-1].name = f"{rows[-1].name}+{op.name}"
            elif training and layer.p > 0:
                if len(shape) == 3 and not nhwc:
                    change("TO_NHWC", shape)
                flat = (tuple(shape) + (1, 1))[:3] if len(shape) == 3 else (shape[0], 1, 1)
                put(Placed("DROPOUT", op.name, flat, flat, op))
            continue
        if op.kind == "flatten":
            if len(shape) == 3 and nhwc:
                if training:
                    change("TO_NCHW", shape)
                else:
                    flat_from = shape
            shape = op.out_shape
            continue
        if op.kind == "relu":
            put(Placed("RELU", op.name, shape, shape, op, relu=True))
            continue
        if op.kind == "linear":
            src = flat_from if len(shape) == 1 else (shape if nhwc else None)
            if training and src is not None:
                change("TO_NCHW", shape)
                src = None
            nhwc = False
            put(Placed("LINEAR", op.name, (layer.n_in, 1, 1), (layer.n_out, 1, 1), op, relu, nhwc_from=src))
            shape, flat_from = op.out_shape, None
            continue
        if not nhwc:
            change("TO_NHWC", shape)
        if op.kind == "vh":
            put(Placed("VH", op.name, shape, op.out_shape, op, relu, vh_taps(op)))
        elif is_gemm(op):
            put(Placed("GEMM", op.name, shape, op.out_shape, op, relu))
        elif op.kind == "conv":
            put(Placed("CONV", op.name, shape, op.out_shape, op, relu,
                       dict(k=layer.k, stride=layer.stride, pad=layer.padding, tile=conv_tile(layer, shape))))
        elif op.kind == "pool":
            put(Placed("POOL", op.name, shape, op.out_shape, op, relu, dict(k=layer.k, stride=layer.stride)))
        else:
            raise UnsupportedNetwork(f"{op.name}: no compiled op for {type(layer).__name__}")
        shape = op.out_shape
    if not training and (nhwc and len(shape) == 3 or flat_from is not None):
        change("TO_NCHW", shape if len(shape) == 3 else flat_from)
    return rows


def row_flops(rows, n):
    """[(forward, backward) floating-point operations] of each row of ``layout`` for n images (2 per
    multiply-add; the GEMM, CONV and VH rows only, the others 0). The first row with parameters computes
    no input gradient, so its backward counts once, the others' twice."""
    out, first = [], True
    for row in rows:
        (c, _, w), (f, ho, wo) = (tuple(row.in_shape) + (1, 1))[:3], (tuple(row.out_shape) + (1, 1))[:3]
        if row.kind in ("GEMM", "LINEAR", "CONV"):
            taps = row.fields["k"] ** 2 if row.kind == "CONV" else 1
            flops = 2 * n * ho * wo * c * taps * f
        elif row.kind == "VH":
            flops = 2 * n * c * (row.fields["h_mid"] * w * row.fields["kv"] + ho * wo * row.fields["kh"])
        else:
            out.append((0, 0))
            continue
        out.append((flops, flops if first else 2 * flops))
        first = False
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
