"""The paper's preprocessing of a data set (engine/preprocess.py: contrast normalization, then ZCA whitening on
CIFAR), cached on disk as .npy files keyed by the settings and a hash of the data itself."""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..preprocess import ZCA, global_contrast_normalize
from .files import DatasetError, default_data_dir
from .formats import load_cifar, load_mnist

CACHE_ENV = "FLATNET_CACHE"


def default_cache_dir():
    """$FLATNET_CACHE, else ~/.cache/flatnet/preprocessed: where preprocessed arrays are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flatnet" / "preprocessed"


def _fingerprint(raw):
    """A hash of the images and labels themselves: the cache key part that changes with the data.

    Not the files' sizes and times: a copy of the same data (a new checkout, a data folder copied
    again) finds its cache instead of writing another (740 MiB for CIFAR-10). About 0.15 s for CIFAR-10.
    """
    h = hashlib.sha1()
    for part in ("train_x", "train_y", "test_x", "test_y"):
        a = np.ascontiguousarray(raw[part])
        h.update(f"{part}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:12]


def _save_atomic_npy(path, array):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def load_dataset(name, data_dir=None, cache_dir=None, label_mode="fine", download_ok=False, log=print,
                 use_cache=True):
    """Preprocessed dataset: float32 NCHW train/test arrays, int64 labels, class names.

    `name` is 'cifar10', 'cifar100' or 'mnist'. Returns a dict with train_x, train_y,
    test_x, test_y, classes, and the preprocessing constants under 'preprocessing'.
    """
    if name not in ("cifar10", "cifar100", "mnist"):
        raise ValueError(f"unknown dataset {name!r} (expected cifar10, cifar100 or mnist)")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    raw = load_mnist(data_dir, download_ok) if name == "mnist" else load_cifar(data_dir, name, label_mode, download_ok)
    for split in ("train", "test"):
        if not len(raw[f"{split}_x"]):
            raise DatasetError(f"{raw['source']}: the {split} set is empty")
    gcn = dict(scale=1.0, sqrt_bias=10.0, use_std=True)
    zca_bias = None if name == "mnist" else 1.0
    params = dict(name=name, label_mode=label_mode if name == "cifar100" else None, gcn=gcn, zca_filter_bias=zca_bias,
                  n_train=len(raw["train_x"]), n_test=len(raw["test_x"]), version=1)
    key = hashlib.sha1((json.dumps(params, sort_keys=True) + _fingerprint(raw)).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache / f"{name}-{key}"
    arrays = ("train_x", "test_x") + (("zca_mean", "zca_matrix") if zca_bias is not None else ())
    out = dict(train_y=raw["train_y"], test_y=raw["test_y"], classes=raw["classes"], source=raw["source"])
    if use_cache and all((folder / f"{a}.npy").is_file() for a in arrays):
        try:
            cached = {a: np.load(folder / f"{a}.npy", allow_pickle=False) for a in arrays}
            if (cached["train_x"].shape[0] == len(out["train_y"]) and cached["test_x"].shape[0] == len(out["test_y"])):
                log(f"preprocessed {name} loaded from cache {folder}")
                return _finish({**out, **cached}, gcn, zca_bias)
            log(f"cache {folder} does not match the data; preprocessing again")
        except (ValueError, OSError) as e:
            log(f"cache {folder} unreadable ({e}); preprocessing again")
    t0 = time.perf_counter()
    log(f"preprocessing {name} once, {len(raw['train_x']) + len(raw['test_x']):,} images "
        f"(contrast normalization{', ZCA whitening' if zca_bias else ''}); the result is cached")
    shape = raw["train_x"].shape[1:]
    train = global_contrast_normalize(raw["train_x"], **gcn)
    test = global_contrast_normalize(raw["test_x"], **gcn)
    if zca_bias is not None:
        zca = ZCA(zca_bias).fit(train)
        train, test = zca.transform(train), zca.transform(test)
        out["zca_mean"], out["zca_matrix"] = zca.mean.astype(np.float32), zca.matrix.astype(np.float32)
    out["train_x"], out["test_x"] = train.reshape(-1, *shape), test.reshape(-1, *shape)
    if use_cache:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for a in arrays:
                _save_atomic_npy(folder / f"{a}.npy", out[a])
            size = sum((folder / f"{a}.npy").stat().st_size for a in arrays)
            log(f"preprocessed {name} in {time.perf_counter() - t0:.1f}s; wrote {size / 2 ** 20:,.0f} MiB to {folder}")
        except OSError as e:
            log(f"could not cache preprocessed arrays in {folder}: {e}")
            shutil.rmtree(folder, ignore_errors=True)
    return _finish(out, gcn, zca_bias)


def _finish(out, gcn, zca_bias):
    out["preprocessing"] = dict(gcn=gcn, zca_filter_bias=zca_bias)
    return out
