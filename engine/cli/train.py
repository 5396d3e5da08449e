"""Train the paper's baseline or flattened network on CIFAR-10, CIFAR-100 or MNIST.

    python train.py --model flattened --dataset cifar10 --data-dir ../shared/data
    python train.py --model baseline --dataset cifar10 --summary
    python train.py --recipe paper ...                    # the paper's optimizer settings (default: reproduce)
    python train.py --out runs/flat-c10 --resume          # continue an interrupted run, as it was started
    mpirun -np 2 --bind-to none python train.py ...       # data-parallel over MPI ranks (engine/distributed.py)

A run folder (--out) receives checkpoint.npz after every epoch (and on Ctrl-C or SIGTERM),
log.jsonl (one JSON line per epoch), curves.png (unless --no-plot), and at the end model.npz
(the final weights and preprocessing, for engine.load). The run ends by printing
"test accuracy: NN.NN%" for the final weights.
"""
import argparse
import importlib.util
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

from engine.models.recipes import (DEFAULT_RECIPE, RECIPES, complete_settings, describe, help_text, recipe,
                                   setting_text)

from ..modelfile import ZCA_STORAGE
from ..optim import DECAYS, check_nesterov
from .common import Parser

IN_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "mnist": (1, 28, 28)}
# Settings that define the run; on --resume they come from the checkpoint.
RUN_SETTINGS = ("model", "dataset", "label_mode", "batch_size", "lr", "momentum", "dampening", "nesterov",
                "weight_decay", "lr_drop_epochs", "lr_drop_factor", "seed", "limit_train", "limit_test", "pool",
                "pool_mode", "flatten_first", "stages", "init", "augment", "schedule", "warmup_epochs",
                "label_smoothing", "ema", "lookahead", "lookahead_alpha", "validation")
# None: Torch7's dampening; all the images; evaluation on the test set
NULLABLE_SETTINGS = ("dampening", "limit_train", "limit_test", "validation")
# Where the data is and how the run runs: remembered as well, so that `--out DIR --resume` alone
# continues; on --resume, a flag given on the command line replaces the remembered value.
RUN_OPTIONS = ("data_dir", "cache_dir", "download", "no_download", "eval_batch_size", "backend", "threads", "plot",
               "quiet", "step", "zca_storage", "compress_model", "conv", "tf32", "bucket_mib", "overlap")
# How model.npz stores the ZCA matrix (engine.save_model): packed16, its upper triangle in float16, changed
# no prediction of a 75% CIFAR-10 network on the 10,000 test images (docs/results.md, "Model files").
DEFAULT_ZCA_STORAGE = "packed16"
INITS = ("auto", "lecun", "glorot", "delta")  # models.paper.INITS, without importing the engine for --help


