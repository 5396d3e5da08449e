"""A model from a training checkpoint: the network its settings describe, with the weights it holds.

A checkpoint (engine/checkpoint.py) holds the run's parameters and its settings (model, data set,
pool, stages...), not the preprocessing a model file needs: the contrast normalization's constants,
the class names and, for CIFAR, the ZCA mean and matrix come from the data set's preprocessed arrays
(engine.data.load_dataset, from its cache when the run wrote one), as train.py takes them when it
writes model.npz at the end of a run. Functions here raise exceptions (CheckpointError, DatasetError);
the commands (engine.makemodel, load_model in common.py) turn them into one-line errors.
"""
from pathlib import Path

from ..checkpoint import CheckpointError, checkpoint_weights
from ..data import default_data_dir, load_dataset
from ..model import Model

DATASETS = ("mnist", "cifar10", "cifar100")


def settings_problem(settings):
    """Why a checkpoint's settings do not describe a network train.py builds (None when they do): each setting
    the network depends on, checked as train.py's flag checks it."""
    from engine.models.paper import INITS

    def count(v, least=0):
        return type(v) is int and v >= least
    checks = dict(model=lambda v: v in ("baseline", "flattened"), dataset=lambda v: v in DATASETS,
                  label_mode=lambda v: v in ("fine", "coarse"),
                  pool=lambda v: isinstance(v, list) and len(v) == 2 and all(count(n, 1) for n in v),
                  pool_mode=lambda v: v in ("ceil", "floor"), flatten_first=lambda v: type(v) is bool,
                  stages=lambda v: count(v, 1), init=lambda v: v in INITS, seed=count)
    for key, ok in checks.items():
        if key not in settings:
            return f"settings lack '{key}'"
        if not ok(settings[key]):
            return f"settings: {key} = {settings[key]!r:.50} is not a value train.py takes"
    return None


def network_of(settings, in_shape, n_classes):
    """The network train.py builds for a run's `settings` (untrained), for images of `in_shape` (C, H, W)."""
    from engine.models.paper import build
    return build(settings["model"], in_shape, n_classes, pool=tuple(settings["pool"]),
                 pool_ceil=settings["pool_mode"] == "ceil", flatten_first=settings["flatten_first"],
                 stages=settings["stages"], init=settings["init"], seed=settings["seed"])


def checkpoint_parts(path, data_dir=None, cache_dir=None, log=print):
    """What engine.save_model takes to write the model of the checkpoint at `path`, as a dict (net, in_shape,
    classes, preprocessing, zca_mean, zca_matrix, extra), and the checkpoint's settings.

    The data set is read from `data_dir` (default: the folder the run used, which the checkpoint
    remembers, else $FLATNET_DATA or ~/.cache/flatnet/data) and its preprocessed arrays from `cache_dir`
    (default: the run's); nothing is downloaded.
    """
    from engine.models.recipes import complete_settings
    params, meta = checkpoint_weights(path)
    settings = complete_settings(meta["settings"])
    problem = settings_problem(settings)
    if problem:
        raise CheckpointError(path, problem)
    remembered = settings.get("data_dir")
    if not data_dir and isinstance(remembered, str) and Path(remembered).is_dir():
        data_dir = remembered
    data = load_dataset(settings["dataset"], data_dir or default_data_dir(), cache_dir or settings.get("cache_dir"),
                        label_mode=settings["label_mode"], download_ok=False, log=log)
    in_shape = tuple(data["test_x"].shape[1:])
    net = network_of(settings, in_shape, len(data["classes"]))
    try:
        net.load_params(params)
    except ValueError as e:
        raise CheckpointError(path, f"its weights do not fit the network its settings describe ({e})") from None
    history, step = meta["history"], meta["step_in_epoch"]
    extra = dict(dataset=settings["dataset"], model=settings["model"], augment=settings["augment"],
                 checkpoint=dict(epoch=meta["epoch"], step_in_epoch=step, epochs=meta["config"].get("epochs")))
    if history and not step:  # the weights the last epoch's evaluation saw (held-out training images: --validation)
        extra["validation_accuracy" if settings.get("validation") else "test_accuracy"] = history[-1].get("test_acc")
    parts = dict(net=net.eval(), in_shape=in_shape, classes=data["classes"],
                 preprocessing=dict(gcn=data["preprocessing"]["gcn"]),
                 zca_mean=data.get("zca_mean"), zca_matrix=data.get("zca_matrix"), extra=extra)
    return parts, settings


def checkpoint_model(path, data_dir=None, cache_dir=None, log=print, backend="cpu"):
    """The engine.Model of the checkpoint at `path` (see checkpoint_parts), built in memory."""
    p, _ = checkpoint_parts(path, data_dir, cache_dir, log)
    meta = dict(classes=list(p["classes"]), input_shape=list(p["in_shape"]), preprocessing=p["preprocessing"],
                extra=p["extra"], checkpoint=str(Path(path)))
    net = p["net"] if backend == "cpu" else p["net"].to(backend)
    return Model(net, meta, p["zca_mean"], p["zca_matrix"])


def describe(extra):
    """Which weights a model made from a checkpoint holds, e.g. 'after epoch 3 of 30 (test accuracy 91.20%)'."""
    c = extra["checkpoint"]
    where = (f"after epoch {c['epoch']}" if not c["step_in_epoch"]
             else f"at step {c['step_in_epoch']} of epoch {c['epoch'] + 1}")
    split = "validation" if "validation_accuracy" in extra else "test"
    acc = extra.get(f"{split}_accuracy")
    return (f"{extra['model']} on {extra['dataset']}, {where} of {c['epochs']}"
            + (f" ({split} accuracy {100 * acc:.2f}%)" if isinstance(acc, (int, float)) else ""))
