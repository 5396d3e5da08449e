"""python -m engine.evaluate: test accuracy of a model file on test sets written here in the official formats.

The expected figures are computed independently of the command and of the model file's reader:
contrast normalization and ZCA in numpy (float64) from the raw images the test wrote, then the
network the test built, layer by layer, on its own weights.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from formats import write_cifar10, write_cifar100, write_mnist

import engine
from engine import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from engine.cli.evaluate import parser

ROOT = Path(__file__).resolve().parents[1]
GCN = dict(scale=1.0, sqrt_bias=10.0, use_std=True)


def small_net(shape, classes, seed=0):
    rng = np.random.default_rng(seed)
    c, h, w = shape
    net = Sequential(Conv2d(c, 2, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2), Flatten(),
                     Linear(2 * (h // 2) * (w // 2), classes, rng=rng),
                     names=["conv", "relu", "pool", "flat", "out"])
    w = net.params["out.weight"]
    w -= w.mean(axis=1, keepdims=True)  # (what all features share cancels: predictions vary from image to image)
    return net


def reference_inputs(images_nchw, zca_mean=None, zca_matrix=None):
    """The network's float32 NCHW input from uint8 NCHW images: pylearn2's contrast normalization, ZCA, in float64."""
    x = images_nchw.reshape(len(images_nchw), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x = x / np.sqrt(10.0 + x.var(axis=1, ddof=1, keepdims=True))
    if zca_matrix is not None:
        x = (x - zca_mean.astype(np.float64)) @ zca_matrix.astype(np.float64)
    return x.astype(np.float32).reshape(images_nchw.shape)


def reference_predictions(net, images_nchw, zca_mean=None, zca_matrix=None):
    """Class indices from uint8 NCHW images: reference_inputs, then the layer path."""
    return net.eval().forward(reference_inputs(images_nchw, zca_mean, zca_matrix)).argmax(axis=1)


def evaluate(*args):
    return subprocess.run([sys.executable, "-m", "engine.evaluate", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def accuracy_line(correct, n):
    return f"test accuracy: {100 * correct / n:.2f}% ({correct:,} of {n:,})"


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


def template_net():
    """A classifier of write_mnist(learnable=True)'s digits whose answers are known without running it.

    Classes 0-6: the mean of the bright square where that label draws it (the image's own square
    scores about 4.7 after contrast normalization, the others about -0.2). Classes 7-9: no weights,
    biases 0.3, 0.2, 0.1. So an image of label 0-7 is classified right, one of 8 or 9 as 7.
    """
    w = np.zeros((10, 28, 28), np.float32)
    for label in range(7):
        r, c = divmod(label, 5)
        w[label, 4 + 10 * r:12 + 10 * r, 2 + 5 * c:6 + 5 * c] = 1 / 32
    net = Sequential(Flatten(), Linear(784, 10), names=["flat", "out"])
    net.params["out.weight"][...] = w.reshape(10, 784)
    net.params["out.bias"][...] = [0] * 7 + [0.3, 0.2, 0.1]
    return net


@pytest.fixture
def mnist(tmp_path):
    """An MNIST test set of 37 images in the IDX files, and a model file of a network whose answers are known."""
    written = write_mnist(tmp_path / "data", np.random.default_rng(0), n_train=3, n_test=37, learnable=True)
    net = template_net()
    path = engine.save_model(tmp_path / "mnist.npz", net, (1, 28, 28), [str(i) for i in range(10)], dict(gcn=GCN),
                             extra=dict(dataset="mnist"))
    images, labels = written["t10k"]
    return path, net, images[:, None], labels.astype(np.int64), tmp_path / "data"


def test_mnist_accuracy_is_the_known_one(mnist):
    path, net, images, labels, data = mnist
    known = np.minimum(labels, 7)
    np.testing.assert_array_equal(reference_predictions(net, images), known)
    correct = int((labels <= 7).sum())
    assert 0 < correct < 37
    r = evaluate(path, "--dataset", "mnist", "--data-dir", data, "--no-download", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == accuracy_line(correct, 37)
    assert r.stderr == ""  # --quiet: no progress bar
    r = evaluate(path, "--data-dir", data, "--no-download", "--limit", "10", "--batch-size", "3")  # dataset: the file's
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == accuracy_line(int((labels[:10] <= 7).sum()), 10)
    assert "evaluating" in r.stderr  # the progress bar


def test_cifar10_with_a_packed_float16_zca_matches_the_layer_path(tmp_path):
    batches = write_cifar10(tmp_path / "data", np.random.default_rng(2), n_train=2, n_test=29)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3072, 3072)).astype(np.float32)
    zca = (0.5 * np.eye(3072) + 0.005 * (a + a.T)).astype(np.float32)  # symmetric, as a ZCA matrix is
    mean = rng.standard_normal(3072).astype(np.float32)
    net = small_net((3, 32, 32), 10, seed=4)
    path = engine.save_model(tmp_path / "c10.npz", net, (3, 32, 32), [f"c{i}" for i in range(10)], dict(gcn=GCN),
                             mean, zca, zca_storage="packed16")
    images = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    labels = np.array(batches["test_batch"][b"labels"])
    stored = zca.astype(np.float16)  # what the file holds: each entry rounded to float16
    correct = int((reference_predictions(net, images, mean, stored) == labels).sum())
    r = evaluate(path, "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--no-download", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == accuracy_line(correct, 29)
    # the same network with its output shifted towards class 3: --compare counts what changed
    other = small_net((3, 32, 32), 10, seed=4)
    other.params["out.bias"][3] += 2.0
    path2 = engine.save_model(tmp_path / "shifted.npz", other, (3, 32, 32), [f"c{i}" for i in range(10)],
                              dict(gcn=GCN), mean, zca, zca_storage="full")
    pred = reference_predictions(net, images, mean, stored)
    pred2 = reference_predictions(other, images, mean, zca)
    assert len(set(pred)) > 3 and 0 < (pred != pred2).sum() < 29
    r = evaluate(path, "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--no-download", "--quiet",
                 "--compare", path2)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[-2:]
    assert first == accuracy_line(correct, 29)
    assert second.startswith(f"{path2}: {accuracy_line(int((pred2 == labels).sum()), 29)}; "
                             f"{int((pred != pred2).sum())} of 29 predictions differ from {path}'s; "
                             f"largest logit difference 2 ")


def test_flip_averaging_follows_the_layer_path_on_mirrored_images(tmp_path):
    """--flip: each test image classified by its probabilities and its mirror image's (mirrored after ZCA), averaged."""
    batches = write_cifar10(tmp_path / "data", np.random.default_rng(9), n_train=2, n_test=31)
    rng = np.random.default_rng(10)
    a = rng.standard_normal((3072, 3072)).astype(np.float32)
    zca = (0.5 * np.eye(3072) + 0.005 * (a + a.T)).astype(np.float32)
    mean = rng.standard_normal(3072).astype(np.float32)
    net = small_net((3, 32, 32), 10, seed=11)
    images = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    labels = np.array(batches["test_batch"][b"labels"])
    x = reference_inputs(images, mean, zca)

    def probabilities(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    layer = net.eval()
    logits = layer.forward(x).astype(np.float64)
    plain = logits.argmax(axis=1)
    flipped = (probabilities(logits)
               + probabilities(layer.forward(np.ascontiguousarray(x[..., ::-1])).astype(np.float64))).argmax(axis=1)
    assert (plain != flipped).sum() > 0  # the test can tell flip averaging from single images
    for augment, note in (("flip,crop4", False), ("none", True)):
        path = engine.save_model(tmp_path / f"{augment}.npz", net, (3, 32, 32), [f"c{i}" for i in range(10)],
                                 dict(gcn=GCN), mean, zca, extra=dict(dataset="cifar10", augment=augment))
        r = evaluate(path, "--data-dir", tmp_path / "data", "--no-download", "--quiet", "--flip")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == accuracy_line(int((flipped == labels).sum()), 31) + " with flip averaging"
        assert ("trained without flipped images" in r.stderr) == note
        r = evaluate(path, "--data-dir", tmp_path / "data", "--no-download", "--quiet")
        assert r.stdout.splitlines()[-1] == accuracy_line(int((plain == labels).sum()), 31) and r.stderr == ""


def test_cifar100_label_mode_follows_the_models_classes(tmp_path):
    batches = write_cifar100(tmp_path / "data", np.random.default_rng(5), n_train=2, n_test=11)
    net = small_net((3, 32, 32), 20, seed=6)
    path = engine.save_model(tmp_path / "coarse.npz", net, (3, 32, 32), [f"k{i}" for i in range(20)], dict(gcn=GCN))
    images = batches["test"][b"data"].reshape(-1, 3, 32, 32)
    labels = np.array(batches["test"][b"coarse_labels"])
    correct = int((reference_predictions(net, images) == labels).sum())
    r = evaluate(path, "--dataset", "cifar100", "--data-dir", tmp_path / "data", "--no-download", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == accuracy_line(correct, 11)
    line = one_error_line(evaluate(path, "--dataset", "cifar100", "--label-mode", "fine", "--data-dir",
                                   tmp_path / "data", "--no-download"))
    assert line == f"error: {path} has 20 classes; the cifar100 test images (fine labels) have 100"


def test_errors_are_one_line(mnist, tmp_path):
    path, _, _, _, data = mnist
    write_cifar10(tmp_path / "c10", np.random.default_rng(7), n_train=1, n_test=2)
    line = one_error_line(evaluate(path, "--dataset", "cifar10", "--data-dir", tmp_path / "c10", "--no-download"))
    assert line == f"error: {path} takes images of shape (1, 28, 28); the cifar10 test images are (3, 32, 32)"
    line = one_error_line(evaluate(tmp_path / "none.npz", "--dataset", "mnist", "--data-dir", data))
    assert line == f"error: no model file at {tmp_path / 'none.npz'}"
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:3000])
    line = one_error_line(evaluate(tmp_path / "cut.npz", "--dataset", "mnist", "--data-dir", data))
    assert "truncated or corrupt model file" in line
    line = one_error_line(evaluate(path, "--dataset", "mnist", "--data-dir", tmp_path / "nowhere", "--no-download"))
    assert "not found in" in line and "pass --download" in line
    unnamed = engine.save_model(tmp_path / "unnamed.npz", small_net((1, 28, 28), 10), (1, 28, 28),
                                [str(i) for i in range(10)], dict(gcn=GCN))
    line = one_error_line(evaluate(unnamed, "--data-dir", data, "--no-download"))
    assert "does not say which data set" in line and "--dataset" in line
    line = one_error_line(evaluate(path, "--data-dir", data, "--no-download", "--label-mode", "fine"))
    assert line == "error: --label-mode is for cifar100, not mnist"
    r = evaluate(path, "--limit", "0")
    assert r.returncode == 2 and "expected a positive integer, got '0'" in r.stderr


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help and len(action.help) > 10, action.dest


