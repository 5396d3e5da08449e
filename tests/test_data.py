"""Dataset loaders on tiny files written in the official formats, and the preprocessing."""
import gzip
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from formats import evil_pickle, write_cifar10, write_cifar100, write_mnist, write_pickle

from engine import data
from engine.data import DatasetError, load_cifar, load_dataset, load_mnist
from engine.preprocess import ZCA, global_contrast_normalize


def _images(d):
    return d[b"data"].reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_round_trip(tmp_path, rng, as_tar):
    batches = write_cifar10(tmp_path, rng, as_tar=as_tar)
    d = load_cifar(tmp_path, "cifar10", download_ok=False)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(d["train_x"], np.concatenate([_images(b) for b in train]))
    np.testing.assert_array_equal(d["train_y"], np.concatenate([b[b"labels"] for b in train]))
    np.testing.assert_array_equal(d["test_x"], _images(batches["test_batch"]))
    assert d["classes"] == [f"c{i}" for i in range(10)]
    assert d["train_x"].dtype == np.uint8 and d["train_x"].shape == (50, 3, 32, 32)


@pytest.mark.parametrize("mode,n", [("fine", 100), ("coarse", 20)])
def test_cifar100_round_trip(tmp_path, rng, mode, n):
    batches = write_cifar100(tmp_path, rng)
    d = load_cifar(tmp_path, "cifar100", label_mode=mode, download_ok=False)
    np.testing.assert_array_equal(d["train_x"], _images(batches["train"]))
    np.testing.assert_array_equal(d["test_y"], batches["test"][f"{mode}_labels".encode()])
    assert len(d["classes"]) == n


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_round_trip(tmp_path, rng, gz):
    written = write_mnist(tmp_path, rng, gz=gz)
    d = load_mnist(tmp_path, download_ok=False)
    np.testing.assert_array_equal(d["train_x"][:, 0], written["train"][0])
    np.testing.assert_array_equal(d["test_y"], written["t10k"][1])
    assert d["train_x"].shape == (20, 1, 28, 28)


def test_malicious_pickle_is_refused_without_running(tmp_path, rng):
    write_cifar10(tmp_path, rng)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil_pickle(marker))
    with pytest.raises(DatasetError, match=r"data_batch_3.*refusing to load global (posix|os)\.system"):
        load_cifar(tmp_path, "cifar10", download_ok=False)
    assert not marker.exists()


def test_truncated_files_are_refused_with_their_name(tmp_path, rng):
    write_cifar10(tmp_path, rng)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DatasetError, match=r"data_batch_2.*truncated or corrupt"):
        load_cifar(tmp_path, "cifar10", download_ok=False)

    write_mnist(tmp_path / "m", rng)
    img = tmp_path / "m" / "mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(img.read_bytes())
    img.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz.*truncated"):
        load_mnist(tmp_path / "m", download_ok=False)
    img.write_bytes(img.read_bytes()[:50])  # a cut gzip stream
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path / "m", download_ok=False)

    write_cifar10(tmp_path / "t", rng, as_tar=True)
    tar = tmp_path / "t" / "cifar-10-python.tar.gz"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz"):
        load_cifar(tmp_path / "t", "cifar10", download_ok=False)


