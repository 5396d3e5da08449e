"""The README's examples work as pasted: its Python blocks run against a small model file this
test writes where the README's first run puts one, and its train.py commands parse."""
import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import engine
from models.paper import build

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def code_blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def test_python_blocks_run_as_pasted(tmp_path, monkeypatch, capsys):
    Image = pytest.importorskip("PIL.Image")
    blocks = code_blocks("python")
    assert len(blocks) >= 2 and any("engine.load(" in b and "Image.open(" in b for b in blocks)
    # What the README tells the reader to have: the first run's model file (an untrained
    # flattened CIFAR-10 network with its preprocessing) and an image file of another size.
    (tmp_path / "runs" / "first").mkdir(parents=True)
    engine.save_model(tmp_path / "runs" / "first" / "model.npz", build("flattened", (3, 32, 32), 10, seed=0),
                      (3, 32, 32), CIFAR10_CLASSES, dict(gcn=dict(scale=1.0, sqrt_bias=10.0, use_std=True)))
    rgba = np.random.default_rng(0).integers(0, 256, (48, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md, python block {i + 1}", "exec"), {"__name__": "readme"})
        out = capsys.readouterr().out
        assert out.strip(), f"python block {i + 1} printed nothing"
        assert "False" not in out.split(), f"python block {i + 1} printed False:\n{out}"


def train_py_commands():
    """The arguments of every `python train.py ...` command in the README's bash blocks."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:2] == ["python", "train.py"]:
                    commands.append(words[2:])
                elif words[:1] == ["mpirun"] and "train.py" in words:  # mpirun [its options] python train.py ...
                    i = words.index("train.py")
                    assert words[i - 1] == "python", part
                    commands.append(words[i + 1:])
    return commands


def test_train_py_commands_parse(capsys):
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
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
    import subprocess
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    sizes = {n: (ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file()}
    total = sum(sizes.values())
    biggest = sorted(sizes, key=sizes.get)[-3:]
    assert total < 40e6, f"{total / 1e6:.1f} MB tracked; the largest: {', '.join(biggest)}"