# ---- the trained models shipped in pretrained/ (issue 12) ----

PRETRAINED = {"flattened-mnist.npz": dict(input_shape=(1, 28, 28), model="flattened", dataset="mnist", accuracy=99.56),
              "baseline-mnist.npz": dict(input_shape=(1, 28, 28), model="baseline", dataset="mnist", accuracy=99.64),
              "flattened-cifar10.npz": dict(input_shape=(3, 32, 32), model="flattened", dataset="cifar10",
                                            accuracy=87.04),
              "baseline-cifar10.npz": dict(input_shape=(3, 32, 32), model="baseline", dataset="cifar10",
                                           accuracy=86.34)}
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_pretrained_models_load_and_are_what_the_readme_says(name):
    path, want = ROOT / "pretrained" / name, PRETRAINED[name]
    model = engine.load(path)
    assert model.input_shape == want["input_shape"] and len(model.classes) == 10
    import json
    # the shipped file's accuracy as pretrained/accuracy.json records it, and the training run's that the file records
    recorded = json.loads((ROOT / "pretrained" / "accuracy.json").read_text())[name]
    assert recorded["test_accuracy"] == want["accuracy"] and recorded["correct"] == round(100 * want["accuracy"])
    assert (recorded["dataset"], recorded["model"]) == (want["dataset"], want["model"])
    extra = model.meta["extra"]
    assert (extra["dataset"], extra["model"]) == (want["dataset"], want["model"])
    assert round(100 * extra["test_accuracy"], 2) == recorded["trained_accuracy"]
    assert abs(recorded["trained_accuracy"] - recorded["test_accuracy"]) <= 0.02  # float16 changed <= 2 of 10,000
    n_flattened = sum(type(layer).__name__ == "Flattened" for layer in model.net.layers)
    assert (n_flattened > 0) == (want["model"] == "flattened")


