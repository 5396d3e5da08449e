"""The architecture as docs/architecture.md states it: the library's import graph has no circle and
never reaches the command-line code, models/ or tests/; importing and using a model pulls in none of
the application's or plotting's modules; a layer type added as the document says works everywhere
the document promises."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.layers import LAYER_TYPES, Layer, register
from engine.lowering import UnsupportedNetwork
from engine.trainstep import make_step

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "engine"


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_guard(node):
    """`if __name__ == "__main__":`, the one-line command aliases' only import of engine.cli."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imports(path, modules):
    """The modules `path` imports, at module level or inside functions, outside a __main__ guard."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            submodules = {f"{target}.{a.name}" for a in node.names} & set(modules)
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in `target` itself, not only its submodules
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.fixture(scope="module")
def graph():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # engine._kernels_<target> (built from engine/_kernels.pyx): imports nothing of ours; engine/_kernels.py
    # imports them by name at run time
    compiled = {f"engine._kernels_{t}" for t in ("baseline", "avx2", "avx512")}
    return {**{name: imports(path, files.keys() | compiled) for name, path in files.items()},
            **{name: set() for name in compiled}}


def test_the_import_graph_of_the_package_has_no_circle(graph):
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    state = {}

    def walk(m, trail):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                walk(t, trail + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            walk(m, [m])
    assert len(edges) > 30  # every module was read


def test_the_library_never_imports_commands_models_or_tests(graph):
    library = {m: targets for m, targets in graph.items() if not m.startswith("engine.cli")}
    assert "engine.model" in library and "engine.cli.predict" in graph
    for m, targets in library.items():
        bad = sorted(t for t in targets if t.split(".")[0] in ("models", "tests", "train")
                     or t.startswith(("engine.cli", "engine.models")))
        assert not bad, f"{m} imports {bad}"


def test_using_a_model_imports_nothing_of_the_application(tmp_path):
    """import engine, engine.load, Model.predict and the predict command: no models/, tests/, matplotlib, tqdm."""
    code = f"""
import json, sys
import numpy as np
import engine
model = engine.load({str(ROOT / "pretrained" / "flattened-mnist.npz")!r})
model.predict(np.zeros((2, 28, 28), np.uint8))
from engine.cli import predict
np.save({str(tmp_path / "x.npy")!r}, np.zeros((1, 28, 28, 1), np.uint8))
predict.main([{str(ROOT / "pretrained" / "flattened-mnist.npz")!r}, {str(tmp_path / "x.npy")!r}])
print(json.dumps(sorted(sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.splitlines()[-1])
    assert "engine.model" in loaded and "engine.cli.predict" in loaded
    unwanted = sorted(m for m in loaded if m.split(".")[0] in ("models", "tests", "matplotlib", "tqdm", "cupy")
                      or m.startswith("engine.models"))
    assert not unwanted, unwanted


# ----------------------------------------------------------------------------- a new layer type

class Scale(Layer):
    """y = x * weight[c] per channel: a layer type written as docs/architecture.md's step 1 says, nothing else."""

    kind = "scale"
    config_keys = ("channels",)

    @classmethod
    def param_shapes(cls, config):
        return {"weight": (int(config["channels"]),)}

    def __init__(self, channels, dtype=np.float32):
        super().__init__(dtype)
        self.channels = int(channels)
        self._add_param("weight", np.linspace(0.5, 1.5, self.channels))

    @property
    def in_channels(self):
        return self.channels

    def config(self):
        return dict(channels=self.channels)

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def forward(self, x):
        self._x = self._check_input(x, 4, self.channels)
        return self._x * self.params["weight"][None, :, None, None]

    def backward(self, dy):
        self.grads["weight"][...] = (dy * self._x).sum(axis=(0, 2, 3))
        return dy * self.params["weight"][None, :, None, None]


@pytest.fixture
def scale_registered():
    yield register(Scale)
    LAYER_TYPES.pop("Scale", None)


def small_net():
    return engine.Sequential(engine.Conv2d(1, 3, 3, padding=1, rng=0), Scale(3), engine.ReLU(), engine.Flatten(),
                             engine.Linear(3 * 6 * 6, 4, rng=1))


def test_a_new_layer_type_trains_and_its_model_file_loads(scale_registered, tmp_path):
    net = small_net()
    net.in_shape = (1, 6, 6)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 6, 6)).astype(np.float32), rng.integers(0, 4, 8)
    step, note = make_step(net, "auto", batch_size=8)
    assert step.name == "layers" and "scale" in note.lower()  # the compiled step refuses it and says why
    with pytest.raises(UnsupportedNetwork, match="Scale"):
        make_step(net, "compiled", batch_size=8)
    velocity, losses = {}, []
    for _ in range(30):
        losses.append(step.step(x, y, 0.05, 0.9, 0.0, 0.0, velocity)[0])
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(net.params["1.weight"], np.linspace(0.5, 1.5, 3))  # its parameter learned too
    engine.save_model(tmp_path / "m.npz", net, (1, 6, 6), list("abcd"))
    model = engine.load(tmp_path / "m.npz")
    assert model.plan is None and "Scale" in model.why_not_compiled  # predict runs the layers instead
    want = engine.softmax(net.eval().forward(x))
    np.testing.assert_allclose(model.predict(x, preprocessed=True), want, rtol=1e-5, atol=1e-6)


def test_a_model_file_with_an_unregistered_type_is_refused(scale_registered, tmp_path):
    net = small_net()
    engine.save_model(tmp_path / "m.npz", net, (1, 6, 6), list("abcd"))
    del LAYER_TYPES["Scale"]
    with pytest.raises(engine.ModelFileError, match="unknown layer type 'Scale'"):
        engine.load(tmp_path / "m.npz")
