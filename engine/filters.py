"""Reconstruct and draw the 3D filters of a flattened layer (the paper's Figure 4).

    python -m engine.filters MODEL.npz --out filters.png [--layer conv1]

A flattened layer without its biases is a linear, translation-equivariant map, so its
equivalent 3D filter bank is its response to unit impulses: one impulse per input
channel, in the middle of an image large enough to hold the whole receptive field. With
S stages of k-tap filters the reconstructed filters are (S(k-1)+1) pixels wide. Filters
are sorted by variance, largest first. For a first layer (3 input channels) each filter
is drawn as a colour patch; otherwise, each filter's strongest input channel in grey.
"""
import argparse
import sys

import numpy as np

from .inference import ModelFileError, load
from .layers import Flattened
from .npzfile import check_writable_file


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


def draw(filters, path, title=""):
    """Grid of filters sorted by variance; colour patches when there are 3 input channels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    f = filters[np.argsort(-filters.reshape(len(filters), -1).var(axis=1))]
    n = len(f)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6 + 0.4))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, w in zip(np.ravel(axes), f):
        if w.shape[0] == 3:
            img = w.transpose(1, 2, 0)
            img = (img - img.min()) / (np.ptp(img) + 1e-12)
            ax.imshow(img, interpolation="nearest")
        else:
            strongest = w[np.argmax((w ** 2).sum(axis=(1, 2)))]
            ax.imshow(strongest, cmap="gray", interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.filters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model file written by train.py")
    p.add_argument("--out", default="filters.png", help="PNG to write")
    p.add_argument("--layer", default=None, help="name of the flattened layer (default: the first one)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: drawing filters needs matplotlib: pip install matplotlib") from None
    try:
        check_writable_file(args.out)
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.out}: {e}") from None
    try:
        model = load(args.model)
    except (FileNotFoundError, ModelFileError) as e:
        raise SystemExit(f"error: {e}") from None
    flat = [(n, layer) for n, layer in model.net.children if isinstance(layer, Flattened)]
    if args.layer:
        flat = [(n, layer) for n, layer in flat if n == args.layer]
    if not flat:
        raise SystemExit(f"error: no flattened layer {args.layer or ''} in {args.model}".replace("  ", " "))
    name, layer = flat[0]
    filters = reconstruct(layer)
    n, c_in, kh, kw = filters.shape
    draw(filters, args.out, f"{name}: {n} filters {kh}x{kw}, reconstructed from 1D filters, sorted by variance")
    print(f"wrote {args.out}: {name}, {n} filters {kh}x{kw} over {c_in} input channels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
