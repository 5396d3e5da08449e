"""Write a model file from a training checkpoint, such as the one a stopped run leaves in its folder.

    python -m engine.makemodel runs/flattened-cifar10/checkpoint.npz runs/flattened-cifar10/model.npz
    python -m engine.makemodel runs/x/checkpoint.npz x.npz --data-dir ../shared/data   # the data moved

The model is the network the checkpoint's settings describe with the weights it holds, as train.py
writes model.npz at the end of a run: the preprocessing (contrast normalization, and on CIFAR the
ZCA whitening) comes from the data set the run trained on, read from --data-dir (default: the
folder the run used) through its cached preprocessed arrays. engine.evaluate and engine.predict
also take a checkpoint directly, building the same model in memory.
"""
import argparse
import sys
from pathlib import Path

import engine

from ..checkpoint import is_checkpoint
from ..data import DatasetError
from ..modelfile import ZCA_STORAGE
from .checkpoints import checkpoint_parts, describe
from .common import Parser, fail, say, writable_file
from .train import DEFAULT_ZCA_STORAGE


def main(argv=None):
    p = Parser(prog="python -m engine.makemodel", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training checkpoint (train.py's OUT/checkpoint.npz)")
    p.add_argument("out", help="model file to write (.npz)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the official data set files (default: the one the run used, else "
                        "$FLATNET_DATA, else ~/.cache/flatnet/data)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="folder of preprocessed arrays (default: the one the run used)")
    p.add_argument("--zca-storage", choices=ZCA_STORAGE, default=None,
                   help="how the model file stores the ZCA matrix, as train.py's flag (default: the run's, else "
                        "packed16)")
    p.add_argument("--compress", action="store_true", help="compress the model file losslessly, as "
                                                               "train.py's --compress-model")
    args = p.parse_args(argv)
    writable_file(args.out)
    if not Path(args.checkpoint).is_file():
        fail(f"no checkpoint at {args.checkpoint}")
    if not is_checkpoint(args.checkpoint):
        fail(f"{args.checkpoint}: not a training checkpoint (train.py's OUT/checkpoint.npz)")
    try:
        parts, settings = checkpoint_parts(args.checkpoint, args.data_dir, args.cache_dir, log=say)
    except (OSError, ValueError) as e:  # CheckpointError
        fail(e)
    except DatasetError as e:
        fail(f"{args.checkpoint}: the model takes its preprocessing from the run's data set: {e}")
    # a checkpoint of a version that did not record it: train.py's default
    storage = args.zca_storage or settings.get("zca_storage") or DEFAULT_ZCA_STORAGE
    try:
        engine.save_model(args.out, parts["net"], parts["in_shape"], parts["classes"], parts["preprocessing"],
                          parts["zca_mean"], parts["zca_matrix"], extra=parts["extra"],
                          zca_storage=storage,
                          compress=args.compress or bool(settings.get("compress_model")))
    except (OSError, ValueError) as e:
        fail(f"cannot write {args.out}: {e}")
    print(f"wrote {args.out}: {describe(parts['extra'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
