"""Model files: save -> load round trip, refusal of bad files, predict on raw images, thread safety."""
import copy
import json
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

import engine
from engine.preprocess import ZCA, global_contrast_normalize
from engine.modelfile import ModelFileError
from engine.plan import compile_network
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
    assert model.plan is not None  # the CPU's compiled path
    expect = engine.softmax(net.eval().forward(x).copy())
    # The file holds exactly the weights: layer by layer, and compiled, the loaded model
    # gives bit for bit what the original network gives on the same path.
    np.testing.assert_array_equal(engine.load(path, compiled=False).predict(x, preprocessed=True), expect)
    np.testing.assert_array_equal(model.predict(x, preprocessed=True),
                                  compile_network(net, (1, 28, 28), softmax=True)(x))
    np.testing.assert_allclose(model.predict(x, preprocessed=True), expect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.predict(raw), expect, rtol=1e-4, atol=1e-6)  # same preprocessing inside
    np.testing.assert_allclose(model.predict(raw[0]), expect[:1], rtol=1e-4, atol=1e-6)  # a single HWC image
    np.testing.assert_allclose(model.predict(raw[..., 0]), expect, rtol=1e-4, atol=1e-6)  # grey NHW, no channel axis
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
    with pytest.raises(ModelFileError, match=r"missing \['param/out.bias'\]"):
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