def test_wrong_structure_is_refused(tmp_path, rng):
    from formats import write_pickle
    write_cifar10(tmp_path, rng)
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch",
                 {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(DatasetError, match=r"test_batch: 4 images but 3 labels"):
        load_cifar(tmp_path, "cifar10", download_ok=False)
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch",
                 {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DatasetError, match=r"test_batch: labels outside \[0, 10\)"):
        load_cifar(tmp_path, "cifar10", download_ok=False)


def test_missing_files_name_what_and_where(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py/ \(or cifar-10-python.tar.gz\) not found in"):
        load_cifar(tmp_path, "cifar10", download_ok=False)
    with pytest.raises(DatasetError, match=r"mnist/train-images-idx3-ubyte"):
        load_mnist(tmp_path, download_ok=False)


def test_download_checks_md5_and_writes_atomically(tmp_path, rng, monkeypatch):
    src = tmp_path / "server"
    write_cifar10(src, rng, as_tar=True)
    archive = src / "cifar-10-python.tar.gz"
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "data"
    monkeypatch.setitem(data.CIFAR10, "url", archive.as_uri())
    monkeypatch.setitem(data.CIFAR10, "md5", "0" * 32)
    with pytest.raises(DatasetError, match="MD5"):
        load_cifar(dest, "cifar10", download_ok=True)
    assert not dest.exists()  # neither a partial file nor the folder it created is left behind
    dest.mkdir()
    with pytest.raises(DatasetError, match="MD5"):
        load_cifar(dest, "cifar10", download_ok=True)
    assert dest.is_dir() and not any(dest.iterdir())  # a folder that was there stays
    monkeypatch.setitem(data.CIFAR10, "md5", md5)
    d = load_cifar(dest, "cifar10", download_ok=True)
    assert (dest / "cifar-10-python.tar.gz").is_file() and d["train_x"].shape[0] == 50


def test_contrast_normalization_and_zca(rng):
    x = rng.integers(0, 256, (300, 48)).astype(np.float64)
    g = global_contrast_normalize(x, sqrt_bias=0.0)
    np.testing.assert_allclose(g.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(g.var(axis=1, ddof=1), 1, rtol=1e-4)
    flat = np.ones((2, 48))  # constant images: divided by sqrt(sqrt_bias), not by zero
    assert np.all(np.isfinite(global_contrast_normalize(flat)))
    zca = ZCA(filter_bias=1e-8).fit(g)
    w = zca.transform(g).astype(np.float64)
    # whitened: identity covariance on the 47 directions GCN leaves (each image's mean is removed,
    # so the constant direction carries no variance): the projection I - 11^T / 48
    np.testing.assert_allclose(np.cov(w.T, bias=True), np.eye(48) - 1 / 48, atol=2e-3)
    np.testing.assert_allclose(zca.matrix, zca.matrix.T, atol=1e-8)  # ZCA: the symmetric whitening


def test_load_dataset_preprocesses_and_caches(tmp_path, rng):
    write_cifar10(tmp_path / "d", rng)
    logs = []
    a = load_dataset("cifar10", tmp_path / "d", tmp_path / "cache", download_ok=False, log=logs.append)
    b = load_dataset("cifar10", tmp_path / "d", tmp_path / "cache", download_ok=False, log=logs.append)
    assert any("loaded from cache" in m for m in logs)
    assert logs[0] == "preprocessing cifar10 once, 56 images (contrast normalization, ZCA whitening); the result is cached"
    done = re.fullmatch(r"preprocessed cifar10 in \d+\.\ds; wrote (\d+) MiB to (.*)", logs[1])
    assert done, logs  # how long it took and how much it wrote, where
    written = sum(f.stat().st_size for f in Path(done.group(2)).iterdir())
    assert int(done.group(1)) == round(written / 2 ** 20) > 0
    np.testing.assert_array_equal(a["train_x"], b["train_x"])
    assert a["train_x"].dtype == np.float32 and a["train_x"].shape == (50, 3, 32, 32)
    np.testing.assert_allclose(a["train_x"].reshape(50, -1).mean(axis=0), 0, atol=1e-4)  # ZCA centres
    m = load_dataset("mnist", _mnist(tmp_path / "m", rng), tmp_path / "cache", download_ok=False, log=logs.append)
    np.testing.assert_allclose(m["train_x"].reshape(20, -1).mean(axis=1), 0, atol=1e-4)  # GCN only
    assert "zca_matrix" not in m


def test_preprocessing_cache_follows_the_data_not_the_files(tmp_path, rng):
    """A copy of the same data (new times, another folder) finds the cache; one changed pixel does not."""
    batches = write_cifar10(tmp_path / "d", rng)
    logs = []
    load_dataset("cifar10", tmp_path / "d", tmp_path / "cache", download_ok=False, log=logs.append)
    shutil.copytree(tmp_path / "d", tmp_path / "copy")
    for f in (tmp_path / "copy" / "cifar-10-batches-py").iterdir():
        os.utime(f, (1e9, 1e9))  # other modification times
    load_dataset("cifar10", tmp_path / "copy", tmp_path / "cache", download_ok=False, log=logs.append)
    assert "loaded from cache" in logs[-1], logs
    changed = dict(batches["test_batch"])
    changed[b"data"] = changed[b"data"].copy()
    changed[b"data"][0, 0] ^= 1
    write_pickle(tmp_path / "copy" / "cifar-10-batches-py" / "test_batch", changed)
    load_dataset("cifar10", tmp_path / "copy", tmp_path / "cache", download_ok=False, log=logs.append)
    assert logs[-2].startswith("preprocessing cifar10 once"), logs
    assert len(list((tmp_path / "cache").iterdir())) == 2


def _mnist(root, rng):
    write_mnist(root, rng)
    return root
