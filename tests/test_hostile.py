"""Hostile and broken files: refused cheaply (time and memory bounded), never loaded silently wrong, one clear error.

Every test writes its own file: a bomb is a few MB of zeros compressed, or a header that lies.
The resource bounds are checked in a subprocess under RLIMIT_AS (a regression fails with
MemoryError instead of exhausting the machine), measuring the peak resident memory it adds.
"""
import gzip
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from formats import cifar_batch, idx_bytes, write_cifar10, write_mnist, write_pickle

import engine
from engine import Conv2d, Flatten, Flattened, Linear, MaxPool2d, ReLU, Sequential
from engine import data, npzfile
from engine.data import DatasetError
from engine.modelfile import ModelFileError
from engine.layers import LAYER_TYPES
from engine.checkpoint import CheckpointError
from engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SECONDS, MEGABYTES = 1.0, 100  # the bound on refusing any hostile file


# ----------------------------------------------------------------------------- helpers

def tiny_net(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2), Flatten(), Linear(32, 3, rng=rng),
                      names=["conv", "relu", "pool", "flat", "out"])


def tiny_model_file(path, seed=0):
    return engine.save_model(path, tiny_net(seed), (1, 8, 8), ["a", "b", "c"], {})


def npy(shape, descr="<f4", data=None, fortran=False):
    """npy bytes whose header says `shape` and `descr`, followed by `data` (default: exactly that many zeros)."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    if data is None:
        data = bytes(math.prod(shape) * np.dtype(descr).itemsize)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def npy_of(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def members_of(path):
    with zipfile.ZipFile(path) as z:
        return {n[:-4]: z.read(n) for n in z.namelist()}


def write_zip(path, members, compress=()):
    """An npz from raw npy bytes; members named in `compress` are deflated."""
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(name + ".npy", raw, zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED)
    return path


def meta_bytes(meta):
    return npy_of(np.array(json.dumps(meta)))


def model_meta(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(str(np.load(io.BytesIO(z.read("meta.npy")), allow_pickle=False)))


def with_meta(src, dst, change):
    m, arrays = model_meta(src), members_of(src)
    change(m)
    arrays["meta"] = meta_bytes(m)
    return write_zip(dst, arrays)


BOUNDED = r"""
import json, pathlib, resource, sys, time
sys.path[:0] = {paths!r}
import numpy as np, engine
from engine import checkpoint, data
def vm():
    return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm() + (1 << 30), resource.RLIM_INFINITY))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    {call}
    out = dict(error=None)
except Exception as e:
    out = dict(error=type(e).__name__, message=str(e))
out.update(seconds=time.perf_counter() - t0,
           grew_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
print(json.dumps(out))
"""


def bounded(call):
    """Run `call` (a statement) in a fresh process under RLIMIT_AS; its exception, seconds and added peak memory."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux's /proc to measure memory")
    code = BOUNDED.format(paths=[str(ROOT), str(ROOT / "tests")], call=call)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def assert_refused_cheaply(call, error, match):
    out = bounded(call)
    assert out["error"] == error, out
    assert match in out["message"], out
    assert out["seconds"] < SECONDS and out["grew_mb"] < MEGABYTES, out
    return out


# ----------------------------------------------------------------------------- 1. small files, huge costs

def test_architecture_is_checked_against_the_arrays_before_anything_is_built(tmp_path):
    src = tiny_model_file(tmp_path / "m.npz")

    def million_stages(m):
        m["architecture"][0] = dict(name="conv", type="Flattened", config=dict(c_in=1, c_out=2, k=3, stages=10**6))
    path = with_meta(src, tmp_path / "stages.npz", million_stages)
    assert path.stat().st_size < 5000
    out = assert_refused_cheaply(f"engine.load({str(path)!r})", "ModelFileError", "1000000 stages")
    assert len(out["message"]) < 500  # one line, not six million names

    def huge_linear(m):
        m["architecture"][-1]["config"] = dict(n_in=10**6, n_out=10**6)
    path = with_meta(src, tmp_path / "linear.npz", huge_linear)
    assert_refused_cheaply(f"engine.load({str(path)!r})", "ModelFileError",
                           "array param/out.bias has shape (3,), expected (1000000,)")