def _int_at_least(lowest, what):
    """An argparse type: an integer >= lowest, else the error 'expected a {what} integer'."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {s!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {s!r}")
        return v
    return parse


positive_int = _int_at_least(1, "positive")
non_negative_int = _int_at_least(0, "non-negative")


def non_negative_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {s!r}")
    return v


def fraction(s):
    """An argparse type: a number in [0, 1)."""
    v = non_negative_float(s)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}")
    return v


def step_fraction(s):
    """An argparse type: a number in (0, 1]."""
    v = non_negative_float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


def int_list(s):
    try:
        return [int(v) for v in s.split(",") if v.strip()] if s.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def augment_spec(s):
    """An argparse type: an augmentation spec of engine.augment, in its canonical form ('flip,crop4')."""
    from engine.augment import canonical
    try:
        return canonical(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    prog = how_started()
    p = Parser(
        prog=prog,
        description="Train the baseline or flattened CNN of Jin et al. (2014) with the flatnet engine.",
        epilog=f"Example (the README's main run): {prog} --model flattened --dataset cifar10 "
               "--data-dir ../shared/data",
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
    g.add_argument("--download", action="store_true", default=None,
                   help="fetch missing data set files from their official location into --data-dir, checked against "
                        "the published MD5 (without it a missing file is an error naming the folder and the files)")
    g.add_argument("--no-download", action="store_true", default=None,
                   help="never download (the default; kept for scripts that pass it)")
    g.add_argument("--flatten-first", action="store_true", help="flattened model: flatten layer 1 as well")
    g.add_argument("--stages", metavar="N", type=positive_int, default=2, help="V-H-L stages per flattened layer")
    g.add_argument("--init", choices=INITS, default=None,
                   help="weight init (default: the recipe's); auto = Glorot for flattened layers, LeCun's heuristic elsewhere (the paper); "
                        "lecun or glorot for all layers; delta = auto, except that each V and H filter starts as "
                        "an identity (1 at its centre tap) and each lateral as the orthogonal matrix nearest its "
                        "Glorot draw (docs/results.md compares it with auto)")
    g.add_argument("--pool", metavar="SIZE,STRIDE", type=pool_spec, default="3,2",
                   help="max-pooling SIZE,STRIDE (3,2 as Srivastava & Salakhutdinov; the paper's text reads 2,3)")
    g.add_argument("--pool-mode", choices=["ceil", "floor"], default="ceil",
                   help="pooled size rounding (ceil as cuda-convnet: 32 -> 16 -> 8 -> 4)")
    g.add_argument("--limit-train", metavar="N", type=positive_int, default=None, help="use only the first N training images")
    g.add_argument("--limit-test", metavar="N", type=positive_int, default=None, help="use only the first N test images")
    g.add_argument("--validation", metavar="N", type=positive_int, default=None,
                   help="hold out the last N training images (after --limit-train) and evaluate on them after each "
                        "epoch instead of the test set, which the run then never reads: for choosing settings "
                        "(docs/results.md); the model file records a validation accuracy")

    g = p.add_argument_group("optimization", "The recipe sets --epochs, --lr, --momentum, --dampening, --nesterov, "
                             "--weight-decay, --lr-drop-epochs, --lr-drop-factor, --schedule, --warmup-epochs, "
                             "--label-smoothing, --ema, --lookahead, --lookahead-alpha, --init and --augment; a flag "
                             "given replaces its recipe value (models/recipes.py, docs/results.md)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help=" | ".join(help_text(name) for name in RECIPES) + f" (default: {DEFAULT_RECIPE})")
    g.add_argument("--epochs", metavar="N", type=positive_int, default=None,
                   help="total number of epochs (default: the recipe's, or the checkpoint's with --resume)")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=128, help="mini-batch size")
    g.add_argument("--lr", type=non_negative_float, default=None, help="initial learning rate (default: the recipe's)")
    g.add_argument("--momentum", type=non_negative_float, default=None, help="SGD momentum (default: the recipe's, 0.9)")
    g.add_argument("--dampening", type=non_negative_float, default=None,
                   help="momentum dampening (default: the recipe's): equal to --momentum in Torch7's optim.sgd that "
                        "the paper used (--recipe paper), 0 in PyTorch's SGD, whose steps are 1/(1-momentum) = "
                        "10x larger (--recipe reproduce)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum: each step looks ahead along the momentum, w -= lr (d + momentum v) "
                        "instead of lr v (as in PyTorch's SGD); needs --dampening 0 (default: the recipe's, off)")
    g.add_argument("--weight-decay", type=non_negative_float, default=None,
                   help="L2 weight decay on weights (default: the recipe's, per model: see --recipe)")
    g.add_argument("--lr-drop-epochs", metavar="E1,E2,...", type=int_list, default=None,
                   help="comma-separated epochs after which the learning rate is multiplied by --lr-drop-factor "
                        "(default: the recipe's)")
    g.add_argument("--lr-drop-factor", type=non_negative_float, default=None,
                   help="learning-rate drop factor (default: the recipe's, 0.1)")
    g.add_argument("--augment", metavar="SPEC", type=augment_spec, default=None,
                   help="training-image augmentation (default: the recipe's): none; flip (mirror left-right "
                        "with probability 1/2); altflip (mirror each image in every other epoch, from a first "
                        "epoch drawn per image); cropP (move by up to P pixels each way, P = 1..16, zeros entering: "
                        "a random crop of the image padded by P); cutoutK (after those, set a KxK square centred "
                        "on a random pixel to zero, K//2 rows and columns before it, K = 1..32); or several, e.g. "
                        "flip,crop4 or flip,crop4,cutout8. Drawn per image and epoch from --seed; test images are "
                        "never augmented (engine/augment.py, docs/results.md)")
    g.add_argument("--schedule", choices=["step", "cosine", "linear"], default=None,
                   help="learning-rate schedule (default: the recipe's): step = --lr multiplied by "
                        "--lr-drop-factor after each of --lr-drop-epochs; cosine = --lr decayed to 0 over the run "
                        "along a half cosine, updated every step; linear = --lr decayed to 0 over the run along a "
                        "straight line, updated every step (cosine and linear ignore --lr-drop-epochs)")
    g.add_argument("--warmup-epochs", metavar="E", type=non_negative_float, default=None,
                   help="raise the rate linearly from --lr/W to --lr over the first W = E epochs' steps, then "
                        "follow --schedule (default: the recipe's)")
    g.add_argument("--label-smoothing", metavar="E", type=fraction, default=None,
                   help="train against (1-E) x the one-hot label + E/classes (label smoothing; evaluation "
                        "losses stay plain cross-entropy) (default: the recipe's)")
    g.add_argument("--ema", metavar="DECAY", type=fraction, default=None,
                   help="keep an exponential moving average of the weights, updated after each step with this "
                        "decay (e.g. 0.999); evaluation and the model file use the average, and the checkpoint "
                        "holds it; 0 = none (default: the recipe's)")
    g.add_argument("--lookahead", metavar="K", type=non_negative_int, default=None,
                   help="Lookahead: every K updates, slow weights move --lookahead-alpha of the way to the "
                        "optimizer's weights, which restart from them; evaluation and the model file use the slow "
                        "weights (unless --ema), and the checkpoint holds them; 0 = none (default: the recipe's)")
    g.add_argument("--lookahead-alpha", metavar="A", type=step_fraction, default=None,
                   help="the step of --lookahead's slow weights, in (0, 1] (default: the recipe's, 0.5)")
    g.add_argument("--seed", metavar="N", type=non_negative_int, default=0, help="seed of weights, dropout masks, batch order and augmentation draws")
    g.add_argument("--eval-batch-size", metavar="N", type=positive_int, default=None,
                   help="batch size for test evaluation (default: 500)")

    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", default=None, help="run folder (default: runs/MODEL-DATASET)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with the settings and data folders "
                        "it was started with (--epochs may be raised; --data-dir, --cache-dir, --threads, "
                        "--backend, --step, --conv, --tf32, --eval-batch-size, --plot, --quiet, --zca-storage, "
                        "--compress-model, --bucket-mib and --overlap may be changed; a setting of the run, such as --lr, is refused unless "
                        "it repeats the checkpoint's)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in --out even if it holds another run's checkpoint and log (they are deleted)")
    g.add_argument("--backend", choices=["auto", "cpu", "cupy"], default=None,
                   help="array backend (default: $FLATNET_BACKEND, else auto: CuPy when it imports and a GPU "
                        "passes a smoke test, else the CPU, saying why; cupy refuses to start without a usable "
                        "GPU and says why). Install CuPy with pip install -e '.[gpu]' (CUDA 12) or "
                        "'.[gpu-cuda13]'; python -m engine.selftest checks a GPU")
    g.add_argument("--step", choices=["auto", "compiled", "layers"], default=None,
                   help="how a training step runs: compiled = the whole network compiled from one lowering (float32; "
                        "on the CPU one forward and one backward call, engine/trainstep.py; on the GPU one CUDA graph "
                        "for each, engine/runtime/cuda_step.py), layers = layer by layer (any "
                        "backend; the reference); auto = compiled where it can run, else layers with the reason "
                        "printed. Both give the same results up to float32 rounding, and a checkpoint of one "
                        "resumes on the other (default: auto)")
    g.add_argument("--conv", choices=["auto", "direct", "winograd2", "winograd3", "winograd4"], default=None,
                   help="how the compiled step and plan run a stride-1 3x3 or 5x5 convolution with at least 16 input "
                        "and output channels: auto = Winograd's F(4x4, k x k), winogradM = F(MxM, k x k), direct = "
                        "im2col and a GEMM; the results agree to float32 rounding (docs/benchmarks.md) "
                        "(default: $FLATNET_CONV, else auto)")
    g.add_argument("--tf32", action="store_true", default=None,
                   help="GPU: let the compiled step's and evaluation's float32 GEMMs use TF32 tensor cores (cuBLAS's "
                        "TF32 math mode: inputs rounded to 10 mantissa bits; faster, less exact); off by default")
    g.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="threads for the compiled kernels, per rank when distributed (default: $OMP_NUM_THREADS, "
                        "else all cores less those other processes keep busy, divided by the ranks on a host when distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="train data-parallel over the ranks of an MPI job (mpi4py: pip install '.[mpi]'), each "
                        "rank taking an equal share of every batch; on automatically under mpirun/mpiexec/srun. "
                        "Example: mpirun -np 2 --bind-to none python train.py ...")
    g.add_argument("--bucket-mib", metavar="MIB", type=non_negative_float, default=None,
                   help="distributed: the gradients are summed over the ranks in buckets of about this many MiB, "
                        "each as soon as the backward pass has finished it; 0 = one bucket, the whole buffer "
                        "(default: 1)")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="distributed: start each bucket's reduction while the backward pass goes on with the "
                        "layers below it (--no-overlap: all of them after the backward; the sums are the same "
                        "bit for bit) (default: on)")
    g.add_argument("--summary", action="store_true",
                   help="print the per-layer table (output shapes, weights, biases) and exit, without data")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="draw learning curves to OUT/curves.png after each epoch (default: on when matplotlib "
                        "is installed)")
    g.add_argument("--quiet", action="store_true", default=None,
                   help="no progress bars (a line a minute instead)")
    g.add_argument("--zca-storage", choices=ZCA_STORAGE, default=None,
                   help="how model.npz stores the ZCA matrix (CIFAR): full = d x d float32 (38 MB for CIFAR), "
                        "packed = its upper triangle in float32 (19 MB, the same matrix), packed16 = the upper "
                        "triangle in float16 (9.4 MB; on a 75%% CIFAR-10 network no test prediction changed, "
                        "see docs/results.md) (default: packed16)")
    g.add_argument("--compress-model", action="store_true", default=None,
                   help="compress model.npz losslessly (byte-shuffled and deflated: 14-21%% smaller for the shipped models, the same "
                        "arrays bit for bit; loads a little slower)")
    return p


def settings_problem(settings):
    """Why a checkpoint's settings cannot define a run (None if they can): each is checked as its flag would be."""
    if not isinstance(settings, dict):
        return "no settings"
    settings = complete_settings(settings)
    actions = {a.dest: a for a in parser()._actions}
    for key in RUN_SETTINGS:
        if key not in settings:
            return f"settings lack '{key}'"
        v, a = settings[key], actions[key]
        if v is None and key in NULLABLE_SETTINGS:
            continue
        if a.const is True or isinstance(a, argparse.BooleanOptionalAction):  # a flag with no value
            ok = isinstance(v, bool)
        else:
            try:
                text = setting_text(v)
                ok = (not isinstance(v, (bool, dict)) and (a.type or str)(text) == v
                      and (not a.choices or v in a.choices))
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                ok = False
        if not ok:
            return f"setting {key} = {v!r:.50} is not a valid --{key.replace('_', '-')}"
    return None


