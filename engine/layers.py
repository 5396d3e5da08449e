"""Layers: NCHW float arrays, one small class each, forward and backward.

Every layer has the same interface, so optimizers, serialization and summaries
need no per-layer code:

* ``layer.params`` / ``layer.grads``: dicts name -> array (``weight``, ``bias``;
  composite layers prefix their children's names, e.g. ``stage1.lateral.weight``).
  Optimizers must update ``params`` in place; ``backward`` overwrites ``grads``.
* ``y = layer.forward(x)``; ``dx = layer.backward(dy)`` for the last forward.
* ``layer.train()`` / ``layer.eval()`` (dropout is the identity in eval mode).
* ``layer.config()``: the constructor arguments, to rebuild the architecture.

Layers are float32 by default; ``dtype=np.float64`` (or ``.astype``) gives float64
layers for gradient checks. Input of another float dtype, or non-contiguous input,
is converted to the layer's dtype; integer input is refused.

Backends: layers are built on the CPU (numpy parameters); ``layer.to("cupy")`` moves
the parameters to the GPU, after which the layer takes and returns CuPy arrays (and
``to("cpu")`` moves them back). Each operation goes through ``get_ops(array)``, so no
layer knows which backend it runs on. A layer with parameters refuses input from
another backend with a message; a layer without parameters follows its input.

Buffers: the arrays ``forward`` and ``backward`` return are owned by the layer and
reused by its next call of the same kind (allocating fresh multi-megabyte arrays on
every call costs page faults comparable to the arithmetic). Copy a result to keep it
beyond the next call.
"""
import numpy as np

from .runtime import get_ops, is_array, ops_for

# im2col works on chunks of the batch so its column buffer stays below this size.
COLUMN_BUFFER_BYTES = 64 * 2**20


