"""Reading the distributed files safely: CIFAR's Python pickles (an allow-list unpickler that can only
rebuild numpy arrays) from the folder or the tar.gz, and MNIST's IDX files, every size bounded before it is
read."""
import gzip
import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .. import npzfile
from .files import DatasetError, fetch_or_explain

# Hard limits, checked before anything is read: the official files are well inside them.
MAX_IDX_ITEMS = 1 << 17            # images or labels in one MNIST file (60,000 and 10,000 officially)
MAX_BATCH_BYTES = 256 << 20        # one CIFAR pickle (CIFAR-100's training set: 155 MB)
MAX_ARCHIVE_BYTES = 512 << 20      # a CIFAR tar.gz decompressed (about 180 MB)
MAX_OTHER_MEMBER_BYTES = 1 << 20   # a member of the tar.gz that is not a batch (the readme), skipped


# ----------------------------------------------------------------------------- safe pickles

class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers and numpy arrays; any other global is refused.

    _codecs.encode is how Python 3 writes bytes in protocol-2 pickles (it only encodes a string).
    """

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _RefusedGlobal(f"refusing to load global {module}.{name}: not a numpy array")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def safe_unpickle(data, source):
    """Load a CIFAR pickle (bytes) without running code from it; errors name `source`."""
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DatasetError(f"{source}: not a CIFAR batch file ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, struct.error) as e:
        raise DatasetError(f"{source}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


# ----------------------------------------------------------------------------- specs

CIFAR10 = dict(
    folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], meta="batches.meta",
)
CIFAR100 = dict(
    folder="cifar-100-python", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
    train=["train"], test=["test"], meta="meta",
)
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]


# ----------------------------------------------------------------------------- CIFAR

def _read_cifar_files(spec, data_dir, download_ok):
    """Return {name: bytes} of the batch files, from the extracted folder or the tar.gz."""
    data_dir = Path(data_dir)
    folder = data_dir / spec["folder"]
    names = spec["train"] + spec["test"] + [spec["meta"]]
    if folder.is_dir():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DatasetError(f"{folder}: missing {', '.join(missing)}")
        for n in names:
            if (folder / n).stat().st_size > MAX_BATCH_BYTES:
                raise DatasetError(f"{folder / n}: {(folder / n).stat().st_size} bytes, more than a CIFAR batch "
                                   f"file can hold ({MAX_BATCH_BYTES})")
        return {n: (folder / n).read_bytes() for n in names}, str(folder)
    archive = data_dir / spec["archive"]
    if not archive.is_file():
        fetch_or_explain([(spec["url"], archive, spec["md5"])],
                          f"{spec['folder']}/ (or {spec['archive']})", data_dir, download_ok)
    files = {}
    try:  # one pass over the stream, every size bounded, then to the end of the gzip stream: its CRC is checked
        with gzip.open(archive, "rb") as gz:
            stream = _Bounded(gz, MAX_ARCHIVE_BYTES, archive)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    wanted = member.isfile() and base in names and os.path.dirname(member.name).endswith(spec["folder"])
                    limit = MAX_BATCH_BYTES if wanted else MAX_OTHER_MEMBER_BYTES
                    if member.size > limit:
                        raise DatasetError(f"{archive}: member {member.name} of {member.size} bytes, more than "
                                           f"{limit}")
                    if wanted:
                        files[base] = tar.extractfile(member).read()
            while stream.read(1 << 20):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {e})") from None
    missing = [n for n in names if n not in files]
    if missing:
        raise DatasetError(f"{archive}: missing {', '.join(missing)} inside the archive")
    return files, str(archive)


class _Bounded:
    """A reader that raises DatasetError once more than `limit` bytes have come out of `f`."""

    def __init__(self, f, limit, source):
        self.f, self.limit, self.source, self.done = f, limit, source, 0

    def read(self, n=-1):
        data = self.f.read(self.limit + 1 - self.done if n is None or n < 0 else n)
        self.done += len(data)
        if self.done > self.limit:
            raise DatasetError(f"{self.source}: decompresses to more than {self.limit} bytes")
        return data


def _cifar_batch(data, source, label_key, n_classes):
    d = safe_unpickle(data, source)
    if "data" not in d or label_key not in d:
        raise DatasetError(f"{source}: missing key 'data' or '{label_key}'")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DatasetError(f"{source}: 'data' must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise DatasetError(f"{source}: {x.shape[0]} images but {y.size} labels")
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{source}: labels must be integers, got {y.dtype} values")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise DatasetError(f"{source}: labels outside [0, {n_classes})")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar(data_dir, which="cifar10", label_mode="fine", download_ok=False):
    """Raw CIFAR as uint8 (N, 3, 32, 32) images, int64 labels and class names.

    Returns dict(train_x, train_y, test_x, test_y, classes, source).
    """
    spec = CIFAR10 if which == "cifar10" else CIFAR100
    if which == "cifar10":
        label_key, n_classes, names_key = "labels", 10, "label_names"
    elif label_mode in ("fine", "coarse"):
        label_key, n_classes = f"{label_mode}_labels", (100 if label_mode == "fine" else 20)
        names_key = f"{label_mode}_label_names"
    else:
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    files, source = _read_cifar_files(spec, data_dir, download_ok)
    meta = safe_unpickle(files[spec["meta"]], f"{source}/{spec['meta']}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    if len(classes) != n_classes:
        raise DatasetError(f"{source}/{spec['meta']}: expected {n_classes} names under '{names_key}'")
    parts = {}
    for split in ("train", "test"):
        xs, ys = zip(*(_cifar_batch(files[n], f"{source}/{n}", label_key, n_classes) for n in spec[split]))
        parts[split] = (np.concatenate(xs), np.concatenate(ys))
    return dict(train_x=parts["train"][0], train_y=parts["train"][1], test_x=parts["test"][0],
                test_y=parts["test"][1], classes=classes, source=source)


# ----------------------------------------------------------------------------- MNIST

def read_idx(path, item_shape):
    """An IDX file of uint8 items of `item_shape` (gzipped or not), at most MAX_IDX_ITEMS of them.

    The header is checked before any data is read, the data is read in place (never more
    than the header announces, a gzip stream to its end, so its CRC is checked).
    """
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if gzipped else raw
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise DatasetError(f"{path}: not an IDX file of unsigned bytes")
            dims = f.read(4 * head[3])
            if len(dims) < 4 * head[3]:
                raise DatasetError(f"{path}: truncated header")
            dims = struct.unpack(f">{head[3]}I", dims)
            if dims[1:] != tuple(item_shape) or not dims:
                raise DatasetError(f"{path}: expected items of shape {tuple(item_shape)}, the header says {dims}")
            if dims[0] > MAX_IDX_ITEMS:
                raise DatasetError(f"{path}: the header announces {dims[0]} items, more than {MAX_IDX_ITEMS}")
            try:
                return npzfile.read_exact(f, dims)
            except (EOFError, ValueError) as e:
                raise DatasetError(f"{path}: the header announces {dims}: {e} (truncated or corrupt?)") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: truncated or corrupt gzip ({type(e).__name__}: {e})") from None


def _find_mnist_file(data_dir, name, md5, download_ok):
    for folder in (data_dir / "mnist", data_dir / "MNIST" / "raw", data_dir):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    dest = data_dir / "mnist" / (name + ".gz")
    return fetch_or_explain([(m + name + ".gz", dest, md5) for m in MNIST_MIRRORS],
                             f"mnist/{name}[.gz]", data_dir, download_ok)


def load_mnist(data_dir, download_ok=False):
    """Raw MNIST: uint8 (N, 1, 28, 28) images, int64 labels."""
    data_dir = Path(data_dir)
    arrays = {}
    for key, (name, md5) in MNIST_FILES.items():
        path = _find_mnist_file(data_dir, name, md5, download_ok)
        arrays[key] = (read_idx(path, (28, 28) if key.endswith("images") else ()), path)
    out = {}
    for split in ("train", "test"):
        (x, xp), (y, yp) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if y.shape[0] != x.shape[0]:
            raise DatasetError(f"{yp}: {y.shape[0]} labels for {x.shape[0]} images in {xp}")
        if y.size and y.max() > 9:
            raise DatasetError(f"{yp}: labels outside [0, 10)")
        out[f"{split}_x"], out[f"{split}_y"] = x[:, None], y.astype(np.int64)
    out["classes"] = [str(i) for i in range(10)]
    out["source"] = str(arrays["train_images"][1].parent)
    return out
