"""flatnet engine: a standalone CNN engine whose hot loops are Cython/OpenMP kernels.

Layers (NCHW float32): Conv2d, Lateral, Vertical, Horizontal, Flattened, MaxPool2d,
ReLU, Dropout, Linear, Flatten, Sequential; loss: SoftmaxCrossEntropy.
Threads: openmp_enabled(), get_num_threads(), set_num_threads(n). CPU target of the compiled
kernels: cpu_target() ('baseline', 'avx2' or 'avx512'; FLATNET_CPU_TARGET forces a lower one).
Trained models: engine.load(path) -> Model with predict() / classify().
Pretrained models by name: engine.pretrained("flattened-cifar10") (names: engine.PRETRAINED).
"""
import os

# Two thread pools share the cores: OpenMP's (our kernels) and OpenBLAS's (GEMMs). By
# default each spins for a while after its work, stealing the cores the other needs
# next (measured: the flattened model's step took up to 2x longer). Unless the user
# chose otherwise, let both go to sleep soon. OpenMP's threads still spin briefly
# (GOMP_SPINCOUNT: about 0.1 ms, by libgomp's own estimate of 100,000 spins per ms):
# waking a sleeping thread costs ~20 us on these machines, which single-image inference
# would pay on every call; training speed was the same within noise (docs/benchmarks.md).
# Must be set before the runtimes load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from ._kernels import cpu_target
from .catalog import PRETRAINED, pretrained, pretrained_path
from .layers import (Conv2d, Dropout, Flatten, Flattened, Horizontal, Lateral, Layer, Linear, MaxPool2d, ReLU,
                      Sequential, Vertical, conv1d_padding)
from .losses import SoftmaxCrossEntropy, softmax
from .model import Model, load
from .modelfile import ModelFileError, save_model
from .runtime.threads import get_num_threads, kernels_path, openmp_enabled, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "Conv2d", "Dropout", "Flatten", "Flattened", "Horizontal", "Lateral", "Layer", "Linear",
    "MaxPool2d", "ReLU", "Sequential", "Vertical", "conv1d_padding", "SoftmaxCrossEntropy", "softmax",
    "get_num_threads", "set_num_threads", "openmp_enabled", "kernels_path", "cpu_target",
    "Model", "ModelFileError", "load", "save_model", "PRETRAINED", "pretrained", "pretrained_path",
]
