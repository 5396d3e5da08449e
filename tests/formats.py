"""Writers of tiny datasets in the official distribution formats, for the loader tests."""
import gzip
import io
import pickle
import struct
import tarfile

import numpy as np


def cifar_batch(n, n_classes, rng, label_keys=("labels",)):
    d = {b"batch_label": b"testing batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [b"img%d.png" % i for i in range(n)]}
    for key in label_keys:
        d[key.encode()] = [int(v) for v in rng.integers(0, n_classes, n)]
    return d


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, rng, n_train=10, n_test=6, as_tar=False):
    """cifar-10-batches-py/ (5 training batches of n_train, a test batch, batches.meta); or its tar.gz."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = cifar_batch(n_train, 10, rng)
    batches["test_batch"] = cifar_batch(n_test, 10, rng)
    for name, d in batches.items():
        write_pickle(folder / name, d)
    write_pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072})
    if as_tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return batches


def write_cifar100(root, rng, n_train=12, n_test=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in (("train", n_train), ("test", n_test)):
        d = cifar_batch(n, 20, rng, label_keys=("coarse_labels",))
        d[b"fine_labels"] = [int(v) for v in rng.integers(0, 100, n)]
        write_pickle(folder / name, d)
        batches[name] = d
    write_pickle(folder / "meta", {b"fine_label_names": [b"f%d" % i for i in range(100)],
                                   b"coarse_label_names": [b"k%d" % i for i in range(20)]})
    return batches


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(root, rng, n_train=20, n_test=8, gz=True, learnable=False):
    """The four IDX files in root/mnist. learnable=True draws digits as bright squares whose place is the label."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        if learnable:
            images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
            for i, lab in enumerate(labels):
                r, c = divmod(int(lab), 5)
                images[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * c:6 + 5 * c] = 250
        else:
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[split] = (images, labels)
    return out


class Evil:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker):
    buf = io.BytesIO()
    pickle.dump({b"data": Evil(marker), b"labels": [0]}, buf, protocol=2)
    return buf.getvalue()