RUN_FILES = ("checkpoint.npz", "log.jsonl", "model.npz", "curves.png", "settings.json")


def given_flags(argv=None):
    """The destinations of the flags written on the command line `argv` (default: sys.argv[1:])."""
    p = parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def how_started():
    """The command line that started this process, to repeat it: `python train.py`, `python -m engine.X`,
    or an installed command's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name}"
    script = sys.argv[0] if sys.argv and sys.argv[0] else "train.py"
    if script.endswith(".py"):
        return f"python {shlex.quote(os.path.relpath(script))}"
    return shlex.quote(os.path.basename(script))


def main(argv=None):
    args = parser().parse_args(argv)
    args.given = given_flags(argv)
    from engine import distributed  # (imports mpi4py only in init())
    if not (args.distributed or distributed.launcher()):
        return run(args)
    try:
        dist = distributed.init()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    if not dist.is_root:  # only rank 0 prints; the others' failures go to stderr
        sys.stdout = open(os.devnull, "w")
    return dist.guard(run, args, dist)


def run(args, dist=None):
    """The run of main(); `dist` (engine.distributed.Distributed): one rank of a data-parallel job."""
    import engine
    from engine.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
    from engine.cli.figures import plot_history
    from engine.data import DatasetError, default_cache_dir, default_data_dir, load_dataset
    from engine.distributed import DistributedError
    from engine.lowering import UnsupportedNetwork
    from engine.npzfile import check_writable_folder
    from engine.runtime.select import BackendUnavailable, select_backend
    from engine.trainer import Trainer, TrainingDiverged
    from engine.models.paper import format_summary

    from .checkpoints import network_of

    out = Path(args.out or f"runs/{args.model}-{args.dataset}")
    ckpt = out / CHECKPOINT_FILE
    is_root = dist is None or dist.is_root  # distributed: rank 0 alone reads and writes the run folder
    if args.resume and is_root and not ckpt.is_file():
        sys.exit(f"error: --resume: no checkpoint at {ckpt}")
    if not args.summary and is_root:
        try:  # before any work: a run that cannot save its checkpoints would lose it
            check_writable_folder(out)
        except OSError as e:
            sys.exit(f"error: --out {out} is not a writable folder ({e.strerror or e})")

    remembered_data = False  # a resumed run never downloads into the data folder its checkpoint names
    if args.resume and args.recipe:
        sys.exit("error: --recipe cannot change a run: --resume continues with the checkpoint's settings")
    if args.resume:
        meta = None
        if is_root:
            try:
                meta = load_checkpoint(ckpt)[2]
            except CheckpointError as e:
                sys.exit(f"error: {e}")
        if dist is not None:
            meta = dist.bcast(meta)
        epochs = meta["config"].get("epochs")
        meta["settings"] = complete_settings(meta["settings"])
        problem = settings_problem(meta["settings"]) or (
            None if type(epochs) is int and epochs >= 1 else f"config epochs = {epochs!r:.50}")
        if problem:
            sys.exit(f"error: {ckpt}: {problem}")
        for key in RUN_SETTINGS:
            if key in getattr(args, "given", ()) and getattr(args, key) != meta["settings"][key]:
                sys.exit(f"error: --{key.replace('_', '-')} cannot change a run: --resume continues with the "
                         f"checkpoint's {setting_text(meta['settings'][key])} "
                         f"(start another run with --out to change it)")
            setattr(args, key, meta["settings"][key])
        remembered_data = args.data_dir is None and meta["settings"].get("data_dir") is not None
        for key in RUN_OPTIONS:  # (older checkpoints lack them: the defaults apply)
            if getattr(args, key) is None:
                setattr(args, key, meta["settings"].get(key))
        args.epochs = args.epochs or meta["config"]["epochs"]
        if args.epochs < meta["epoch"]:
            sys.exit(f"error: --epochs {args.epochs} ends before this run's {meta['epoch']} trained epochs: a run "
                     f"cannot be shortened (--epochs above {meta['epoch']} extends it; see --help)")
        if args.schedule in DECAYS and args.epochs != meta["config"]["epochs"] and is_root:
            print(f"warning: the {args.schedule} schedule was planned over {meta['config']['epochs']} epochs; its "
                  f"remaining steps now follow it over {args.epochs} (a run started with --epochs {args.epochs} "
                  f"would have had other rates before epoch {meta['epoch'] + 1})", file=sys.stderr)
        args.recipe = meta["settings"].get("recipe")
        print(f"resuming {ckpt}: {args.model} on {args.dataset}, epoch {meta['epoch'] + 1}, "
              f"step {meta['step_in_epoch']} (settings from the checkpoint; data from {args.data_dir})")
    else:  # a new run: the recipe fills every optimization setting no flag gave
        args.recipe = args.recipe or DEFAULT_RECIPE
        for key, value in recipe(args.recipe, args.dataset, args.model).items():
            if getattr(args, key) is None:
                setattr(args, key, value)

    try:
        check_nesterov(args.nesterov, args.momentum, args.momentum if args.dampening is None else args.dampening)
    except ValueError:
        damp = "Torch7's (= momentum)" if args.dampening is None else f"{args.dampening:g}"
        sys.exit(f"error: --nesterov needs --momentum above 0 and --dampening 0 (this run: momentum "
                 f"{args.momentum:g}, dampening {damp})")
    in_shape = IN_SHAPES[args.dataset]
    n_classes = 10 if args.dataset != "cifar100" else (100 if args.label_mode == "fine" else 20)
    model = network_of(vars(args), in_shape, n_classes)  # as engine.makemodel rebuilds it from a checkpoint
    if args.summary:  # needs neither data nor a device
        print(format_summary(model, f"{args.model} model, input {in_shape}, {n_classes} classes"))
        return 0

    # Remembered by the checkpoint as absolute paths, so that a resumed run finds the same folders.
    args.data_dir = os.path.abspath(args.data_dir or default_data_dir())
    args.cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    args.eval_batch_size = args.eval_batch_size or 500
    args.zca_storage = args.zca_storage or DEFAULT_ZCA_STORAGE
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if args.plot and not has_matplotlib:
        sys.exit("error: --plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')")
    args.plot = has_matplotlib if args.plot is None else args.plot
    try:
        backend, why_not_gpu = select_backend(args.backend)
    except BackendUnavailable as e:
        sys.exit(f"error: {e}")
    if args.tf32:  # read when the GPU executor's cuBLAS handle is made (engine.runtime.cuda.GraphBlas)
        if backend != "cupy":
            sys.exit("error: --tf32 applies to the GPU (--backend cupy); this run is on the CPU")
        from engine.runtime.cuda import TF32_ENV  # (CuPy imports: the backend is cupy)
        os.environ[TF32_ENV] = "1"
    if args.conv:  # read by the lowering when the compiled step and plan are built (engine.lowering.conv_tile)
        from engine.lowering import CONV_ENV
        os.environ[CONV_ENV] = args.conv
    threads = args.threads or (dist.default_threads() if dist is not None else None)
    if threads:
        engine.set_num_threads(threads)
    if dist is not None:  # how the gradients are summed over the ranks (engine/distributed.py, "Buckets")
        dist.bucket_mib = dist.bucket_mib if args.bucket_mib is None else args.bucket_mib
        dist.overlap = dist.overlap if args.overlap is None else args.overlap
    if backend != "cpu":
        model.to(backend)
    if not args.resume and is_root:
        old = [name for name in RUN_FILES if (out / name).exists()]
        if old and not args.overwrite:
            sys.exit(f"error: {out / old[0]} already exists (the folder holds another run: {', '.join(old)}): "
                     f"pass --resume to continue it, --overwrite to start afresh, or choose another --out")
        for name in old:  # --overwrite: nothing of the old run may be mistaken for this one's
            (out / name).unlink()

    t0 = time.time()
    def load():
        try:
            return load_dataset(args.dataset, args.data_dir, args.cache_dir, label_mode=args.label_mode,
                                download_ok=bool(args.download) and not args.no_download
                                and not (remembered_data and Path(args.data_dir).is_dir()))
        except DatasetError as e:
            sys.exit(f"error: {e}")
    data = load() if dist is None else dist.in_turn(load)  # one rank after another fills a shared cache
    for split, limit in (("train", args.limit_train), ("test", args.limit_test)):
        if limit:
            data[f"{split}_x"], data[f"{split}_y"] = data[f"{split}_x"][:limit], data[f"{split}_y"][:limit]
    evaluated = "test"
    if args.validation:  # the last N training images stand in for the test set, which is dropped
        keep = len(data["train_x"]) - args.validation
        if keep < 1:
            sys.exit(f"error: --validation {args.validation} leaves no training images (there are "
                     f"{len(data['train_x'])})")
        data["test_x"], data["test_y"] = data["train_x"][keep:], data["train_y"][keep:]
        data["train_x"], data["train_y"] = data["train_x"][:keep], data["train_y"][:keep]
        evaluated = "validation (held out of the training set; the test set is not used)"
    print(f"{args.dataset}: {len(data['train_x'])} training, {len(data['test_x'])} {evaluated} images "
          f"from {data['source']} ({time.time() - t0:.1f}s); backend {backend}"
          f"{f' (GPU not used: {why_not_gpu})' if why_not_gpu else ''}; "
          f"kernels on {engine.get_num_threads()} thread(s), OpenMP {'on' if engine.openmp_enabled() else 'off'}")
    if dist is not None:
        line, warnings = dist.startup(engine.get_num_threads())
        print("\n".join([line, *warnings]))

    late = [e for e in args.lr_drop_epochs if e >= args.epochs] if args.schedule == "step" else []
    if late and is_root:  # e.g. --resume --epochs N that cuts a run short of its drops
        never = "the rate stays at --lr for the whole run" if len(late) == len(args.lr_drop_epochs) else \
            "they never happen"
        print(f"warning: the learning-rate drop(s) after epoch(s) {', '.join(map(str, late))} fall at or after the "
              f"last epoch ({args.epochs}): {never} (see --lr-drop-epochs)", file=sys.stderr)
    config = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                  dampening=args.dampening, nesterov=args.nesterov,
                  weight_decay=args.weight_decay, lr_drop_epochs=args.lr_drop_epochs,
                  lr_drop_factor=args.lr_drop_factor, seed=args.seed, eval_batch_size=args.eval_batch_size,
                  step=args.step or "auto", augment=args.augment, schedule=args.schedule,
                  warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, ema=args.ema,
                  lookahead=args.lookahead, lookahead_alpha=args.lookahead_alpha,
                  eval_split="validation" if args.validation else "test")
    settings = {key: getattr(args, key) for key in RUN_SETTINGS + RUN_OPTIONS}
    settings["recipe"] = args.recipe  # what filled the optimization settings (older runs: None)
    def plot(t):
        plot_history(t.history, out / "curves.png", f"{args.model} on {args.dataset}")

    try:
        trainer = Trainer(model, data, config, out, settings=settings, progress=not args.quiet,
                          on_epoch=plot if args.plot and is_root else None, dist=dist)
    except UnsupportedNetwork as e:
        sys.exit(f"error: --step compiled: {e}")
    except DistributedError as e:
        sys.exit(f"error: {e}")
    print(f"recipe {args.recipe or '(none recorded)'}: {describe(vars(args))}")
    print(f"training step: {trainer.step.name}"
          f"{f' (the compiled step cannot run this network: {trainer.step_note})' if trainer.step_note else ''}")
    try:
        if args.resume:
            trainer.resume(ckpt)  # checks the checkpoint against this model and data before a step is trained
        elif is_root:
            (out / "settings.json").write_text(json.dumps(dict(settings, epochs=args.epochs), indent=2))
        status = trainer.run()
        if status == "interrupted":
            launch = f"mpirun -np {dist.size} " if dist is not None else ""  # (or any number of ranks, or none)
            print(f"continue with: {launch}{how_started()} --out {shlex.quote(str(out))} --resume")
            # 130 after Ctrl-C, 143 after SIGTERM, 138 after SIGUSR1 (distributed: on every rank, the signal they agreed on)
            return 128 + int(trainer.stop_signal or signal.SIGINT)
        acc = trainer.history[-1]["test_acc"]  # the last epoch's evaluation saw these very weights
        accuracy_key = "validation_accuracy" if args.validation else "test_accuracy"
        if is_root:
            with trainer.final_weights():  # the average of the weights, or Lookahead's slow weights, where kept
                engine.save_model(out / "model.npz", model, in_shape, data["classes"],
                                  preprocessing=dict(gcn=data["preprocessing"]["gcn"]),
                                  zca_mean=data.get("zca_mean"), zca_matrix=data.get("zca_matrix"),
                                  extra={"dataset": args.dataset, "model": args.model, accuracy_key: acc,
                                         "augment": args.augment},
                                  zca_storage=args.zca_storage, compress=bool(args.compress_model))
    except (CheckpointError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a folder gone read-only: the last checkpoint written is kept
        sys.exit(f"error: cannot write in {out}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}")
    except KeyboardInterrupt:
        sys.exit("aborted without saving (a second interrupt); the last checkpoint is kept")
    print(f"run folder: {out} ({time.time() - t0:.0f}s); model file: {out / 'model.npz'}")
    print(f"{'validation' if args.validation else 'test'} accuracy: {100 * acc:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
