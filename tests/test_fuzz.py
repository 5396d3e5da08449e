"""Seeded mutation fuzz of the model file, checkpoint and IDX readers: the documented error is the only failure.

Each mutation (bit flips, overwritten, inserted or copied bytes, a cut) is loaded in this
process; the reader must return or raise its file kind's error (ModelFileError,
CheckpointError, DatasetError), nothing else. The default run is short; the long one is
marked `manual`: python -m pytest -m manual tests/test_fuzz.py
"""
import gzip

import numpy as np
import pytest
from formats import idx_bytes

import engine
from engine import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from engine.data import DatasetError, read_idx
from engine.modelfile import ModelFileError
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.trainer import Trainer


def mutate(raw, rng):
    b = bytearray(raw)
    op, at = rng.integers(5), int(rng.integers(len(b)))
    n = int(rng.integers(1, 9))
    if op == 0:
        for i in rng.integers(len(b), size=n):
            b[i] ^= 1 << int(rng.integers(8))
    elif op == 1:
        b[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif op == 2:
        del b[at:]
    elif op == 3:
        b[at:at] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    else:
        src = int(rng.integers(len(b)))
        b[at:at + 4 * n] = b[src:src + 4 * n]
    return bytes(b)


def net():
    rng = np.random.default_rng(0)
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2), Flatten(), Linear(8, 3, rng=rng),
                      names=["conv", "relu", "pool", "flat", "out"])


def fuzz(tmp_path, original, read, error, count, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "mutant"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(count):
        path.write_bytes(mutate(original, rng))
        try:
            read(path)
            outcomes["loaded"] += 1
        except error as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e), (i, str(e))
            outcomes["refused"] += 1
    assert outcomes["refused"] > count // 5, outcomes  # the mutations do reach the checks
    return outcomes


def model_case(tmp_path, compact=False):
    """A model file; compact=True: with a ZCA matrix packed in float16, every member deflated."""
    zca = {}
    if compact:
        a = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
        zca = dict(zca_mean=np.zeros(16, np.float32), zca_matrix=(a + a.T) / 2, zca_storage="packed16", compress=True)
    path = engine.save_model(tmp_path / "m.npz", net(), (1, 4, 4), ["a", "b", "c"], dict(gcn=dict(scale=1.0)), **zca)

    def read(p):
        m = engine.load(p)
        probs = m.predict(np.zeros((1, 4, 4, 1), np.uint8))
        assert np.isfinite(probs).all() and probs.shape == (1, 3)
    return path.read_bytes(), read, ModelFileError


def checkpoint_case(tmp_path):
    rng = np.random.default_rng(0)
    data = dict(train_x=rng.standard_normal((10, 1, 4, 4)).astype(np.float32), train_y=rng.integers(0, 3, 10),
                test_x=rng.standard_normal((4, 1, 4, 4)).astype(np.float32), test_y=rng.integers(0, 3, 4))
    cfg = dict(epochs=2, batch_size=4, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_drop_epochs=[1], seed=1)
    t = Trainer(net(), data, cfg, tmp_path / "run", log=lambda m: None, progress=False)
    t.on_step = lambda t: setattr(t, "stop_requested", t.epoch == 1 and t.step_in_epoch == 1)
    assert t.run() == "interrupted"
    shapes = {k: v.shape for k, v in t.model.params.items()}

    def read(p):
        load_checkpoint(p)
        load_checkpoint(p, shapes, 10)
        Trainer(net(), data, cfg, tmp_path / "run2", log=lambda m: None, progress=False).resume(p)
    return t.checkpoint_path.read_bytes(), read, CheckpointError


def idx_case(tmp_path, gz):
    raw = idx_bytes(np.random.default_rng(0).integers(0, 256, (6, 5, 5)))
    return (gzip.compress(raw) if gz else raw), lambda p: read_idx(p, (5, 5)), DatasetError


CASES = {"model file": model_case, "packed model file": lambda p: model_case(p, compact=True),
         "checkpoint": checkpoint_case,
         "idx": lambda p: idx_case(p, False), "idx.gz": lambda p: idx_case(p, True)}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_mutations_end_in_the_documented_error(tmp_path, kind):
    fuzz(tmp_path, *CASES[kind](tmp_path), count=400, seed=sorted(CASES).index(kind))


@pytest.mark.manual
@pytest.mark.parametrize("kind", sorted(CASES))
def test_long_fuzz(tmp_path, kind):
    fuzz(tmp_path, *CASES[kind](tmp_path), count=20000, seed=100 + sorted(CASES).index(kind))
