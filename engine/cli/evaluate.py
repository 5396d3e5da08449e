"""Test accuracy of a model file on a data set's official test set.

    python -m engine.evaluate runs/flattened-cifar10/model.npz --dataset cifar10 --data-dir ../shared/data
    python -m engine.evaluate MODEL.npz --dataset mnist --data-dir ../shared/data --limit 1000 --quiet
    python -m engine.evaluate A.npz --dataset cifar10 --compare B.npz    # and how far B's outputs are from A's
    python -m engine.evaluate MODEL.npz --dataset cifar10 --flip         # each image averaged with its mirror image

The test images are read raw, as distributed (engine.data's loaders: the CIFAR "python
version" folder or tar.gz, the MNIST IDX files), and go through the model file's own
preprocessing (contrast normalization, and ZCA whitening for CIFAR, with the constants the
file stores), as `model.predict` does. The model file is read by `engine.load`, which never
executes anything from it. Prints "test accuracy: NN.NN% (N of M)" (with --flip, followed by
"with flip averaging"); with --compare, the
second model's accuracy, how many predictions differ and the largest logit difference.
Errors (a missing or bad model file, data set or folder, a model whose input shape or class
count does not fit the data set) are one line on stderr and exit status 1.
"""
import argparse
import sys

import numpy as np

from ..augment import mirror, parse_spec
from ..data import DatasetError, default_data_dir, load_cifar, load_mnist
from ..losses import softmax
from .common import MODEL_HELP, Parser, fail, load_model

