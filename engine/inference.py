"""Model files and a small prediction API, for applications that embed a trained network.

A model file is one ``.npz`` written with ``allow_pickle=False``: every weight array
(``param/<name>``), the ZCA mean and matrix when the data was whitened, and a JSON
document (``meta``, a string array) with a format version, the architecture (each
layer's type and constructor arguments), the input shape, the class names and the
preprocessing settings. Loading never executes anything from the file.

    import engine
    model = engine.load("runs/flattened-cifar10/model.npz")
    probs = model.predict(images_uint8_nhwc)      # (N, classes)
    labels = model.classify(images_uint8_nhwc)    # (N,)

On the CPU, ``predict`` runs the network compiled by ``engine.plan`` (one compiled call
per batch, channels-last, packed weights); ``Model(..., compiled=False)`` or a network
the compiled path does not handle runs layer by layer instead, with the same results up
to float32 rounding.

This module needs numpy and the compiled kernels only (no trainer, tqdm or matplotlib).
"""
import copy
import threading
from pathlib import Path

import numpy as np

from . import layers as L
from . import npzfile
from .backend import ops_for, to_numpy
from .losses import softmax
from .plan import UnsupportedNetwork, compile_network

FORMAT = "flatnet-model"
VERSION = 1
LAYER_TYPES = {cls.__name__: cls for cls in (L.Conv2d, L.Lateral, L.Vertical, L.Horizontal, L.Flattened,
                                             L.MaxPool2d, L.ReLU, L.Dropout, L.Flatten, L.Linear)}


class ModelFileError(ValueError):
    """A model file is unreadable, truncated, of an unknown version, or disagrees with itself."""


def architecture(net):
    """The layer list of a Sequential as JSON-able dicts: name, type, constructor arguments."""
    arch = []
    for name, layer in net.children:
        kind = type(layer).__name__
        if kind not in LAYER_TYPES:
            raise ValueError(f"cannot save layer {name} of type {kind}")
        arch.append(dict(name=name, type=kind, config=layer.config()))
    return arch