def test_npz_members_are_refused_by_name_and_header_before_their_data(tmp_path):
    src = tiny_model_file(tmp_path / "m.npz")
    arrays = members_of(src)
    junk = dict(arrays, junk=npy((64 << 20,), "|u1"))  # 64 MB of zeros, deflated to 64 KB
    path = write_zip(tmp_path / "junk.npz", junk, compress={"junk"})
    assert path.stat().st_size < 1 << 20
    assert_refused_cheaply(f"engine.load({str(path)!r})", "ModelFileError", "unexpected ['junk']")

    # a header claiming 4 TiB, in a member the format names (a checkpoint read without a model: any shape)
    meta = dict(epoch=0, step_in_epoch=0, running=dict(loss=0.0, correct=0, seen=0, seconds=0.0), history=[],
                data_rng=np.random.default_rng(0).bit_generator.state, model_rng=None, settings={}, config={}, version=1)
    path = write_zip(tmp_path / "tib.npz", {"meta": meta_bytes(meta), "param/w": npy((1 << 40,), "<f4", b"")})
    assert_refused_cheaply(f"checkpoint.load_checkpoint({str(path)!r})", "CheckpointError",
                           f"exceeds the limit of {npzfile.MAX_BYTES} bytes")


def test_deflated_member_larger_than_its_header_says_is_refused(tmp_path):
    src = tiny_model_file(tmp_path / "m.npz")
    arrays = members_of(src)
    arrays["param/out.bias"] = npy((3,), "<f4", bytes(100 << 20))  # the header says 12 bytes, 100 MB follow
    path = write_zip(tmp_path / "long.npz", arrays, compress={"param/out.bias"})
    assert_refused_cheaply(f"engine.load({str(path)!r})", "ModelFileError", "header declares 12 bytes")


def _any_arrays(meta, names):  # npzfile.load's reader for a file of any numeric arrays
    return {n: npzfile.Member(kinds="fiub") for n in names}


def test_compressed_files_give_back_every_array_exactly_and_smaller(tmp_path):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(100_000) * 0.02).astype(np.float32)
    arrays = dict(w=weights, h=weights[:999].astype(np.float16), d=rng.standard_normal((3, 5)),
                  order=rng.permutation(1000), small=np.arange(7, dtype=np.uint16), i=np.arange(-3, 3, dtype=np.int32),
                  mask=rng.random(9) < 0.5, scalar=np.float64(np.pi), empty=np.zeros((0, 3), np.float32),
                  fortran=np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
                  big_endian=weights[:10].astype(">f4"), big_endian_int=np.arange(-2, 3, dtype=">i8"),
                  strided=weights[::7])
    packed = npzfile.save(tmp_path / "packed.npz", arrays, dict(a=1), compress=True)
    back, meta = npzfile.load(packed, "file", npzfile.FileFormatError, _any_arrays)
    assert meta == dict(a=1)  # the format's own entry is not the caller's
    assert back.keys() == arrays.keys()
    for k, a in arrays.items():
        assert back[k].shape == np.shape(a) and back[k].dtype == np.asarray(a).dtype.newbyteorder("="), k
        np.testing.assert_array_equal(back[k], a, err_msg=k)
    assert back["w"].tobytes() == weights.tobytes()  # bit for bit, not just equal as numbers
    # byte-shuffled, the weights deflate to less than 95% of what plain deflate gives (measured: 92%)
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    assert packed.stat().st_size < 0.95 * (tmp_path / "deflated.npz").stat().st_size
    with np.load(packed, allow_pickle=False) as raw:  # numpy's loader sees bytes in rows, never wrong weights
        assert raw["w"].dtype == np.uint8 and raw["w"].shape == (4, 100_000)
        assert raw["mask"].dtype == bool and raw["mask"].shape == (9,)  # one byte a value: stored as it is
    with pytest.raises(ValueError, match="the file format's own entry"):
        npzfile.save(tmp_path / "x.npz", arrays, {npzfile.SHUFFLED: {}}, compress=True)


