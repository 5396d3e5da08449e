"""The installed product: a regular (non-editable) install of the project, used from another folder.

The module's fixture copies the checkout, installs it with pip (no network, no build isolation: the
venv's Cython, setuptools and numpy build it) into a folder, and every check runs a fresh interpreter
with `-S` (no site-packages, so no editable install of the checkout is seen) whose path is that folder
and the folder holding numpy and scipy, in a working folder outside the checkout. It checks: one
top-level package (engine; models/ installed as engine.models), every console command's --help,
pretrained models by name (library and command), and a model file made from the checkpoint of a tiny
training run. The pretrained models' lookup and the checkpoint commands are also tested in the checkout.
"""
import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from formats import write_cifar10, write_mnist

import engine
from engine.catalog import PRETRAINED_ENV, PretrainedNotFound, pretrained_path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "examples" / "samples"
COMMANDS = {"flatnet-train", "flatnet-predict", "flatnet-evaluate", "flatnet-export", "flatnet-bench",
            "flatnet-makemodel"}
NOT_COPIED = (".venv", ".git", "build", "dist", "runs", "*.so", "*.egg-info", "__pycache__", ".pytest_cache",
              ".ruff_cache", "_kernels.c", "*.npz.tmp")


def dependency_folders():
    """The folders holding the run-time dependencies (numpy, scipy, tqdm; Pillow and onnx where installed)."""
    folders = []
    for name in ("numpy", "scipy", "tqdm", "PIL", "onnx"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            folder = str(Path(spec.origin).parents[1])
            if folder not in folders:
                folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site, work): the folder the project is installed in with `pip install --target`, and an empty work folder."""
    top = tmp_path_factory.mktemp("install")
    src, site = top / "src", top / "site"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_COPIED))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(site), str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    work = top / "work"
    work.mkdir()
    return site, work


def run(installed, *args, code=None, env=None):
    """A fresh interpreter that sees only the install and the dependencies, in the work folder."""
    site, work = installed
    path = os.pathsep.join([str(site)] + [f for f in dependency_folders() if f != str(site)])
    command = [sys.executable, "-S"] + (["-c", code] if code else []) + [str(a) for a in args]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600,
                          env=dict(PATH=os.environ.get("PATH", "/usr/bin:/bin"), PYTHONPATH=path,
                                   HOME=str(work), **(env or {})))


def entry_points(site):
    """{command: 'module:function'} from the installed distribution's entry_points.txt."""
    (info,) = site.glob("flatnet-*.dist-info")
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str
    parser.read(info / "entry_points.txt")
    return dict(parser["console_scripts"])


def command(installed, name, *args, env=None):
    """Run the installed console command `name` through its entry point (the wrapper pip --target writes would
    run its interpreter with the site-packages, where an editable install of the checkout may be)."""
    module, function = entry_points(installed[0])[name].split(":")
    return run(installed, *args, env=env, code=f"import sys; from {module} import {function} as main; "
                                               f"sys.argv[0] = {name!r}; sys.exit(main())")


@pytest.mark.slow
def test_one_top_level_package_is_installed(installed):
    site, _ = installed
    top = sorted(p.name for p in site.iterdir() if p.name not in ("bin", "__pycache__") and not p.name.endswith(".dist-info"))
    assert top == ["engine"]
    (info,) = site.glob("flatnet-*.dist-info")
    record = [line.split(",")[0] for line in (info / "RECORD").read_text().splitlines()]
    assert record and not [f for f in record if f.startswith(("models/", "pretrained/", "train.py"))]
    r = run(installed, code="import engine, engine.models.paper as p, engine.models.recipes as r; "
                            "print(engine.__file__); print(p.__file__); print(r.DEFAULT_RECIPE)\n"
                            "try:\n    import models\nexcept ImportError:\n    print('no models')")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(site / "engine" / "__init__.py")
    assert lines[1] == str(site / "engine" / "models" / "paper.py")
    assert lines[-1] == "no models"


@pytest.mark.slow
def test_every_subpackage_of_engine_is_installed(installed):
    site, _ = installed
    for folder in [ROOT / "engine", *(p for p in (ROOT / "engine").rglob("*") if p.is_dir())]:
        modules = {p.name for p in folder.glob("*.py")}
        if modules and "__pycache__" not in folder.parts:
            there = site / folder.relative_to(ROOT)
            assert modules <= {p.name for p in there.glob("*.py")}, f"{folder.relative_to(ROOT)} is not all installed"
    for name in ("paper.py", "recipes.py"):
        assert (site / "engine" / "models" / name).is_file()
    shipped = {p.name for p in (ROOT / "pretrained").iterdir() if p.suffix in (".npz", ".json")}
    assert shipped and shipped == {p.name for p in (site / "engine" / "pretrained_models").iterdir()}


