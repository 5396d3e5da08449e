"""The 3D filters a flattened layer is equivalent to (the paper's Figure 4).

    filters = reconstruct(layer)        # python -m engine.filters MODEL.npz draws them

A flattened layer without its biases is a linear, translation-equivariant map, so its
equivalent 3D filter bank is its response to unit impulses: one impulse per input
channel, in the middle of an image large enough to hold the whole receptive field. With
S stages of k-tap filters the reconstructed filters are (S(k-1)+1) pixels wide.
"""
import numpy as np

from .layers import Flattened


def reconstruct(layer):
    """Equivalent filters (C_out, C_in, K, K) of a Flattened layer, biases excluded; K = stages*(k-1)+1."""
    if not isinstance(layer, Flattened):
        raise TypeError(f"expected a Flattened layer, got {type(layer).__name__}")
    K = layer.stages * (layer.k - 1) + 1
    size = 2 * K + 1
    centre = size // 2
    saved = {name: p.copy() for name, p in layer.params.items()}
    try:
        for name, p in layer.params.items():
            if name.endswith("bias"):
                p[...] = 0
        x = np.zeros((layer.c_in, layer.c_in, size, size), dtype=layer.dtype)
        x[np.arange(layer.c_in), np.arange(layer.c_in), centre, centre] = 1
        y = layer.forward(x).copy()  # (C_in impulses, C_out, Ho, Wo)
    finally:
        layer.load_params(saved)
    # the output is `size` wide for odd k (same size as the input): shift to the centre
    off = (y.shape[2] - size) // 2
    # correlation: out[f, centre + pad - u] = W[f, c, u]; read the window around the centre, flipped
    half = K // 2
    win = y[:, :, centre + off - half:centre + off + half + 1, centre + off - half:centre + off + half + 1]
    return np.ascontiguousarray(win[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
