"""Model files: save -> load round trip, refusal of bad files, predict on raw images, thread safety."""
import json
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

import engine
from engine.data import ZCA, global_contrast_normalize
from engine.inference import ModelFileError
from models.paper import build


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(0)
    net = build("flattened", (1, 28, 28), 4, seed=5)  # (ZCA on MNIST-sized images, to keep the test fast)
    raw = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    gcn = dict(scale=1.0, sqrt_bias=10.0, use_std=True)
    flat = global_contrast_normalize(raw.transpose(0, 3, 1, 2).reshape(40, -1), **gcn)
    zca = ZCA(1.0).fit(flat)
    path = engine.save_model(tmp_path / "m.npz", net, (1, 28, 28), ["a", "b", "c", "d"], dict(gcn=gcn),
                             zca.mean.astype(np.float32), zca.matrix.astype(np.float32))
    x = zca.transform(flat).reshape(40, 1, 28, 28)
    return path, net, raw, x


def test_round_trip_gives_identical_predictions(saved):
    path, net, raw, x = saved
    model = engine.load(path)
    expect = engine.softmax(net.eval().forward(x).copy())
    np.testing.assert_array_equal(model.predict(x, preprocessed=True), expect)
    np.testing.assert_allclose(model.predict(raw), expect, rtol=1e-4, atol=1e-6)  # same preprocessing inside
    np.testing.assert_allclose(model.predict(raw[0]), expect[:1], rtol=1e-4, atol=1e-6)  # a single HWC image
    assert model.classify(x, preprocessed=True).tolist() == expect.argmax(1).tolist()
    assert model.classes == ["a", "b", "c", "d"]


def test_calls_from_many_threads_match_one_at_a_time(saved):
    path, _, raw, _ = saved
    model = engine.load(path)
    expect = [model.predict(raw[i:i + 5]) for i in range(0, 40, 5)]
    results = [None] * 8

    def work(i):
        for _ in range(3):
            results[i] = model.predict(raw[5 * i:5 * i + 5])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expect):
        np.testing.assert_array_equal(got, want)


def _rewrite(path, out, change):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(out, "wb") as f:
        np.savez(f, **arrays)
    return out


def _meta(change):
    def f(arrays):
        meta = json.loads(str(arrays["meta"]))
        change(meta)
        arrays["meta"] = np.array(json.dumps(meta))
    return f


def test_bad_model_files_are_refused_with_the_reason(saved, tmp_path):
    path = saved[0]
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        engine.load(cut)
    with pytest.raises(ModelFileError, match="version 99"):
        engine.load(_rewrite(path, tmp_path / "v.npz", _meta(lambda m: m.update(version=99))))
    with pytest.raises(ModelFileError, match=r"conv3.stage1.lateral.weight has shape \(3, 3\)"):
        engine.load(_rewrite(path, tmp_path / "s.npz",
                             lambda a: a.update({"param/conv3.stage1.lateral.weight": np.zeros((3, 3), np.float32)})))
    with pytest.raises(ModelFileError, match=r"missing \['out.bias'\]"):
        engine.load(_rewrite(path, tmp_path / "missing.npz", lambda a: a.pop("param/out.bias")))
    with pytest.raises(ModelFileError, match="layer 0 of the architecture is invalid"):
        engine.load(_rewrite(path, tmp_path / "a.npz",
                             _meta(lambda m: m["architecture"][0].update(type="os.system"))))
    with pytest.raises(ModelFileError, match="4 classes|outputs for 5 classes"):
        engine.load(_rewrite(path, tmp_path / "c.npz", _meta(lambda m: m.update(classes=list("abcde")))))
    with pytest.raises(ModelFileError, match="not finite"):
        engine.load(_rewrite(path, tmp_path / "n.npz",
                             lambda a: a.update({"param/out.bias": np.full(4, np.nan, np.float32)})))
    assert zipfile.is_zipfile(path)


def test_bad_images_are_refused(saved):
    model = engine.load(saved[0])
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28, 1\)"):
        model.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="preprocessed input of shape"):
        model.predict(np.zeros((2, 28, 28, 1), np.float32), preprocessed=True)


def test_inference_import_is_light():
    code = ("import sys, engine; m = engine.load; "
            "print(sorted(k for k in ('tqdm', 'matplotlib', 'cupy', 'engine.trainer', 'torch') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_predict_cli_on_png_and_npy(saved, tmp_path):
    path, _, raw, x = saved
    model = engine.load(path)
    np.save(tmp_path / "batch.npy", raw[:3])
    r = subprocess.run([sys.executable, "-m", "engine.predict", str(path), str(tmp_path / "batch.npy"), "--top", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    best = model.predict(raw[:3]).argmax(1)
    for line, b in zip(lines, best):
        assert line.split(": ")[1].split()[0] == model.classes[b]
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(raw[0][..., 0]).save(tmp_path / "digit.png")
    r = subprocess.run([sys.executable, "-m", "engine.predict", str(path), str(tmp_path / "digit.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{tmp_path / 'digit.png'}: {model.classes[best[0]]} ")
    r = subprocess.run([sys.executable, "-m", "engine.predict", str(tmp_path / "nope.npz"), str(tmp_path / "digit.png")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no model file" in r.stderr


def test_example_application_writes_a_csv(saved, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    path, _, raw, _ = saved
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(raw[i][..., 0]).save(folder / f"{i}.png")
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "classify_folder.py"
    r = subprocess.run([sys.executable, str(script), str(path), str(folder), str(tmp_path / "out.csv")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "out.csv").read_text().splitlines()
    model = engine.load(path)
    assert rows[0] == "file,class,probability" and len(rows) == 5
    assert rows[1].split(",")[1] == model.classes[model.classify(raw[:1])[0]]
