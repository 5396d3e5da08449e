"""A trained network compiled for fast float32 inference on the CPU.

    plan = compile_network(net)      # net: a Sequential of engine layers (e.g. models.paper.build)
    logits = plan(x)                 # x: (N, C, H, W) float32, already preprocessed

The layer-by-layer ``net.forward`` is written for training: each layer checks its
input, returns its own buffer and runs its own parallel region. For a single image
those fixed costs are most of the time (a 32x32 image is about 50 MFLOP). A plan
instead runs the whole network in one compiled call (``engine/_infer.h``), in the rows that
``lowering.layout(..., training=False)`` decides; this module packs the weights and sizes the buffers:

* activations are channels-last, (H, W, C), so per-channel ops run on whole SIMD vectors
  of channels; the first op transposes the NCHW input, and a Linear layer after Flatten
  gets its weight columns permuted, so Flatten itself is free;
* dropout is dropped (eval mode); each ReLU, and optionally the softmax, is folded into
  the op before it;
* a vertical convolution and the horizontal one after it are one op, channel by channel;
* convolutions and lateral 1x1 convolutions are GEMMs with the weights packed once,
  here, for the micro-kernel, reading the (zero-padded) input in place - no im2col;
  Linear layers are GEMVs;
* the threads are woken once per call: with a batch of at least twice the thread count
  each thread takes whole images, otherwise they share each op of an image.

A plan holds copies of the weights taken when it was compiled: compile again after
changing them. Calls are serialized by a lock (the plan owns its work buffers). Its op
table holds raw pointers into those copies, so ``copy.deepcopy`` (and ``copy.copy``)
re-point them, and pickling is refused: save the network and compile it again.
The result equals ``net.eval().forward(x)`` up to float32 rounding (the sums run in
a different order); tests/test_plan.py checks both against independent references.
"""
import threading

import numpy as np

from . import winograd
from ._kernels import infer_layout, infer_run
from .lowering import UnsupportedNetwork, fuse, identity_half, layout, lower, op_row, op_table
from .runtime.memory import aligned_copy, aligned_empty
from .runtime.threads import get_num_threads, run_threads

NR, VL = infer_layout()