SHUFFLED_CASES = {  # (change to the entry of param/out.bias or the table, replacement member or None, problem)
    "table": (lambda t: "x", None, "byte_shuffled must map array names to [dtype, shape]"),
    "no entry": (lambda t: {k: v for k, v in t.items() if k != "param/out.bias"}, None,  # the rows as they are
                 "array param/out.bias has dtype uint8; expected floating-point"),
    "dtype list": (lambda t: dict(t, **{"param/out.bias": [["<f4"], [3]]}), None, "is not [dtype, shape]"),
    "huge dims": (lambda t: dict(t, **{"param/out.bias": ["<f4", [0, 1 << 40, 1 << 40]]}), None,
                  "is not [dtype, shape]"),
    "unknown": (lambda t: dict(t, nope=["<f4", [3]]), None, "byte_shuffled names 'nope', which is not one of"),
    "object": (lambda t: dict(t, **{"param/out.bias": ["|O", [3]]}), None, "is not [dtype, shape] of a numeric"),
    "complex": (lambda t: dict(t, **{"param/out.bias": ["<c8", [3]]}), None, "is not [dtype, shape] of a numeric"),
    "negative": (lambda t: dict(t, **{"param/out.bias": ["<f4", [-3]]}), None, "is not [dtype, shape] of a numeric"),
    "float dim": (lambda t: dict(t, **{"param/out.bias": ["<f4", [3.0]]}), None, "is not [dtype, shape]"),
    "integer": (lambda t: dict(t, **{"param/out.bias": ["<i4", [3]]}), None,
                "array param/out.bias has dtype int32; expected floating-point"),
    "format shape": (lambda t: dict(t, **{"param/out.bias": ["<f4", [4]]}), None,
                     "array param/out.bias has shape (4,), expected (3,)"),
    "header shape": (lambda t: dict(t, **{"param/out.bias": ["<f8", [3]]}), None,
                     "array param/out.bias has shape (4, 3), expected (8, 3)"),
    "not rows": (None, npy((3,), "<f4"), "array param/out.bias has dtype float32; expected unsigned integer"),
    "wide rows": (None, npy((4, 3), "<u2"), "byte-shuffled array param/out.bias is stored as uint16"),
    "fortran rows": (None, npy((4, 3), "|u1", fortran=True), "stored as uint8 (Fortran order), not uint8 rows"),
}