def test_float_images_are_read_as_told(saved, tmp_path):
    path, _, raw, _ = saved
    model = engine.load(path)
    want = model.predict(raw)
    np.testing.assert_allclose(model.predict(raw.astype(np.float32)), want, rtol=1e-5, atol=1e-7)  # 0..255 floats
    with pytest.raises(ValueError, match="every value in 0..1: pass float_max=1.0"):
        model.predict(raw / 255.0)  # 0..1 floats would otherwise be taken for nearly black 0..255 images
    np.testing.assert_allclose(model.predict(raw / 255.0, float_max=1.0), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.classify(raw / 255.0, float_max=1.0), want.argmax(1))
    with pytest.raises(ValueError, match="float_max must be a positive number"):
        model.predict(raw / 255.0, float_max=0)
    np.save(tmp_path / "floats.npy", raw[:2] / 255.0)
    cli = [sys.executable, "-m", "engine.predict", str(path), str(tmp_path / "floats.npy")]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 1 and "pass --float-max 1" in r.stderr and len(r.stderr.splitlines()) == 1
    r = subprocess.run(cli + ["--float-max", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [line.split(": ")[1].split()[0] for line in r.stdout.splitlines()] == \
        [model.classes[i] for i in want[:2].argmax(1)]


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


def test_flip_averages_the_probabilities_of_each_image_and_its_mirror(saved, tmp_path):
    """predict(flip=True): the layer path's softmax of x and of x mirrored left-right (after preprocessing),
    averaged."""
    path, _, raw, x = saved
    sharp = engine.load(path, compiled=False)
    sharp.net.params["out.weight"] *= 30  # (a freshly initialized network's probabilities are all near 1/4)
    path = sharp.save(tmp_path / "sharp.npz")
    mirrored = np.ascontiguousarray(x[..., ::-1])
    layer = sharp.net.eval()
    plain = engine.softmax(layer.forward(x).copy())
    expect = (plain + engine.softmax(layer.forward(mirrored).copy())) / 2
    assert np.abs(expect - plain).max() > 0.02  # mirroring changes this network's answers (tolerance below: 1e-4)
    for compiled in (True, False):
        model = engine.load(path, compiled=compiled)
        np.testing.assert_allclose(model.predict(x, preprocessed=True, flip=True), expect, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(model.predict(raw, flip=True), expect, rtol=1e-4, atol=1e-6)
        assert model.classify(raw, flip=True).tolist() == expect.argmax(1).tolist()
    np.save(tmp_path / "batch.npy", raw[:4])
    r = subprocess.run([sys.executable, "-m", "engine.predict", str(path), str(tmp_path / "batch.npy"), "--top", "1",
                        "--flip"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = [line.split(": ")[1] for line in r.stdout.splitlines()]
    assert got == [f"{'abcd'[i]} {100 * p[i]:.1f}%" for i, p in zip(expect[:4].argmax(1), expect[:4])]


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
    assert "note" not in r.stderr  # the model's size and colour mode: nothing to say
    rgb = Image.fromarray(np.repeat(raw[1], 3, axis=2)).resize((40, 30))
    rgb.save(tmp_path / "colour.png")
    r = subprocess.run([sys.executable, "-m", "engine.predict", str(path), str(tmp_path / "colour.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"note: {tmp_path / 'colour.png'}: RGB converted to L, 40x30 resized to 28x28 (the model takes 28x28 L)\n"
    converted = np.asarray(rgb.convert("L").resize((28, 28), Image.BILINEAR))
    assert r.stdout.startswith(f"{tmp_path / 'colour.png'}: {model.classes[model.classify(converted)[0]]} ")
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


@pytest.mark.parametrize("model_name,shape,kw", [("baseline", (3, 32, 32), {}), ("flattened", (3, 32, 32), {}),
                                                 ("flattened", (1, 28, 28), dict(flatten_first=True, stages=3))])
def test_onnx_export_matches_the_engine(tmp_path, model_name, shape, kw):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from engine.cli.export import main as export_main
    net = build(model_name, shape, 10, seed=1, **kw)
    path = engine.save_model(tmp_path / "m.npz", net, shape, [str(i) for i in range(10)], {})
    export_main([str(path), str(tmp_path / "m.onnx")])
    x = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, engine.load(path).predict(x, preprocessed=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stages", [1, 2])
def test_filter_reconstruction_equals_the_composed_rank_one_filters(stages):
    from scipy.signal import convolve2d

    from engine.filterbank import reconstruct
    rng = np.random.default_rng(3)
    layer = engine.Flattened(3, 4, 3, stages=stages, dtype=np.float64)
    for p in layer.params.values():
        p[...] = rng.standard_normal(p.shape)
    bias_before = layer.params["stage1.lateral.bias"].copy()
    got = reconstruct(layer)
    p = layer.params

    def stage(s):  # V, H on input channels, then lateral: W[f, c] = alpha[f, c] * beta[c] (x) gamma[c]
        return np.einsum("fc,cy,cx->fcyx", p[f"stage{s}.lateral.weight"], p[f"stage{s}.vertical.weight"],
                         p[f"stage{s}.horizontal.weight"])

    expect = stage(1)
    if stages == 2:  # correlating twice = correlating once with the full convolution of the kernels
        w1, w2 = stage(1), stage(2)
        expect = np.array([[sum(convolve2d(w2[f, m], w1[m, c]) for m in range(w2.shape[1])) for c in range(3)]
                           for f in range(4)])
    assert got.shape == (4, 3, 2 * stages + 1, 2 * stages + 1)
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(layer.params["stage1.lateral.bias"], bias_before)  # biases restored


def test_filters_cli_draws_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from engine.cli.filters import main as filters_main
    net = build("flattened", (3, 32, 32), 10, seed=1, flatten_first=True)
    path = engine.save_model(tmp_path / "m.npz", net, (3, 32, 32), [str(i) for i in range(10)], {})
    filters_main([str(path), "--out", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").stat().st_size > 5000
    # conv1 flattened: 96 filters on the 3 input channels, 2 stages of 5 taps -> 9x9 (as in the image's title)
    assert capsys.readouterr().out == f"wrote {tmp_path / 'f.png'}: conv1, 96 filters 9x9 over 3 input channels\n"
    filters_main([str(path), "--out", str(tmp_path / "f2.png"), "--layer", "conv2"])
    assert "conv2, 128 filters 9x9 over 96 input channels" in capsys.readouterr().out


# ----------------------------------------------------------------------------- how the ZCA matrix is stored

def _zca_members(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename[:-4]: i for i in z.infolist() if i.filename.startswith("zca_")}


def test_zca_storage_forms_round_trip(saved, tmp_path):
    path, net, raw, x = saved  # written with the default, the full form (as every file before the packed forms)
    full = engine.load(path)
    assert set(_zca_members(path)) == {"zca_mean", "zca_matrix"}
    w = full.zca_matrix
    d = len(w)
    # what the packed forms store: the upper triangle, row by row (the lower one mirrors it)
    upper = np.triu(w) + np.triu(w, 1).T
    sizes = {"full": path.stat().st_size}
    for storage, dtype in (("packed", np.float32), ("packed16", np.float16)):
        p = engine.save_model(tmp_path / f"{storage}.npz", net, (1, 28, 28), ["a", "b", "c", "d"], full.preprocessing,
                              full.zca_mean, w, zca_storage=storage)
        sizes[storage] = p.stat().st_size
        members = _zca_members(p)
        assert set(members) == {"zca_mean", "zca_matrix_packed"}
        with zipfile.ZipFile(p) as z, z.open(members["zca_matrix_packed"]) as f:
            np.lib.format.read_magic(f)
            assert np.lib.format.read_array_header_1_0(f)[::2] == ((d * (d + 1) // 2,), np.dtype(dtype))
        m = engine.load(p)
        np.testing.assert_array_equal(m.zca_mean, full.zca_mean)
        # float32: exactly the upper triangle; float16: each entry rounded to float16, nothing else
        np.testing.assert_array_equal(m.zca_matrix, upper.astype(dtype).astype(np.float32))
        assert m.zca_matrix.dtype == np.float32 and m.zca_matrix.flags.c_contiguous
        tol = dict(rtol=1e-4, atol=1e-6) if storage == "packed" else dict(rtol=2e-2, atol=2e-3)
        np.testing.assert_allclose(m.predict(raw), full.predict(raw), **tol)
    matrix_bytes = d * d * 4
    assert sizes["full"] - sizes["packed"] > 0.49 * matrix_bytes
    assert sizes["full"] - sizes["packed16"] > 0.74 * matrix_bytes
    # a matrix that is exactly symmetric comes back bit for bit from the packed float32 form
    a = np.random.default_rng(1).standard_normal((d, d)).astype(np.float32)
    sym = (a + a.T) / 2
    p = engine.save_model(tmp_path / "sym.npz", net, (1, 28, 28), list("abcd"), {}, full.zca_mean, sym,
                          zca_storage="packed")
    np.testing.assert_array_equal(engine.load(p).zca_matrix, sym)


def test_packed_zca_is_refused_when_it_would_not_be_the_same_matrix(saved, tmp_path):
    _, net, _, _ = saved
    d = 784
    mean = np.zeros(d, np.float32)
    w = np.eye(d, dtype=np.float32)
    w[0, 1] = 0.5  # not symmetric
    for storage in ("packed", "packed16"):
        with pytest.raises(ValueError, match=r"not symmetric \(max \|W - W\^T\| = 0.5"):
            engine.save_model(tmp_path / "m.npz", net, (1, 28, 28), list("abcd"), {}, mean, w, zca_storage=storage)
    big = np.eye(d, dtype=np.float32) * 1e5
    with pytest.raises(ValueError, match="beyond float16's range"):
        engine.save_model(tmp_path / "m.npz", net, (1, 28, 28), list("abcd"), {}, mean, big, zca_storage="packed16")
    engine.save_model(tmp_path / "m.npz", net, (1, 28, 28), list("abcd"), {}, mean, big, zca_storage="packed")
    with pytest.raises(ValueError, match="zca_storage must be one of full, packed, packed16"):
        engine.save_model(tmp_path / "m.npz", net, (1, 28, 28), list("abcd"), {}, mean, w, zca_storage="half")
    assert not list(tmp_path.glob("*.tmp"))


def test_a_model_saved_again_compact_and_deflated_predicts_the_same(saved, tmp_path):
    path, _, raw, _ = saved
    model = engine.load(path)
    p = model.save(tmp_path / "small.npz", zca_storage="packed", compress=True)
    with zipfile.ZipFile(p) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    again = engine.load(p)
    assert again.meta == model.meta and again.classes == model.classes
    for k, v in model.net.params.items():
        np.testing.assert_array_equal(again.net.params[k], v)
    np.testing.assert_allclose(again.predict(raw), model.predict(raw), rtol=1e-4, atol=1e-6)


def test_float16_weights_are_each_weight_rounded_and_nothing_else(saved, tmp_path):
    path, net, raw, x = saved
    model = engine.load(path)
    p = model.save(tmp_path / "w16.npz", weights="float16")
    with zipfile.ZipFile(p) as z:
        dtypes = {}
        for i in z.infolist():
            if i.filename.startswith("param/"):
                with z.open(i) as f:
                    np.lib.format.read_magic(f)
                    dtypes[i.filename[:-4]] = np.lib.format.read_array_header_1_0(f)[2]
    assert set(dtypes) == {f"param/{k}" for k in net.params} and set(dtypes.values()) == {np.dtype(np.float16)}
    half = engine.load(p)
    for k, v in net.params.items():  # back in float32, each value the float16 nearest the original
        assert half.net.params[k].dtype == np.float32
        np.testing.assert_array_equal(half.net.params[k], np.asarray(v).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(half.zca_matrix, model.zca_matrix)  # the ZCA storage is a separate choice
    # what it predicts is the original network's answer with the rounded weights, run layer by layer
    rounded = copy.deepcopy(net)
    rounded.load_params({k: np.asarray(v).astype(np.float16).astype(np.float32) for k, v in net.params.items()})
    got = half.predict(x, preprocessed=True)
    np.testing.assert_allclose(got, engine.softmax(rounded.eval().forward(x).copy()), rtol=1e-4, atol=1e-6)
    full = model.predict(x, preprocessed=True)
    np.testing.assert_allclose(got, full, rtol=0, atol=2e-2)
    assert not np.array_equal(got, full)  # it did round
    param_bytes = sum(np.asarray(v).nbytes for v in net.params.values())
    assert path.stat().st_size - p.stat().st_size > 0.49 * param_bytes
    # weights beyond float16's range are refused, not written as inf
    big = copy.deepcopy(model)
    name = next(iter(big.net.params))
    big.net.params[name][...] = 1e5
    with pytest.raises(ValueError, match=f"weight {name} has entries up to 1e\\+05, beyond float16's range"):
        big.save(tmp_path / "big.npz", weights="float16")
    with pytest.raises(ValueError, match="weights must be one of float32, float16"):
        model.save(tmp_path / "x.npz", weights="int8")
    assert not (tmp_path / "big.npz").exists() and not list(tmp_path.glob("*.tmp"))


def test_zca_members_must_agree(saved, tmp_path):
    path = saved[0]
    model = engine.load(path)
    packed = model.save(tmp_path / "p.npz", zca_storage="packed")
    with pytest.raises(ModelFileError, match=r"holds the ZCA matrix twice \(zca_matrix and zca_matrix_packed\)"):
        engine.load(_rewrite(packed, tmp_path / "both.npz", lambda a: a.update(zca_matrix=model.zca_matrix)))
    with pytest.raises(ModelFileError, match="holds only one of the ZCA mean and matrix"):
        engine.load(_rewrite(packed, tmp_path / "nomean.npz", lambda a: a.pop("zca_mean")))
    with pytest.raises(ModelFileError, match="array zca_matrix_packed is not finite"):
        engine.load(_rewrite(packed, tmp_path / "inf.npz",
                             lambda a: a.update(zca_matrix_packed=np.full(a["zca_matrix_packed"].shape, np.inf,
                                                                          np.float16))))


# ----------------------------------------------------------------------------- a ZCA file shared by models

def test_models_share_one_zca_file(saved, tmp_path):
    path, net, raw, _ = saved
    model = engine.load(path)
    other = build("baseline", (1, 28, 28), 4, seed=6)
    folder = tmp_path / "shared"
    folder.mkdir()
    a = model.save(folder / "a.npz", zca_storage="packed16", weights="float16", zca_file="zca.npz")
    b = engine.save_model(folder / "b.npz", other, (1, 28, 28), model.classes, model.preprocessing, model.zca_mean,
                          model.zca_matrix, zca_storage="packed16", zca_file="zca.npz")
    assert sorted(p.name for p in folder.iterdir()) == ["a.npz", "b.npz", "zca.npz"]
    assert _zca_members(a) == {} and _zca_members(b) == {}  # the models hold no ZCA array themselves
    assert set(_zca_members(folder / "zca.npz")) == {"zca_mean", "zca_matrix_packed"}
    # the same matrix, mean and predictions as a model file holding its matrix in the same form
    alone = engine.load(model.save(tmp_path / "alone.npz", zca_storage="packed16", weights="float16"))
    for p in (a, b):
        m = engine.load(p)
        assert m.meta["version"] == 2 and m.meta["zca_file"]["name"] == "zca.npz"
        np.testing.assert_array_equal(m.zca_mean, alone.zca_mean)
        np.testing.assert_array_equal(m.zca_matrix, alone.zca_matrix)
    np.testing.assert_array_equal(engine.load(a).predict(raw), alone.predict(raw))
    # saved again with its own matrix (the default), a model file holds it again: version 1
    back = engine.load(engine.load(a).save(tmp_path / "back.npz", zca_storage="packed16"))
    assert back.meta["version"] == 1 and "zca_file" not in back.meta and set(_zca_members(tmp_path / "back.npz"))
    # a ZCA file is the same file for the same arrays: a third model reuses it, a model with another matrix is refused
    before = (folder / "zca.npz").read_bytes()
    model.save(folder / "c.npz", zca_storage="packed16", zca_file="zca.npz")
    assert (folder / "zca.npz").read_bytes() == before
    for storage, matrix in (("packed16", model.zca_matrix * 2), ("packed", model.zca_matrix)):
        with pytest.raises(ValueError, match="zca.npz holds another ZCA matrix"):
            engine.save_model(folder / "d.npz", net, (1, 28, 28), model.classes, model.preprocessing, model.zca_mean,
                              matrix, zca_storage=storage, zca_file="zca.npz")
    assert not (folder / "d.npz").exists() and (folder / "zca.npz").read_bytes() == before
    (folder / "notzca.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="notzca.npz exists and is not this model's ZCA file"):
        model.save(folder / "e.npz", zca_file="notzca.npz")
    for bad in ("../zca.npz", "sub/zca.npz", ".zca.npz", "/tmp/zca.npz", "zca.npy", "", 3):
        with pytest.raises(ValueError, match="zca_file must be a plain file name ending .npz"):
            model.save(folder / "f.npz", zca_file=bad)
    with pytest.raises(ValueError, match="zca_file given for a model without a ZCA matrix"):
        engine.save_model(folder / "g.npz", net, (1, 28, 28), model.classes, zca_file="zca.npz")
    with pytest.raises(ValueError, match="zca_file 'h.npz' is the model file's own name"):
        model.save(folder / "h.npz", zca_file="h.npz")
    (folder / "dir.npz").mkdir()
    with pytest.raises(ValueError, match="dir.npz exists and is not this model's ZCA file"):
        model.save(folder / "i.npz", zca_file="dir.npz")
    assert not any((folder / n).exists() for n in ("h.npz", "i.npz"))


def test_a_zca_file_holds_float32_and_can_be_deflated(saved, tmp_path):
    model = engine.load(saved[0])
    # a float64 matrix is stored as the float32 that load gives back, so the loaded model saves to the same ZCA file
    a = engine.save_model(tmp_path / "a.npz", model.net, (1, 28, 28), model.classes, model.preprocessing,
                          model.zca_mean.astype(np.float64), model.zca_matrix.astype(np.float64), zca_file="z.npz")
    before = (tmp_path / "z.npz").read_bytes()
    engine.load(a).save(tmp_path / "b.npz", zca_file="z.npz")
    assert (tmp_path / "z.npz").read_bytes() == before
    with np.load(tmp_path / "z.npz", allow_pickle=False) as z:
        assert z["zca_mean"].dtype == z["zca_matrix"].dtype == np.float32
    # compress=True deflates the ZCA file too, and it is the same arrays (a model names them, not the bytes)
    (tmp_path / "c").mkdir()
    c = model.save(tmp_path / "c" / "c.npz", zca_file="z.npz", compress=True)
    with zipfile.ZipFile(tmp_path / "c" / "z.npz") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    assert (tmp_path / "c" / "z.npz").stat().st_size < len(before)
    assert engine.load(c).meta["zca_file"] == engine.load(a).meta["zca_file"]


def test_a_model_file_is_refused_without_its_own_zca_file(saved, tmp_path):
    model = engine.load(saved[0])
    a = model.save(tmp_path / "a.npz", zca_storage="packed", zca_file="zca.npz")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a.npz").write_bytes(a.read_bytes())  # copied without its ZCA file
    with pytest.raises(ModelFileError, match="a.npz: its ZCA matrix is in zca.npz, which is not beside it: copy zca.npz"):
        engine.load(lone / "a.npz")
    # another matrix under that name (here: another model's) is refused, not used
    other = tmp_path / "other"
    other.mkdir()
    model.save(other / "b.npz", zca_storage="packed", zca_file="zca.npz", weights="float32")
    _rewrite(other / "zca.npz", lone / "zca.npz",
             lambda z: z.update(zca_matrix_packed=z["zca_matrix_packed"] * np.float32(1.5)))
    with pytest.raises(ModelFileError, match="zca.npz is not the ZCA file it was saved with"):
        engine.load(lone / "a.npz")
    # a ZCA file for other inputs, or not one at all, is refused by its own document before its arrays are read
    _rewrite(other / "zca.npz", lone / "zca.npz", _meta(lambda m: m.update(d=3 * 32 * 32)))
    with pytest.raises(ModelFileError, match="zca.npz: a ZCA matrix for inputs of 3072 values; the model's have 784"):
        engine.load(lone / "a.npz")
    _rewrite(other / "zca.npz", lone / "zca.npz", _meta(lambda m: m.update(format="flatnet-model")))
    with pytest.raises(ModelFileError, match="a.npz: its ZCA file zca.npz: not a flatnet ZCA file"):
        engine.load(lone / "a.npz")
    # a ZCA file must hold the mean and the matrix once
    for change in (lambda z: z.pop("zca_matrix_packed"), lambda z: z.update(zca_matrix=np.eye(784, dtype=np.float32))):
        _rewrite(other / "zca.npz", lone / "zca.npz", change)
        with pytest.raises(ModelFileError, match="holds its matrix once, as zca_matrix or zca_matrix_packed"):
            engine.load(lone / "a.npz")
    _rewrite(other / "zca.npz", lone / "zca.npz", lambda z: z.pop("zca_mean"))
    with pytest.raises(ModelFileError, match=r"missing \['zca_mean'\]"):
        engine.load(lone / "a.npz")
    (lone / "zca.npz").write_bytes((other / "zca.npz").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="a.npz: its ZCA file zca.npz: truncated or corrupt ZCA file"):
        engine.load(lone / "a.npz")


@pytest.mark.parametrize("ref", [dict(name="../zca.npz", sha256="0" * 64), dict(name="/etc/passwd", sha256="0" * 64),
                                 dict(name="sub/zca.npz", sha256="0" * 64), dict(name="zca.npz", sha256="x" * 64),
                                 dict(name="zca.npz"), "zca.npz", None])
def test_a_model_files_zca_reference_is_checked_before_any_file_is_opened(saved, tmp_path, ref):
    model = engine.load(saved[0])
    a = model.save(tmp_path / "a.npz", zca_storage="packed", zca_file="zca.npz")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "zca.npz").write_bytes((tmp_path / "zca.npz").read_bytes())  # where a bad name might lead
    bad = _rewrite(a, tmp_path / "bad.npz", _meta(lambda m: m.update(zca_file=ref)))
    with pytest.raises(ModelFileError, match="zca_file must be {name: a plain file name ending .npz"):
        engine.load(bad)


def test_a_model_files_version_says_where_its_zca_matrix_is(saved, tmp_path):
    model = engine.load(saved[0])
    a = model.save(tmp_path / "a.npz", zca_storage="packed", zca_file="zca.npz")
    # a version-2 file holding the ZCA arrays itself, or a version-1 file naming a ZCA file, disagrees with itself
    both = _rewrite(a, tmp_path / "both.npz", lambda z: z.update(zca_mean=model.zca_mean))
    with pytest.raises(ModelFileError, match=r"unexpected \['zca_mean'\]"):
        engine.load(both)
    v1 = _rewrite(a, tmp_path / "v1.npz", _meta(lambda m: m.update(version=1)))
    with pytest.raises(ModelFileError, match="a version-1 model file names no zca_file"):
        engine.load(v1)