@pytest.mark.slow
def test_every_console_command_answers_help(installed):
    scripts = entry_points(installed[0])
    assert COMMANDS <= set(scripts)
    for name in sorted(scripts):
        r = command(installed, name, "--help")
        assert r.returncode == 0, f"{name} --help: {r.stderr[-2000:]}"
        assert r.stdout.startswith(f"usage: {name} "), f"{name} --help: {r.stdout[:200]}"  # its own name
        r = command(installed, name, "--no-such-flag")
        assert r.returncode == 2 and r.stderr.startswith(f"{name}: error: ") and \
            r.stderr.strip().endswith(f"(see {name} --help)"), f"{name}: {r.stderr[-2000:]}"
    assert "Example (the README's main run): flatnet-train --model" in \
        " ".join(command(installed, "flatnet-train", "--help").stdout.split())


@pytest.mark.slow
def test_pretrained_models_by_name_from_the_install(installed):
    pytest.importorskip("PIL.Image", reason="reading PNG files needs Pillow")
    site, _ = installed
    r = run(installed, code=f"""
import numpy as np
from PIL import Image
import engine
print(engine.pretrained_path("flattened-mnist"))
model = engine.pretrained("flattened-mnist")
digit = np.asarray(Image.open({str(SAMPLES / "mnist" / "digit-7.png")!r}).convert("L"))
print(model.classes[model.classify(digit)[0]])
ship = np.asarray(Image.open({str(SAMPLES / "cifar10" / "ship.png")!r}).convert("RGB"))
cifar = engine.pretrained("flattened-cifar10")   # its ZCA matrix is in cifar10-zca.npz beside it
print(cifar.classes[cifar.classify(ship)[0]])
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(site / "engine" / "pretrained_models" / "flattened-mnist.npz"), "7", "ship"]
    r = command(installed, "flatnet-predict", "flattened-mnist", SAMPLES / "mnist" / "digit-7.png", "--top", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("digit-7.png: 7 100.0%"), r.stdout


@pytest.mark.slow
def test_a_missing_pretrained_file_says_what_to_do_in_one_line(installed):
    site, work = installed
    hidden = site / "engine" / "pretrained_models" / "baseline-mnist.npz"
    moved = work / "baseline-mnist.npz"
    shutil.move(hidden, moved)
    try:
        r = command(installed, "flatnet-evaluate", "baseline-mnist")
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: pretrained model baseline-mnist: ")
        assert PRETRAINED_ENV in r.stderr and "reinstall flatnet" in r.stderr
        r = command(installed, "flatnet-predict", "baseline-mnist", SAMPLES / "mnist" / "digits.npy", "--top", "1",
                    env={PRETRAINED_ENV: str(work)})  # the documented folder of one's own copies
        assert r.returncode == 0, r.stderr
        assert [line.split(": ")[1].split()[0] for line in r.stdout.splitlines()] == [str(i) for i in range(10)]
    finally:
        shutil.move(moved, hidden)


@pytest.mark.slow
def test_a_model_file_from_the_checkpoint_of_a_tiny_run_from_the_install(installed):
    _, work = installed
    write_mnist(work / "tiny", np.random.default_rng(0), n_train=256, n_test=64, learnable=True)
    data, run_dir = work / "tiny", work / "runs" / "tiny"
    r = command(installed, "flatnet-train", "--model", "flattened", "--dataset", "mnist", "--data-dir", data,
                "--cache-dir", work / "cache", "--epochs", "1", "--batch-size", "32", "--quiet", "--no-plot",
                "--out", run_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    accuracy = r.stdout.strip().splitlines()[-1]  # test accuracy: NN.NN%
    assert accuracy.startswith("test accuracy: ")
    (run_dir / "model.npz").rename(work / "model-of-the-run.npz")  # a stopped run has only its checkpoint
    r = command(installed, "flatnet-makemodel", run_dir / "checkpoint.npz", work / "made.npz")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {work / 'made.npz'}: flattened on mnist, after epoch 1 of 1")
    for model in (work / "made.npz", run_dir / "checkpoint.npz"):  # the file made, and the checkpoint itself
        r = command(installed, "flatnet-evaluate", model, "--data-dir", data, "--quiet",
                    "--compare", work / "model-of-the-run.npz")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[1].startswith(accuracy + " ("), lines[1]  # the run's last evaluation saw these weights
        assert " 0 of 64 predictions differ" in lines[2] and "largest logit difference 0 " in lines[2], lines[2]
    if importlib.util.find_spec("onnx") is not None:  # the checkpoint exported to ONNX directly
        r = command(installed, "flatnet-export", run_dir / "checkpoint.npz", work / "tiny.onnx")
        assert r.returncode == 0, r.stderr
        assert (work / "tiny.onnx").stat().st_size > 1000


# ----------------------------------------------------------------------------- in the checkout

def test_pretrained_names_find_the_checkouts_files_and_load():
    for name in engine.PRETRAINED:
        assert pretrained_path(name) == ROOT / "pretrained" / f"{name}.npz"
    digits = np.load(SAMPLES / "mnist" / "digits.npy")
    assert list(engine.pretrained("baseline-mnist").classify(digits)) == list(range(10))
    with pytest.raises(ValueError, match="the names are flattened-cifar10, baseline-cifar10"):
        engine.pretrained("flattened-cifar100")


def test_the_pretrained_folder_of_the_environment_comes_first(tmp_path, monkeypatch):
    (tmp_path / "flattened-mnist.npz").symlink_to(ROOT / "pretrained" / "flattened-mnist.npz")
    monkeypatch.setenv(PRETRAINED_ENV, str(tmp_path))
    assert pretrained_path("flattened-mnist") == tmp_path / "flattened-mnist.npz"
    assert pretrained_path("baseline-mnist") == ROOT / "pretrained" / "baseline-mnist.npz"  # the next folder


def test_a_missing_pretrained_file_is_one_line_naming_what_to_do(tmp_path, monkeypatch, capsys):
    from engine import catalog
    from engine.cli import predict
    monkeypatch.setattr(catalog, "pretrained_folders", lambda: [tmp_path])
    with pytest.raises(PretrainedNotFound) as e:
        engine.pretrained("flattened-mnist")
    assert str(tmp_path) in str(e.value) and PRETRAINED_ENV in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        predict.main(["flattened-mnist", str(SAMPLES / "mnist" / "digits.npy")])
    assert str(e.value.code).startswith("error: pretrained model flattened-mnist: flattened-mnist.npz is in none of")
    # a file of a pretrained model's name is that file, not the pretrained model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flattened-mnist").write_bytes(b"not a model")
    with pytest.raises(SystemExit) as e:
        predict.main(["flattened-mnist", str(SAMPLES / "mnist" / "digits.npy")])
    assert "truncated or corrupt model file" in str(e.value.code)


def python(*args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.slow
def test_a_cifar_checkpoint_makes_the_model_file_its_run_wrote(tmp_path):
    """The ZCA whitening comes from the data set's cached preprocessing: the model made from the checkpoint
    of a finished run predicts exactly as the model.npz the run wrote, and a checkpoint is accepted directly."""
    write_cifar10(tmp_path / "data", np.random.default_rng(0), n_train=10, n_test=6)
    r = python(ROOT / "train.py", "--model", "baseline", "--dataset", "cifar10", "--data-dir", "data", "--cache-dir",
               "cache", "--epochs", "1", "--batch-size", "25", "--quiet", "--no-plot", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = python("-m", "engine.makemodel", "run/checkpoint.npz", "made.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "loaded from cache" in r.stderr  # the run's preprocessing, not computed again
    made = engine.load(tmp_path / "made.npz")
    ran = engine.load(tmp_path / "run" / "model.npz")
    assert made.zca_matrix is not None and np.array_equal(made.zca_matrix, ran.zca_matrix)
    assert made.classes == ran.classes == [f"c{i}" for i in range(10)]
    assert made.meta["extra"]["checkpoint"] == dict(epoch=1, step_in_epoch=0, epochs=1)
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(made.predict(images), ran.predict(images))
    r = python("-m", "engine.predict", "run/checkpoint.npz", SAMPLES / "cifar10" / "ship.png", cwd=tmp_path)
    r2 = python("-m", "engine.predict", "run/model.npz", SAMPLES / "cifar10" / "ship.png", cwd=tmp_path)
    assert r.returncode == 0 and r2.returncode == 0, r.stderr + r2.stderr
    assert r.stdout == r2.stdout and "ship.png: c" in r.stdout


def test_the_checkpoint_commands_refuse_in_one_line(tmp_path):
    r = python("-m", "engine.makemodel", ROOT / "pretrained" / "flattened-mnist.npz", "x.npz", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().endswith("not a training checkpoint (train.py's OUT/checkpoint.npz)")
    r = python("-m", "engine.makemodel", "missing.npz", "x.npz", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, "error: no checkpoint at missing.npz\n")
    (tmp_path / "notes.npz").write_bytes(b"PK not really")
    r = python("-m", "engine.evaluate", "notes.npz", "--dataset", "mnist", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "notes.npz: truncated or corrupt model file" in r.stderr
    assert not (tmp_path / "x.npz").exists()
