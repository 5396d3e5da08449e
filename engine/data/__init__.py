"""Datasets in their official distribution formats, and the paper's preprocessing.

* CIFAR-10 / CIFAR-100: the "python version" (``cifar-10-python.tar.gz`` or the
  extracted ``cifar-10-batches-py/``; ``cifar-100-python``), Python 2 pickles read
  with an allow-list unpickler that can only rebuild numpy arrays.
* MNIST: the four IDX files, gzipped or not.

Files found on disk are validated by structure (shapes, counts that agree, label
ranges), not by checksum, so a user's own copy works. Missing files are downloaded only when
asked (``download_ok=True``; the commands' --download) from their official location, checked
against the published MD5 and written atomically; otherwise the error names the files and the
folder to put them in.

``load_dataset`` preprocesses them as the paper does (engine/preprocess.py: contrast
normalization, then ZCA whitening on CIFAR) and caches the arrays on disk as .npy.

The parts, each with one reason to change: ``files`` (where the data lives, downloads, DatasetError),
``formats`` (reading the distributed files safely: CIFAR pickles, MNIST IDX, their bounds) and
``cache`` (the preprocessing and its cache on disk).
"""
from .cache import CACHE_ENV, default_cache_dir, load_dataset
from .files import DATA_ENV, DatasetError, default_data_dir, download
from .formats import (CIFAR10, CIFAR100, MAX_ARCHIVE_BYTES, MAX_BATCH_BYTES, MAX_IDX_ITEMS, MAX_OTHER_MEMBER_BYTES,
                      MNIST_FILES, MNIST_MIRRORS, load_cifar, load_mnist, read_idx, safe_unpickle)

__all__ = ["CACHE_ENV", "DATA_ENV", "DatasetError", "default_cache_dir", "default_data_dir", "download", "load_cifar",
           "load_dataset", "load_mnist", "read_idx", "safe_unpickle", "CIFAR10", "CIFAR100", "MNIST_FILES",
           "MNIST_MIRRORS", "MAX_ARCHIVE_BYTES", "MAX_BATCH_BYTES", "MAX_IDX_ITEMS", "MAX_OTHER_MEMBER_BYTES"]
