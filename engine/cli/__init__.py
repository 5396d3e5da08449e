"""The command-line tools: one module per command (bench: a package, one module per subcommand), each a
thin layer over the library.

    python -m engine.predict   classify image files or a .npy batch with a model file
    python -m engine.evaluate  test accuracy of a model file on a data set
    python -m engine.export    a model file to ONNX
    python -m engine.makemodel a model file from a training checkpoint (a stopped run's)
    python -m engine.filters   draw a flattened layer's reconstructed 3D filters
    python -m engine.figures   the paper's figures from finished runs
    python -m engine.bench     speed and memory, beside PyTorch and onnxruntime
    python -m engine.selftest  check a backend (the GPU) on this machine

Library functions raise exceptions; these modules turn them into one-line errors
(``common.fail``). Only these modules import ``engine.models`` (the paper's networks and
recipes: the checkout's ``models/`` folder, installed under that name); the library (the rest
of ``engine``) never imports them.
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path


class CheckoutModels(importlib.abc.MetaPathFinder):
    """`engine.models` in a checkout: its models/ folder (beside engine/, with pyproject.toml), when no install maps
    it there (an editable install made before the mapping, or PYTHONPATH=checkout). Installed, models/ is the real
    subpackage engine/models/ (pyproject.toml's package-dir), found first; this finder, last on sys.meta_path,
    is not asked then. Nothing is loaded until engine.models is imported."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "engine.models":
            return None
        root = Path(__file__).resolve().parents[2]
        folder = root / "models"
        if not (root / "pyproject.toml").is_file() or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if CheckoutModels not in sys.meta_path:
    sys.meta_path.append(CheckoutModels)
