"""Training steps for the trainer: layer by layer (any backend, float64 too) or compiled (CPU, float32).

    step = make_step(net, "compiled", batch_size=128)[0]   # or "layers", or "auto"
    loss, correct = step.loss(x, y)                 # forward and loss of a batch
    step.apply(velocity, lr, momentum, weight_decay, dampening, nesterov)   # backward() then update():
                                                        # gradients into the layers' grads, then SGD
    loss, logits = step.step(x, y, lr, momentum, weight_decay, dampening, velocity, nesterov)   # both

``LayerStep`` is the reference: ``net.forward``, the loss, ``net.backward`` and
``optim.sgd_momentum``, each layer its own call. ``CompiledStep`` runs the same
computation as two compiled calls (forward, backward; engine/_train.h) around the
loss, then one compiled SGD update. It is built from the shared lowering
(engine/lowering.py): channels-last activations, fused V+H, bias and ReLU folded
into the op before them, whole-batch GEMMs on register-blocked micro-kernels for the
convolutions, laterals and Linear layers, and no Python per layer.

Both steps read and write the same state: ``Layer.params`` are the master weights
(updated in place), ``Layer.grads`` receive the gradients, ``velocity`` (name ->
array) the momentum buffers, and dropout draws its masks' seeds from the dropout
layers' generators in the same order with the same hash. So a checkpoint written
with one step resumes on the other, and their results agree to float32 rounding
(the sums run in a different order).
"""
import numpy as np

from . import winograd
from ._kernels import infer_layout, sgd_run, train_run, train_vh_sizes, train_wgrad_scratch, train_wgrad_slices
from .losses import SoftmaxCrossEntropy
from .lowering import COL, UnsupportedNetwork, fuse, identity_half, layout, lower, op_row, op_table, row_flops
from .optim import check_nesterov, sgd_momentum
from .runtime.dropout import dropout_seed, dropout_threshold
from .runtime.memory import aligned_empty
from .runtime.threads import run_threads

COLUMN_FLOATS = 16 * 2**20  # im2col works on chunks of images with at most this many column floats (64 MiB)
OWN_COLUMN_FLOATS = 12 * 2**20  # a convolution whose columns for the whole batch fit keeps them for backward
STEPS = ("auto", "compiled", "layers")


NR = infer_layout()[0]  # filters per panel of the GEMM micro-kernel