class Layer:
    """Base class: parameter bookkeeping, train/eval switch, input and gradient checks.

    Each layer type declares what the rest of the engine needs to know about it, so that
    adding a type means writing its class (registered with ``@register``) and its kernels
    in each executor (docs/architecture.md):

    * ``kind``: its op in the shared lowering (engine/lowering.py), or None for containers;
    * ``config_keys``: the constructor arguments a model file stores (``config()``);
    * ``param_shapes(config)``: its parameters' shapes from those arguments, without building it
      (model files are checked against them before any array is read);
    * ``in_channels``: the input channels it needs, for image layers that fix them (else None);
    * ``image_input``: it takes (C, H, W) images (not the flat vectors after Flatten);
    * ``fuses_relu``: its compiled op applies a ReLU that follows it to its own output.
    """

    kind = None
    config_keys = ()
    in_channels = None
    image_input = False
    fuses_relu = False

    @classmethod
    def param_shapes(cls, config):
        """{parameter name: shape} of a layer built with `config` (validated; nothing allocated)."""
        return {}

    def __init__(self, dtype=np.float32):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"{type(self).__name__}: dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.training = True
        self._params = {}
        self._grads = {}
        self.children = []  # (name, layer) of composite layers
        self._out_shape = None
        # False on a network's first layer: its backward then skips the input gradient
        # (nobody needs it) and returns None. Sequential passes it to its first child.
        self.input_grad = True
        self.backend = "cpu"

    # parameters -------------------------------------------------------------------
    def _add_param(self, name, value):
        self._params[name] = np.ascontiguousarray(value, dtype=self.dtype)
        self._grads[name] = np.zeros_like(self._params[name])

    @property
    def params(self):
        d = dict(self._params)
        for cname, child in self.children:
            d.update({f"{cname}.{k}": v for k, v in child.params.items()})
        return d

    @property
    def grads(self):
        d = dict(self._grads)
        for cname, child in self.children:
            d.update({f"{cname}.{k}": v for k, v in child.grads.items()})
        return d

    def grad_views(self, views):
        """Make each gradient array (name -> array, names as in `grads`) the given array of its shape and
        dtype, with its current values copied in: e.g. views of one buffer that a single Allreduce sums."""
        own = self.grads
        for name, view in views.items():
            if name not in own or view.shape != own[name].shape or view.dtype != own[name].dtype:
                raise ValueError(f"{self!r}: no gradient {name} of shape {getattr(view, 'shape', None)} "
                                 f"and dtype {getattr(view, 'dtype', None)}")
        for name, view in views.items():
            view[...] = own[name]
            layer, own_name = self._owner(name)
            layer._grads[own_name] = view

    def _owner(self, name):
        """(layer, its own name) of parameter `name` of this layer or a descendant."""
        if name in self._grads:
            return self, name
        for cname, child in self.children:  # a child's name may hold dots itself (a Flattened's "stage1.vertical")
            if name.startswith(cname + ".") and name[len(cname) + 1:] in child.grads:
                return child._owner(name[len(cname) + 1:])
        raise KeyError(name)

    def load_params(self, arrays):
        """Copy arrays (name -> array, names as in `params`) into this layer's parameters, in place."""
        own = self.params
        missing = sorted(set(own) - set(arrays))
        extra = sorted(set(arrays) - set(own))
        if missing or extra:
            raise ValueError(f"{self!r}: parameters do not match (missing {missing}, unexpected {extra})")
        for name, target in own.items():
            src = arrays[name] if is_array(arrays[name]) else np.asarray(arrays[name])
            if src.shape != target.shape:
                raise ValueError(f"{self!r}: parameter {name} has shape {src.shape}, expected {target.shape}")
            target[...] = get_ops(target).asarray(src)

    def to(self, backend):
        """Move this layer's parameters and gradients (and its children's) to 'cpu' or 'cupy', in place; returns self."""
        ops = ops_for(backend)
        for d in (self._params, self._grads):
            for name, v in d.items():
                d[name] = ops.asarray(v)
        self.backend = ops.name
        self.__dict__.pop("_ws", None)
        for _, child in self.children:
            child.to(backend)
        return self

    def astype(self, dtype):
        """Convert this layer (and its children) to float32 or float64, in place; returns self."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"{self!r}: dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        for name in self._params:
            self._params[name] = self._params[name].astype(dtype)
            self._grads[name] = self._grads[name].astype(dtype)
        for _, child in self.children:
            child.astype(dtype)
        return self

    def train(self, mode=True):
        self.training = bool(mode)
        for _, child in self.children:
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def config(self):
        """Constructor arguments of this layer (JSON-friendly), to rebuild the architecture."""
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # checks -----------------------------------------------------------------------
    def _as_array(self, x, what="input"):
        """x as an array of this layer's backend (a layer without parameters adopts the input's backend)."""
        if not is_array(x):
            x = np.asarray(x)
        name = get_ops(x).name
        if name != self.backend:
            if self._params or self.children:
                raise TypeError(f"{self!r}: {what} is a {name} array but the layer's parameters are on "
                                f"{self.backend}; move the layer with .to({name!r}) or the array to {self.backend}")
            self.backend = name
            self.__dict__.pop("_ws", None)
        return x

    def _check_input(self, x, ndim, channels=None):
        """Validate x and return it as a C-contiguous array of the layer's dtype."""
        x = self._as_array(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{self!r}: expected a floating-point input, got dtype {x.dtype}")
        if x.ndim != ndim:
            raise ValueError(f"{self!r}: expected input of shape {self._expected_shape()}, got {x.shape}")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(
                f"{self!r}: expected input of shape {self._expected_shape()} with {channels} channels, "
                f"got {x.shape}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{self!r}: empty batch (input shape {x.shape})")
        return get_ops(x).xp.ascontiguousarray(x, dtype=self.dtype)

    def _expected_shape(self):
        return "(N, C, H, W)"

    def _check_grad(self, dy):
        if self._out_shape is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = self._as_array(dy, "gradient")
        if dy.dtype.kind != "f":
            raise TypeError(f"{self!r}: expected a floating-point gradient, got dtype {dy.dtype}")
        if dy.shape != self._out_shape:
            raise ValueError(
                f"{self!r}: gradient of shape {dy.shape} does not match the last forward output {self._out_shape}"
            )
        return get_ops(dy).xp.ascontiguousarray(dy, dtype=self.dtype)

    def _workspace(self, name, shape, dtype=None):
        """A buffer kept between calls (re-allocated only when the shape or dtype changes)."""
        dtype = np.dtype(dtype or self.dtype)
        ws = self.__dict__.setdefault("_ws", {})
        buf = ws.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = ws[name] = ops_for(self.backend).xp.empty(shape, dtype=dtype)
        return buf

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)


