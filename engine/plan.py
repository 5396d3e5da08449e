"""A trained network compiled for fast float32 inference on the CPU.

    plan = compile_network(net)      # net: a Sequential of engine layers (e.g. models.paper.build)
    logits = plan(x)                 # x: (N, C, H, W) float32, already preprocessed

The layer-by-layer ``net.forward`` is written for training: each layer checks its
input, returns its own buffer and runs its own parallel region. For a single image
those fixed costs are most of the time (a 32x32 image is about 50 MFLOP). A plan
instead runs the whole network in one compiled call (``engine/_infer.h``):

* dropout is dropped (eval mode), Flatten is free (NCHW is already flat), and each
  ReLU is folded into the op before it;
* a vertical convolution and the horizontal one after it are one op, channel by channel;
* convolutions (im2col) and lateral 1x1 convolutions are GEMMs with the weights packed
  once, here, for the micro-kernel; Linear layers are GEMVs;
* the threads are woken once per call: with a batch of at least twice the thread count
  each thread takes whole images, otherwise they share each op of an image.

A plan holds copies of the weights taken when it was compiled: compile again after
changing them. Calls are serialized by a lock (the plan owns its work buffers).
The result equals ``net.eval().forward(x)`` up to float32 rounding (the sums run in
a different order); tests/test_plan.py checks both against independent references.
"""
import threading

import numpy as np

from . import _kernels
from .backend import get_num_threads
from .layers import Conv2d, Dropout, Flatten, Horizontal, Lateral, Linear, MaxPool2d, ReLU, Sequential, \
    Vertical

MR, VL, NFIELDS = _kernels.infer_layout()
(GEMM, CONV, VH, POOL, LINEAR, RELU) = range(6)
FIELDS = ("kind relu c_in h_in w_in c_out h_out w_out k stride pad kv vbefore kh hbefore h_mid "
          "w b wv bv wh bh").split()
COL = {name: i for i, name in enumerate(FIELDS)}


class UnsupportedNetwork(ValueError):
    """The network holds a layer (or a dtype or backend) the compiled path does not handle."""


def _leaves(layer):
    """The network's layers in order, with Sequential/Flattened containers opened."""
    if isinstance(layer, Sequential):
        for _, child in layer.children:
            yield from _leaves(child)
    else:
        yield layer


