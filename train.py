#!/usr/bin/env python
"""Train the paper's baseline or flattened network on CIFAR-10, CIFAR-100 or MNIST.

    python train.py --model flattened --dataset cifar10 --data-dir ../shared/data
    python train.py --model baseline --dataset cifar10 --summary
    python train.py --out runs/flat-c10 --resume          # continue an interrupted run

A run folder (--out) receives checkpoint.npz after every epoch (and on Ctrl-C),
log.jsonl (one JSON line per epoch), with --plot curves.png, and at the end model.npz
(the final weights and preprocessing, for engine.load). The run ends by printing
"test accuracy: NN.NN%" for the final weights.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_WEIGHT_DECAY = {"baseline": 5e-4, "flattened": 1e-4}
IN_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "mnist": (1, 28, 28)}
# Settings that define the run; on --resume they come from the checkpoint.
RUN_SETTINGS = ("model", "dataset", "label_mode", "batch_size", "lr", "momentum", "dampening", "weight_decay",
                "lr_drop_epochs",
                "lr_drop_factor", "seed", "limit_train", "limit_test", "pool", "pool_mode", "flatten_first", "stages",
                "init")


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def non_negative_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {s!r}")
    return v


def int_list(s):
    try:
        return [int(v) for v in s.split(",") if v.strip()] if s.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def pool_spec(s):
    v = int_list(s)
    if len(v) != 2 or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE,STRIDE such as 3,2, got {s!r}")
    return v


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def parser():
    p = argparse.ArgumentParser(
        description="Train the baseline or flattened CNN of Jin et al. (2014) with the flatnet engine.",
        epilog="Example: python train.py --model flattened --dataset cifar10 --data-dir ../shared/data --plot",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=["baseline", "flattened"], default="flattened",
                   help="baseline: three 5x5 convolutions; flattened: layers 2 and 3 as flattened layers")
    g.add_argument("--dataset", choices=["cifar10", "cifar100", "mnist"], default="cifar10", help="dataset")
    g.add_argument("--label-mode", choices=["fine", "coarse"], default="fine",
                   help="CIFAR-100 labels: 100 fine classes or 20 coarse superclasses")
    g.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the official dataset files (default: $FLATNET_DATA, else ~/.cache/flatnet/data)")
    g.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="folder for preprocessed arrays (default: $FLATNET_CACHE, else ~/.cache/flatnet/preprocessed)")
    g.add_argument("--no-download", action="store_true", help="never download missing dataset files")
    g.add_argument("--flatten-first", action="store_true", help="flattened model: flatten layer 1 as well")
    g.add_argument("--stages", metavar="N", type=positive_int, default=2, help="V-H-L stages per flattened layer")
    g.add_argument("--init", choices=["auto", "lecun", "glorot"], default="auto",
                   help="weight init; auto = Glorot for flattened layers, LeCun's heuristic elsewhere (the paper)")
    g.add_argument("--pool", metavar="SIZE,STRIDE", type=pool_spec, default=[3, 2],
                   help="max-pooling SIZE,STRIDE (3,2 as Srivastava & Salakhutdinov; the paper's text reads 2,3)")
    g.add_argument("--pool-mode", choices=["ceil", "floor"], default="ceil",
                   help="pooled size rounding (ceil as cuda-convnet: 32 -> 16 -> 8 -> 4)")
    g.add_argument("--limit-train", metavar="N", type=positive_int, default=None, help="use only the first N training images")
    g.add_argument("--limit-test", metavar="N", type=positive_int, default=None, help="use only the first N test images")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", metavar="N", type=positive_int, default=None,
                   help="total number of epochs (default: 20, or the checkpoint's with --resume)")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=128, help="mini-batch size")
    g.add_argument("--lr", type=non_negative_float, default=0.1, help="initial learning rate")
    g.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    g.add_argument("--dampening", type=non_negative_float, default=None,
                   help="momentum dampening; default = --momentum, as Torch7's optim.sgd that the paper used "
                        "(0 gives PyTorch's SGD, whose steps are 1/(1-momentum) = 10x larger)")
    g.add_argument("--weight-decay", type=non_negative_float, default=None,
                   help="L2 weight decay on weights (default: 5e-4 baseline, 1e-4 flattened, smaller as the paper)")
    g.add_argument("--lr-drop-epochs", metavar="E1,E2,...", type=int_list, default=[8],
                   help="comma-separated epochs after which the learning rate is multiplied by --lr-drop-factor")
    g.add_argument("--lr-drop-factor", type=non_negative_float, default=0.1, help="learning-rate drop factor")
    g.add_argument("--seed", metavar="N", type=int, default=0, help="seed of weights, dropout masks and batch order")
    g.add_argument("--eval-batch-size", metavar="N", type=positive_int, default=500, help="batch size for test evaluation")

    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", default=None, help="run folder (default: runs/MODEL-DATASET)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (settings come from the checkpoint; "
                        "--epochs may be raised)")
    g.add_argument("--backend", choices=["auto", "cpu", "cupy"], default=None,
                   help="array backend (default: $FLATNET_BACKEND, else auto: CuPy when it imports and a GPU "
                        "passes a smoke test, else the CPU, saying why; cupy refuses to start without a usable "
                        "GPU and says why). Install CuPy with pip install -e '.[gpu]' (CUDA 12) or "
                        "'.[gpu-cuda13]'; python -m engine.selftest checks a GPU")
    g.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="threads for the compiled kernels (default: $OMP_NUM_THREADS, else all cores)")
    g.add_argument("--summary", action="store_true",
                   help="print the per-layer table (output shapes, weights, biases) and exit, without data")
    g.add_argument("--plot", action="store_true", help="draw learning curves to OUT/curves.png after each epoch")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    import engine
    from engine.data import DatasetError, load_dataset
    from engine.trainer import Trainer, TrainingDiverged, evaluate, load_checkpoint, plot_history
    from models.paper import build, format_summary

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("error: --plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')")
    try:
        backend, why_not_gpu = engine.backend.select_backend(args.backend)
    except engine.backend.BackendUnavailable as e:
        sys.exit(f"error: {e}")
    if args.threads:
        engine.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{args.model}-{args.dataset}")
    ckpt = out / "checkpoint.npz"

    if args.resume:
        if not ckpt.is_file():
            sys.exit(f"error: --resume: no checkpoint at {ckpt}")
        try:
            _, _, meta, _ = load_checkpoint(ckpt)
        except ValueError as e:
            sys.exit(f"error: {e}")
        for key in RUN_SETTINGS:
            setattr(args, key, meta["settings"][key])
        args.epochs = args.epochs or meta["config"]["epochs"]
        print(f"resuming {ckpt}: {args.model} on {args.dataset}, epoch {meta['epoch'] + 1}, "
              f"step {meta['step_in_epoch']} (settings from the checkpoint)")
    args.epochs = args.epochs or 20
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.model]

    in_shape = IN_SHAPES[args.dataset]
    n_classes = 10 if args.dataset != "cifar100" else (100 if args.label_mode == "fine" else 20)
    model = build(args.model, in_shape, n_classes, pool=tuple(args.pool), pool_ceil=args.pool_mode == "ceil",
                  flatten_first=args.flatten_first, stages=args.stages, init=args.init, seed=args.seed)
    if args.summary:
        print(format_summary(model, f"{args.model} model, input {in_shape}, {n_classes} classes"))
        return 0
    if backend != "cpu":
        model.to(backend)
    if not args.resume and ckpt.exists():
        sys.exit(f"error: {ckpt} already exists: pass --resume to continue that run, or choose another --out")

    t0 = time.time()
    try:
        data = load_dataset(args.dataset, args.data_dir, args.cache_dir, label_mode=args.label_mode,
                            download_ok=not args.no_download)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    for split, limit in (("train", args.limit_train), ("test", args.limit_test)):
        if limit:
            data[f"{split}_x"], data[f"{split}_y"] = data[f"{split}_x"][:limit], data[f"{split}_y"][:limit]
    print(f"{args.dataset}: {len(data['train_x'])} training, {len(data['test_x'])} test images "
          f"from {data['source']} ({time.time() - t0:.1f}s); backend {backend}"
          f"{f' (GPU not used: {why_not_gpu})' if why_not_gpu else ''}; "
          f"kernels on {engine.get_num_threads()} thread(s), OpenMP {'on' if engine.openmp_enabled() else 'off'}")

    config = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                  dampening=args.dampening,
                  weight_decay=args.weight_decay, lr_drop_epochs=args.lr_drop_epochs,
                  lr_drop_factor=args.lr_drop_factor, seed=args.seed, eval_batch_size=args.eval_batch_size)
    settings = {key: getattr(args, key) for key in RUN_SETTINGS}
    def plot(t):
        plot_history(t.history, out / "curves.png", f"{args.model} on {args.dataset}")

    trainer = Trainer(model, data, config, out, settings=settings, progress=not args.quiet,
                      on_epoch=plot if args.plot else None)
    if args.resume:
        trainer.resume(ckpt)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(dict(settings, epochs=args.epochs), indent=2))

    try:
        status = trainer.run()
    except TrainingDiverged as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("aborted without saving (second Ctrl-C); the last checkpoint is kept")
    if status == "interrupted":
        return 130
    _, acc = evaluate(model, data["test_x"], data["test_y"], args.eval_batch_size)
    engine.save_model(out / "model.npz", model, in_shape, data["classes"],
                      preprocessing=dict(gcn=data["preprocessing"]["gcn"]),
                      zca_mean=data.get("zca_mean"), zca_matrix=data.get("zca_matrix"),
                      extra=dict(dataset=args.dataset, model=args.model, test_accuracy=acc))
    print(f"run folder: {out} ({time.time() - t0:.0f}s); model file: {out / 'model.npz'}")
    print(f"test accuracy: {100 * acc:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
