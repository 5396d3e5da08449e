"""The README's examples work as pasted, from the repository root, on the files the repository ships.

Its Python blocks run (and print what their comments say they print); every `python -m engine.predict`,
`engine.evaluate`, `engine.export`, `engine.filters`, `engine.makemodel` and `python examples/...` line of its bash blocks
runs and exits 0 (the evaluations of the real test sets skip when ../shared/data is missing); its
train.py commands parse. The commands run in a copy of the repository root made of links to the
shipped files, plus the model file that the README's first run writes (an untrained network written
here) and a checkpoint (of one epoch on a tiny MNIST), so that nothing is written into the checkout.
"""
import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from formats import write_mnist
from models.paper import build

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHARED_DATA = ROOT.parent / "shared" / "data"
ACCURACY = json.loads((ROOT / "pretrained" / "accuracy.json").read_text())
RUN_COMMANDS = ("engine.predict", "engine.evaluate", "engine.export", "engine.filters", "engine.makemodel")
# what each shipped sample shows, as a class name of the models it is for
SAMPLE_CLASSES = {"ship.png": "ship", "airplane.png": "airplane", "car.png": "automobile",
                  **{f"digit-{i}.png": str(i) for i in range(10)}}


def code_blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def bash_commands():
    """The words of every command of the README's bash blocks (`a && b` is two commands)."""
    return [words for block in code_blocks("bash") for line in block.splitlines()
            for part in line.split("&&") if (words := shlex.split(part, comments=True))]


