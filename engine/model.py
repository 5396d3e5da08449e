"""A trained network with its preprocessing, for applications that embed it.

    import engine
    model = engine.load("pretrained/flattened-cifar10.npz")
    probs = model.predict(images_uint8_nhwc)      # (N, classes)
    labels = model.classify(images_uint8_nhwc)    # (N,)

On the CPU, ``predict`` runs the network compiled by ``engine.plan`` (one compiled call
per batch, channels-last, packed weights); ``Model(..., compiled=False)`` or a network
the compiled path does not handle runs layer by layer instead, with the same results up
to float32 rounding.

This module needs numpy and the compiled kernels only (no trainer, tqdm or matplotlib).
The file format is engine/modelfile.py.
"""
import copy
import threading

import numpy as np

from .augment import mirror
from .losses import softmax
from .modelfile import read_model, save_model
from .plan import compiled_or_reason
from .preprocess import global_contrast_normalize
from .runtime import ops_for, to_numpy


class AmbiguousFloatImages(ValueError):
    """Float images whose every value lies in 0..1: 0..1 pixels, or nearly black 0..255 ones? float_max says."""


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
        self.plan, self.why_not_compiled = compiled_or_reason(self.net, self.input_shape, softmax=True)
        return self.plan

    def save(self, path, zca_storage="full", compress=False, weights="float32", zca_file=None):
        """Write this model to a model file again, e.g. with its ZCA matrix or weights stored compactly, or its ZCA
        matrix in a ZCA file beside it that other models share (see save_model)."""
        return save_model(path, self.net, self.input_shape, self.classes, self.preprocessing, self.zca_mean,
                          self.zca_matrix, extra=self.meta.get("extra"), zca_storage=zca_storage, compress=compress,
                          weights=weights, zca_file=zca_file)

    def preprocess(self, images, float_max=None):
        """uint8 (or float) images, HWC or NHWC (grey: also HW or NHW), -> float32 NCHW as in training.

        This is the input of `predict(..., preprocessed=True)` and of an exported ONNX model.
        Float pixels are read as 0..float_max (white = float_max). Without float_max, float
        images are read as 0..255, and refused when every value lies in 0..1 (the 0..1 convention
        or a nearly black image? say which with float_max=1.0 or float_max=255.0).
        """
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
            raise AmbiguousFloatImages("float images with every value in 0..1: pass float_max=1.0 if white is "
                                       "1.0, or float_max=255.0 if they are 0..255 pixels (uint8 images need neither)")
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

    def predict(self, images, preprocessed=False, batch_size=256, float_max=None, flip=False):
        """Class probabilities (N, classes). `images`: uint8 HWC/NHWC, or with preprocessed=True float CHW/NCHW.

        float_max: for float images, the value of white (see `preprocess`).
        flip: average each image's probabilities with those of its left-right mirror image (test-time
        flip averaging; it helps a network trained with flipped images, as train.py's CIFAR recipes are,
        and costs a second forward pass; the paper's accuracies are of single images).

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
        if flip:  # mirrored after preprocessing, as train.py's augmentation mirrors its training images
            return (self.predict(x, True, batch_size) + self.predict(mirror(x), True, batch_size)) / 2
        if self.plan is not None:  # thread-safe itself; the whole batch, softmax included, in one call
            return self.plan(x)
        out = np.empty((len(x), len(self.classes)), dtype=np.float32)
        ops = ops_for(self.net.backend)
        with self._lock:
            for i in range(0, len(x), batch_size):
                out[i:i + batch_size] = to_numpy(softmax(self.net.forward(ops.asarray(x[i:i + batch_size]))))
        return out

    def classify(self, images, preprocessed=False, float_max=None, flip=False):
        """Class indices (N,); names are in `model.classes`."""
        return self.predict(images, preprocessed=preprocessed, float_max=float_max, flip=flip).argmax(axis=1)


def load(path, backend="cpu", compiled=True):
    """Load a model file written by save_model / train.py, validating it; returns a Model.

    backend='cupy' runs the network on the GPU (the file is the same whichever backend wrote it).
    compiled=False runs it layer by layer on the CPU too (see engine.plan for the compiled path).
    Everything in the file is checked before anything is built from it (see npzfile.load);
    any problem raises ModelFileError naming the file.
    """
    net, meta, zca_mean, zca_matrix = read_model(path)
    if backend != "cpu":
        net.to(backend)
    return Model(net, meta, zca_mean, zca_matrix, compiled=compiled)
