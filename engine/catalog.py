"""The pretrained models, by name: ``engine.pretrained("flattened-cifar10")`` is a loaded engine.Model.

    import engine
    model = engine.pretrained("flattened-mnist")       # engine.PRETRAINED: every name
    engine.pretrained_path("baseline-cifar10")         # the model file itself (cifar10-zca.npz beside it)

The files are the checkout's pretrained/ folder, installed as package data (engine/pretrained_models/
of the installation). They are looked for in $FLATNET_PRETRAINED first (a folder holding copies of
those files), then in the installation, then in the checkout that holds this engine/. A CIFAR model
file names the ZCA file it shares, cifar10-zca.npz, which must lie beside it.
"""
import os
from pathlib import Path

from .model import load
from .modelfile import PRETRAINED

PRETRAINED_ENV = "FLATNET_PRETRAINED"


class PretrainedNotFound(FileNotFoundError):
    """A pretrained model's file is in none of the folders searched; the message says what to do."""


def pretrained_folders():
    """The folders searched for pretrained model files, in order."""
    here = Path(__file__).resolve().parent
    folders = [Path(os.environ[PRETRAINED_ENV])] if os.environ.get(PRETRAINED_ENV) else []
    folders.append(here / "pretrained_models")  # installed: pyproject.toml's package data
    if (here.parent / "pyproject.toml").is_file():  # a checkout (or an editable install of one)
        folders.append(here.parent / "pretrained")
    return folders


def pretrained_path(name):
    """The model file of the pretrained model `name` (one of PRETRAINED); ValueError for another name,
    PretrainedNotFound when no folder holds it."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model named {name!r}: the names are {', '.join(PRETRAINED)}")
    folders = pretrained_folders()
    for folder in folders:
        if (folder / f"{name}.npz").is_file():
            return folder / f"{name}.npz"
    raise PretrainedNotFound(
        f"pretrained model {name}: {name}.npz is in none of {', '.join(map(str, folders))}; reinstall flatnet "
        f"(an install ships them), or set {PRETRAINED_ENV} to a folder holding the repository's pretrained/ files")


def pretrained(name, backend="cpu", compiled=True):
    """The pretrained model `name` (one of PRETRAINED: flattened-cifar10, baseline-cifar10, flattened-mnist,
    baseline-mnist), loaded by engine.load (same backend and compiled arguments)."""
    return load(pretrained_path(name), backend=backend, compiled=compiled)
