"""What every command shares: one-line errors and notes, loading a model (a file, a name or a checkpoint), checking
an output path."""
import argparse
import os
import sys
from pathlib import Path

from ..catalog import PRETRAINED, pretrained
from ..checkpoint import is_checkpoint
from ..model import load
from ..npzfile import check_writable_file


INSTALLED_PREFIX = "flatnet-"  # the installed commands (pyproject.toml, [project.scripts])


def invoked_as(default):
    """The name this command was started by: an installed command's (flatnet-predict, ...), else `default`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith(INSTALLED_PREFIX) else default


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a wrong flag or value is one line naming it, not the whole usage block; `prog`
    gives way to the installed command's name when the command was started by it."""

    def __init__(self, *args, prog=None, **kwargs):
        super().__init__(*args, prog=invoked_as(prog) if prog else None, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(message):
    """Stop the command with `error: message` on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


def say(line):
    """A note for the user on stderr (stdout carries the command's results)."""
    print(line, file=sys.stderr)


MODEL_HELP = ("a model file (train.py's OUT/model.npz), a pretrained model's name (" + ", ".join(PRETRAINED) +
              ") or a training checkpoint (OUT/checkpoint.npz: its data set gives the preprocessing)")


def load_model(spec, data_dir=None, cache_dir=None):
    """The model `spec` names (engine.Model), or exit with a one-line error saying why it cannot be read.

    `spec`: a model file; a pretrained model's name (engine.PRETRAINED), unless a file of that name
    exists; or a training checkpoint, whose model is built in memory (cli/checkpoints.py) with the
    preprocessing of its data set, read from `data_dir` and `cache_dir` (default: the run's folders).
    """
    try:
        if spec in PRETRAINED and not Path(spec).exists():
            return pretrained(spec)
        if not is_checkpoint(spec):
            return load(spec)
        from ..data import DatasetError  # (loaded for checkpoints only, as the paper's networks are)
        from .checkpoints import checkpoint_model
        try:
            return checkpoint_model(spec, data_dir, cache_dir, log=say)
        except DatasetError as e:
            fail(f"{spec}: a checkpoint's model takes its preprocessing from its data set: {e}")
    except (OSError, ValueError) as e:  # FileNotFoundError, PretrainedNotFound, ModelFileError, CheckpointError
        fail(e)


def writable_file(path):
    """Exit with a one-line error unless `path` can be written (checked before any long work)."""
    try:
        check_writable_file(path)
    except OSError as e:
        fail(f"cannot write {path}: {e}")
    return path


def needs(module, purpose, install):
    """Import `module` or exit saying what needs it and how to install it."""
    try:
        return __import__(module)
    except ImportError:
        fail(f"{purpose} needs {module}: {install}")
