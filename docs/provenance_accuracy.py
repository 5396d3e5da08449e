"""Test accuracy of CIFAR-10 model files on the exact and on the JPEG-recovered images of ../shared/data.

    python docs/provenance_accuracy.py pretrained/flattened-cifar10.npz pretrained/baseline-cifar10.npz \
        --data-dir ../shared/data

The reconstructed CIFAR-10 copy ships `cifar10_provenance.npz` beside its folder, whose boolean
mask `lossless_test` marks the 1,000 test images whose pixels are exact; the other 9,000 were
recovered from JPEG copies (../shared/data/README.md). This prints each model's accuracy on both
groups, with the binomial standard error of each (and the 95% Wilson interval on the exact images), so that the cost of the JPEG artefacts can be
read beside Table 2 (docs/results.md).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
from engine.data import DatasetError, load_cifar  # noqa: E402


def accuracy(correct):
    """Percent correct and its binomial standard error, in points."""
    p = correct.mean()
    return 100 * p, 100 * np.sqrt(p * (1 - p) / len(correct))


def wilson(correct, z=1.96):
    """The 95% Wilson score interval of the accuracy, in percent (Wilson 1927): valid near 0% and 100% too."""
    n, p = len(correct), correct.mean()
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="CIFAR-10 model files (train.py's model.npz, pretrained/*.npz)")
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/ and cifar10_provenance.npz")
    args = p.parse_args(argv)
    masks = Path(args.data_dir) / "cifar10_provenance.npz"
    try:
        with np.load(masks, allow_pickle=False) as z:
            exact = np.asarray(z["lossless_test"], dtype=bool)
        raw = load_cifar(args.data_dir, "cifar10", download_ok=False)
    except (OSError, KeyError, ValueError, DatasetError) as e:
        sys.exit(f"error: {e}")
    if exact.shape != raw["test_y"].shape:
        sys.exit(f"error: {masks}: lossless_test has shape {exact.shape}, the test set {raw['test_y'].shape}")
    print(f"{exact.sum():,} exact and {(~exact).sum():,} JPEG-recovered test images ({raw['source']})")
    for path in args.models:
        try:
            model = engine.load(path)
        except engine.ModelFileError as e:
            sys.exit(f"error: {e}")
        correct = model.predict(raw["test_x"].transpose(0, 2, 3, 1)).argmax(1) == raw["test_y"]  # NCHW -> NHWC
        (a, sa), (b, sb) = accuracy(correct[exact]), accuracy(correct[~exact])
        lo, hi = wilson(correct[exact])
        print(f"{path}: exact {a:.2f}% (+-{sa:.2f}; 95% interval {lo:.2f}-{hi:.2f}%), recovered {b:.2f}% "
              f"(+-{sb:.2f}), all {100 * correct.mean():.2f}%")


if __name__ == "__main__":
    main()
