"""The compiled GPU executor: the training step and batch inference from the shared lowering, on CuPy.

    step = GpuStep(net, batch_size=128)     # net on the 'cupy' backend, float32
    loss, correct = step.loss(x, y)         # forward and loss: one graph launch
    step.apply(velocity, lr, momentum, weight_decay, dampening, nesterov)   # backward and SGD: one graph launch
    plan = GpuPlan(net); logits = plan(x)   # inference: one graph launch per batch

Like the CPU's compiled step (engine/trainstep.py) and plan (engine/plan.py), it is built from
``lowering.layout``: the same rows, the same channels-last activations, the same fused V+H ops,
the same ReLUs folded into the op before them and the same dropouts folded into the pooling
before them. Each row is a few launches of the kernels of engine/cuda_step.cu and cuBLAS GEMMs:
a lateral, a 1x1 convolution and a Linear layer are one GEMM over every pixel of the batch, with
bias and ReLU in the epilogue kernel; any other convolution is im2col and one GEMM (the Winograd
choice of ``lowering.conv_tile`` is made for the CPU's kernels; the GPU does not take it); V+H runs
the vertical half into its scratch plane, then the horizontal half with bias and ReLU.

A step runs no Python per layer and reads nothing back: every buffer is allocated when the
executor is built (or grown for a larger batch), and everything that changes between steps
(the images, the labels, the dropout seeds, the learning rate and the other hyper-parameters) is
copied into fixed device buffers before the launch. So the forward with the loss, and the
backward with the SGD update, are each captured once per batch size as a CUDA graph (CuPy's stream
capture) and replayed. The first call for a batch size runs the same launches directly
(it compiles the kernels); the second captures them.

What it shares with the other paths: the weights stay in ``Layer.params`` and the gradients go to
``Layer.grads`` (the graphs hold their addresses; loading a checkpoint writes into them in place),
the momentum buffers are the trainer's ``velocity``, and the dropout seeds are drawn from the
dropout layers' generators in the same order as the CPU's step with the same hash, so the masks
are the CPU's bit for bit and a checkpoint resumes on either device.
"""
import time

import numpy as np

import cupy as cp

from ..losses import SoftmaxCrossEntropy
from ..lowering import UnsupportedNetwork, fuse, layout, lower, row_flops
from ..optim import check_nesterov
from .cuda import SOURCE_PATH, GraphBlas, launch, strided_gemm as _strided_gemm
from .dropout import dropout_seed, dropout_threshold

STEP_SOURCE = SOURCE_PATH.with_name("cuda_step.cu")
HYPER = ("lr", "momentum", "dampening", "weight_decay", "smoothing", "nesterov")  # the slots of `hyper` (cuda_step.cu)
SEGMENT_ROWS = 64      # rows of a bias gradient's partial sum (st_colsum_partial)
SEGMENT_VALUES = 256   # values of dy per partial sum of a V or H weight gradient (st_conv1d_dw_partial)


def _chw(shape):
    """A row's per-image shape as (C, H, W): a flat (n,) is (n, 1, 1)."""
    return (tuple(shape) + (1, 1))[:3]


def _k(name, n, *args):
    launch(STEP_SOURCE, name, n, *args)


_graph_blas_problem = []  # why cuBLAS cannot be called directly here (then CuPy's cuBLAS, and no graphs)


def strided_gemm(trans_a, trans_b, alpha, a, b, beta, c):
    """One GEMM (runtime/cuda.py), through cuBLAS called directly so that a stream capture can record it; where
    that library cannot be found or set up, through CuPy's cuBLAS functions (the step then runs without graphs)."""
    if not _graph_blas_problem:
        try:
            GraphBlas.get()
        except Exception as e:
            _graph_blas_problem.append(f"cuBLAS cannot be called directly ({type(e).__name__}: {e})")
    _strided_gemm(trans_a, trans_b, alpha, a, b, beta, c, capturable=not _graph_blas_problem)


def _f32(v):
    return np.float32(v)


