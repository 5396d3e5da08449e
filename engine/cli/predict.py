"""Classify images with a trained model file.

    python -m engine.predict MODEL.npz cat.png dog.jpg        # PNG/JPEG files (needs Pillow)
    python -m engine.predict MODEL.npz batch.npy --top 3      # a .npy batch: uint8 NHWC, or float NCHW preprocessed
    python -m engine.predict MODEL.npz floats.npy --float-max 1   # float NHWC pixels where white is 1.0
    python -m engine.predict MODEL.npz cat.png --flip         # probabilities averaged with the mirror image's
    python -m engine.predict flattened-mnist digit.png        # a pretrained model by name (or a checkpoint.npz)

Prints the top-k classes with their probabilities for each image. An image file of another
size or colour mode than the model's input is converted, with a note on stderr saying so.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from ..images import ImageError, read_image
from ..model import AmbiguousFloatImages
from .common import MODEL_HELP, Parser, fail, load_model, say


def main(argv=None):
    p = Parser(prog="python -m engine.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", help="PNG/JPEG files, or one .npy batch")
    p.add_argument("--top", type=int, default=3, help="how many classes to print per image")
    p.add_argument("--float-max", type=float, default=None,
                   help="a float NHWC .npy batch: the value of white (1 or 255); needed when every value is in 0..1")
    p.add_argument("--flip", action="store_true",
                   help="average each image's probabilities with its left-right mirror image's (test-time flip "
                        "averaging: for networks trained with flipped images, such as train.py's CIFAR recipes)")
    args = p.parse_args(argv)
    model = load_model(args.model)
    names, preprocessed = [], False
    if len(args.inputs) == 1 and args.inputs[0].endswith(".npy"):
        try:
            # mapped, not read: a header that claims more than the file holds is refused, not allocated
            batch = np.array(np.load(args.inputs[0], mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError) as e:
            fail(f"cannot read {args.inputs[0]}: {e}")
        preprocessed = batch.dtype.kind == "f" and batch.ndim == 4 and batch.shape[1:] == model.input_shape
        names = [f"{args.inputs[0]}[{i}]" for i in range(len(batch))]
    else:
        try:
            batch = np.stack([read_image(Path(f), model.input_shape, note=say) for f in args.inputs])
        except ImageError as e:
            fail(e)
        names = args.inputs
    try:
        probs = model.predict(batch, preprocessed=preprocessed, float_max=args.float_max, flip=args.flip)
    except AmbiguousFloatImages:
        fail(f"{args.inputs[0]} holds float images with every value in 0..1: pass --float-max 1 if white is 1.0, "
             f"or --float-max 255 if they are 0..255 pixels")
    except (ValueError, TypeError) as e:
        fail(f"{e}")
    k = max(1, min(args.top, len(model.classes)))
    for name, pr in zip(names, probs):
        top = np.argsort(-pr)[:k]
        print(name + ": " + ", ".join(f"{model.classes[i]} {100 * pr[i]:.1f}%" for i in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
