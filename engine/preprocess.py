"""The paper's preprocessing, after Goodfellow et al. (2013, maxout): per-image global contrast
normalization, then ZCA whitening fitted on the training set (CIFAR); contrast normalization
only (MNIST). Training (engine/data/cache.py) and trained models (engine/model.py) both use it.
"""
import numpy as np


def global_contrast_normalize(x, scale=1.0, sqrt_bias=10.0, use_std=True, min_divisor=1e-8):
    """Per-image contrast normalization (pylearn2's, as used for maxout networks).

    Each image (row) has its mean removed and is divided by
    sqrt(sqrt_bias + var) / scale (use_std, ddof=1) or sqrt(sqrt_bias + sum of squares) / scale.
    Works on any float (N, ...) array; returns float32.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = x - x.mean(axis=1, keepdims=True)
    if use_std:
        norm = np.sqrt(sqrt_bias + x.var(axis=1, ddof=1, keepdims=True)) / scale
    else:
        norm = np.sqrt(sqrt_bias + (x ** 2).sum(axis=1, keepdims=True)) / scale
    norm[norm < min_divisor] = 1.0
    return (x / norm).astype(np.float32)


class ZCA:
    """ZCA whitening fitted on a training set: x -> (x - mean) @ W, W = V diag(1/sqrt(eig + bias)) V^T."""

    def __init__(self, filter_bias=1.0):
        self.filter_bias = filter_bias
        self.mean = self.matrix = None

    def fit(self, x):
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        self.mean = x.mean(axis=0)
        xc = x - self.mean
        cov = xc.T @ xc / len(x)
        eig, vec = np.linalg.eigh(cov)
        eig = np.clip(eig, 0, None)
        self.matrix = (vec * (1.0 / np.sqrt(eig + self.filter_bias))) @ vec.T
        return self

    def transform(self, x, batch=5000):
        shape = x.shape
        flat = np.asarray(x).reshape(len(x), -1)
        out = np.empty(flat.shape, dtype=np.float32)
        w, mean = self.matrix.astype(np.float32), self.mean.astype(np.float32)
        for i in range(0, len(flat), batch):
            out[i:i + batch] = (flat[i:i + batch].astype(np.float32) - mean) @ w
        return out.reshape(shape)