def runnable_commands():
    """The README's commands that this test runs: the engine's model tools and the examples."""
    return [words for words in bash_commands()
            if words[:2] == ["python", "-m"] and words[2] in RUN_COMMANDS
            or words[0] == "python" and len(words) > 1 and words[1].startswith("examples/")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repository root as the README's reader has it after the first run, made of links."""
    top = tmp_path_factory.mktemp("clone")
    repo = top / "repo"
    repo.mkdir()
    for name in ("engine", "models", "pretrained", "examples", "docs", "train.py"):
        (repo / name).symlink_to(ROOT / name)
    if SHARED_DATA.is_dir():
        (top / "shared").mkdir()
        (top / "shared" / "data").symlink_to(SHARED_DATA)
    # the first run's model file: `train.py --model flattened --dataset mnist ... --out runs/first`
    (repo / "runs" / "first").mkdir(parents=True)
    # and its checkpoint: of one epoch on a tiny MNIST written here, which the checkpoint names as its data
    write_mnist(top / "tiny", np.random.default_rng(0), n_train=64, n_test=16, learnable=True)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "flattened", "--dataset", "mnist",
                        "--data-dir", str(top / "tiny"), "--cache-dir", str(top / "cache"), "--epochs", "1",
                        "--batch-size", "32", "--quiet", "--no-plot", "--out", str(top / "first")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (top / "first" / "checkpoint.npz").rename(repo / "runs" / "first" / "checkpoint.npz")
    engine.save_model(repo / "runs" / "first" / "model.npz", build("flattened", (1, 28, 28), 10, seed=0),
                      (1, 28, 28), [str(i) for i in range(10)], dict(gcn=dict(scale=1.0, sqrt_bias=10.0, use_std=True)))
    return repo


def test_python_blocks_run_as_pasted(repo, monkeypatch, capsys):
    pytest.importorskip("PIL.Image")
    blocks = code_blocks("python")
    assert len(blocks) >= 2 and any("engine.load(" in b and "Image.open(" in b for b in blocks)
    monkeypatch.chdir(repo)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md, python block {i + 1}", "exec"), {"__name__": "readme"})
        out = capsys.readouterr().out
        assert out.strip(), f"python block {i + 1} printed nothing"
        assert "False" not in out.split(), f"python block {i + 1} printed False:\n{out}"
        # a print(...) line's comment is what it prints
        said = [line.split("#", 1)[1].strip() for line in block.splitlines()
                if line.startswith("print(") and "#" in line]
        printed = out.splitlines()
        assert len(said) <= len(printed)
        for want in said:
            assert want in printed, f"python block {i + 1} did not print {want!r}:\n{out}"


def test_the_readme_runs_the_engine_tools_and_examples():
    commands = runnable_commands()
    tools = {words[2] if words[1] == "-m" else words[1] for words in commands}
    assert set(RUN_COMMANDS) <= tools and "examples/classify_folder.py" in tools
    assert any(w[2] == "engine.evaluate" and "../shared/data" in w for w in commands)
    # every file a command reads from the checkout is shipped (tracked or not ignored)
    for words in commands:
        for w in words[2:]:
            if w.startswith(("pretrained/", "examples/")):
                assert (ROOT / w).exists(), f"{shlex.join(words)}: {w} is not in the repository"


def expected_classes(words, stdout):
    """(image, class the README says it shows) for each line a pretrained model printed for a sample."""
    for line in stdout.splitlines():
        name, _, answer = line.partition(": ")
        top = answer.split(",")[0].rsplit(" ", 1)[0]
        if m := re.search(r"digits\.npy\[(\d)\]$", name):  # the drawn digits 0..9 in order
            yield name, top, m.group(1)
        elif Path(name).name in SAMPLE_CLASSES:
            yield name, top, SAMPLE_CLASSES[Path(name).name]


@pytest.mark.parametrize("words", runnable_commands(), ids=lambda words: shlex.join(words[1:])[:80])
def test_command_runs_as_pasted(words, repo):
    if "../shared/data" in words and not SHARED_DATA.is_dir():
        pytest.skip(f"reads the real data set, and {SHARED_DATA} is missing")
    if any(w.endswith((".png", ".jpg")) for w in words) or words[1].startswith("examples/"):
        pytest.importorskip("PIL.Image", reason="reading PNG files needs Pillow")
    if "engine.export" in words:
        pytest.importorskip("onnx", reason="engine.export needs onnx")
    if "engine.filters" in words:
        pytest.importorskip("matplotlib", reason="engine.filters needs matplotlib")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable] + words[1:], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{shlex.join(words)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    model = next((w for w in words if w.endswith(".npz") or w in engine.PRETRAINED), "")
    if model in engine.PRETRAINED:  # a pretrained model by name: its file's checks
        model = f"pretrained/{model}.npz"
    if words[2:3] == ["engine.predict"] and model.startswith("pretrained/"):
        checked = list(expected_classes(words, r.stdout))
        assert checked, r.stdout
        for name, top, want in checked:
            assert top == want, f"{model} reads {name} as {top}, not {want}"
    if words[2:3] == ["engine.evaluate"] and model.startswith("pretrained/") and "--limit" not in words:
        line = next(l for l in r.stdout.splitlines() if l.startswith("test accuracy: "))
        want = ACCURACY[Path(model).name]["flip_accuracy" if "--flip" in words else "test_accuracy"]
        assert line.split()[2] == f"{want:.2f}%", f"{model}: {line}; pretrained/accuracy.json says {want:.2f}%"
    if words[1] == "examples/classify_folder.py":
        with open(repo / words[-1], newline="") as f:
            rows = list(csv.DictReader(f))
        assert {row["file"] for row in rows} == {p.name for p in (ROOT / words[3]).iterdir()}
        for row in rows:
            assert row["class"] == SAMPLE_CLASSES[row["file"]], row


def test_every_engine_module_the_readme_runs_exists():
    for words in bash_commands():
        if words[:2] == ["python", "-m"] and words[2].startswith("engine."):
            assert importlib.util.find_spec(words[2]) is not None, shlex.join(words)


def test_the_samples_are_drawn_by_their_script(tmp_path):
    """examples/make_samples.py draws the shipped samples' files, and its digits read as 0 to 9."""
    pytest.importorskip("PIL.Image")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_samples.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shipped = ROOT / "examples" / "samples"
    names = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == names
    for name in names:
        assert (shipped / name).stat().st_size < 16_000, f"{name}: a sample should be a few KB"
    digits = np.load(tmp_path / "mnist" / "digits.npy")
    assert digits.shape == (10, 28, 28) and digits.dtype == np.uint8
    for model in ("flattened-mnist.npz", "baseline-mnist.npz"):
        assert list(engine.load(ROOT / "pretrained" / model).classify(digits)) == list(range(10)), model


def train_py_commands():
    """The arguments of every `python train.py ...` command in the README's bash blocks."""
    commands = []
    for words in bash_commands():
        if words[:2] == ["python", "train.py"]:
            commands.append(words[2:])
        elif words[:1] == ["mpirun"] and "train.py" in words:  # mpirun [its options] python train.py ...
            i = words.index("train.py")
            assert words[i - 1] == "python", shlex.join(words)
            commands.append(words[i + 1:])
    return commands


def test_train_py_commands_parse(capsys):
    from engine.cli import train
    commands = train_py_commands()
    assert len(commands) >= 5 and ["--out", "runs/flattened-cifar10", "--resume"] in commands
    for args in commands:
        try:
            train.parser().parse_args(args)
        except SystemExit as e:  # --help exits with 0; a bad flag with 2 and a message
            assert e.code == 0 and args == ["--help"], f"python train.py {shlex.join(args)}: {capsys.readouterr().err}"


def test_the_checked_out_files_stay_under_40_mb():
    """A checkout must fit whole on a GPU machine (issue 12): trained models and run checkpoints included."""
    import shutil
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    sizes = {n: (ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file()}
    total = sum(sizes.values())
    biggest = sorted(sizes, key=sizes.get)[-3:]
    assert total < 40e6, f"{total / 1e6:.1f} MB tracked; the largest: {', '.join(biggest)}"
