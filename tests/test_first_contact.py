"""What a new user meets first: a whole-run time estimate, a warning for learning-rate drops a run never
reaches, downloads only when asked, one-line errors that name the flag, an example application that
skips a broken image, and a model file whose metadata nests too deeply refused before it is parsed."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import data as datasets
from engine.data import DatasetError, load_mnist
from engine.trainer import Trainer, duration
from formats import write_mnist
from models.paper import build

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


# ----------------------------------------------------------------------------- time estimate

def test_durations_read_at_a_glance():
    assert [duration(s) for s in (0.2, 40, 61, 899, 7380)] == ["1 s", "40 s", "1 min", "15 min", "2 h 3 min"]


def test_a_run_estimates_its_whole_length_early_and_after_each_epoch(tmp_path):
    rng = np.random.default_rng(0)
    data = dict(train_x=rng.standard_normal((64, 1, 28, 28)).astype(np.float32), train_y=rng.integers(0, 10, 64),
                test_x=rng.standard_normal((8, 1, 28, 28)).astype(np.float32), test_y=rng.integers(0, 10, 8))
    cfg = dict(epochs=3, batch_size=4, lr=0.01, momentum=0.9, weight_decay=0.0, lr_drop_epochs=[], seed=0)
    lines = []
    t = Trainer(build("flattened", (1, 28, 28), 10, seed=0), data, cfg, tmp_path, log=lines.append, progress=False)
    assert t.run() == "done"
    estimates = [line for line in lines if line.startswith("estimate: about ")]
    assert len(estimates) == 1 and "for the 3 epoch(s) left" in estimates[0]  # once, after the first steps
    assert lines.index(estimates[0]) < next(i for i, line in enumerate(lines) if line.startswith("epoch   1"))
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 3
    assert all("left" in line.rsplit(";", 1)[-1] for line in epochs[:2]) and "left" not in epochs[2]
    assert len(t.epoch_walls) == 3 and t.seconds_left() == 0


# ----------------------------------------------------------------------------- learning-rate drops

@pytest.fixture
def tiny_mnist(tmp_path):
    write_mnist(tmp_path / "data", np.random.default_rng(0), n_train=64, n_test=16)
    return tmp_path / "data"


def test_drops_after_the_last_epoch_are_warned_about(tiny_mnist, tmp_path):
    common = ["train.py", "--model", "flattened", "--dataset", "mnist", "--data-dir", tiny_mnist, "--cache-dir",
              tmp_path / "cache", "--batch-size", "32", "--quiet", "--no-plot", "--limit-test", "16"]
    r = run([*common, "--epochs", "2", "--lr-drop-epochs", "1,5", "--out", tmp_path / "a"])
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning: the learning-rate drop")]
    assert len(warning) == 1 and "after epoch(s) 5 fall at or after the last epoch (2)" in warning[0]
    assert "they never happen" in warning[0]
    r = run([*common, "--epochs", "1", "--out", tmp_path / "b"])  # the MNIST recipe's drops: 20 and 26
    assert r.returncode == 0, r.stderr
    assert "after epoch(s) 20, 26 fall at or after the last epoch (1): the rate stays at --lr" in r.stderr
    r = run([*common, "--epochs", "3", "--lr-drop-epochs", "1,2", "--out", tmp_path / "c"])
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    before = (tmp_path / "c" / "model.npz").read_bytes()
    r = run([*common, "--epochs", "2", "--out", tmp_path / "c", "--resume"])  # shorter than the 3 trained
    assert r.returncode == 1 and "cannot be shortened" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / "c" / "model.npz").read_bytes() == before


# ----------------------------------------------------------------------------- downloads only when asked

def test_missing_files_are_downloaded_only_when_asked(tmp_path, monkeypatch):
    asked = []

    def offline(url, dest, md5, progress=True):
        asked.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets.files, "download", offline)  # what the readers call
    with pytest.raises(DatasetError, match=r"not found in .*pass --download") as e:
        load_mnist(tmp_path / "empty")
    assert asked == [] and not (tmp_path / "empty").exists()
    assert "could not be downloaded" not in str(e.value)
    with pytest.raises(DatasetError, match=r"could not be downloaded \(.*network unreachable"):
        load_mnist(tmp_path / "empty", download_ok=True)
    assert asked  # with permission, a download was tried


def test_train_py_downloads_nothing_unless_told(tmp_path):
    r = run(["train.py", "--dataset", "mnist", "--data-dir", tmp_path / "typo", "--out", tmp_path / "run", "--quiet"])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "pass --download" in r.stderr
    assert "downloading" not in r.stderr and not (tmp_path / "typo").exists()
    help_text = run(["train.py", "--help"]).stdout
    assert "--download" in help_text


# ----------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("args, names", [
    (["train.py", "--model", "flatened"], "--model"),
    (["train.py", "--epochs", "0"], "--epochs"),
    (["train.py", "--batch-size", "0"], "--batch-size"),
    (["-m", "engine.predict", "pretrained/flattened-mnist.npz", "x.png", "--topp", "2"], "--topp"),
    (["-m", "engine.evaluate"], "model"),
])
def test_a_wrong_flag_is_one_line_that_names_it(args, names):
    r = run(args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert names in lines[0] and "error: " in lines[0] and lines[0].endswith("--help)")


# ----------------------------------------------------------------------------- the example application

def test_classify_folder_skips_a_broken_image_and_fails_in_one_line(tmp_path):
    pytest.importorskip("PIL")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("car.png", "ship.png"):
        (folder / name).write_bytes((ROOT / "examples" / "samples" / "cifar10" / name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    script, model = ROOT / "examples" / "classify_folder.py", ROOT / "pretrained" / "flattened-cifar10.npz"
    r = run([script, model, folder, tmp_path / "out.csv"])
    assert r.returncode == 0, r.stderr
    assert "warning: skipped broken.png" in r.stderr and "classified 2 images" in r.stdout
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0] == "file,class,probability" and [row.split(",")[:2] for row in rows[1:]] == \
        [["car.png", "automobile"], ["ship.png", "ship"]]
    (tmp_path / "not-a-model.npz").write_bytes(b"PK\x03\x04 truncated")
    for args, says in (([model, tmp_path / "missing", tmp_path / "o.csv"], "is not a folder"),
                       ([tmp_path / "none.npz", folder, tmp_path / "o.csv"], "no model file at"),
                       ([tmp_path / "not-a-model.npz", folder, tmp_path / "o.csv"], "not-a-model.npz"),
                       ([model, folder, tmp_path / "nowhere" / "o.csv"], "cannot write")):
        r = run([script, *args])
        assert r.returncode == 1 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- metadata

def test_deeply_nested_metadata_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "m.npz"
    engine.save_model(path, build("flattened", (1, 28, 28), 10, seed=0), (1, 28, 28), [str(i) for i in range(10)])
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    meta = json.loads(str(np.load(path, allow_pickle=False)["meta"]))
    text = json.dumps(meta)[:-1] + ', "extra": ' + "[" * 50_000 + "]" * 50_000 + "}"
    bad = tmp_path / "deep.npz"
    with zipfile.ZipFile(bad, "w") as z:
        for name, blob in members.items():
            if name != "meta.npy":
                z.writestr(name, blob)
        with z.open("meta.npy", "w") as f:
            np.lib.format.write_array(f, np.array(text), allow_pickle=False)
    with pytest.raises(engine.ModelFileError, match="nests deeper than 64 levels") as e:
        engine.load(bad)
    assert "Recursion" not in str(e.value)
