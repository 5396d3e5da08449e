"""What every command shares: one-line errors and notes, loading a model file, checking an output path."""
import argparse
import sys

from ..model import load
from ..modelfile import ModelFileError
from ..npzfile import check_writable_file


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a wrong flag or value is one line naming it, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(message):
    """Stop the command with `error: message` on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


def say(line):
    """A note for the user on stderr (stdout carries the command's results)."""
    print(line, file=sys.stderr)


def load_model(path):
    """The model file at `path` (engine.Model), or exit with a one-line error saying why it cannot be read."""
    try:
        return load(path)
    except (FileNotFoundError, ModelFileError) as e:
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