def _pack(wt):
    """(K, F) weights -> (ceil(F/NR), K, NR) panels of NR filters, k-major, zero filters past F."""
    k, f = wt.shape
    panels = -(-f // NR)
    padded = np.zeros((k, panels * NR), np.float32)
    padded[:, :f] = wt
    return padded.reshape(k, panels, NR).transpose(1, 0, 2)


def _round16(n):
    return -(-n // 16) * 16


def _padded_bias(bias):
    out = np.zeros(-(-len(bias) // NR) * NR, np.float32)
    out[:len(bias)] = bias
    return out


class Plan:
    """A compiled network: ``plan(x)`` -> outputs for float32 x (N, C, H, W); see the module docstring."""

    def __init__(self, net, in_shape, softmax=False):
        if net.backend != "cpu":
            raise UnsupportedNetwork(f"the compiled path runs on the CPU; the network is on {net.backend}")
        ops = fuse(lower(net, in_shape))
        self.in_shape = ops[0].in_shape
        self._keep = []      # arrays the op table points into
        self._rows = []
        self.names = []      # per op: the layers it runs
        self._act = self._cols = self._scratch = 1
        for row in layout(ops, training=False):
            op, relu = row.op, int(row.relu)
            layer = op.layer if op is not None else None
            fields = dict(row.fields, relu=relu)
            if row.kind == "LINEAR":
                weight = layer.params["weight"]
                if row.nhwc_from is not None:  # the engine flattens (C, H, W); this activation is (H, W, C)
                    weight = weight.reshape(layer.n_out, *row.nhwc_from).transpose(0, 2, 3, 1).reshape(layer.n_out, -1)
                fields.update(w=self._ptr(weight), b=self._ptr(layer.params["bias"]))
            elif row.kind == "CONV" and row.fields["tile"]:  # Winograd (lowering.conv_tile): fp_wino_image
                (c, h, w), (f, ho, wo) = row.in_shape, row.out_shape
                m, k = row.fields["tile"], layer.k
                at, g, bt = winograd.transforms(m, k)
                n, tiles = m + k - 1, -(-ho // m) * -(-wo // m)
                u = np.einsum("ay,fcyx,bx->abcf", g, layer.params["weight"].astype(np.float64), g)  # G g GT per filter
                fields.update(w=self._ptr(np.concatenate([_pack(u[a, b]).ravel() for a in range(n) for b in range(n)])),
                              b=self._ptr(_padded_bias(layer.params["bias"])),
                              aux=self._ptr(np.zeros(-(-f // NR) * NR, np.float32)),
                              wt=self._ptr(np.concatenate([t.ravel() for t in (at, g, bt)]).astype(np.float32)))
                self._cols = max(self._cols, n * n * tiles * (c + f))  # V, then M
                self._scratch = max(self._scratch, 2 * n * n * c, (m * n + 1) * f)
            elif row.kind == "CONV":
                c, h, w = row.in_shape
                # rows of the packed weights in the order the GEMM reads the taps: (ky, kx, c)
                weight = layer.params["weight"].transpose(0, 2, 3, 1).reshape(layer.c_out, -1)
                fields.update(w=self._ptr(_pack(weight.T)), b=self._ptr(_padded_bias(layer.params["bias"])))
                self._cols = max(self._cols, c * (h + 2 * layer.padding) * (w + 2 * layer.padding))  # padded input
            elif row.kind == "VH":
                c, h, w = row.in_shape
                for half, (wkey, bkey) in zip(op.parts, (("wv", "bv"), ("wh", "bh"))):
                    p = half.layer.params if half is not None else identity_half(c)
                    fields.update({wkey: self._ptr(p["weight"].T), bkey: self._ptr(p["bias"])})
                # this thread's planes of one vector of channels (see fp_vh in _infer.h)
                kv, kh, hm, wo = fields["kv"], fields["kh"], fields["h_mid"], row.out_shape[2]
                self._scratch = max(self._scratch, ((hm + kv - 1) * w + hm * (wo + kh - 1)) * VL, wo + kh - 1)
            elif row.kind == "GEMM":
                f, c = row.out_shape[0], row.in_shape[0]
                fields.update(w=self._ptr(_pack(layer.params["weight"].reshape(f, c).T)),
                              b=self._ptr(_padded_bias(layer.params["bias"])))
            self._add(row.kind, row.name, row.in_shape, row.out_shape, **fields)
        if not self._rows:
            raise UnsupportedNetwork("the network has no op the compiled path runs (only dropout/flatten)")
        shape = ops[-1].out_shape
        if softmax:
            if len(shape) != 1:
                raise UnsupportedNetwork(f"softmax needs a flat output, the network gives {shape}")
            self._add("SOFTMAX", "softmax", shape, shape)
        self.out_shape = tuple(shape)
        self.ops = op_table(self._rows)
        self.act_floats = _round16(self._act)
        self.ctx_floats = 2 * self.act_floats + _round16(self._cols)
        self.scratch_floats = _round16(self._scratch)
        del self._rows, self._act, self._cols, self._scratch  # construction state, now in the table
        self._arena = aligned_empty(0)
        self._lock = threading.Lock()
        self.last_threads = 0  # threads that ran the last call

    def _add(self, kind, name, in_shape, out_shape, **fields):
        self._rows.append(op_row(kind, in_shape, out_shape, **fields))
        self._act = max(self._act, int(np.prod(out_shape)))
        self.names.append(name)

    def __deepcopy__(self, memo=None):
        """A copy with its own weights, buffers and lock; the op table's pointers are moved to the copies."""
        new = object.__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_keep", "ops", "_arena", "_lock")})
        new.names = list(self.names)
        new._keep = [aligned_copy(a) for a in self._keep]
        moved = {a.ctypes.data: b.ctypes.data for a, b in zip(self._keep, new._keep)}
        # every cell holding the address of one of the plan's arrays, whichever field it is
        new.ops = np.array([[moved.get(int(v), int(v)) for v in row] for row in self.ops], np.int64).reshape(
            self.ops.shape)
        new._arena, new._lock = aligned_empty(0), threading.Lock()
        return new

    __copy__ = __deepcopy__  # a shallow copy would share the work buffers without sharing the lock

    def __reduce__(self):
        raise TypeError("a compiled plan points into its own memory and cannot be pickled; "
                        "pickle the network (or save a model file) and compile it again")

    def _ptr(self, array):
        a = aligned_copy(array)
        self._keep.append(a)
        return a.ctypes.data

    def __call__(self, x, num_threads=None):
        """Outputs (N, ...) for x (N, C, H, W) or one image (C, H, W); float input, converted to float32."""
        x = self._check(x)
        out = np.empty((len(x), int(np.prod(self.out_shape))), np.float32)
        self._run(x, out, num_threads)
        return out.reshape(len(x), *self.out_shape)

    def profile(self, x, repeat=20, num_threads=None):
        """[(op name, median milliseconds)] over `repeat` runs of x (after one warm-up run)."""
        x = self._check(x)
        out = np.empty((len(x), int(np.prod(self.out_shape))), np.float32)
        self._run(x, out, num_threads)
        runs = np.zeros((repeat, len(self.names)))
        for r in range(repeat):
            self._run(x, out, num_threads, runs[r])
        return list(zip(self.names, 1e3 * np.median(runs, axis=0)))

    def _check(self, x):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"expected floating-point input, got dtype {x.dtype}")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != self.in_shape:
            raise ValueError(f"expected input of shape (N, {', '.join(map(str, self.in_shape))}), got {x.shape}")
        if len(x) == 0:
            raise ValueError("empty batch")
        return np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)

    def _run(self, x, out, num_threads, times=None):
        if num_threads:
            threads = int(num_threads)
        else:  # whole images per thread never wait for each other; smaller batches share each op
            threads = get_num_threads()
            threads = threads if len(x) >= 2 * threads else run_threads()
        with self._lock:
            if self._arena.size < threads * (self.ctx_floats + self.scratch_floats):
                self._arena = aligned_empty(threads * (self.ctx_floats + self.scratch_floats))
            self.last_threads = infer_run(self.ops, x, out, self._arena, self.act_floats, self.ctx_floats,
                                          self.scratch_floats, threads, times)


def compiled_or_reason(net, in_shape=None, softmax=False, gpu=False):
    """(plan, None) for a float32 network the compiled path runs, else (None, why it runs layer by layer):
    not float32 (float64 is the reference), not on the CPU, no input shape, or a layer it lacks.

    gpu=True also compiles a network on the cupy backend, as the GPU's plan (engine/runtime/cuda_step.py,
    GpuPlan: device arrays in and out, one caller at a time, the weights read at each call)."""
    if net.dtype != np.float32:
        return None, f"the network is {net.dtype}, the compiled path float32"
    try:
        if gpu and net.backend == "cupy":
            from .runtime.cuda_step import GpuPlan
            return GpuPlan(net, in_shape, softmax=softmax), None
        return compile_network(net, in_shape, softmax), None
    except UnsupportedNetwork as e:
        return None, str(e)


def compile_network(net, in_shape=None, softmax=False):
    """Compile `net` (engine layers, float32, on the CPU) for inputs of `in_shape` (C, H, W).

    in_shape defaults to ``net.in_shape`` (set by models.paper.build). softmax=True ends
    the plan with a softmax over the (flat) output. The plan computes in float32 whatever
    the layers' dtype (it copies the weights as float32). Raises UnsupportedNetwork for a layer
    the compiled path does not handle. Input holding NaN or infinity is refused (ValueError).
    """
    in_shape = in_shape if in_shape is not None else getattr(net, "in_shape", None)
    if in_shape is None:
        raise UnsupportedNetwork("in_shape is needed (the network does not record one)")
    return Plan(net, in_shape, softmax)