def build_architecture(arch):
    """Rebuild a Sequential from `architecture(...)` output, validating every entry."""
    if not isinstance(arch, list) or not arch:
        raise ModelFileError("architecture must be a non-empty list of layers")
    layers, names = [], []
    for i, entry in enumerate(arch):
        try:
            cls = LAYER_TYPES[entry["type"]]
            layers.append(cls(**entry["config"]))
            names.append(str(entry["name"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"layer {i} of the architecture is invalid ({type(e).__name__}: {e})") from None
    return L.Sequential(*layers, names=names, check_finite=True)


def save_model(path, net, in_shape, classes, preprocessing=None, zca_mean=None, zca_matrix=None, extra=None):
    """Write `net` (a Sequential of engine layers) and what prediction needs to `path`, atomically."""
    meta = dict(format=FORMAT, version=VERSION, architecture=architecture(net), input_shape=list(in_shape),
                classes=list(classes), preprocessing=preprocessing or {}, extra=extra or {})
    arrays = {f"param/{k}": to_numpy(v) for k, v in net.params.items()}
    if zca_matrix is not None:
        arrays["zca_mean"], arrays["zca_matrix"] = zca_mean, zca_matrix
    return npzfile.save(path, arrays, meta)


class Model:
    """A loaded network with its preprocessing: predict() and classify(), thread-safe."""

    def __init__(self, net, meta, zca_mean=None, zca_matrix=None, compiled=True):
        self.net = net.eval()
        self.meta = meta
        self.classes = meta["classes"]
        self.input_shape = tuple(meta["input_shape"])  # (C, H, W)
        self.preprocessing = meta["preprocessing"]
        self.zca_mean, self.zca_matrix = zca_mean, zca_matrix
        self._lock = threading.Lock()  # layers reuse their buffers: one forward at a time
        self.plan, self.why_not_compiled = None, "compiled=False"
        if compiled:
            self.compile()

    def __deepcopy__(self, memo):
        """An independent model: its own network, compiled plan (see Plan.__deepcopy__) and lock."""
        new = object.__new__(type(self))
        for k, v in self.__dict__.items():
            setattr(new, k, threading.Lock() if k == "_lock" else copy.deepcopy(v, memo))
        return new

    def compile(self):
        """(Re)compile the network for the CPU's fast path, from its current weights.

        Called by the constructor; call it again after changing ``model.net``'s weights.
        Returns the plan, or None when the network runs layer by layer (not on the CPU,
        not float32, or a layer the compiled path lacks: ``model.why_not_compiled`` says which).
        """
        self.plan, self.why_not_compiled = None, None
        if self.net.dtype != np.float32:
            self.why_not_compiled = f"the network is {self.net.dtype}, the compiled path float32"
            return None
        try:
            self.plan = compile_network(self.net, self.input_shape, softmax=True)
        except UnsupportedNetwork as e:
            self.why_not_compiled = str(e)
        return self.plan

    def preprocess(self, images, float_max=None):
        """uint8 (or float) images, HWC or NHWC (grey: also HW or NHW), -> float32 NCHW as in training.

        This is the input of `predict(..., preprocessed=True)` and of an exported ONNX model.
        Float pixels are read as 0..float_max (white = float_max). Without float_max, float
        images are read as 0..255, and refused when every value lies in 0..1 (the 0..1 convention
        or a nearly black image? say which with float_max=1.0 or float_max=255.0).
        """
        from .data import global_contrast_normalize
        x = np.asarray(images)
        c, h, w = self.input_shape
        if c == 1 and x.shape[-2:] == (h, w) and x.ndim in (2, 3):
            x = x[..., None]  # grey images without a channel axis: (H, W) or (N, H, W)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise ValueError(f"expected images of shape (N, {h}, {w}, {c}) or ({h}, {w}, {c}), got {np.shape(images)}")
        if x.dtype.kind not in "uif":
            raise TypeError(f"expected uint8 or float pixel values, got dtype {x.dtype}")
        is_float = x.dtype.kind == "f"
        x = x.transpose(0, 3, 1, 2).reshape(len(x), -1).astype(np.float32)
        if is_float and float_max is None and x.size and np.abs(x).max() <= 1.0:
            raise ValueError("float images with every value in 0..1: pass float_max=1.0 if white is 1.0, "
                             "or float_max=255.0 if they are 0..255 pixels (uint8 images need neither)")
        if is_float and float_max is not None:
            if not 0 < float_max < np.inf:
                raise ValueError(f"float_max must be a positive number (the value of white), got {float_max!r}")
            x *= 255.0 / float_max
        gcn = self.preprocessing.get("gcn")
        if gcn:
            x = global_contrast_normalize(x, **gcn)
        if self.zca_matrix is not None:
            x = (x - self.zca_mean) @ self.zca_matrix
        return np.ascontiguousarray(x.reshape(-1, c, h, w), dtype=np.float32)

    def predict(self, images, preprocessed=False, batch_size=256, float_max=None):
        """Class probabilities (N, classes). `images`: uint8 HWC/NHWC, or with preprocessed=True float CHW/NCHW.

        float_max: for float images, the value of white (see `preprocess`).

        batch_size bounds the layer-by-layer path's buffers; the compiled path takes the
        whole batch in one call (its buffers do not grow with the batch).
        """
        if preprocessed:
            x = np.asarray(images)
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4 or x.shape[1:] != self.input_shape:
                raise ValueError(f"expected preprocessed input of shape (N, {', '.join(map(str, self.input_shape))})"
                                 f", got {np.shape(images)}")
        else:
            x = self.preprocess(images, float_max)
        if self.plan is not None:  # thread-safe itself; the whole batch, softmax included, in one call
            return self.plan(x)
        out = np.empty((len(x), len(self.classes)), dtype=np.float32)
        ops = ops_for(self.net.backend)
        with self._lock:
            for i in range(0, len(x), batch_size):
                out[i:i + batch_size] = to_numpy(softmax(self.net.forward(ops.asarray(x[i:i + batch_size]))))
        return out

    def classify(self, images, preprocessed=False, float_max=None):
        """Class indices (N,); names are in `model.classes`."""
        return self.predict(images, preprocessed=preprocessed, float_max=float_max).argmax(axis=1)


def load(path, backend="cpu", compiled=True):
    """Load a model file written by save_model / train.py, validating it; returns a Model.

    backend='cupy' runs the network on the GPU (the file is the same whichever backend wrote it).
    compiled=False runs it layer by layer on the CPU too (see engine.plan for the compiled path).
    """
    path = Path(path)
    arrays, meta = npzfile.load(path, "model file", ModelFileError)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a flatnet model file")
    if meta.get("version") != VERSION:
        raise ModelFileError(f"{path}: model file version {meta.get('version')!r}; this engine reads version {VERSION}")
    for key in ("architecture", "input_shape", "classes", "preprocessing"):
        if key not in meta:
            raise ModelFileError(f"{path}: model file lacks '{key}'")
    net = build_architecture(meta["architecture"])
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    expected = net.params
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{path}: weights do not match the architecture (missing {missing}, unexpected {extra})")
    for name, target in expected.items():
        if params[name].shape != target.shape:
            raise ModelFileError(f"{path}: array {name} has shape {params[name].shape}, the architecture "
                                 f"needs {target.shape}")
        if params[name].dtype.kind != "f" or not np.isfinite(params[name]).all():
            raise ModelFileError(f"{path}: array {name} is not finite floating-point data")
    net.load_params(params)
    try:
        out_shape = net.output_shape((1, *meta["input_shape"]))
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: input shape {meta['input_shape']} does not fit the architecture ({e})") from None
    if out_shape != (1, len(meta["classes"])):
        raise ModelFileError(f"{path}: the network gives {out_shape[1:]} outputs for {len(meta['classes'])} classes")
    zca_mean, zca_matrix = arrays.get("zca_mean"), arrays.get("zca_matrix")
    d = int(np.prod(meta["input_shape"]))
    if zca_matrix is not None and (zca_matrix.shape != (d, d) or zca_mean is None or zca_mean.shape != (d,)):
        raise ModelFileError(f"{path}: ZCA arrays do not match the input size {d}")
    if backend != "cpu":
        net.to(backend)
    return Model(net, meta, zca_mean, zca_matrix, compiled=compiled)
