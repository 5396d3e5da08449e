"""Checkpoints that resume exactly.

A checkpoint is one .npz written with allow_pickle=False (never a pickle): every
parameter and momentum buffer (and the average of the weights and Lookahead's slow weights of a
run that keeps them), the position inside the epoch (with that epoch's shuffling order), and a
JSON document holding the generators' states, the history and the run's settings. It is written to a temporary file and renamed,
so an interruption never leaves a half-written checkpoint. ``load_checkpoint``
checks every header and the JSON document before it reads any data.
"""
import math

import numpy as np

from . import npzfile
from .runtime import to_numpy

CHECKPOINT_FILE = "checkpoint.npz"  # in the run folder, beside log.jsonl: what --resume continues from
CHECKPOINT_VERSION = 1


def save_checkpoint(path, model, velocity, meta, perm=None, average=None, slow=None):
    """Write weights, momentum, epoch order, the average of the weights and Lookahead's slow weights where the run
    keeps them ({name: array}) and `meta` (JSON-able) atomically to `path` (.npz), compressed.

    Compressed losslessly (npzfile.save's byte shuffle and deflate), so that a run's checkpoint can be
    carried to another machine to be continued there: the CIFAR-10 baseline's takes 15.5 MB instead
    of 18.5 (84%), for 0.76 s of writing instead of 0.03 (docs/results.md, "Checkpoints").
    """
    arrays = {f"param/{k}": to_numpy(v) for k, v in model.params.items()}
    arrays.update({f"velocity/{k}": to_numpy(v) for k, v in velocity.items()})
    arrays.update({f"average/{k}": to_numpy(v) for k, v in (average or {}).items()})
    arrays.update({f"slow/{k}": to_numpy(v) for k, v in (slow or {}).items()})
    if perm is not None:
        arrays["perm"] = perm
    npzfile.save(path, arrays, dict(meta, version=CHECKPOINT_VERSION), compress=True)


class CheckpointError(npzfile.FileFormatError):
    """A checkpoint is unreadable, truncated, of another version, or does not fit the run resuming it."""

    what = "checkpoint"


def rng_state_problem(state):
    """Why `state` is not a numpy Generator state this engine wrote (None if it is one)."""
    try:
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            return "not a PCG64 generator state"
        np.random.default_rng().bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _check_meta(meta):
    """Raise ValueError with the first thing a checkpoint's JSON document lacks or gets wrong."""
    def count(v):
        return type(v) is int and v >= 0
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {meta.get('version')!r:.50} is not {CHECKPOINT_VERSION}")
    missing = [k for k in ("epoch", "step_in_epoch", "running", "history", "data_rng", "model_rng", "settings",
                           "config") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    if not count(meta["epoch"]) or not count(meta["step_in_epoch"]):
        raise ValueError(f"epoch and step_in_epoch must be non-negative integers, got {meta['epoch']!r:.50}, "
                         f"{meta['step_in_epoch']!r:.50}")
    r = meta["running"]
    if (not isinstance(r, dict) or set(r) != {"loss", "correct", "seen", "seconds"}
            or not all(type(r[k]) in (int, float) and math.isfinite(r[k]) for k in r)):
        raise ValueError(f"running totals must be finite loss, correct, seen and seconds, got {r!r:.100}")
    h = meta["history"]
    if not isinstance(h, list) or len(h) != meta["epoch"] or not all(isinstance(e, dict) for e in h):
        raise ValueError(f"history must hold one record per finished epoch ({meta['epoch']})")
    for key in ("data_rng", "model_rng"):
        problem = None if key == "model_rng" and meta[key] is None else rng_state_problem(meta[key])
        if problem:
            raise ValueError(f"{key}: {problem}")
    if not isinstance(meta["settings"], dict) or not isinstance(meta["config"], dict):
        raise ValueError("settings and config must be JSON objects")


def load_checkpoint(path, shapes=None, n_train=None):
    """Read and validate a checkpoint without executing anything from it: (params, velocity, meta, perm, average,
    slow), `average` the average of the weights and `slow` Lookahead's slow weights ({name: array}), each None
    where the run keeps none.

    `shapes` ({name: shape} of the model's parameters) and `n_train` (the training set's size),
    when given, are what the checkpoint must fit: parameters exactly, momentum buffers a subset
    with the same shapes, the epoch order a permutation of range(n_train). Every array header
    is checked before any data is read; any problem raises CheckpointError naming the file.
    """
    def members(meta, names):
        _check_meta(meta)
        if shapes is None:
            spec = {n: npzfile.Member() for n in names if n.startswith(("param/", "velocity/", "average/", "slow/"))}
        else:
            spec = {f"param/{k}": npzfile.Member(tuple(v)) for k, v in shapes.items()}
            spec.update({f"{group}/{k}": npzfile.Member(tuple(v), required=False) for k, v in shapes.items()
                         for group in ("velocity", "average", "slow")})
        spec["perm"] = npzfile.Member(None if n_train is None else (n_train,), "iu", required=False)
        return spec

    arrays, meta = npzfile.load(path, "checkpoint", CheckpointError, members)
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    velocity = {k[len("velocity/"):]: v for k, v in arrays.items() if k.startswith("velocity/")}
    average = {k[len("average/"):]: v for k, v in arrays.items() if k.startswith("average/")} or None
    slow = {k[len("slow/"):]: v for k, v in arrays.items() if k.startswith("slow/")} or None
    perm = arrays.get("perm")
    for kept, what in ((average, "average of the weights does"), (slow, "slow weights do")):
        if kept is not None and set(kept) != set(params):
            raise CheckpointError(path, f"its {what} not cover every parameter")
    for name, a in [*params.items(), *velocity.items(), *(average or {}).items(), *(slow or {}).items()]:
        if not np.isfinite(a).all():
            raise CheckpointError(path, f"array {name} is not finite")
    if perm is not None and (perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(len(perm)))):
        raise CheckpointError(path, "the epoch's batch order is not a permutation of the training set")
    if perm is None and meta["step_in_epoch"]:
        raise CheckpointError(path, f"step {meta['step_in_epoch']} of an epoch without its batch order")
    return params, velocity, meta, perm, average, slow


class _Peeked(Exception):
    pass


def is_checkpoint(path):
    """True when `path` is an .npz whose JSON document is a checkpoint's (only that document is read)."""
    found = []

    def members(meta, names):
        found.append(isinstance(meta, dict) and meta.get("version") == CHECKPOINT_VERSION
                     and all(k in meta for k in ("epoch", "settings", "config")))
        raise _Peeked

    try:
        npzfile.load(path, "checkpoint", CheckpointError, members)
    except (CheckpointError, OSError):
        pass
    return bool(found and found[0])


def checkpoint_weights(path):
    """(params, meta) of the checkpoint at `path`: the weights a model made from it runs with, and its JSON document.

    The one place that chooses them: the average of the weights where a checkpoint holds one (a run with
    --ema), else Lookahead's slow weights where it holds them (--lookahead), else the parameters the optimizer
    reached. Raises CheckpointError naming the file.
    """
    params, _, meta, _, average, slow = load_checkpoint(path)
    return average or slow or params, meta
