"""The paper's networks (section 4.1 and Table 1): baseline and flattened.

baseline: three 5x5 convolutions (96, 128, 256 filters, 'same' padding), each followed
by ReLU and max-pooling; two fully-connected layers of 256 units with ReLU; a linear
output over the classes (softmax in the loss). Five dropout layers, p = 0.1, 0.25, 0.25,
0.5, 0.5 from lower to higher layers: after each pooling and after each hidden
fully-connected layer.

flattened: the same network with convolution layers 2 and 3 (optionally 1) replaced by
`Flattened` layers of `stages` V-H-L stages.

Pooling: the paper's text says "sizes of 2 and strides of 3"; the network it copies
(Srivastava & Salakhutdinov 2013, cuda-convnet) pools 3x3 windows with stride 2, with
cuda-convnet's ceil output size (32 -> 16 -> 8 -> 4). That is the default here;
`pool=(2, 3)` and `pool_ceil=False` give the text's reading.
"""
import numpy as np

from engine import Conv2d, Dropout, Flatten, Flattened, Linear, MaxPool2d, ReLU, Sequential

MODELS = ("baseline", "flattened")
INITS = ("auto", "lecun", "glorot", "delta")
DROPOUT = (0.1, 0.25, 0.25, 0.5, 0.5)
CHANNELS = (96, 128, 256)
HIDDEN = 256


def build(model, in_shape=(3, 32, 32), n_classes=10, pool=(3, 2), pool_ceil=True, flatten_first=False,
          stages=2, init="auto", seed=0, k=5):
    """Build the paper's `model` ('baseline' or 'flattened') for inputs of `in_shape` (C, H, W).

    init: 'auto' (the paper's choice: Glorot's normalized initialization for flattened
    layers, LeCun's heuristic for everything else), 'lecun' or 'glorot' for all layers;
    'delta' draws as 'auto' and then starts each V and H filter as an identity (a 1 at its
    centre tap) and each lateral as the orthogonal matrix nearest its Glorot draw (the
    random numbers drawn are the same as for 'auto', so are the dropout masks).
    All randomness (weights, dropout masks) comes from one numpy Generator seeded by `seed`;
    the model keeps it as `model.rng` so a checkpoint can save its state.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (expected one of {', '.join(MODELS)})")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r} (expected one of {', '.join(INITS)})")
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
    rng = np.random.default_rng(seed)
    conv_init = "lecun" if init in ("auto", "delta") else init
    flat_init = "glorot" if init == "auto" else init
    layers, names = [], []
    c_prev = in_shape[0]
    for i, (c, p) in enumerate(zip(CHANNELS, DROPOUT[:3]), start=1):
        flat = model == "flattened" and (i > 1 or flatten_first)
        conv = (Flattened(c_prev, c, k, stages=stages, init=flat_init, rng=rng) if flat
                else Conv2d(c_prev, c, k, padding=k // 2, init=conv_init, rng=rng))
        layers += [conv, ReLU(), MaxPool2d(pool[0], pool[1], ceil_mode=pool_ceil), Dropout(p, rng=rng)]
        names += [f"conv{i}", f"relu{i}", f"pool{i}", f"drop{i}"]
        c_prev = c
    shape = (1, *in_shape)
    for layer in layers:
        shape = layer.output_shape(shape)
    flat_size = int(np.prod(shape[1:]))
    if flat_size < 1:
        raise ValueError(f"input {in_shape} is too small for three pooling stages of {pool}")
    layers += [Flatten(),
               Linear(flat_size, HIDDEN, init=conv_init, rng=rng), ReLU(), Dropout(DROPOUT[3], rng=rng),
               Linear(HIDDEN, HIDDEN, init=conv_init, rng=rng), ReLU(), Dropout(DROPOUT[4], rng=rng),
               Linear(HIDDEN, n_classes, init=conv_init, rng=rng)]
    names += ["flatten", "fc1", "relu4", "drop4", "fc2", "relu5", "drop5", "out"]
    net = Sequential(*layers, names=names, check_finite=True)
    net.rng = rng
    net.in_shape = tuple(in_shape)
    net.arch = dict(model=model, in_shape=list(in_shape), n_classes=n_classes, pool=list(pool), pool_ceil=pool_ceil,
                    flatten_first=flatten_first, stages=stages, init=init, k=k)
    return net


def summary(net, in_shape=None):
    """Per-layer table rows: (name, type, output shape, weights, biases), and the totals."""
    in_shape = tuple(in_shape or net.in_shape)
    shape = (1, *in_shape)
    rows = []
    for name, layer in net.children:
        shape = layer.output_shape(shape)
        params = layer.params
        weights = sum(v.size for k, v in params.items() if k.endswith("weight"))
        biases = sum(v.size for k, v in params.items() if k.endswith("bias"))
        rows.append((name, repr(layer), shape[1:], weights, biases))
    return rows


def format_summary(net, title=""):
    rows = summary(net)
    lines = [title] if title else []
    lines.append(f"{'layer':<8} {'type':<54} {'output':<16} {'weights':>10} {'biases':>8}")
    lines.append("-" * 100)
    for name, kind, shape, w, b in rows:
        lines.append(f"{name:<8} {kind:<54} {str(tuple(shape)):<16} {w:>10,} {b:>8,}")
    tw, tb = sum(r[3] for r in rows), sum(r[4] for r in rows)
    lines.append("-" * 100)
    lines.append(f"{'total':<8} {'':<54} {'':<16} {tw:>10,} {tb:>8,}   ({tw + tb:,} parameters)")
    return "\n".join(lines)