def _pack_panels(weight, k):
    """(M, K) weights -> (ceil(M/MR), K, MR) panels, k-major inside a panel, zero rows past M."""
    m = weight.shape[0]
    panels = -(-m // MR)
    padded = np.zeros((panels * MR, k), np.float32)
    padded[:m] = weight.reshape(m, k)
    return np.ascontiguousarray(padded.reshape(panels, MR, k).transpose(0, 2, 1))


def _padded_bias(bias):
    out = np.zeros(-(-len(bias) // MR) * MR, np.float32)
    out[:len(bias)] = bias
    return out


class Plan:
    """A compiled network: ``plan(x)`` -> outputs (N, n_out) for float32 x (N, C, H, W)."""

    def __init__(self, net, in_shape):
        if net.backend != "cpu":
            raise UnsupportedNetwork(f"the compiled path runs on the CPU; the network is on {net.backend}")
        self.in_shape = tuple(int(v) for v in in_shape)
        if len(self.in_shape) != 3 or min(self.in_shape) < 1:
            raise UnsupportedNetwork(f"in_shape must be (C, H, W), got {in_shape}")
        self._keep = []      # arrays the op table points into
        rows = []
        shape = self.in_shape
        act = cols = scratch = 1
        layers = list(_leaves(net))
        i = 0
        while i < len(layers):
            layer = layers[i]
            c, h, w = shape if len(shape) == 3 else (shape[0], 1, 1)
            row = dict(relu=0, c_in=c, h_in=h, w_in=w)
            if isinstance(layer, (Dropout, Flatten)):
                if isinstance(layer, Flatten):
                    shape = (int(np.prod(shape)),)
                i += 1
                continue
            if isinstance(layer, ReLU):
                if rows and rows[-1]["kind"] != RELU and not rows[-1]["relu"]:
                    rows[-1]["relu"] = 1
                else:
                    rows.append(dict(row, kind=RELU, c_out=c, h_out=h, w_out=w))
                i += 1
                continue
            if len(shape) != 3 and not isinstance(layer, Linear):
                raise UnsupportedNetwork(f"{layer!r} after Flatten is not supported by the compiled path")
            if isinstance(layer, (Vertical, Horizontal)):
                v = layer if isinstance(layer, Vertical) else None
                hz = layer if isinstance(layer, Horizontal) else None
                if v is not None and i + 1 < len(layers) and isinstance(layers[i + 1], Horizontal) \
                        and layers[i + 1].channels == v.channels:
                    hz = layers[i + 1]
                    i += 1
                _check_channels(layer, c, layer.channels)
                kv, vb, vw, vbias = ((v.k, v.before, v.params["weight"], v.params["bias"]) if v is not None
                                     else (1, 0, np.ones((c, 1)), np.zeros(c)))
                hm = h + (v.before + v.after - v.k + 1 if v is not None else 0)
                kh, hb, hw, hbias = ((hz.k, hz.before, hz.params["weight"], hz.params["bias"]) if hz is not None
                                     else (1, 0, np.ones((c, 1)), np.zeros(c)))
                wo = w + (hz.before + hz.after - hz.k + 1 if hz is not None else 0)
                if hm < 1 or wo < 1:
                    raise UnsupportedNetwork(f"{layer!r}: input {shape} too small")
                row.update(kind=VH, c_out=c, h_out=hm, w_out=wo, kv=kv, vbefore=vb, kh=kh, hbefore=hb, h_mid=hm,
                           wv=self._ptr(vw), bv=self._ptr(vbias), wh=self._ptr(hw), bh=self._ptr(hbias))
                scratch = max(scratch, hm * w + wo + kh)
                shape = (c, hm, wo)
            elif isinstance(layer, Lateral) or (isinstance(layer, Conv2d) and layer.k == 1 and layer.stride == 1
                                                and layer.padding == 0):
                f = layer.c_out
                _check_channels(layer, c, layer.c_in)
                row.update(kind=GEMM, c_out=f, h_out=h, w_out=w, w=self._ptr(_pack_panels(layer.params["weight"], c)),
                           b=self._ptr(_padded_bias(layer.params["bias"])))
                shape = (f, h, w)
            elif isinstance(layer, Conv2d):
                _check_channels(layer, c, layer.c_in)
                _, f, ho, wo = layer.output_shape((1, c, h, w))
                if ho < 1 or wo < 1:
                    raise UnsupportedNetwork(f"{layer!r}: input {shape} too small")
                kk = c * layer.k * layer.k
                row.update(kind=CONV, c_out=f, h_out=ho, w_out=wo, k=layer.k, stride=layer.stride, pad=layer.padding,
                           w=self._ptr(_pack_panels(layer.params["weight"], kk)),
                           b=self._ptr(_padded_bias(layer.params["bias"])))
                cols = max(cols, kk * ho * wo)
                shape = (f, ho, wo)
            elif isinstance(layer, MaxPool2d):
                _, _, ho, wo = layer.output_shape((1, c, h, w))
                if ho < 1 or wo < 1:
                    raise UnsupportedNetwork(f"{layer!r}: input {shape} too small")
                row.update(kind=POOL, c_out=c, h_out=ho, w_out=wo, k=layer.k, stride=layer.stride)
                scratch = max(scratch, h * wo)
                shape = (c, ho, wo)
            elif isinstance(layer, Linear):
                n_in = int(np.prod(shape))
                if n_in != layer.n_in:
                    raise UnsupportedNetwork(f"{layer!r}: gets {n_in} inputs")
                row.update(kind=LINEAR, c_in=n_in, h_in=1, w_in=1, c_out=layer.n_out, h_out=1, w_out=1,
                           w=self._ptr(layer.params["weight"]), b=self._ptr(layer.params["bias"]))
                shape = (layer.n_out,)
            else:
                raise UnsupportedNetwork(f"the compiled path has no op for {type(layer).__name__}")
            rows.append(row)
            act = max(act, row["c_out"] * row["h_out"] * row["w_out"])
            i += 1
        if not rows:
            raise UnsupportedNetwork("the network has no op the compiled path runs (only dropout/flatten)")
        self.out_shape = tuple(shape)
        self.ops = np.zeros((len(rows), NFIELDS), np.int64)
        for r, row in enumerate(rows):
            for name, v in row.items():
                self.ops[r, COL[name]] = v
        self.kinds = [rows[r]["kind"] for r in range(len(rows))]
        self.act_floats, self.scratch_floats = act, scratch
        self.ctx_floats = 2 * act + cols
        self._arena = np.empty(0, np.float32)
        self._lock = threading.Lock()

    def _ptr(self, array):
        a = np.ascontiguousarray(array, dtype=np.float32).copy()
        self._keep.append(a)
        return a.ctypes.data

    def __call__(self, x, num_threads=None):
        x = np.asarray(x)
        if x.dtype != np.float32:
            if x.dtype.kind != "f":
                raise TypeError(f"expected float32 input, got dtype {x.dtype}")
            x = x.astype(np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != self.in_shape:
            raise ValueError(f"expected input of shape (N, {', '.join(map(str, self.in_shape))}), got {x.shape}")
        if len(x) == 0:
            raise ValueError("empty batch")
        if not np.isfinite(x).all():
            raise ValueError("input holds NaN or infinite values")
        threads = int(num_threads or get_num_threads())
        x2 = np.ascontiguousarray(x).reshape(len(x), -1)
        out = np.empty((len(x), int(np.prod(self.out_shape))), np.float32)
        need = threads * (self.ctx_floats + self.scratch_floats)
        with self._lock:
            if self._arena.size < need:
                self._arena = np.empty(need, np.float32)
            _kernels.infer_run(self.ops, x2, out, self._arena, self.act_floats, self.ctx_floats,
                               self.scratch_floats, threads)
        return out.reshape(len(x), *self.out_shape)


def _check_channels(layer, got, expected):
    if got != expected:
        raise UnsupportedNetwork(f"{layer!r} expects {expected} channels, gets {got}")


def compile_network(net, in_shape=None):
    """Compile `net` (engine layers, float32, on the CPU) for inputs of `in_shape` (C, H, W).

    in_shape defaults to ``net.in_shape`` (set by models.paper.build). Raises
    UnsupportedNetwork for a layer the compiled path does not handle.
    """
    in_shape = in_shape if in_shape is not None else getattr(net, "in_shape", None)
    if in_shape is None:
        raise UnsupportedNetwork("in_shape is needed (the network does not record one)")
    return Plan(net, in_shape)