@pytest.mark.parametrize("case", sorted(SHUFFLED_CASES))
def test_a_byte_shuffled_member_is_checked_against_its_entry_and_the_format(tmp_path, case):
    change, member, match = SHUFFLED_CASES[case]
    src = engine.save_model(tmp_path / "m.npz", tiny_net(), (1, 8, 8), ["a", "b", "c"], {}, compress=True)
    np.testing.assert_array_equal(engine.load(src).net.params["out.bias"], tiny_net().params["out.bias"])
    m, arrays = model_meta(src), members_of(src)
    if change:
        m[npzfile.SHUFFLED] = change(m[npzfile.SHUFFLED])
    if member is not None:
        arrays["param/out.bias"] = member
    arrays["meta"] = meta_bytes(m)
    path = write_zip(tmp_path / "bad.npz", arrays)
    with pytest.raises(ModelFileError, match=re.escape(match)) as e:
        engine.load(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_a_byte_shuffled_entry_claiming_a_huge_array_is_refused_cheaply(tmp_path):
    # a checkpoint read without a model accepts any shape: the entry and the header agree on 2^40 values, no data
    meta = dict(epoch=0, step_in_epoch=0, running=dict(loss=0.0, correct=0, seen=0, seconds=0.0), history=[],
                data_rng=np.random.default_rng(0).bit_generator.state, model_rng=None, settings={}, config={}, version=1,
                **{npzfile.SHUFFLED: {"param/w": ["<f4", [1 << 40]]}})
    path = write_zip(tmp_path / "tib.npz", {"meta": meta_bytes(meta), "param/w": npy((4, 1 << 40), "|u1", b"")})
    assert_refused_cheaply(f"checkpoint.load_checkpoint({str(path)!r})", "CheckpointError",
                           f"exceeds the limit of {npzfile.MAX_BYTES} bytes")


def test_mnist_gzip_bomb_is_refused_after_the_header_size(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(tmp_path, np.random.default_rng(0))
    bomb = folder / "train-images-idx3-ubyte.gz"
    head = struct.pack(">BBBB3I", 0, 0, 8, 3, 20, 28, 28)
    with gzip.open(bomb, "wb", compresslevel=1) as f:  # 20 images announced, 64 MB of zeros follow
        f.write(head)
        for _ in range(8):
            f.write(bytes(8 << 20))
    assert bomb.stat().st_size < 2 << 20
    assert_refused_cheaply(f"data.read_idx(pathlib.Path({str(bomb)!r}), (28, 28))", "DatasetError",
                           "more data than the 15680 bytes its header declares")
    liar = folder / "t10k-images-idx3-ubyte.gz"
    liar.write_bytes(gzip.compress(struct.pack(">BBBB3I", 0, 0, 8, 3, 1 << 31, 28, 28)))
    assert_refused_cheaply(f"data.read_idx(pathlib.Path({str(liar)!r}), (28, 28))", "DatasetError",
                           f"announces {1 << 31} items, more than {data.MAX_IDX_ITEMS}")


def test_cifar_archive_bomb_is_refused_by_member_size(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(0), n_train=2, n_test=2, as_tar=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
    with gzip.open(archive, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as t:
        junk = tarfile.TarInfo("cifar-10-batches-py/junk.bin")
        junk.size = 64 << 20
        t.addfile(junk, io.BytesIO(bytes(junk.size)))
        for m, content in members:
            t.addfile(m, io.BytesIO(content) if content is not None else None)
    assert archive.stat().st_size < 2 << 20
    assert_refused_cheaply(f"data.load_cifar({str(tmp_path)!r}, download_ok=False)", "DatasetError",
                           "junk.bin of 67108864 bytes, more than 1048576")


# ----------------------------------------------------------------------------- 2. loaded silently wrong

def test_sequential_refuses_names_that_would_share_a_key():
    with pytest.raises(ValueError, match="layer name 'a' is used twice"):
        Sequential(Linear(2, 2), Linear(2, 2), names=["a", "a"])
    with pytest.raises(ValueError, match=r"parameter a.stage1.lateral.weight of layer 'a.stage1.lateral' collides "
                                         r"with layer 'a'"):
        Sequential(Flattened(2, 2, 3), Linear(2, 2), names=["a", "a.stage1.lateral"])
    with pytest.raises(ValueError, match="one non-empty string name per layer"):
        Sequential(Linear(2, 2), Linear(2, 2), names=["a", ""])
    with pytest.raises(ValueError, match="one non-empty string name per layer"):
        Sequential(Linear(2, 2), Linear(2, 2), names=["a"])


def test_model_file_with_duplicate_or_colliding_names_is_refused(tmp_path):
    src = tiny_model_file(tmp_path / "m.npz")
    path = with_meta(src, tmp_path / "dup.npz", lambda m: m["architecture"][1].update(name="conv"))
    with pytest.raises(ModelFileError, match=r"dup.npz: layer 1 of the architecture is invalid.*'conv'.*used twice"):
        engine.load(path)


def test_load_reproduces_the_saved_network_exactly(tmp_path):
    net = tiny_net(3)
    path = engine.save_model(tmp_path / "m.npz", net, (1, 8, 8), ["a", "b", "c"], {})
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    expect = engine.softmax(net.eval().forward(x).copy())
    for _ in range(2):  # and the same from one load to the next
        np.testing.assert_array_equal(engine.load(path, compiled=False).predict(x, preprocessed=True), expect)


def test_layer_shapes_from_configs_match_the_built_layers():
    rng = np.random.default_rng(0)
    for _ in range(30):
        a, b, k, s = (int(v) for v in rng.integers(1, 6, 4))
        for layer in (Conv2d(a, b, k, padding=k // 2), engine.Lateral(a, b), engine.Vertical(a, k),
                      engine.Horizontal(a, k), Flattened(a, b, k, stages=s), Linear(a, b), MaxPool2d(k), ReLU()):
            want = {name: p.shape for name, p in layer.params.items()}
            assert LAYER_TYPES[type(layer).__name__].param_shapes(layer.config()) == want


def test_cifar_archive_with_a_bad_crc_is_refused(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(0), n_train=2, n_test=2, as_tar=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    raw = bytearray(archive.read_bytes())
    raw[-8] ^= 1  # the trailer's CRC-32: everything before it decompresses as before
    archive.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz: truncated or corrupt archive.*CRC"):
        data.load_cifar(tmp_path, download_ok=False)


def test_mnist_with_a_bad_crc_or_corrupt_deflate_is_refused(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.gz: truncated or corrupt gzip.*CRC"):
        data.load_mnist(tmp_path, download_ok=False)
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(20)))[:10] + b"\xff" * 30)  # not deflate data
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.gz: truncated or corrupt gzip \(error"):
        data.load_mnist(tmp_path, download_ok=False)


@pytest.mark.parametrize("labels,what", [([0.0, 1.5], "float64"), ([0, float("nan")], "float64"),
                                         ([0, 2 ** 70], "object")])
def test_cifar_labels_must_be_integers(tmp_path, labels, what):
    write_cifar10(tmp_path, np.random.default_rng(0), n_train=2, n_test=2)
    d = cifar_batch(2, 10, np.random.default_rng(1))
    d[b"labels"] = labels
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2", d)
    with pytest.raises(DatasetError, match=rf"data_batch_2: labels must be integers, got {what} values"):
        data.load_cifar(tmp_path, download_ok=False)


def test_float64_weights_beyond_float32_are_refused(tmp_path):
    src = tiny_model_file(tmp_path / "m.npz")
    arrays = members_of(src)
    arrays["param/out.bias"] = npy_of(np.array([0.0, 1e39, 0.0]))  # finite as float64, inf as float32
    with pytest.raises(ModelFileError, match="array out.bias is not finite floating-point data as float32"):
        engine.load(write_zip(tmp_path / "big.npz", arrays))


# ----------------------------------------------------------------------------- 3. one line, not a traceback

@pytest.mark.parametrize("change,match", [
    (lambda m: m.update(preprocessing="gcn"), "preprocessing must be"),
    (lambda m: m.update(preprocessing=dict(gcn=dict(scale="x"))), "preprocessing must be"),
    (lambda m: m.update(classes=3), "classes must be a non-empty list of names"),
    (lambda m: m.update(classes=[1, 2, 3]), "classes must be a non-empty list of names"),
    (lambda m: m.update(input_shape=[1, 10 ** 6, 10 ** 6]), "input_shape must be"),
    (lambda m: m.update(input_shape=[1, 2, 2]), "does not fit the architecture"),
    (lambda m: m.update(input_shape=[1, 8, 12]), "does not fit the architecture"),  # Linear sees 48, not 32
    (lambda m: m["architecture"][0]["config"].update(dtype="float64"), "Conv2d takes"),
    (lambda m: m["architecture"][0]["config"].update(c_in=1.5), "c_in must be a positive integer"),
    (lambda m: m.update(architecture={}), "architecture must be a non-empty list"),
])
def test_model_file_settings_are_validated_at_load(tmp_path, change, match):
    path = with_meta(tiny_model_file(tmp_path / "m.npz"), tmp_path / "bad.npz", change)
    with pytest.raises(ModelFileError, match=match) as e:
        engine.load(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize("meta_raw,match", [
    (npy_of(np.array("[" * 100000 + "]" * 100000)), "nests deeper than 64 levels"),  # deeply nested JSON: measured before it is parsed
    (npy((), "<U2", b"").replace(b"'shape': ()", b"'shape': ((("), "TokenError"),  # a header numpy cannot parse
    (npy_of(np.array("{")), r"truncated or corrupt model file \(JSONDecodeError"),
    (npy_of(np.array("[1, 2]")), "not a flatnet model file"),
    (npy((), "<U4", b"{}"), "EOFError"),  # the header promises more than the member holds
    (npy_of(np.zeros(3)), "array meta has dtype float64"),
])
def test_unparseable_documents_are_model_file_errors(tmp_path, meta_raw, match):
    arrays = members_of(tiny_model_file(tmp_path / "m.npz"))
    arrays["meta"] = meta_raw
    with pytest.raises(ModelFileError, match=match):
        engine.load(write_zip(tmp_path / "bad.npz", arrays))


def test_empty_training_or_test_set_is_refused(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0), n_train=0)
    with pytest.raises(DatasetError, match="the train set is empty"):
        data.load_dataset("mnist", tmp_path, tmp_path / "cache", download_ok=False, log=lambda m: None)


def train_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_train_py_refuses_a_negative_seed_and_an_unwritable_out(tmp_path):
    r = train_py("--seed", "-1")
    assert r.returncode == 2 and "expected a non-negative integer, got '-1'" in r.stderr
    (tmp_path / "file").write_text("x")
    line = one_error_line(train_py("--out", tmp_path / "file", "--no-download", "--data-dir", tmp_path))
    assert "is not a writable folder" in line
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert "is not a writable folder" in one_error_line(train_py("--out", ro / "run", "--data-dir", tmp_path))
        finally:
            ro.chmod(0o700)


def test_a_new_run_refuses_a_folder_with_another_runs_log_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"epoch": 1}\n')
    line = one_error_line(train_py("--out", out, "--no-download", "--data-dir", tmp_path / "none"))
    assert "log.jsonl already exists" in line and "--overwrite" in line
    line = one_error_line(train_py("--out", out, "--overwrite", "--no-download", "--data-dir", tmp_path / "none"))
    assert "not found" in line and not (out / "log.jsonl").exists()  # the old log is gone, the data was missing


def test_images_and_outputs_of_the_other_clis_end_in_one_line(tmp_path, monkeypatch, capsys):
    from engine.cli import bench, export, filters, predict
    model = tiny_model_file(tmp_path / "m.npz")
    # a PNG header announcing 20000 x 20000 pixels (Pillow's decompression-bomb limit), no pixel data
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(png)
    pytest.importorskip("PIL")
    with pytest.raises(SystemExit, match=r"error: cannot read image .*bomb.png: .*exceeds limit"):
        predict.main([str(model), str(tmp_path / "bomb.png")])
    (tmp_path / "lie.npy").write_bytes(npy((1 << 40, 8, 8, 1), "|u1", b""))  # 64 TiB announced
    with pytest.raises(SystemExit, match=r"error: cannot read .*lie.npy"):
        predict.main([str(model), str(tmp_path / "lie.npy")])
    with pytest.raises(SystemExit, match=r"error: cannot write .*missing/m.onnx: folder .*missing does not exist"):
        export.main([str(model), str(tmp_path / "missing" / "m.onnx")])
    with pytest.raises(SystemExit, match=r"error: cannot write .*nothere/f.png"):
        filters.main([str(model), "--out", str(tmp_path / "nothere" / "f.png")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="error: drawing filters needs matplotlib"):
        filters.main([str(model), "--out", str(tmp_path / "f.png")])
    monkeypatch.undo()
    capsys.readouterr()
    for flag in ("--json", "--plot"):
        with pytest.raises(SystemExit) as e:  # refused before the benchmark runs, not after
            bench.main(["layers", "--sizes", "8", "--batch", "1", "--channels", "2", flag,
                        str(tmp_path / "nowhere" / "b.out")])
        assert e.value.code == 2
        text = capsys.readouterr()
        assert f"{flag} {tmp_path / 'nowhere' / 'b.out'}: folder" in text.err and "median_ms" not in text.out


# ----------------------------------------------------------------------------- checkpoints and run folders

def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return dict(train_x=rng.standard_normal((n, 1, 28, 28)).astype(np.float32), train_y=rng.integers(0, 10, n),
                test_x=rng.standard_normal((8, 1, 28, 28)).astype(np.float32), test_y=rng.integers(0, 10, 8))


def _trainer(out, data=None, **cfg):
    from models.paper import build
    config = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_drop_epochs=[1], seed=1)
    config.update(cfg)
    return Trainer(build("flattened", (1, 28, 28), 10, seed=1), data or _data(), config, out, log=lambda m: None,
                   progress=False, settings=dict(model="flattened"))


@pytest.fixture
def interrupted_run(tmp_path):
    """A run folder holding a checkpoint taken mid-epoch (batch order, momentum and generators saved)."""
    t = _trainer(tmp_path / "run")

    def stop(t):
        if t.epoch == 1 and t.step_in_epoch == 1:
            t.stop_requested = True
    t.on_step = stop
    assert t.run() == "interrupted"
    return tmp_path / "run" / "checkpoint.npz"


def _rewrite_checkpoint(src, dst, meta_change=None, arrays_change=None):
    """`src` with its JSON document and raw npy members changed; a member replaced or removed is no longer listed
    as byte-shuffled (a replacement is plain npy)."""
    arrays = members_of(src)
    m = json.loads(str(np.load(io.BytesIO(arrays["meta"]), allow_pickle=False)))
    if meta_change:
        meta_change(m)
    if arrays_change:
        before = dict(arrays)
        arrays_change(arrays)
        for name in before:
            if arrays.get(name) is not before[name]:
                m.get(npzfile.SHUFFLED, {}).pop(name, None)
    arrays["meta"] = meta_bytes(m)
    return write_zip(dst, arrays)


CHECKPOINT_CASES = {
    "version": (lambda m: m.update(version=2), None, "checkpoint version 2 is not 1"),
    "no settings": (lambda m: m.pop("settings"), None, "checkpoint lacks ['settings']"),
    "float epoch": (lambda m: m.update(epoch=1.5), None, "epoch and step_in_epoch must be non-negative integers"),
    "history": (lambda m: m.update(history=[]), None, "one record per finished epoch (1)"),
    "running": (lambda m: m["running"].update(loss="x"), None, "running totals"),
    "data rng": (lambda m: m["data_rng"].update(state="x"), None, "data_rng: "),
    "model rng": (lambda m: m.update(model_rng=dict(bit_generator="MT19937")), None, "model_rng: not a PCG64"),
    "param shape": (None, lambda a: a.update({"param/out.bias": npy_of(np.zeros(3, np.float32))}),
                    "array param/out.bias has shape (3,), expected (10,)"),
    "velocity shape": (None, lambda a: a.update({"velocity/out.bias": npy_of(np.zeros(3, np.float32))}),
                       "array velocity/out.bias has shape (3,), expected (10,)"),
    "unknown array": (None, lambda a: a.update({"velocity/nope": npy_of(np.zeros(3, np.float32))}),
                      "unexpected ['velocity/nope']"),
    "float order": (None, lambda a: a.update(perm=npy_of(np.arange(48.0))), "array perm has dtype float64"),
    "order range": (None, lambda a: a.update(perm=npy_of(np.arange(48) + 1)), "not a permutation"),
    "another data set": (None, lambda a: a.update(perm=npy_of(np.arange(60))), "array perm has shape (60,), "
                                                                                   "expected (48,)"),
    "no order": (lambda m: m.update(step_in_epoch=2), lambda a: a.pop("perm"), "step 2 of an epoch without"),
    "step": (lambda m: m.update(step_in_epoch=7), None, "step 7 of an epoch of 3 steps"),
    "nan weight": (None, lambda a: a.update({"param/out.bias": npy_of(np.full(10, np.nan, np.float32))}),
                   "out.bias is not finite"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_inconsistent_checkpoints_are_refused_before_a_step(interrupted_run, tmp_path, case):
    meta_change, arrays_change, match = CHECKPOINT_CASES[case]
    bad = _rewrite_checkpoint(interrupted_run, tmp_path / "bad.npz", meta_change, arrays_change)
    t = _trainer(tmp_path / "other")
    before = {k: v.copy() for k, v in t.model.params.items()}
    with pytest.raises(CheckpointError, match=re.escape(match)) as e:
        t.resume(bad)
    assert str(e.value).startswith(str(bad))
    for k, v in t.model.params.items():  # nothing was loaded
        np.testing.assert_array_equal(v, before[k])


def test_train_py_checks_a_checkpoints_settings_and_says_so_in_one_line(interrupted_run, tmp_path):
    from engine.cli.train import RUN_SETTINGS, settings_problem
    from models.recipes import LATER_SETTINGS
    good = dict(model="flattened", dataset="mnist", label_mode="fine", batch_size=16, lr=0.05, momentum=0.9,
                dampening=None, weight_decay=1e-4, lr_drop_epochs=[1], lr_drop_factor=0.1, seed=1, limit_train=None,
                limit_test=None, pool=[3, 2], pool_mode="ceil", flatten_first=False, stages=2, init="auto")
    assert set(good) == set(RUN_SETTINGS) - set(LATER_SETTINGS) and settings_problem(good) is None  # an older run's
    assert settings_problem(dict(good, augment="flip,crop4")) is None
    for key, value in (("model", "resnet"), ("dataset", "imagenet"), ("batch_size", 0), ("batch_size", 1.5),
                       ("lr", -1.0), ("lr", "0.1"), ("seed", -1), ("pool", [3]), ("flatten_first", 1),
                       ("lr_drop_epochs", "8"), ("augment", "crop0"), ("augment", "crop4,flip"), ("augment", 4)):
        assert settings_problem(dict(good, **{key: value})) == (f"setting {key} = {value!r} is not a valid "
                                                                f"--{key.replace('_', '-')}")
    assert settings_problem({k: v for k, v in good.items() if k != "init"}) == "settings lack 'init'"
    run = tmp_path / "cli"
    run.mkdir()
    _rewrite_checkpoint(interrupted_run, run / "checkpoint.npz", lambda m: m.update(settings=dict(good, model="x")))
    line = one_error_line(train_py("--resume", "--out", run, "--data-dir", tmp_path / "none"))
    assert line == f"error: {run / 'checkpoint.npz'}: setting model = 'x' is not a valid --model"
    _rewrite_checkpoint(interrupted_run, run / "checkpoint.npz", lambda m: m.pop("data_rng"))
    assert "checkpoint lacks ['data_rng']" in one_error_line(train_py("--resume", "--out", run))


def test_a_failed_write_leaves_no_temporary_file_and_train_py_says_why(tmp_path, monkeypatch):
    import errno

    def full_disk(f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        npzfile.save(tmp_path / "c.npz", {}, {})
    assert list(tmp_path.iterdir()) == []

    from engine.cli import train
    write_mnist(tmp_path / "data", np.random.default_rng(0), n_train=40, n_test=8)
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "mnist", "--epochs", "1", "--batch-size", "20", "--quiet", "--out",
                    str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")])
    assert str(e.value) == f"error: cannot write in {tmp_path / 'run'}: No space left on device"
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_the_log_follows_the_checkpoint_after_a_crash(tmp_path, monkeypatch):
    t = _trainer(tmp_path / "run", epochs=3)
    real = Trainer._write_log

    def crash_after_epoch_2(self):  # killed between the checkpoint and the log of epoch 2
        if self.epoch == 2:
            raise KeyboardInterrupt
        real(self)
    monkeypatch.setattr(Trainer, "_write_log", crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        t.run()
    monkeypatch.setattr(Trainer, "_write_log", real)
    log = tmp_path / "run" / "log.jsonl"
    assert len(log.read_text().splitlines()) == 1  # behind the checkpoint, never ahead of it or duplicated
    again = _trainer(tmp_path / "run", epochs=3)
    again.resume()
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    assert again.run() == "done"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records == again.history and [r["epoch"] for r in records] == [1, 2, 3]
    assert not list((tmp_path / "run").glob("*.tmp"))


# ----------------------------------------------------------------------------- the packed ZCA matrix

def _with_packed_zca(src, dst, packed_npy, input_shape=None):
    """The model file `src` with a ZCA mean and the packed-matrix member `packed_npy` (raw npy bytes)."""
    m, arrays = model_meta(src), members_of(src)
    if input_shape:
        m["input_shape"] = input_shape
    d = math.prod(m["input_shape"])
    arrays.update(meta=meta_bytes(m), zca_mean=npy((d,), "<f4", b"" if d > 1 << 20 else None),
                  zca_matrix_packed=packed_npy)
    return write_zip(dst, arrays, compress={"zca_matrix_packed"})


def test_a_packed_zca_member_is_checked_before_its_data(tmp_path):
    src = tiny_model_file(tmp_path / "m.npz")  # input (1, 8, 8): d = 64, 2080 values in the upper triangle
    good = _with_packed_zca(src, tmp_path / "good.npz", npy_of(np.eye(64, dtype=np.float16)[np.triu_indices(64)]))
    np.testing.assert_array_equal(engine.load(good).zca_matrix, np.eye(64))
    for name, raw, match in (
            ("size", npy((2081,), "<f2"), "array zca_matrix_packed has shape (2081,), expected (2080,)"),
            ("square", npy((64, 64), "<f4"), "array zca_matrix_packed has shape (64, 64), expected (2080,)"),
            ("dtype", npy((2080,), "<i4"), "array zca_matrix_packed has dtype int32; expected floating-point"),
            ("object", npy((2080,), "|O", b""), "array zca_matrix_packed has dtype object"),
            ("short", npy((2080,), "<f4", bytes(100)), "header declares 8320 bytes of data, the zip directory 100")):
        path = _with_packed_zca(src, tmp_path / f"{name}.npz", raw)
        with pytest.raises(ModelFileError, match=re.escape(match)) as e:
            engine.load(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_a_packed_zca_member_claiming_a_huge_size_is_refused_cheaply(tmp_path):
    src = tiny_model_file(tmp_path / "m.npz")
    # a header of 2^40 values, no data
    path = _with_packed_zca(src, tmp_path / "tib.npz", npy((1 << 40,), "<f4", b""))
    assert_refused_cheaply(f"engine.load({str(path)!r})", "ModelFileError",
                           f"array zca_matrix_packed has shape ({1 << 40},), expected (2080,)")
    # an input shape whose triangle is that large (d = 2^24: 1.4e14 values), the header agreeing, no data
    d = 1 << 24
    path = _with_packed_zca(src, tmp_path / "wide.npz", npy((d * (d + 1) // 2,), "<f2", b""), [1, 4096, 4096])
    assert path.stat().st_size < 10000
    assert_refused_cheaply(f"engine.load({str(path)!r})", "ModelFileError",
                           f"array zca_matrix_packed of shape ({d * (d + 1) // 2},) ({d * (d + 1)} bytes) exceeds "
                           f"the limit")
    # the right header followed by 100 MB of deflated zeros
    path = _with_packed_zca(src, tmp_path / "bomb.npz", npy((2080,), "<f2", bytes(100 << 20)))
    assert path.stat().st_size < 1 << 20
    assert_refused_cheaply(f"engine.load({str(path)!r})", "ModelFileError", "header declares 4160 bytes")