@pytest.mark.parametrize("name, folder, least", [("flattened-mnist.npz", "mnist", 99.0),
                                                  ("baseline-mnist.npz", "mnist", 99.0),
                                                  ("flattened-cifar10.npz", "cifar-10-batches-py", 78.0),
                                                  ("baseline-cifar10.npz", "cifar-10-batches-py", 78.0)])
def test_pretrained_models_on_the_real_test_images(name, folder, least):
    """The first 1,000 real test images through the command a user runs (the full set is the README's figure)."""
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"the real {folder} files are not in ../shared/data")
    r = subprocess.run([sys.executable, "-m", "engine.evaluate", str(ROOT / "pretrained" / name),
                        "--dataset", PRETRAINED[name]["dataset"], "--data-dir", str(SHARED_DATA), "--limit", "1000",
                        "--quiet", "--no-download"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("test accuracy: "))
    assert float(line.split()[2].rstrip("%")) >= least, line


def test_provenance_script_splits_the_accuracy_by_the_exact_image_mask(tmp_path):
    """docs/provenance_accuracy.py: accuracy on the images a mask marks exact and on the others."""
    batches = write_cifar10(tmp_path / "data", np.random.default_rng(7), n_train=2, n_test=29)
    exact = np.zeros(29, bool)
    exact[[0, 3, 4, 8, 15, 16, 20, 27]] = True
    np.savez(tmp_path / "data" / "cifar10_provenance.npz", lossless_test=exact, lossless_train=np.zeros(10, bool))
    net = small_net((3, 32, 32), 10, seed=8)
    path = engine.save_model(tmp_path / "m.npz", net, (3, 32, 32), [f"c{i}" for i in range(10)], dict(gcn=GCN))
    images = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    correct = reference_predictions(net, images) == np.array(batches["test_batch"][b"labels"])
    assert 0 < correct.sum() < 29
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "provenance_accuracy.py"), str(path),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "8 exact and 21 JPEG-recovered test images" in r.stdout
    a, b = 100 * correct[exact].mean(), 100 * correct[~exact].mean()
    assert f"exact {a:.2f}% " in r.stdout and f"recovered {b:.2f}% " in r.stdout
    assert f"all {100 * correct.mean():.2f}%" in r.stdout
    # the 95% Wilson interval on the exact images: the accuracies p whose score test at 1.96 accepts the count seen
    from scipy.optimize import brentq
    k, n = int(correct[exact].sum()), int(exact.sum())

    def score(q):
        return (k / n - q) / np.sqrt(q * (1 - q) / n)
    lo = 0.0 if k == 0 else brentq(lambda q: score(q) - 1.96, 1e-12, k / n)
    hi = 1.0 if k == n else brentq(lambda q: score(q) + 1.96, k / n, 1 - 1e-12)
    assert f"95% interval {100 * lo:.2f}-{100 * hi:.2f}%" in r.stdout, r.stdout
    np.savez(tmp_path / "data" / "cifar10_provenance.npz", lossless_test=exact[:5])  # a mask of the wrong length
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "provenance_accuracy.py"), str(path),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "shape (5,)" in r.stderr
