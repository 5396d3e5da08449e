"""python -m engine.filters MODEL.npz --out filters.png [--layer conv1]: draw a flattened layer's 3D filters.

The filters are reconstructed from the layer's 1D filters (engine.filterbank.reconstruct) and sorted
by variance, largest first. For a first layer (3 input channels) each filter is drawn as a colour
patch; otherwise, each filter's strongest input channel in grey. Needs matplotlib.
"""
import argparse
import sys

import numpy as np

from ..filterbank import reconstruct
from ..layers import Flattened
from .common import MODEL_HELP, Parser, fail, load_model, needs, writable_file


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
    p = Parser(prog="python -m engine.filters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", default="filters.png", help="PNG to write")
    p.add_argument("--layer", default=None, help="name of the flattened layer (default: the first one)")
    args = p.parse_args(argv)
    needs("matplotlib", "drawing filters", "pip install matplotlib")
    writable_file(args.out)
    model = load_model(args.model)
    flat = [(n, layer) for n, layer in model.net.children if isinstance(layer, Flattened)]
    if args.layer:
        flat = [(n, layer) for n, layer in flat if n == args.layer]
    if not flat:
        fail(f"no flattened layer {args.layer or ''} in {args.model}".replace("  ", " "))
    name, layer = flat[0]
    filters = reconstruct(layer)
    n, c_in, kh, kw = filters.shape
    draw(filters, args.out, f"{name}: {n} filters {kh}x{kw}, reconstructed from 1D filters, sorted by variance")
    print(f"wrote {args.out}: {name}, {n} filters {kh}x{kw} over {c_in} input channels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
