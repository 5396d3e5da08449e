"""What every command shares: one-line errors, loading a model file, checking an output path."""
from ..model import load
from ..modelfile import ModelFileError
from ..npzfile import check_writable_file


def fail(message):
    """Stop the command with `error: message` on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


def load_model(path):
    """The model file at `path` (engine.Model), or exit with a one-line error saying why it cannot be read."""
    try:
        return load(path)
    except (FileNotFoundError, ModelFileError) as e:
        raise SystemExit(f"error: {e}") from None


def writable_file(path):
    """Exit with a one-line error unless `path` can be written (checked before any long work)."""
    try:
        check_writable_file(path)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path}: {e}") from None
    return path


def needs(module, purpose, install):
    """Import `module` or exit saying what needs it and how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"error: {purpose} needs {module}: {install}") from None