class _Rows:
    """The rows of ``layout(fuse(lower(net, in_shape)), training)`` with their device buffers, for up to
    `capacity` images: ``forward(n)`` and ``backward(n)`` issue the launches (nothing is read back)."""

    def __init__(self, net, in_shape, capacity, training):
        if net.backend != "cupy":
            raise UnsupportedNetwork(f"the GPU executor runs networks on the cupy backend; the network is on "
                                     f"{net.backend}")
        if net.dtype != np.float32:
            raise UnsupportedNetwork(f"the GPU executor is float32; the network is {net.dtype}")
        in_shape = in_shape if in_shape is not None else getattr(net, "in_shape", None)
        if in_shape is None:
            raise UnsupportedNetwork("in_shape is needed (the network does not record one)")
        self.net, self.training = net, training
        self.ops = fuse(lower(net, in_shape))
        self.in_shape = self.ops[0].in_shape
        self.out_shape = self.ops[-1].out_shape
        self.rows = layout(self.ops, training)
        if not self.rows:
            raise UnsupportedNetwork("the network has no op the GPU executor runs (only dropout/flatten)")
        self.names = [row.name for row in self.rows]
        self.dropouts = []  # (row index, Dropout layer): one seed slot each, in the order the CPU draws them
        for r, row in enumerate(self.rows):
            drop = row.dropout if row.kind == "POOL" else row.op if row.kind == "DROPOUT" else None
            if drop is not None:
                self.dropouts.append((r, drop.layer))
        self.seeds = cp.zeros(max(1, len(self.dropouts)), dtype=cp.uint64)
        self.seed_slot = {r: i for i, (r, _) in enumerate(self.dropouts)}
        # the first row with parameters: as in the CPU's step it computes no input gradient, and no row before it runs
        self.first_param_row = next(
            (r for r, row in enumerate(self.rows) if row.kind in ("GEMM", "LINEAR", "CONV", "VH")), len(self.rows) - 1)
        self.capacity = 0
        self._alloc(max(1, int(capacity)))

    # buffers ----------------------------------------------------------------------------------
    def _alloc(self, cap):
        self.capacity = cap
        sizes = [int(np.prod(self.in_shape))]
        self.x = cp.empty(cap * sizes[0], dtype=cp.float32)
        self.out, self.aux, self.mid, self.cols = [], [], [], []
        cols = part = wperm = 1
        for row in self.rows:
            (c, h, w), n_out = _chw(row.in_shape), int(np.prod(row.out_shape))
            sizes += [c * h * w, n_out]
            self.out.append(cp.empty(cap * n_out, dtype=cp.float32))
            self.aux.append(cp.empty(cap * n_out, dtype=cp.int32) if row.kind == "POOL" else None)
            both = row.kind == "VH" and all(row.op.parts)  # a V+H op keeps the vertical half's output
            self.mid.append(cp.empty(cap * row.fields["h_mid"] * w * c, dtype=cp.float32) if both else None)
            if both:
                sizes.append(row.fields["h_mid"] * w * c)
            if row.kind == "CONV":
                layer = row.op.layer
                kkc, p = layer.k * layer.k * c, row.out_shape[1] * row.out_shape[2]
                # training keeps each convolution's columns for its weight gradient; inference shares one buffer
                self.cols.append(cp.empty(cap * p * kkc, dtype=cp.float32) if self.training else None)
                cols = max(cols, cap * p * kkc)
            else:
                self.cols.append(None)
            if row.kind in ("GEMM", "LINEAR", "CONV"):
                part = max(part, -(-cap * row.out_shape[1] * row.out_shape[2] // SEGMENT_ROWS) * row.out_shape[0])
            for half in row.op.parts if row.kind == "VH" else ():
                if half is not None:
                    part = max(part, self._segments(half, cap)[0] * (half.layer.k + 1) * c)
            if row.kind == "LINEAR" and row.nhwc_from is not None:
                wperm = max(wperm, row.op.layer.params["weight"].size)
        act = max(sizes)
        self.cols_shared = cp.empty(cols, dtype=cp.float32)  # inference columns; training: the columns' gradient
        self.wperm = cp.empty(wperm, dtype=cp.float32)
        if self.training:
            self.g = [cp.empty(cap * act, dtype=cp.float32) for _ in range(2)]  # ping-pong gradients
            self.gmid = cp.empty(cap * act, dtype=cp.float32)  # a V+H op's gradient at the vertical half's output
            self.part = cp.empty(part, dtype=cp.float64)  # partial sums of weight and bias gradients

    @staticmethod
    def _segments(half, n):
        """(S, R): a V or H half's weight gradient for n images is summed in S partial sums of R output lines
        (an image's output row) each, about SEGMENT_VALUES values of dy a partial sum."""
        _, ho, wo = half.out_shape
        lines = max(1, SEGMENT_VALUES // wo)
        return -(-n * ho // lines), lines

    def grow(self, n):
        """Room for n images (buffers re-allocated: any captured graph is stale after a True)."""
        if n > self.capacity:
            self._alloc(n)
            return True
        return False

    # forward ----------------------------------------------------------------------------------
    def forward(self, n):
        """Launches of the forward of the first n images of self.x; the output is in self.out[-1]."""
        src = self.x
        for r, row in enumerate(self.rows):
            self._forward_row(r, row, src, self.out[r], n)
            src = self.out[r]
        return self.out[-1][:n * int(np.prod(self.out_shape))]

    def _forward_row(self, r, row, x, y, n):
        (c, h, w), (f, ho, wo) = _chw(row.in_shape), _chw(row.out_shape)
        relu = int(row.relu)
        layer = row.op.layer if row.op is not None else None
        if row.kind == "TO_NHWC":
            _k("st_to_nhwc", n * c * h * w, x, y, n, c, h * w)
        elif row.kind == "TO_NCHW":
            _k("st_to_nchw", n * c * h * w, x, y, n, c, h * w)
        elif row.kind == "RELU":
            _k("st_relu", n * c * h * w, x, y, n * c * h * w)
        elif row.kind in ("GEMM", "LINEAR"):
            weight = layer.params["weight"].reshape(f, -1)
            if row.nhwc_from is not None:  # inference: the columns follow the channels-last activation
                fc, fh, fw = row.nhwc_from
                wp = self.wperm[:weight.size].reshape(weight.shape)
                _k("st_permute_columns", weight.size, weight, wp, f, fc, fh * fw)
                weight = wp
            rows = n * ho * wo
            strided_gemm(False, True, 1.0, x[:rows * weight.shape[1]].reshape(rows, -1), weight, 0.0,
                         y[:rows * f].reshape(rows, f))
            _k("st_bias_act", rows * f, y, layer.params["bias"], rows, f, relu)
        elif row.kind == "CONV":
            kkc = layer.k * layer.k * c
            cols = self.cols[r] if self.cols[r] is not None else self.cols_shared
            rows = n * ho * wo
            _k("st_im2col", rows * kkc, x, cols, n, h, w, c, layer.k, layer.stride, layer.padding, ho, wo)
            strided_gemm(False, True, 1.0, cols[:rows * kkc].reshape(rows, kkc),
                         layer.params["weight"].reshape(f, kkc), 0.0, y[:rows * f].reshape(rows, f))
            _k("st_bias_act", rows * f, y, layer.params["bias"], rows, f, relu)
        elif row.kind == "VH":
            v, hz = row.op.parts
            hm = row.fields["h_mid"]
            if v is not None:
                dst = self.mid[r] if hz is not None else y
                _k("st_conv1d", n * hm * w * c, x, v.layer.params["weight"], v.layer.params["bias"], dst,
                   n, h, w, c, v.layer.k, v.layer.before, hm, 1, 0 if hz is not None else relu)
                x = dst
            if hz is not None:
                _k("st_conv1d", n * hm * wo * c, x, hz.layer.params["weight"], hz.layer.params["bias"], y,
                   n, hm, w, c, hz.layer.k, hz.layer.before, wo, 0, relu)
        elif row.kind == "POOL":
            slot, thresh, scale = self._dropout_fields(r, row.dropout)
            _k("st_maxpool", n * ho * wo * c, x, y, self.aux[r], n, h, w, c, ho, wo, layer.k, layer.stride, relu,
               self.seeds, slot, thresh, scale)
        elif row.kind == "DROPOUT":
            slot, thresh, scale = self._dropout_fields(r, row.op)
            _k("st_dropout", n * c * h * w, x, y, n, c, h * w, self.seeds, slot, thresh, scale)
        else:
            raise UnsupportedNetwork(f"{row.name}: the GPU executor has no op {row.kind}")

    def _dropout_fields(self, r, op):
        if op is None:
            return 0, 0, _f32(1.0)
        return self.seed_slot[r], dropout_threshold(op.layer.p), _f32(1.0 / (1.0 - op.layer.p))

    # backward ---------------------------------------------------------------------------------
    def backward(self, n, dlogits):
        """Launches of the backward of the last forward from dlogits (a device buffer of n x outputs):
        every parameter's gradient into the layers' grads (rows first_param_row and after)."""
        first = self.first_param_row
        dy, dx = dlogits, self.g[1]
        for r in range(len(self.rows) - 1, first - 1, -1):
            row = self.rows[r]
            x = self.out[r - 1] if r else self.x
            self._backward_row(r, row, x, dy, dx if r > first else None, n)
            dy, dx = dx, dy

    def _backward_row(self, r, row, x, dy, d, n):
        (c, h, w), (f, ho, wo) = _chw(row.in_shape), _chw(row.out_shape)
        layer = row.op.layer if row.op is not None else None
        y = self.out[r]
        if row.relu:
            _k("st_relu_mask", n * f * ho * wo, dy, y, n * f * ho * wo)
        if row.kind == "TO_NHWC":
            if d is not None:
                _k("st_to_nchw", n * c * h * w, dy, d, n, c, h * w)
        elif row.kind == "TO_NCHW":
            if d is not None:
                _k("st_to_nhwc", n * c * h * w, dy, d, n, c, h * w)
        elif row.kind == "RELU":
            if d is not None:
                _k("st_copy", n * c * h * w, dy, d, n * c * h * w)
        elif row.kind in ("GEMM", "LINEAR", "CONV"):
            rows = n * ho * wo
            kk = c if row.kind != "CONV" else layer.k * layer.k * c
            inp = x[:rows * kk].reshape(rows, kk) if row.kind != "CONV" else self.cols[r][:rows * kk].reshape(rows, kk)
            g = dy[:rows * f].reshape(rows, f)
            self._bias_grad(dy, rows, f, layer.grads["bias"])
            strided_gemm(True, False, 1.0, g, inp, 0.0, layer.grads["weight"].reshape(f, kk))
            if d is not None:
                weight = layer.params["weight"].reshape(f, kk)
                if row.kind == "CONV":
                    dcols = self.cols_shared[:rows * kk].reshape(rows, kk)
                    strided_gemm(False, False, 1.0, g, weight, 0.0, dcols)
                    _k("st_col2im", n * h * w * c, dcols, d, n, h, w, c, layer.k, layer.stride, layer.padding, ho, wo)
                else:
                    strided_gemm(False, False, 1.0, g, weight, 0.0, d[:rows * c].reshape(rows, c))
        elif row.kind == "VH":
            v, hz = row.op.parts
            hm = row.fields["h_mid"]
            if hz is not None:  # horizontal half: input mid (or x), output y
                hin = self.mid[r] if v is not None else x
                self._conv1d_grads(hz, hin, dy, n, hm, w, c, wo, 0)
                dmid = self.gmid if v is not None else d
                if dmid is not None:
                    _k("st_conv1d_dx", n * hm * w * c, dy, hz.layer.params["weight"], dmid, n, hm, w, c, hz.layer.k,
                       hz.layer.before, wo, 0)
                dy = dmid
            if v is not None:
                self._conv1d_grads(v, x, dy, n, h, w, c, hm, 1)
                if d is not None:
                    _k("st_conv1d_dx", n * h * w * c, dy, v.layer.params["weight"], d, n, h, w, c, v.layer.k,
                       v.layer.before, hm, 1)
        elif row.kind == "POOL":
            if d is not None:
                slot, thresh, scale = self._dropout_fields(r, row.dropout)
                _k("st_maxpool_dx", n * h * w * c, dy, self.aux[r], d, n, h, w, c, ho, wo, layer.k, layer.stride,
                   self.seeds, slot, thresh, scale)
        elif row.kind == "DROPOUT":
            if d is not None:
                slot, thresh, scale = self._dropout_fields(r, row.op)
                _k("st_dropout", n * c * h * w, dy, d, n, c, h * w, self.seeds, slot, thresh, scale)
        else:
            raise UnsupportedNetwork(f"{row.name}: the GPU executor has no op {row.kind}")

    def _bias_grad(self, dy, rows, f, db):
        s = -(-rows // SEGMENT_ROWS)
        _k("st_colsum_partial", s * f, dy, self.part, rows, f, SEGMENT_ROWS, s)
        _k("st_sum_segments", f, self.part, db, db, s, 0, f)

    def _conv1d_grads(self, half, x, dy, n, h, w, c, l_out, along_h):
        layer = half.layer
        s, lines = self._segments(half, n)
        _k("st_conv1d_dw_partial", s * (layer.k + 1) * c, x, dy, self.part, n, h, w, c, layer.k, layer.before,
           l_out, along_h, lines, s)
        _k("st_sum_segments", (layer.k + 1) * c, self.part, layer.grads["weight"], layer.grads["bias"], s, layer.k, c)


def _as_device_images(x, in_shape):
    """x (N, C, H, W) as a C-contiguous float32 device array, checked (one-line errors)."""
    if x.dtype.kind != "f":
        raise TypeError(f"expected floating-point images, got dtype {x.dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(in_shape) or len(x) == 0:
        raise ValueError(f"expected images of shape (N, {', '.join(map(str, in_shape))}), got {tuple(x.shape)}")
    return cp.ascontiguousarray(cp.asarray(x), dtype=cp.float32)


class _Graphs:
    """CUDA graphs by key: the first call for a key runs `body` directly, the second captures it on a
    private stream, every later call replays the capture on the current stream."""

    def __init__(self):
        self.seen, self.graphs = set(), {}
        self.stream = None
        self.captures = 0
        self.failed = None  # why capturing failed (every call then runs its launches directly)

    def run(self, key, body):
        graph = self.graphs.get(key)
        if graph is not None:
            graph.launch(stream=cp.cuda.get_current_stream())
            return
        if key not in self.seen or self.failed:
            self.seen.add(key)
            body()
            return
        if self.stream is None:
            self.stream = cp.cuda.Stream(non_blocking=True)
        try:  # recorded on the private stream (nothing runs), then launched on the current one, after its work
            with self.stream:
                self.stream.begin_capture()
                try:
                    body()
                finally:
                    graph = self.stream.end_capture()
        except Exception as e:  # a CUDA or cuBLAS version that cannot capture this: run directly from now on
            self.failed = "; ".join(_graph_blas_problem + [f"{type(e).__name__}: {e}"])
            body()
            return
        self.graphs[key] = graph
        self.captures += 1
        graph.launch(stream=cp.cuda.get_current_stream())

    def clear(self):
        self.seen.clear()
        self.graphs.clear()


class GpuStep:
    """The compiled training step on the GPU (see the module docstring); the same interface as
    trainstep.CompiledStep. Raises UnsupportedNetwork for a network it cannot run."""

    name = "compiled"

    def __init__(self, net, in_shape=None, batch_size=128):
        self.net = net
        self._rows = _Rows(net, in_shape, batch_size, training=True)
        if len(self._rows.out_shape) != 1:
            raise UnsupportedNetwork(f"the network's output {self._rows.out_shape} is not flat (N, classes): "
                                     f"nothing to train on")
        self.in_shape, self.out_shape, self.names = self._rows.in_shape, self._rows.out_shape, self._rows.names
        self.loss_fn = SoftmaxCrossEntropy()
        self._graphs = _Graphs()
        self._alloc_io()
        self.n = 0

    def _alloc_io(self):
        cap, k = self._rows.capacity, self.out_shape[0]
        self._labels = cp.zeros(cap, dtype=cp.int32)
        self._rowloss = cp.zeros(cap, dtype=cp.float64)
        self._right = cp.zeros(cap, dtype=cp.float64)
        self._total = cp.zeros(2, dtype=cp.float64)  # mean loss, number right
        self._hyper = cp.zeros(len(HYPER), dtype=cp.float32)
        self._dlogits = self._rows.g[0]
        self._hyper_host = None
        self._k = k

    @property
    def captures(self):
        """How many CUDA graphs were captured so far (one per batch size for each half of the step)."""
        return self._graphs.captures

    @property
    def capture_failed(self):
        """None, or why a capture failed (the step then runs its launches directly, with the same results)."""
        return self._graphs.failed

    def flops(self, n):
        """[(forward, backward) floating-point operations] of each row for n images (lowering.row_flops)."""
        return row_flops(self._rows.rows, n)

    def _set_hyper(self, **values):
        host = dict(zip(HYPER, self._hyper_host)) if self._hyper_host is not None else dict.fromkeys(HYPER, 0.0)
        host.update(values)
        vec = np.array([host[name] for name in HYPER], np.float32)
        if self._hyper_host is None or not np.array_equal(vec, self._hyper_host):
            self._hyper.set(vec)
            self._hyper_host = vec

    # the step -----------------------------------------------------------------------------------
    def _put(self, x):
        if not isinstance(x, cp.ndarray):  # host images are checked on the host (device ones are not read back)
            x = np.asarray(x)
            if getattr(self.net, "check_finite", True) and x.dtype.kind == "f" and not np.isfinite(x).all():
                raise ValueError("input holds NaN or infinite values")
        x = _as_device_images(x, self.in_shape)
        n = len(x)
        if self._rows.grow(n):
            self._graphs.clear()
            self._alloc_io()
        self._rows.x[:x.size] = x.reshape(-1)
        seeds = [dropout_seed(layer.rng, layer.p)[0] for _, layer in self._rows.dropouts]  # the CPU's order
        if seeds:
            self._rows.seeds.set(np.array(seeds, np.uint64))
        self.n = n

    def loss(self, x, y):
        """(mean loss, number right) of images x with labels y, training-mode forward: two 0-d device arrays
        (nothing is read back). Host labels are checked on the host; device labels are taken as they are."""
        x = x if hasattr(x, "shape") else np.asarray(x)
        n = len(x)
        on_device = isinstance(y, cp.ndarray)
        y = y if on_device else np.asarray(y)
        if y.dtype.kind not in "iu" or tuple(y.shape) != (n,):
            raise ValueError(f"expected integer labels of shape ({n},), got {y.dtype} {tuple(y.shape)}")
        if not on_device:
            if n and (int(y.min()) < 0 or int(y.max()) >= self._k):
                raise ValueError(f"labels must lie in [0, {self._k}), got [{int(y.min())}, {int(y.max())}]")
        self._put(x)
        if on_device:
            self._labels[:n] = y.astype(cp.int32)
        else:
            self._labels[:n].set(y.astype(np.int32))
        self._set_hyper(smoothing=self.loss_fn.smoothing)
        self._graphs.run(("forward+loss", n), lambda: self._forward_loss(n))
        total = self._total.copy()
        self.logits = self._rows.out[-1][:n * self._k].reshape(n, self._k)
        return total[0], total[1]

    def _forward_loss(self, n):
        logits = self._rows.forward(n)
        _k("st_xent_rows", n, logits, self._labels, n, self._k, self._hyper, self._rowloss, self._right,
           self._dlogits)
        _k("st_xent_total", 1, self._rowloss, self._right, n, self._total)

    def backward(self, ready=None):
        """Gradients of every parameter into the layers' grads from the last loss(); then ready(every gradient
        array), if given."""
        self._rows.backward(self.n, self._dlogits)
        if ready is not None:
            ready(list(self.net.grads.values()))

    def _update_rows(self, velocity, lr, momentum, weight_decay, dampening, nesterov):
        """The SGD settings into `hyper`, and (parameter, gradient, momentum, decay) per parameter, with the
        momentum buffers made where `velocity` lacks them (then this is a first step: v = d)."""
        dampening = momentum if dampening is None else dampening
        check_nesterov(nesterov, momentum, dampening)
        self._set_hyper(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=float(bool(nesterov)))
        rows, first = [], False
        for name, w in self.net.params.items():
            v = velocity.get(name)
            if v is None:
                v = velocity[name] = cp.zeros_like(w)
                first = True
            rows.append((w, self.net.grads[name], v, int(name.endswith("weight"))))
        return rows, first

    def apply(self, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False):
        """The backward and the SGD update (optim.sgd_momentum's rule; skipped on the device when the last loss
        was not finite): one graph launch per batch size and set of momentum buffers."""
        rows, first = self._update_rows(velocity, lr, momentum, weight_decay, dampening, nesterov)
        n = self.n

        def body():
            self._rows.backward(n, self._dlogits)
            for w, g, v, decay in rows:
                _k("st_sgd", w.size, w, g, v, w.size, self._hyper, decay, int(first), self._total)

        if first:  # a first step (v = d) runs once, directly
            body()
            return
        key = ("apply", n, tuple(v.data.ptr for _, _, v, _ in rows))  # the graph holds the momentum buffers' addresses
        self._graphs.run(key, body)

    def step(self, x, y, lr, momentum, weight_decay, dampening, velocity, nesterov=False):
        """loss() then apply() (the update is skipped on the device if the loss is not finite);
        returns (loss as a float, logits). Reads the loss back: the trainer calls loss() and apply()."""
        loss = self.loss(x, y)[0]
        self.apply(velocity, lr, momentum, weight_decay, dampening, nesterov)
        return float(loss), self.logits

    def testing_saved(self, row, n):
        """What the last forward kept for op `row` on its n images, on the host: (output, argmax or None),
        each (n, H, W, C) for channels-last rows, (n, C, H, W) / (n, F) for the others."""
        r = self._rows.rows[row]
        f, ho, wo = _chw(r.out_shape)
        shape = (ho, wo, f) if r.channels_last else tuple(r.out_shape)
        size = n * int(np.prod(shape))
        aux = self._rows.aux[row]
        return (cp.asnumpy(self._rows.out[row][:size]).reshape(n, *shape),
                None if aux is None else cp.asnumpy(aux[:size]).reshape(n, *shape))


class GpuPlan:
    """Batch inference on the GPU from ``layout(..., training=False)``: ``plan(x)`` -> outputs (a new device
    array; softmax=True adds a softmax over a flat output), one graph launch per batch after the first two of
    its size. Reads the layers' weights as they are at each call."""

    def __init__(self, net, in_shape=None, batch_size=1, softmax=False):
        self.net = net
        self._rows = _Rows(net, in_shape, batch_size, training=False)
        self.in_shape, self.out_shape, self.names = self._rows.in_shape, self._rows.out_shape, self._rows.names
        if softmax and len(self.out_shape) != 1:
            raise UnsupportedNetwork(f"softmax needs a flat output, the network gives {self.out_shape}")
        self.softmax = softmax
        self._graphs = _Graphs()

    @property
    def captures(self):
        return self._graphs.captures

    def __call__(self, x):
        x = _as_device_images(x, self.in_shape)
        n = len(x)
        if self._rows.grow(n):
            self._graphs.clear()
        self._rows.x[:x.size] = x.reshape(-1)
        self._graphs.run(n, lambda: self._rows.forward(n))
        out = self._rows.out[-1][:n * int(np.prod(self.out_shape))].reshape(n, *self.out_shape).copy()
        if self.softmax:
            z = cp.exp(out - out.max(axis=1, keepdims=True))
            out = z / z.sum(axis=1, keepdims=True)
        return out


def device_peak(iters=4096, repeat=3):
    """The device's float32 rate in GFLOP/s as st_fma_peak measures it (independent chains of fused
    multiply-adds on every thread the device holds at once): the best of `repeat` runs."""
    props = cp.cuda.runtime.getDeviceProperties(0)
    threads = int(props.get("multiProcessorCount", 1)) * int(props.get("maxThreadsPerMultiProcessor", 256))
    out = cp.empty(threads, dtype=cp.float32)
    best = 0.0
    for r in range(repeat + 1):  # a first run loads the module
        cp.cuda.runtime.deviceSynchronize()
        t0 = time.perf_counter()
        _k("st_fma_peak", threads, out, iters)
        cp.cuda.runtime.deviceSynchronize()
        if r:
            best = max(best, 2 * 8 * iters * threads / (time.perf_counter() - t0) / 1e9)
    return best