def _init_uniform(rng, shape, fan_in, fan_out, init):
    """'lecun': U(-1/sqrt(fan_in), +) as Torch7's default heuristic; 'glorot': Glorot & Bengio's normalized init."""
    if init == "lecun":
        bound = 1.0 / np.sqrt(fan_in)
    elif init == "glorot":
        bound = np.sqrt(6.0 / (fan_in + fan_out))
    else:
        raise ValueError(f"unknown init {init!r} (expected 'lecun' or 'glorot')")
    return rng.uniform(-bound, bound, size=shape)


def _nearest_orthogonal(w):
    """The matrix with orthonormal rows or columns (whichever are fewer) nearest to w: U V^T of its SVD."""
    u, _, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    return u @ vt


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _positive_int(layer, name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{layer}: {name} must be a positive integer, got {v!r}")
    return int(v)


LAYER_TYPES = {}  # type name (as model files store it) -> class: every layer type a model file may hold
MAX_STAGES = 1666  # stages of a Flattened layer a model file may declare (6 parameter arrays each, 10,000 in all)


def register(cls):
    """Class decorator: `cls` may appear in model files under its class name."""
    LAYER_TYPES[cls.__name__] = cls
    return cls


def _weight_and_bias(name, config, weight, bias):
    """{"weight": ..., "bias": ...} shapes from the config keys that size them."""
    n = {key: _positive_int(name, key, config[key]) for key in dict.fromkeys(weight + bias)}
    return {"weight": tuple(n[k] for k in weight), "bias": tuple(n[k] for k in bias)}


# ------------------------------------------------------------------------------- convolutions

@register
class Conv2d(Layer):
    """Baseline 3D convolution (cross-correlation like Torch/PyTorch): im2col + GEMM.

    x (N, C_in, H, W) -> y (N, C_out, Ho, Wo), Ho = (H + 2*padding - k) // stride + 1.
    weight (C_out, C_in, k, k), bias (C_out,).
    """

    kind = "conv"
    image_input = True
    fuses_relu = True
    config_keys = ("c_in", "c_out", "k", "stride", "padding")

    @classmethod
    def param_shapes(cls, config):
        return _weight_and_bias("Conv2d", config, ("c_out", "c_in", "k", "k"), ("c_out",))

    @property
    def in_channels(self):
        return self.c_in

    def __init__(self, c_in, c_out, k, stride=1, padding=0, init="lecun", rng=None, dtype=np.float32):
        super().__init__(dtype)
        name = "Conv2d"
        self.c_in, self.c_out = _positive_int(name, "c_in", c_in), _positive_int(name, "c_out", c_out)
        self.k, self.stride = _positive_int(name, "k", k), _positive_int(name, "stride", stride)
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"Conv2d: padding must be a non-negative integer, got {padding!r}")
        self.padding = int(padding)
        self.init = init
        rng = _rng(rng)
        fan_in, fan_out = c_in * k * k, c_out * k * k
        self._add_param("weight", _init_uniform(rng, (c_out, c_in, k, k), fan_in, fan_out, init))
        self._add_param("bias", _init_uniform(rng, (c_out,), fan_in, fan_out, init) if init == "lecun" else np.zeros(c_out))

    def config(self):
        return dict(c_in=self.c_in, c_out=self.c_out, k=self.k, stride=self.stride, padding=self.padding)

    def _expected_shape(self):
        return f"(N, {self.c_in}, H, W)"

    def output_shape(self, in_shape):
        n, _, h, w = in_shape
        ho = (h + 2 * self.padding - self.k) // self.stride + 1
        wo = (w + 2 * self.padding - self.k) // self.stride + 1
        return (n, self.c_out, ho, wo)

    def column_chunk(self, n, p):
        """Images per im2col chunk of a batch of n with p output pixels each (the columns stay within a bound)."""
        per_image = self.c_in * self.k * self.k * p * self.dtype.itemsize
        return max(1, min(n, COLUMN_BUFFER_BYTES // max(per_image, 1)))

    def forward(self, x):
        x = self._check_input(x, 4, self.c_in)
        N, F = x.shape[0], self.c_out
        _, _, ho, wo = self.output_shape(x.shape)
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r}: input {x.shape} is smaller than the {self.k}x{self.k} kernel")
        ops = get_ops(x)
        P, CKK = ho * wo, self.c_in * self.k * self.k
        y = self._workspace("out", (N, F, ho, wo))
        y3 = y.reshape(N, F, P)
        y3[...] = self._params["bias"][:, None]
        w2 = self._params["weight"].reshape(1, F, CKK)
        chunk = self.column_chunk(N, P)
        cols = self._workspace("cols", (chunk, CKK, P))
        for n0 in range(0, N, chunk):
            n = min(chunk, N - n0)
            ops.im2col(x, n0, self.k, self.k, self.stride, self.padding, cols[:n])
            ops.batched_gemm(False, False, 1.0, w2, cols[:n], 1.0, y3[n0:n0 + n], shared_a=True)
        self._x, self._out_shape, self._cols_valid = x, y.shape, chunk >= N
        return y

    def backward(self, dy):
        dy = self._check_grad(dy)
        x = self._x
        ops = get_ops(dy)
        N, F = x.shape[0], self.c_out
        P, CKK = dy.shape[2] * dy.shape[3], self.c_in * self.k * self.k
        dy3 = dy.reshape(N, F, P)
        w2 = self._params["weight"].reshape(1, F, CKK)
        dw2 = self._grads["weight"].reshape(1, F, CKK)
        ops.channel_sum(dy3, self._grads["bias"])
        dx = self._workspace("dx", x.shape) if self.input_grad else None
        chunk = self.column_chunk(N, P)
        cols = self._workspace("cols", (chunk, CKK, P))
        dcols = self._workspace("dcols", (chunk, CKK, P)) if self.input_grad else None
        for n0 in range(0, N, chunk):
            n = min(chunk, N - n0)
            if not self._cols_valid:  # the forward's columns were overwritten: rebuild this chunk
                ops.im2col(x, n0, self.k, self.k, self.stride, self.padding, cols[:n])
            ops.batched_gemm(False, True, 1.0, dy3[n0:n0 + n], cols[:n], 1.0 if n0 else 0.0, dw2)
            if self.input_grad:
                ops.batched_gemm(True, False, 1.0, w2, dy3[n0:n0 + n], 0.0, dcols[:n], shared_a=True)
                ops.col2im(dcols[:n], n0, self.k, self.k, self.stride, self.padding, dx)
        return dx


@register
class Lateral(Layer):
    """Lateral (L) 1D convolution across channels: a 1x1 convolution, one GEMM per image, no im2col.

    x (N, C_in, H, W) -> y (N, C_out, H, W); weight (C_out, C_in), bias (C_out,).
    init: 'glorot', 'lecun', or 'delta' (the orthogonal matrix nearest the Glorot draw).
    """

    kind = "lateral"
    image_input = True
    fuses_relu = True
    config_keys = ("c_in", "c_out")

    @classmethod
    def param_shapes(cls, config):
        return _weight_and_bias("Lateral", config, ("c_out", "c_in"), ("c_out",))

    @property
    def in_channels(self):
        return self.c_in

    def __init__(self, c_in, c_out, init="glorot", rng=None, dtype=np.float32):
        super().__init__(dtype)
        self.c_in, self.c_out = _positive_int("Lateral", "c_in", c_in), _positive_int("Lateral", "c_out", c_out)
        self.init = init
        # 'delta' (a flattened layer's identity-like start): the Glorot draw, made orthogonal.
        weight = _init_uniform(_rng(rng), (c_out, c_in), c_in, c_out, "glorot" if init == "delta" else init)
        self._add_param("weight", _nearest_orthogonal(weight) if init == "delta" else weight)
        self._add_param("bias", np.zeros(c_out))

    def config(self):
        return dict(c_in=self.c_in, c_out=self.c_out)

    def _expected_shape(self):
        return f"(N, {self.c_in}, H, W)"

    def output_shape(self, in_shape):
        return (in_shape[0], self.c_out, in_shape[2], in_shape[3])

    def forward(self, x):
        x = self._check_input(x, 4, self.c_in)
        ops = get_ops(x)
        N, _, H, W = x.shape
        y = self._workspace("out", (N, self.c_out, H, W))
        y3 = y.reshape(N, self.c_out, H * W)
        y3[...] = self._params["bias"][:, None]
        ops.batched_gemm(False, False, 1.0, self._params["weight"][None], x.reshape(N, self.c_in, H * W),
                         1.0, y3, shared_a=True)
        self._x, self._out_shape = x, y.shape
        return y

    def backward(self, dy):
        dy = self._check_grad(dy)
        ops = get_ops(dy)
        x = self._x
        N, _, H, W = x.shape
        dy3 = dy.reshape(N, self.c_out, H * W)
        ops.channel_sum(dy3, self._grads["bias"])
        ops.batched_gemm(False, True, 1.0, dy3, x.reshape(N, self.c_in, H * W), 0.0, self._grads["weight"][None])
        if not self.input_grad:
            return None
        dx = self._workspace("dx", x.shape)
        ops.batched_gemm(True, False, 1.0, self._params["weight"][None], dy3, 0.0,
                         dx.reshape(N, self.c_in, H * W), shared_a=True)
        return dx


def conv1d_padding(k, mode):
    """(before, after) zero padding of a length-k 1D convolution for a mode.

    'full' keeps every partial overlap (output N+k-1), 'same' keeps the size
    (output N), 'valid' only complete overlaps (output N-k+1); a (before, after)
    pair of integers is taken as is (negative values crop).
    """
    if mode == "full":
        return (k - 1, k - 1)
    if mode == "same":
        return ((k - 1) // 2, k // 2)
    if mode == "valid":
        return (0, 0)
    if (isinstance(mode, (tuple, list)) and len(mode) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in mode)):
        return (int(mode[0]), int(mode[1]))
    raise ValueError(f"mode must be 'full', 'same', 'valid' or a (before, after) pair of ints, got {mode!r}")


class _Conv1d(Layer):
    """Per-channel 1D convolution along one axis (2: vertical, 3: horizontal); see Vertical/Horizontal.

    init: 'glorot', 'lecun', or 'delta' (every filter an identity: 1 at its centre tap).
    """

    axis = None
    config_keys = ("channels", "k", "mode")

    @classmethod
    def param_shapes(cls, config):
        return _weight_and_bias(cls.__name__, config, ("channels", "k"), ("channels",))

    @property
    def in_channels(self):
        return self.channels

    def __init__(self, channels, k, mode="full", init="glorot", rng=None, dtype=np.float32):
        super().__init__(dtype)
        name = type(self).__name__
        self.channels, self.k = _positive_int(name, "channels", channels), _positive_int(name, "k", k)
        self.mode = mode if isinstance(mode, str) else tuple(int(v) for v in mode)
        self.before, self.after = conv1d_padding(self.k, mode)
        self.init = init
        # Glorot over the filter's own taps: fan_in = fan_out = k. 'delta': an identity filter,
        # 1 at the centre tap (the left one of the two for an even k), after the same draw.
        weight = _init_uniform(_rng(rng), (channels, k), k, k, "glorot" if init == "delta" else init)
        if init == "delta":
            weight = np.zeros_like(weight)
            weight[:, (k - 1) // 2] = 1.0
        self._add_param("weight", weight)
        self._add_param("bias", np.zeros(channels))

    def config(self):
        return dict(channels=self.channels, k=self.k, mode=self.mode if isinstance(self.mode, str) else list(self.mode))

    def _expected_shape(self):
        return f"(N, {self.channels}, H, W)"

    def output_shape(self, in_shape):
        shape = list(in_shape)
        shape[self.axis] = in_shape[self.axis] + self.before + self.after - self.k + 1
        return tuple(shape)

    def forward(self, x):
        x = self._check_input(x, 4, self.channels)
        out_shape = self.output_shape(x.shape)
        if out_shape[self.axis] < 1:
            raise ValueError(f"{self!r}: input {x.shape} too small for this kernel and mode")
        ops = get_ops(x)
        y = self._workspace("out", out_shape)
        ops.conv1d(self.axis, x, self._params["weight"], self._params["bias"], self.before, False, y)
        self._x, self._out_shape = x, y.shape
        return y

    def backward(self, dy):
        dy = self._check_grad(dy)
        ops = get_ops(dy)
        ops.conv1d_grad_params(self.axis, self._x, dy, self.before, self._grads["weight"], self._grads["bias"])
        if not self.input_grad:
            return None
        dx = self._workspace("dx", self._x.shape)
        # The adjoint of a correlation is the correlation with the flipped filter and
        # padding k-1-before, cropped to the input's length.
        ops.conv1d(self.axis, dy, self._params["weight"], None, self.k - 1 - self.before, True, dx)
        return dx


@register
class Vertical(_Conv1d):
    """Vertical (V) convolution: each channel with its own k x 1 filter along H.

    x (N, C, H, W) -> y (N, C, H + before + after - k + 1, W); weight (C, k), bias (C,).
    """

    axis = 2
    kind = "vertical"
    image_input = True
    fuses_relu = True


@register
class Horizontal(_Conv1d):
    """Horizontal (H) convolution: each channel with its own 1 x k filter along W.

    x (N, C, H, W) -> y (N, C, H, W + before + after - k + 1); weight (C, k), bias (C,).
    """

    axis = 3
    kind = "horizontal"
    image_input = True
    fuses_relu = True


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse. Children are named '0', '1', ..."""

    def __init__(self, *layers, names=None, check_finite=False):
        """`check_finite=True` refuses input holding NaN or infinity (one pass over the input)."""
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Sequential: needs at least one layer")
        for layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: {layer!r} is not a Layer")
        super().__init__(layers[0].dtype)
        names = [str(i) for i in range(len(layers))] if names is None else list(names)
        if len(names) != len(layers) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"Sequential: needs one non-empty string name per layer, got {names!r}")
        keys = {}  # parameters are saved under these keys: two layers must never share one
        if len(set(names)) != len(names):
            raise ValueError(f"Sequential: layer name {next(n for n in names if names.count(n) > 1)!r} is used twice")
        for name, layer in zip(names, layers):
            for k in layer.params:
                other = keys.setdefault(f"{name}.{k}", name)
                if other != name:
                    raise ValueError(f"Sequential: parameter {name}.{k} of layer {name!r} collides with layer {other!r}")
        self.children = list(zip(names, layers))
        self.check_finite = check_finite
        if len({layer.dtype for layer in layers}) > 1:
            self.astype(np.float64)

    @property
    def layers(self):
        return [layer for _, layer in self.children]

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.children)

    def __repr__(self):
        inner = "\n".join(f"  ({name}): {layer!r}" for name, layer in self.children)
        return f"{type(self).__name__}(\n{inner}\n)"

    def forward(self, x):
        if self.check_finite:
            x = x if is_array(x) else np.asarray(x)
            if x.dtype.kind == "f" and not get_ops(x).xp.isfinite(x).all():
                raise ValueError(f"{type(self).__name__}: input holds NaN or infinite values")
        for layer in self.layers:
            x = layer.forward(x)
        self._out_shape = x.shape
        return x

    def backward(self, dy):
        dy = self._check_grad(dy)
        self.layers[0].input_grad = self.input_grad
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def output_shape(self, in_shape):
        for layer in self.layers:
            in_shape = layer.output_shape(in_shape)
        return in_shape


@register
class Flattened(Sequential):
    """Flattened layer (Jin et al. 2014): `stages` x (vertical, horizontal, lateral), biases, no non-linearity.

    x (N, C_in, H, W) -> y (N, C_out, Ho, Wo), the same size as
    Conv2d(c_in, c_out, k, padding=k//2): (H + 2*(k//2) - k + 1, likewise W).

    Which channel count each 1D filter acts on is fixed by the paper's Table 1:
    with k=5, Flattened(96, 128) has 30,912 weights = 2*5*96 + 96*128 + 2*5*128 + 128*128,
    and Flattened(128, 256) has 102,144 = 2*5*128 + 128*256 + 2*5*256 + 256*256. So the
    first stage's V and H act on the C_in input channels before its lateral maps
    C_in -> C_out, and later stages act on C_out: each stage is V, H, L - the paper's
    L-V-H-L-V-H sequence with the first lateral moved to the end, the only order with
    which those counts come out.

    V and H of every stage but the last run in 'full' mode (no boundary feature lost);
    the last stage's V and H are cropped (centred) to the baseline's output size,
    which for 2 stages and odd k is exactly 'valid'.
    """

    config_keys = ("c_in", "c_out", "k", "stages")

    @classmethod
    def param_shapes(cls, config):
        n = {key: _positive_int("Flattened", key, config[key]) for key in cls.config_keys}
        if n["stages"] > MAX_STAGES:
            raise ValueError(f"{n['stages']} stages, more than {MAX_STAGES}")
        shapes = {}
        for s in range(n["stages"]):
            ch = n["c_in"] if s == 0 else n["c_out"]
            for sub, shape in (("vertical", (ch, n["k"])), ("horizontal", (ch, n["k"])),
                               ("lateral", (n["c_out"], ch))):
                shapes[f"stage{s + 1}.{sub}.weight"] = shape
                shapes[f"stage{s + 1}.{sub}.bias"] = shape[:1]
        return shapes

    def __init__(self, c_in, c_out, k, stages=2, init="glorot", rng=None, dtype=np.float32):
        c_in, c_out = _positive_int("Flattened", "c_in", c_in), _positive_int("Flattened", "c_out", c_out)
        k, stages = _positive_int("Flattened", "k", k), _positive_int("Flattened", "stages", stages)
        rng = _rng(rng)
        # Total padding over all stages so the output matches Conv2d(padding=k//2): the
        # full-mode stages grow each axis by k-1; the last stage takes the rest (maybe < 0).
        last_total = 2 * (k // 2) - (stages - 1) * (k - 1)
        last = (last_total // 2, last_total - last_total // 2)
        layers, names = [], []
        for s in range(stages):
            ch = c_in if s == 0 else c_out
            mode = "full" if s < stages - 1 else last
            layers += [Vertical(ch, k, mode, init, rng, dtype), Horizontal(ch, k, mode, init, rng, dtype),
                       Lateral(ch, c_out, init, rng, dtype)]
            names += [f"stage{s + 1}.vertical", f"stage{s + 1}.horizontal", f"stage{s + 1}.lateral"]
        super().__init__(*layers, names=names)
        self.c_in, self.c_out, self.k, self.stages = c_in, c_out, k, stages

    def config(self):
        return dict(c_in=self.c_in, c_out=self.c_out, k=self.k, stages=self.stages)

    def __repr__(self):
        return Layer.__repr__(self)

    def _expected_shape(self):
        return f"(N, {self.c_in}, H, W)"

    def forward(self, x):
        return super().forward(self._check_input(x, 4, self.c_in))


# ------------------------------------------------------------------------------- other layers

@register
class MaxPool2d(Layer):
    """Max-pooling over k x k windows with a stride (overlapping when stride < k), no padding.

    x (N, C, H, W) -> y (N, C, Ho, Wo), Ho = floor((H - k) / stride) + 1, or with
    ceil_mode=True ceil(...) + 1 where the last window, clipped at the border, still
    starts inside the input (the rule of Torch and PyTorch).
    """

    kind = "pool"
    image_input = True
    fuses_relu = True
    config_keys = ("k", "stride", "ceil_mode")

    def __init__(self, k, stride=None, ceil_mode=False, dtype=np.float32):
        super().__init__(dtype)
        self.k = _positive_int("MaxPool2d", "k", k)
        self.stride = self.k if stride is None else _positive_int("MaxPool2d", "stride", stride)
        self.ceil_mode = bool(ceil_mode)

    def config(self):
        return dict(k=self.k, stride=self.stride, ceil_mode=self.ceil_mode)

    def _out_len(self, n):
        if n < self.k:
            return 0
        if self.ceil_mode:
            out = -(-(n - self.k) // self.stride) + 1
            if (out - 1) * self.stride >= n:
                out -= 1
            return out
        return (n - self.k) // self.stride + 1

    def output_shape(self, in_shape):
        return (in_shape[0], in_shape[1], self._out_len(in_shape[2]), self._out_len(in_shape[3]))

    def forward(self, x):
        x = self._check_input(x, 4)
        shape = self.output_shape(x.shape)
        if shape[2] < 1 or shape[3] < 1:
            raise ValueError(f"{self!r}: input {x.shape} is smaller than the {self.k}x{self.k} window")
        ops = get_ops(x)
        y = self._workspace("out", shape)
        self._argmax = self._workspace("argmax", shape, np.int32)
        ops.maxpool_forward(x, self.k, self.stride, y, self._argmax)
        self._in_shape, self._out_shape = x.shape, y.shape
        return y

    def backward(self, dy):
        dy = self._check_grad(dy)
        ops = get_ops(dy)
        return ops.maxpool_backward(dy, self._argmax, self._workspace("dx", self._in_shape), self.k, self.stride)


class _AnyShape(Layer):
    """Base of the layers that take input of any shape (N, ...)."""

    def _check_input(self, x, ndim=None, channels=None):
        x = self._as_array(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{self!r}: expected a floating-point input, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"{self!r}: expected a non-empty batch of shape (N, ...), got {x.shape}")
        return get_ops(x).xp.ascontiguousarray(x, dtype=self.dtype)

    def output_shape(self, in_shape):
        return in_shape


@register
class ReLU(_AnyShape):
    """max(x, 0), element-wise, any shape."""

    kind = "relu"

    def forward(self, x):
        x = self._check_input(x)
        ops = get_ops(x)
        self._y = ops.relu_forward(x, self._workspace("out", x.shape))
        self._out_shape = x.shape
        return self._y

    def backward(self, dy):
        dy = self._check_grad(dy)
        ops = get_ops(dy)
        return ops.relu_backward(self._y, dy, self._workspace("dx", dy.shape))


@register
class Dropout(_AnyShape):
    """Inverted dropout: in training, zero each element with probability p and scale the rest by 1/(1-p).

    The mask comes from `rng` (a numpy Generator or a seed), so a run is reproducible
    and its state can be saved. In eval mode the layer is the identity.
    """

    kind = "dropout"
    config_keys = ("p",)

    def __init__(self, p=0.5, rng=None, dtype=np.float32):
        super().__init__(dtype)
        if not (isinstance(p, (float, int)) and 0.0 <= p < 1.0):
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = _rng(rng)

    def config(self):
        return dict(p=self.p)

    def forward(self, x):
        x = self._check_input(x)
        self._out_shape = x.shape
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        ops = get_ops(x)
        self._mask = ops.dropout_mask(self.rng, self.p, self._workspace("mask", x.shape, np.uint8))
        return ops.mask_scale(x, self._mask, 1.0 / (1.0 - self.p), self._workspace("out", x.shape))

    def backward(self, dy):
        dy = self._check_grad(dy)
        if self._mask is None:
            return dy
        ops = get_ops(dy)
        return ops.mask_scale(dy, self._mask, 1.0 / (1.0 - self.p), self._workspace("dx", dy.shape))


@register
class Flatten(_AnyShape):
    """(N, ...) -> (N, prod(...)), a view."""

    kind = "flatten"

    def output_shape(self, in_shape):
        return (in_shape[0], int(np.prod(in_shape[1:])))

    def forward(self, x):
        x = self._check_input(x)
        if x.ndim < 2:
            raise ValueError(f"{self!r}: expected input of shape (N, ...), got {x.shape}")
        self._in_shape = x.shape
        self._out_shape = self.output_shape(x.shape)
        return x.reshape(self._out_shape)

    def backward(self, dy):
        return self._check_grad(dy).reshape(self._in_shape)


@register
class Linear(Layer):
    """Fully-connected layer, y = x @ weight.T + bias, as one GEMM.

    x (N, n_in) -> y (N, n_out); weight (n_out, n_in), bias (n_out,).
    """

    kind = "linear"
    fuses_relu = True
    config_keys = ("n_in", "n_out")

    @classmethod
    def param_shapes(cls, config):
        return _weight_and_bias("Linear", config, ("n_out", "n_in"), ("n_out",))

    def __init__(self, n_in, n_out, init="lecun", rng=None, dtype=np.float32):
        super().__init__(dtype)
        self.n_in, self.n_out = _positive_int("Linear", "n_in", n_in), _positive_int("Linear", "n_out", n_out)
        self.init = init
        rng = _rng(rng)
        self._add_param("weight", _init_uniform(rng, (n_out, n_in), n_in, n_out, init))
        self._add_param("bias", _init_uniform(rng, (n_out,), n_in, n_out, init) if init == "lecun" else np.zeros(n_out))

    def config(self):
        return dict(n_in=self.n_in, n_out=self.n_out)

    def _expected_shape(self):
        return f"(N, {self.n_in})"

    def output_shape(self, in_shape):
        return (in_shape[0], self.n_out)

    def forward(self, x):
        x = self._check_input(x, 2, self.n_in)
        ops = get_ops(x)
        y = self._workspace("out", (x.shape[0], self.n_out))
        y[...] = self._params["bias"]
        ops.gemm(False, True, 1.0, x, self._params["weight"], 1.0, y)
        self._x, self._out_shape = x, y.shape
        return y

    def backward(self, dy):
        dy = self._check_grad(dy)
        ops = get_ops(dy)
        ops.gemm(True, False, 1.0, dy, self._x, 0.0, self._grads["weight"])
        self._grads["bias"][...] = dy.sum(axis=0)
        return ops.gemm(False, False, 1.0, dy, self._params["weight"], 0.0, self._workspace("dx", self._x.shape))