def _panels(n):
    """n rounded up to whole panels of the GEMM micro-kernel's filters."""
    return -(-n // NR) * NR


def _float_bits(v):
    return int(np.array([v], np.float32).view(np.int32)[0])


class LayerStep:
    """The layer-by-layer step: every backend and dtype (the reference)."""

    name = "layers"

    def __init__(self, net):
        self.net = net
        self.loss_fn = SoftmaxCrossEntropy()

    def loss(self, x, y):
        """(mean loss, number correct) of images x (on the network's backend) with labels y (host or
        backend), both left on the backend as scalars: a device is not read here."""
        self.logits = self.net.forward(x)
        loss = self.loss_fn(self.logits, y, as_array=True)  # host labels are checked on the host
        return loss, (self.logits.argmax(axis=1) == self.loss_fn.labels).sum()

    def backward(self, ready=None):
        """Gradients of the last loss into the layers' grads; then ready(every gradient array), if given."""
        self.net.backward(self.loss_fn.backward())
        if ready is not None:
            ready(list(self.net.grads.values()))

    def update(self, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False):
        """The SGD update from the layers' grads (optim.sgd_momentum's rule)."""
        sgd_momentum(self.net.params, self.net.grads, velocity, lr, momentum, weight_decay, dampening, nesterov)

    def apply(self, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False):
        """backward() then update()."""
        self.backward()
        self.update(velocity, lr, momentum, weight_decay, dampening, nesterov)

    def step(self, x, y, lr, momentum, weight_decay, dampening, velocity, nesterov=False):
        """loss() then, if the loss is finite, apply(); returns (loss as a float, logits)."""
        loss = float(self.loss(x, y)[0])
        if np.isfinite(loss):
            self.apply(velocity, lr, momentum, weight_decay, dampening, nesterov)
        return loss, self.logits


class CompiledStep:
    """The compiled step (CPU, float32) for `net` on images of `in_shape` (C, H, W); see the module docstring.

    Buffers are sized for `batch_size` images (a larger batch re-sizes them once).
    Raises UnsupportedNetwork for a network it cannot run (the reason in the message).
    """

    name = "compiled"

    def __init__(self, net, in_shape=None, batch_size=128):
        if net.backend != "cpu":
            raise UnsupportedNetwork(f"the compiled step runs on the CPU; the network is on {net.backend}")
        if net.dtype != np.float32:
            raise UnsupportedNetwork(f"the compiled step is float32; the network is {net.dtype}")
        in_shape = in_shape if in_shape is not None else getattr(net, "in_shape", None)
        if in_shape is None:
            raise UnsupportedNetwork("in_shape is needed (the network does not record one)")
        self.net = net
        self.ops = fuse(lower(net, in_shape))
        self.in_shape = self.ops[0].in_shape
        self.loss_fn = SoftmaxCrossEntropy()
        self.capacity = 0
        self.last_threads = 0
        self._build(max(1, int(batch_size)))

    # construction -----------------------------------------------------------------------
    def _build(self, cap):
        """The op table and every buffer, for up to `cap` images."""
        self.capacity = cap
        self._keep, self._rows, self.names, self._dropouts = [], [], [], []
        self.row_grads = []  # per row: the layers' gradient arrays it writes (backward(ready=...))
        self._saved = []  # per row: (output array, argmax/mask array or None), for testing_saved()
        self._act = int(np.prod(self.in_shape))
        self._cols = self._wbuf = self._part = self._scratch = self._wpack = self._bpad = self._wpart = 1
        self._has_params = False  # whether an op with parameters came before (the first computes no input gradient)
        self._layouts = []
        rows = layout(self.ops, training=True)
        for r, row in enumerate(rows):
            op, relu = row.op, int(row.relu)
            layer = op.layer if op is not None else None
            self._channels_last = row.channels_last
            if row.kind in ("TO_NHWC", "TO_NCHW", "RELU"):
                self._add(row.kind, row.name, row.in_shape, row.out_shape, relu=relu)
            elif row.kind == "DROPOUT":
                mask = self._buf(cap * int(np.prod(row.out_shape)), np.uint8)
                self._dropouts.append((len(self._rows), layer))
                self._add("DROPOUT", row.name, row.in_shape, row.out_shape, aux=mask,
                          thresh=dropout_threshold(layer.p), scale=_float_bits(1.0 / (1.0 - layer.p)))
            elif row.kind in ("LINEAR", "GEMM"):
                self._gemm_row(row.kind, op, row.in_shape, row.out_shape, relu=relu)
            elif row.kind == "CONV" and row.fields["tile"]:
                self._winograd_row(row, relu)
            elif row.kind == "CONV":
                c, h, w = row.in_shape
                f, ho, wo = row.out_shape
                kkc, p = layer.k * layer.k * c, ho * wo
                chunk = max(1, min(cap, COLUMN_FLOATS // (p * kkc)))
                own = {}
                if chunk == cap and cap * p * kkc <= OWN_COLUMN_FLOATS:  # kept from forward to backward
                    own = dict(aux=self._buf(cap * p * kkc))
                    if r + 1 < len(rows) and rows[r + 1].kind == "POOL":
                        # the pooling runs in its forward, an image at a time from the thread's scratch, and the
                        # output is never stored: nothing reads it (_train.h, ft_conv_pool_forward)
                        own.update(pooled=1, out=0)
                        self._scratch = max(self._scratch, p * f)
                else:
                    self._cols = max(self._cols, chunk * p * kkc)
                if self._has_params and layer.stride == 1 and layer.padding < layer.k:
                    # the input gradient as a convolution of the output gradient (_train.h,
                    # ft_conv_input_grad): its columns, k*k*F per input pixel, in chunks of images
                    per_image = h * w * layer.k * layer.k * f
                    self._cols = max(self._cols, max(1, min(cap, COLUMN_FLOATS // per_image)) * per_image)
                    self._wpack = max(self._wpack, _panels(c) * layer.k * layer.k * f)
                self._wbuf = max(self._wbuf, f * kkc)
                self._part = max(self._part, f)
                self._wgrad_rows(chunk * p, f, kkc)
                self._gemm_row("CONV", op, row.in_shape, row.out_shape, relu=relu, **row.fields,
                               mid=self._buf(f * kkc), chunk=chunk, **own)
            elif row.kind == "VH":
                self._vh_row(row)
            elif row.kind == "POOL":
                drop = {}
                if row.dropout is not None:  # folded in (lowering.layout): its seed goes in this row
                    rate = row.dropout.layer.p
                    self._dropouts.append((len(self._rows), row.dropout.layer))
                    drop = dict(thresh=dropout_threshold(rate), scale=_float_bits(1.0 / (1.0 - rate)))
                self._add("POOL", row.name, row.in_shape, row.out_shape, relu=relu, **row.fields, **drop,
                          aux=self._buf(cap * int(np.prod(row.out_shape)), np.int32))
            else:
                raise UnsupportedNetwork(f"{row.name}: the compiled step has no op {row.kind}")
        shape = self.ops[-1].out_shape
        if len(shape) != 1:
            raise UnsupportedNetwork(f"the network's output {shape} is not flat (N, classes): nothing to train on")
        self.out_shape = shape
        self.table = op_table(self._rows)
        self._cols_buf = aligned_empty(self._cols)
        self._wbuf_buf = aligned_empty(self._wbuf)
        self._wpart_buf = aligned_empty(self._wpart)
        self._wpack_buf = aligned_empty(self._wpack)
        self._bpad_buf = np.zeros(2 * self._bpad, np.float32)
        self._part_buf = np.empty((cap, self._part), np.float32)
        self._g = [aligned_empty(cap * self._act) for _ in range(2)]
        self._scratch = max(self._scratch, train_wgrad_scratch())
        self._scratch_buf = np.empty((0, self._scratch), np.float32)
        self._param_rows = [row for row in range(len(self.table) - 1, -1, -1) if self.row_grads[row]]  # last first
        del self._rows

    def _buf(self, n, dtype=np.float32):
        a = aligned_empty(max(1, n), dtype)
        self._keep.append(a)
        return a.ctypes.data

    def _ptr(self, array):
        a = np.asarray(array)
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise UnsupportedNetwork("the compiled step needs float32, C-contiguous parameters")
        self._keep.append(a)
        return a.ctypes.data

    def _add(self, kind, name, in_shape, out_shape, **fields):
        n_out = int(np.prod(out_shape))
        if "out" not in fields:
            fields["out"] = self._buf(self.capacity * n_out)
            self._last_out = self._keep[-1]
        aux = fields.get("aux")
        c, h, w = (tuple(out_shape) + (1, 1))[:3]
        self._layouts.append((h, w, c) if self._channels_last else tuple(out_shape))
        kept = aux if kind in ("POOL", "DROPOUT") else None  # argmax / mask
        out = next(a for a in self._keep if a.ctypes.data == fields["out"]) if fields["out"] else None
        self._saved.append((out, next((a for a in self._keep if kept and a.ctypes.data == kept), None)))
        self._rows.append(op_row(kind, in_shape, out_shape, **fields))
        self.row_grads.append([])
        self._act = max(self._act, n_out, int(np.prod(in_shape)))
        self.names.append(name)

    def _wgrad_rows(self, rows, f, cn):
        """Room in the partial-sum buffer for a weight gradient (f x cn) summed over `rows` rows."""
        slices = train_wgrad_slices(rows)
        if slices > 1:
            self._wpart = max(self._wpart, slices * f * cn)

    def _gemm_row(self, kind, op, in_shape, out_shape, **fields):
        layer = op.layer
        self._part = max(self._part, out_shape[0])
        f, k = layer.params["weight"].shape[0], layer.params["weight"].size // layer.params["weight"].shape[0]
        if kind in ("GEMM", "LINEAR"):  # (a CONV's rows: its chunks of images, or its Winograd tiles)
            self._wgrad_rows(self.capacity * int(np.prod(out_shape[1:])), f, k)
        self._wpack = max(self._wpack, _panels(f) * k, _panels(k) * f)  # forward: W^T packed; backward: W
        self._bpad = max(self._bpad, _panels(f), _panels(k))
        self._add(kind, op.name, in_shape, out_shape, w=self._ptr(layer.params["weight"]),
                  b=self._ptr(layer.params["bias"]), dw=self._ptr(layer.grads["weight"]),
                  db=self._ptr(layer.grads["bias"]), **fields)
        self.row_grads[-1] = [layer.grads["weight"], layer.grads["bias"]]
        self._has_params = True

    def _winograd_row(self, row, relu):
        """A CONV by Winograd's F(m x m, k x k) (_train.h, ft_wino_*): the transforms, the transformed input kept for
        backward (and reused by the input gradient), the products, the packed transformed filters."""
        (c, h, w), (f, ho, wo) = row.in_shape, row.out_shape
        m, k = row.fields["tile"], row.fields["k"]
        n, cap = m + k - 1, self.capacity
        tiles, tiles_in = -(-ho // m) * -(-wo // m), -(-h // m) * -(-w // m)  # forward; input gradient
        wt = np.concatenate([t.astype(np.float32).ravel() for t in winograd.transforms(m, k)])
        self._keep.append(wt)
        self._wbuf = max(self._wbuf, n * n * f * c)
        self._wgrad_rows(cap * tiles, f, c)
        self._scratch = max(self._scratch, 2 * n * n * max(c, f) + max(c, f))
        self._bpad = max(self._bpad, _panels(f), _panels(c))
        self._gemm_row("CONV", row.op, row.in_shape, row.out_shape, relu=relu, **row.fields, wt=wt.ctypes.data,
                       tv=self._buf(n * n * cap * max(tiles * c, tiles_in * f)),
                       tm=self._buf(n * n * cap * max(tiles * f, tiles_in * c)),
                       mid=self._buf(n * n * max(_panels(f) * c, _panels(c) * f)), chunk=cap)

    def _vh_row(self, row):
        c = row.in_shape[0]
        halves, grads = [], []
        for half in row.op.parts:
            if half is None:  # the identity filter; its gradients go to scratch arrays
                p = identity_half(c)
                g = {k: np.empty_like(v) for k, v in p.items()}
            else:
                p, g = half.layer.params, half.layer.grads
                grads += [g["weight"], g["bias"]]
            halves += [self._ptr(p["weight"]), self._ptr(p["bias"]), self._ptr(g["weight"]), self._ptr(g["bias"])]
        wv, bv, dwv, dbv, wh, bh, dwh, dbh = halves
        kv, kh = row.fields["kv"], row.fields["kh"]
        fields = dict(relu=int(row.relu), **row.fields, wv=wv, bv=bv, wh=wh, bh=bh, dwv=dwv, dbv=dbv, dwh=dwh, dbh=dbh)
        scratch, wbuf, kmax = train_vh_sizes(op_table([op_row("VH", row.in_shape, row.out_shape, **fields)])[0])
        if max(kv, kh) > kmax:
            raise UnsupportedNetwork(f"{row.name}: 1D filters of {max(kv, kh)} taps (the compiled step takes up to {kmax})")
        self._wbuf = max(self._wbuf, wbuf)
        self._part = max(self._part, (kv + kh + 2) * c)
        self._scratch = max(self._scratch, scratch)
        self._add("VH", row.name, row.in_shape, row.out_shape, **fields)
        self.row_grads[-1] = grads
        self._has_params = True

    def testing_saved(self, row, n):
        """What the last forward kept for op `row` on its n images: (output, argmax or mask or None),
        each (n, H, W, C) for channels-last ops, (n, C, H, W) / (n, F) for the others; the output is None
        for a convolution whose pooling ran in its forward (its output is not kept)."""
        shape = self._layouts[row]
        size = n * int(np.prod(shape))
        out, aux = self._saved[row]
        return (None if out is None else out[:size].reshape(n, *shape),
                None if aux is None else aux[:size].reshape(n, *shape))

    # running ------------------------------------------------------------------------------
    def _check(self, x):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"expected floating-point images, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1:] != self.in_shape or len(x) == 0:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.in_shape))}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
        # the network's own switch, as in the layer path (the trainer checks each batch on the host itself)
        if getattr(self.net, "check_finite", True) and not np.isfinite(x).all():
            raise ValueError("input holds NaN or infinite values")
        if len(x) > self.capacity:
            self._build(len(x))
        return x

    def _threads(self, num_threads):
        threads = int(num_threads) if num_threads else run_threads()
        if self._scratch_buf.shape[0] < threads:
            self._scratch_buf = np.empty((threads, self._scratch), np.float32)
        return threads

    def forward(self, x, num_threads=None, times=None):
        """Training-mode forward of x (N, C, H, W); returns the logits (N, classes) (a view: copy to keep).

        times: None, or an array of 2 x n_ops float64 to which seconds per op are added."""
        x = self._check(x)
        for row, layer in self._dropouts:  # one seed per dropout layer and step, in order, as the layer path
            self.table[row, COL["seed"]] = dropout_seed(layer.rng, layer.p)[0]  # < 2**63
        threads = self._threads(num_threads)
        self._x = x
        self.last_threads = train_run(False, self.table, x, x, self._cols_buf, self._wbuf_buf,
                                      self._part_buf, self._scratch_buf, self._g[0], self._g[1],
                                      self._wpack_buf, self._bpad_buf, self._wpart_buf, threads, times)
        n_out = self.out_shape[0]
        return self._last_out[:len(x) * n_out].reshape(len(x), n_out)

    def backward(self, dlogits=None, num_threads=None, times=None, ready=None):
        """Gradients of every parameter (into the layers' grads) from dlogits (N, classes) of the last
        forward (default: the gradient of the last loss()).

        ready: None, or a function called between the ops with the list of gradient arrays an op
        has just finished, op after op from the last (the backward then runs in parts, one per op
        with parameters; the results are the same bit for bit)."""
        dlogits = np.ascontiguousarray(self.loss_fn.backward() if dlogits is None else dlogits, dtype=np.float32)
        if dlogits.shape != (len(self._x), self.out_shape[0]):
            raise ValueError(f"dlogits of shape {dlogits.shape} do not match the last forward "
                             f"({len(self._x)}, {self.out_shape[0]})")
        threads = self._threads(num_threads)
        upper = len(self.table)
        for first in self._param_rows if ready is not None else [0]:  # rows [first, upper) in each call
            self.last_threads = train_run(True, self.table, self._x, dlogits, self._cols_buf, self._wbuf_buf,
                                          self._part_buf, self._scratch_buf, self._g[0], self._g[1],
                                          self._wpack_buf, self._bpad_buf, self._wpart_buf, threads, times, upper,
                                          first)
            upper = first
            if ready is not None:
                ready(self.row_grads[first])

    def update(self, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False, num_threads=None):
        """SGD with momentum on every parameter (optim.sgd_momentum's rule), compiled."""
        dampening = momentum if dampening is None else dampening
        check_nesterov(nesterov, momentum, dampening)
        params, grads = self.net.params, self.net.grads
        rows = []
        for name, w in params.items():
            v = velocity.get(name)
            first = v is None
            if first:
                v = velocity[name] = np.empty_like(w)
            rows.append((w.ctypes.data, grads[name].ctypes.data, v.ctypes.data, w.size,
                         int(bool(weight_decay) and name.endswith("weight")), int(first)))
        sgd_run(np.array(rows, np.int64).reshape(-1, 6), lr, momentum, dampening, weight_decay, nesterov,
                self._threads(num_threads))
        return velocity

    def loss(self, x, y):
        """(mean loss, number correct) of images x with labels y (host arrays), training-mode forward."""
        self.logits = self.forward(x)
        loss = self.loss_fn(self.logits, y)
        return loss, int((self.logits.argmax(axis=1) == self.loss_fn.labels).sum())

    def apply(self, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False):
        """backward() then update()."""
        self.backward()
        self.update(velocity, lr, momentum, weight_decay, dampening, nesterov)

    def step(self, x, y, lr, momentum, weight_decay, dampening, velocity, nesterov=False):
        """loss() then, if the loss is finite, apply(); returns (loss, logits)."""
        loss = self.loss(x, y)[0]
        if np.isfinite(loss):
            self.apply(velocity, lr, momentum, weight_decay, dampening, nesterov)
        return loss, self.logits

    def flops(self, n):
        """[(forward, backward) floating-point operations] of each op for n images (lowering.row_flops)."""
        return row_flops(layout(self.ops, training=True), n)

    def profile(self, x, y, repeat=5, num_threads=None):
        """[(op name, forward ms, backward ms)]: medians over `repeat` forward/backward runs (no update)."""
        runs = np.zeros((repeat, 2 * len(self.names)))
        for r in range(-1, repeat):  # one warm-up run
            t = runs[r] if r >= 0 else np.zeros(2 * len(self.names))
            self.loss_fn(self.forward(x, num_threads, t), y)
            self.backward(self.loss_fn.backward(), num_threads, t)
        med = 1e3 * np.median(runs, axis=0)
        n = len(self.names)
        return [(name, med[i], med[n + i]) for i, name in enumerate(self.names)]


def make_step(net, kind="auto", batch_size=128, in_shape=None):
    """(step, note): the step `kind` asks for ('auto': compiled where it can run, else layers).

    note is None, or why 'auto' fell back to the layer path. 'compiled' raises
    UnsupportedNetwork with the reason when the network cannot run compiled."""
    if kind not in STEPS:
        raise ValueError(f"unknown step {kind!r} (expected one of {', '.join(STEPS)})")
    if kind == "layers":
        return LayerStep(net), None
    try:
        if net.backend == "cupy":  # the GPU's compiled step, from the same lowering (engine/runtime/cuda_step.py)
            from .runtime.cuda_step import GpuStep
            return GpuStep(net, in_shape, batch_size), None
        return CompiledStep(net, in_shape, batch_size), None
    except UnsupportedNetwork as e:
        if kind == "compiled":
            raise
        return LayerStep(net), str(e)