DATASETS = ("mnist", "cifar10", "cifar100")


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def parser():
    p = Parser(prog="python -m engine.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="the data set whose test set to use (default: the one train.py recorded in the model "
                        "file; required when it recorded none)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the official data set files, as for train.py (default: $FLATNET_DATA, "
                        "else ~/.cache/flatnet/data)")
    p.add_argument("--label-mode", choices=["fine", "coarse"], default=None,
                   help="CIFAR-100 only: 100 fine classes or 20 coarse superclasses (default: from the model's "
                        "number of classes)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing data set files from their official location, checked against the published "
                        "MD5 (without it a missing file is an error naming the folder and the files)")
    p.add_argument("--no-download", action="store_true", help="never download (the default; kept for scripts)")
    p.add_argument("--limit", metavar="N", type=positive_int, default=None,
                   help="evaluate the first N test images only (default: all)")
    p.add_argument("--batch-size", metavar="N", type=positive_int, default=500,
                   help="images classified per call (default: 500)")
    p.add_argument("--compare", metavar="MODEL2", default=None,
                   help="a second model file of the same input shape and classes: also print its accuracy, "
                        "how many of its predictions differ from MODEL's and the largest absolute difference "
                        "of their logits (e.g. the same network saved with another --zca-storage)")
    p.add_argument("--flip", action="store_true",
                   help="test-time flip averaging: classify each image by the mean of its class probabilities and "
                        "those of its left-right mirror image (two forward passes). It helps networks trained with "
                        "flipped images (train.py's CIFAR recipes), not digits; the paper's accuracies, and the "
                        "default here, are of single images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _logits(model):
    """x (preprocessed NCHW float32) -> logits, as model.predict computes them, without the softmax."""
    if model.plan is not None:
        from ..plan import compile_network
        return compile_network(model.net, model.input_shape)  # the same compiled network, softmax left out
    net = model.net.eval()
    return lambda x: np.array(net.forward(x))  # (the layer path returns its own buffer: copied)


def _recorded(model, key):
    """What train.py recorded in the model file under `key` (dataset, augment...), or None."""
    extra = model.meta.get("extra")
    return extra.get(key) if isinstance(extra, dict) else None


def _trained_without_flips(model):
    """True when the model file records (train.py's `augment`) that its training images were never mirrored."""
    try:
        return not parse_spec(_recorded(model, "augment"))[0]
    except ValueError:  # no `augment` recorded in the model file, or not a spec
        return False


def _dataset_name(args, model):
    if args.dataset:
        return args.dataset
    recorded = _recorded(model, "dataset")
    if recorded in DATASETS:
        return recorded
    fail(f"{args.model} does not say which data set it was trained on: pass --dataset "
                     f"({', '.join(DATASETS)})")


def main(argv=None):
    args = parser().parse_args(argv)
    model = load_model(args.model, data_dir=args.data_dir)
    other = load_model(args.compare, data_dir=args.data_dir) if args.compare else None
    name = _dataset_name(args, model)
    label_mode = args.label_mode or ("coarse" if len(model.classes) == 20 else "fine")
    if args.label_mode and name != "cifar100":
        fail(f"--label-mode is for cifar100, not {name}")
    data_dir = args.data_dir or default_data_dir()
    try:
        download = args.download and not args.no_download
        raw = (load_mnist(data_dir, download_ok=download) if name == "mnist"
               else load_cifar(data_dir, name, label_mode, download_ok=download))
    except DatasetError as e:
        fail(f"{e}")
    x, y = raw["test_x"][:args.limit], raw["test_y"][:args.limit]
    what = f"the {name} test images" + (f" ({label_mode} labels)" if name == "cifar100" else "")
    for path, m in ((args.model, model), (args.compare, other)):
        if m is None:
            continue
        if m.input_shape != x.shape[1:]:
            fail(f"{path} takes images of shape {m.input_shape}; {what} are {x.shape[1:]}")
        if len(m.classes) != len(raw["classes"]):
            fail(f"{path} has {len(m.classes)} classes; {what} have {len(raw['classes'])}")
        if m.classes != raw["classes"]:
            print(f"note: {path}: its class names differ from the data set's ({', '.join(m.classes[:3])}, ... "
                  f"against {', '.join(raw['classes'][:3])}, ...); classes are compared by index", file=sys.stderr)
        if args.flip and _trained_without_flips(m):
            print(f"note: {path} was trained without flipped images (augmentation {_recorded(m, 'augment')!r}): "
                  f"--flip may lower its accuracy", file=sys.stderr)
    if not len(x):
        fail(f"{raw['source']}: the test set is empty")

    print(f"{args.model}: {len(x):,} {name} test images from {raw['source']}")
    models = [model] + ([other] if other else [])
    forwards = [_logits(m) for m in models]
    preds = [np.empty(len(x), np.int64) for _ in models]
    max_diff = largest = 0.0
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(x), desc="evaluating", unit="img", leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    try:
        for i in range(0, len(x), args.batch_size):
            images = x[i:i + args.batch_size].transpose(0, 2, 3, 1)  # NCHW -> the NHWC that predict takes
            inputs = [m.preprocess(images) for m in models]
            logits = [f(x_) for f, x_ in zip(forwards, inputs)]
            for p, z, f, x_ in zip(preds, logits, forwards, inputs):
                # with --flip, as model.predict(..., flip=True): mirrored after preprocessing, probabilities averaged
                scores = softmax(z) + softmax(f(mirror(x_))) if args.flip else z
                p[i:i + len(z)] = scores.argmax(axis=1)
            if other:
                max_diff = max(max_diff, float(np.abs(logits[0] - logits[1]).max()))
                largest = max(largest, float(np.abs(logits[0]).max()))
            if bar:
                bar.update(len(images))
    finally:
        if bar:
            bar.close()

    def accuracy(p):
        correct = int((p == y).sum())
        return f"{100 * correct / len(y):.2f}% ({correct:,} of {len(y):,})"

    flipped = " with flip averaging" if args.flip else ""
    print(f"test accuracy: {accuracy(preds[0])}{flipped}")
    if other:
        print(f"{args.compare}: test accuracy: {accuracy(preds[1])}{flipped}; {int((preds[0] != preds[1]).sum()):,} of "
              f"{len(y):,} predictions differ from {args.model}'s; largest logit difference {max_diff:.3g} "
              f"(logits up to {largest:.3g} in magnitude)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
