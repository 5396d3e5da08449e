"""Model files: a trained network, its input shape, classes and preprocessing in one safe .npz.

A model file is one ``.npz`` written with ``allow_pickle=False``: every weight array
(``param/<name>``), the ZCA mean and matrix when the data was whitened, and a JSON
document (``meta``, a string array) with a format version, the architecture (each
layer's type and constructor arguments), the input shape, the class names and the
preprocessing settings. Loading never executes anything from the file.

The ZCA matrix W (d x d, d = C*H*W) is symmetric, W = U diag((s + eps)^-1/2) U^T. It is
stored either whole (``zca_matrix``, float32: 38 MB for CIFAR) or as its upper triangle,
row by row (``zca_matrix_packed``: W[0, 0:], W[1, 1:], ..., d(d+1)/2 values, float32 or
float16), which `save_model(..., zca_storage=...)` chooses; `load` reads every form.
Models whitened with the same matrix may share it: `save_model(..., zca_file="cifar10-zca.npz")`
writes the mean and matrix once, to that file beside the model file (a "ZCA file": an .npz of
the same arrays with its own JSON document), and the model file (version 2) names it with the
SHA-256 of its arrays; `load` reads it from beside the model file and refuses one that is
missing or is not the same matrix. A version-1 file holds its matrix itself.
The weights are float32, or float16 with `save_model(..., weights="float16")` (half the
size, each weight rounded to float16); `load` turns them back into float32.

"""
import hashlib
import math
import re
from pathlib import Path

import numpy as np

from . import layers as L
from . import npzfile
from .runtime import to_numpy

FORMAT = "flatnet-model"
VERSION = 1          # a model file that holds its ZCA matrix, if any, itself
VERSION_ZCA_FILE = 2  # one whose ZCA mean and matrix are in a ZCA file beside it (meta["zca_file"])
ZCA_FORMAT = "flatnet-zca"
# The pretrained models' names (engine/catalog.py finds their files); a missing path named after one points there.
PRETRAINED = ("flattened-cifar10", "baseline-cifar10", "flattened-mnist", "baseline-mnist")
ZCA_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.npz")  # a plain file name: no folder, nothing hidden


class ModelFileError(npzfile.FileFormatError):
    """A model file is unreadable, truncated, of an unknown version, or disagrees with itself."""

    what = "model file"


MAX_LAYERS = 10_000          # entries of an architecture, and parameter arrays in all
MAX_ACTIVATION = 1 << 25     # elements of one image's input or of any layer's output for one image
GCN_KEYS = {"scale", "sqrt_bias", "use_std", "min_divisor"}


def architecture(net):
    """The layer list of a Sequential as JSON-able dicts: name, type, constructor arguments."""
    arch = []
    for name, layer in net.children:
        kind = type(layer).__name__
        if L.LAYER_TYPES.get(kind) is not type(layer):
            raise ValueError(f"cannot save layer {name} of type {kind}")
        arch.append(dict(name=name, type=kind, config=layer.config()))
    return arch


def architecture_shapes(arch):
    """{parameter name: shape} of an architecture list, validated (types, keys, bounds), before anything is built."""
    if not isinstance(arch, list) or not arch:
        raise ValueError("architecture must be a non-empty list of layers")
    if len(arch) > MAX_LAYERS:
        raise ValueError(f"architecture of {len(arch)} layers, more than {MAX_LAYERS}")
    shapes, names = {}, set()
    for i, entry in enumerate(arch):
        try:
            if not isinstance(entry, dict) or set(entry) != {"name", "type", "config"}:
                raise ValueError("expected a dict with name, type and config")
            name, kind, config = entry["name"], entry["type"], entry["config"]
            if not isinstance(name, str) or not name or name in names:
                raise ValueError(f"layer name {name!r} is empty, not a string or used twice")
            if kind not in L.LAYER_TYPES:
                raise ValueError(f"unknown layer type {kind!r}")
            keys = L.LAYER_TYPES[kind].config_keys
            if not isinstance(config, dict) or not set(config) <= set(keys):
                raise ValueError(f"{kind} takes {sorted(keys)}, got {config!r:.200}")
            names.add(name)
            for k, shape in L.LAYER_TYPES[kind].param_shapes(config).items():
                if f"{name}.{k}" in shapes:
                    raise ValueError(f"parameter {name}.{k} collides with another layer's")
                shapes[f"{name}.{k}"] = shape
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"layer {i} of the architecture is invalid ({type(e).__name__}: {e})") from None
        if len(shapes) > MAX_LAYERS:
            raise ValueError(f"more than {MAX_LAYERS} parameter arrays")
    return shapes


def build_architecture(arch):
    """Rebuild a Sequential from `architecture(...)` output, validating every entry."""
    architecture_shapes(arch)
    layers = []
    for i, entry in enumerate(arch):
        try:
            layers.append(L.LAYER_TYPES[entry["type"]](**entry["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {i} of the architecture is invalid ({type(e).__name__}: {e})") from None
    return L.Sequential(*layers, names=[entry["name"] for entry in arch], check_finite=True)


ZCA_STORAGE = ("full", "packed", "packed16")
WEIGHT_STORAGE = ("float32", "float16")
SYMMETRY_RTOL = 1e-5  # how far from symmetric a ZCA matrix may be to be stored packed (relative to its largest entry)


def pack_upper(matrix):
    """The upper triangle of a square matrix, row by row: m[0, 0:], m[1, 1:], ... (d(d+1)/2 values)."""
    return np.concatenate([matrix[i, i:] for i in range(len(matrix))])


def unpack_upper(packed, d):
    """The symmetric d x d float32 matrix whose upper triangle `pack_upper` gave as `packed`."""
    if len(packed) != d * (d + 1) // 2:
        raise ValueError(f"{len(packed)} values for the upper triangle of a {d} x {d} matrix, "
                         f"expected {d * (d + 1) // 2}")
    out = np.empty((d, d), np.float32)
    start = 0
    for i in range(d):
        row = packed[start:start + d - i]
        out[i, i:] = row
        out[i:, i] = row
        start += d - i
    return out


def _zca_arrays(zca_mean, zca_matrix, storage):
    """The model file's ZCA members: the mean, and the matrix whole or packed (see the module's docstring)."""
    if storage not in ZCA_STORAGE:
        raise ValueError(f"zca_storage must be one of {', '.join(ZCA_STORAGE)}, got {storage!r}")
    zca_mean = np.asarray(zca_mean, np.float32)  # (what load makes of any form)
    if storage == "full":
        return dict(zca_mean=zca_mean, zca_matrix=np.asarray(zca_matrix, np.float32))
    w = np.asarray(zca_matrix)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"the ZCA matrix must be square, got shape {w.shape}")
    scale = float(np.abs(w).max()) if w.size else 0.0
    asymmetry = float(np.abs(w - w.T).max()) if w.size else 0.0
    if not asymmetry <= SYMMETRY_RTOL * scale:
        raise ValueError(f"the ZCA matrix is not symmetric (max |W - W^T| = {asymmetry:.3g}, max |W| = {scale:.3g}): "
                         f"store it with zca_storage='full'")
    dtype = np.float16 if storage == "packed16" else np.float32
    if dtype == np.float16 and not scale <= float(np.finfo(np.float16).max):
        raise ValueError(f"the ZCA matrix has entries up to {scale:.3g}, beyond float16's range: "
                         f"store it with zca_storage='packed' or 'full'")
    return dict(zca_mean=zca_mean, zca_matrix_packed=pack_upper(w).astype(dtype))


def zca_digest(arrays):
    """SHA-256 (hex) of ZCA arrays as stored (names, little-endian dtypes, shapes, bytes): a model file names its ZCA
    file by it, so that zip timestamps or a rewrite of the same arrays do not matter."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{name}:{a.dtype.str}:{list(a.shape)};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _zca_members(d, required):
    """The ZCA arrays a file may hold for inputs of d values: the mean, and the matrix whole or packed."""
    return {"zca_mean": npzfile.Member((d,), required=required),
            "zca_matrix": npzfile.Member((d, d), required=False),
            "zca_matrix_packed": npzfile.Member((d * (d + 1) // 2,), required=False)}  # (its upper triangle)


def _zca_file_reader(d):
    """npzfile.load's `members` for a ZCA file that must fit inputs of d values."""
    def members(meta, names=None):
        if meta.get("format") != ZCA_FORMAT or meta.get("version") != 1:
            raise ValueError("not a flatnet ZCA file (version 1)")
        if meta.get("d") != d:
            raise ValueError(f"a ZCA matrix for inputs of {meta.get('d')!r:.50} values; the model's have {d}")
        if names is not None and sum(n in names for n in ("zca_matrix", "zca_matrix_packed")) != 1:
            raise ValueError("a ZCA file holds its matrix once, as zca_matrix or zca_matrix_packed")
        return _zca_members(d, required=True)
    return members


def _write_zca_file(path, zca, d, compress):
    """Write the ZCA arrays `zca` to the ZCA file `path`, or keep the one there if it holds the same arrays; their digest."""
    digest = zca_digest(zca)
    if Path(path).exists():
        try:
            held, _ = npzfile.load(path, "ZCA file", ModelFileError, _zca_file_reader(d))
        except (ModelFileError, OSError) as e:
            raise ValueError(f"{path} exists and is not this model's ZCA file "
                             f"({getattr(e, 'problem', e)}): name another zca_file") from None
        if zca_digest(held) != digest:
            raise ValueError(f"{path} holds another ZCA matrix (or another zca_storage): name another zca_file")
        return digest
    npzfile.save(path, zca, dict(format=ZCA_FORMAT, version=1, d=d), compress=compress)
    return digest


def _weight_arrays(net, storage):
    """The model file's weight members, float32 or rounded to float16 (refused beyond float16's range)."""
    if storage not in WEIGHT_STORAGE:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_STORAGE)}, got {storage!r}")
    arrays = {k: to_numpy(v) for k, v in net.params.items()}
    if storage == "float16":
        limit = float(np.finfo(np.float16).max)
        for k, v in arrays.items():
            big = float(np.abs(v).max()) if v.size else 0.0
            if not big <= limit:
                raise ValueError(f"weight {k} has entries up to {big:.3g}, beyond float16's range: "
                                 f"store the weights as float32")
            arrays[k] = v.astype(np.float16)
    return {f"param/{k}": v for k, v in arrays.items()}


def save_model(path, net, in_shape, classes, preprocessing=None, zca_mean=None, zca_matrix=None, extra=None,
               zca_storage="full", compress=False, weights="float32", zca_file=None):
    """Write `net` (a Sequential of engine layers) and what prediction needs to `path`, atomically.

    zca_storage: how the ZCA matrix is stored: 'full' (d x d float32), 'packed' (its upper
    triangle, float32: half the size, the same matrix when it is symmetric, which a ZCA matrix
    is up to rounding; a matrix further than that from symmetric is refused) or 'packed16' (the
    upper triangle in float16: a quarter of the size, each entry rounded to float16).
    weights: 'float32', or 'float16' (half the size; each weight rounded to float16, which
    changes the outputs slightly: measure it, e.g. with `python -m engine.evaluate A --compare B`).
    compress=True deflates the file's members (see npzfile.save).
    zca_file: a file name (letters, digits, '.', '_', '-'; ending .npz) to keep the ZCA mean and
    matrix in beside `path` instead of in it, shared by the models saved with the same name and
    the same matrix: written if absent, kept if it holds the same arrays, refused otherwise.
    """
    meta = dict(format=FORMAT, version=VERSION, architecture=architecture(net), input_shape=list(in_shape),
                classes=list(classes), preprocessing=preprocessing or {}, extra=extra or {})
    arrays = _weight_arrays(net, weights)
    if zca_file is not None:
        if not (isinstance(zca_file, str) and ZCA_FILE_NAME.fullmatch(zca_file)):
            raise ValueError(f"zca_file must be a plain file name ending .npz (letters, digits, '.', '_', '-'), "
                             f"got {zca_file!r:.100}")
        if zca_matrix is None:
            raise ValueError("zca_file given for a model without a ZCA matrix")
        if Path(path).name == zca_file:
            raise ValueError(f"zca_file {zca_file!r} is the model file's own name: give the ZCA file another")
    if zca_matrix is not None:
        zca = _zca_arrays(zca_mean, zca_matrix, zca_storage)
        if zca_file is None:
            arrays.update(zca)
        else:
            d = math.prod(in_shape)
            digest = _write_zca_file(Path(path).parent / zca_file, zca, d, compress)
            meta.update(version=VERSION_ZCA_FILE, zca_file=dict(name=zca_file, sha256=digest))
    elif zca_storage not in ZCA_STORAGE:
        raise ValueError(f"zca_storage must be one of {', '.join(ZCA_STORAGE)}, got {zca_storage!r}")
    return npzfile.save(path, arrays, meta, compress=compress)


def _model_members(meta, names=None):
    """The arrays a model file must hold, from its JSON document, validated first (npzfile.load's `members`)."""
    if meta.get("format") != FORMAT:
        raise ValueError("not a flatnet model file")
    if meta.get("version") not in (VERSION, VERSION_ZCA_FILE):
        raise ValueError(f"model file version {meta.get('version')!r:.50}; this engine reads versions {VERSION} and "
                         f"{VERSION_ZCA_FILE}")
    if meta["version"] == VERSION_ZCA_FILE:
        ref = meta.get("zca_file")
        if (not isinstance(ref, dict) or set(ref) != {"name", "sha256"} or not isinstance(ref["name"], str)
                or not ZCA_FILE_NAME.fullmatch(ref["name"]) or not isinstance(ref["sha256"], str)
                or not re.fullmatch(r"[0-9a-f]{64}", ref["sha256"])):
            raise ValueError(f"zca_file must be {{name: a plain file name ending .npz, sha256: 64 hex digits}}, "
                             f"got {ref!r:.150}")
    elif "zca_file" in meta:
        raise ValueError(f"a version-{VERSION} model file names no zca_file")
    for key in ("architecture", "input_shape", "classes", "preprocessing"):
        if key not in meta:
            raise ValueError(f"model file lacks '{key}'")
    shape = meta["input_shape"]
    if (not isinstance(shape, list) or len(shape) != 3 or not all(type(v) is int and v >= 1 for v in shape)
            or math.prod(shape) > MAX_ACTIVATION):
        raise ValueError(f"input_shape must be (C, H, W), positive integers, at most {MAX_ACTIVATION} elements; "
                         f"got {shape!r:.100}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be a non-empty list of names, got {classes!r:.100}")
    pre = meta["preprocessing"]
    gcn = pre.get("gcn") if isinstance(pre, dict) else None
    if (not isinstance(pre, dict) or not set(pre) <= {"gcn"}
            or gcn and not (isinstance(gcn, dict) and set(gcn) <= GCN_KEYS
                            and all(type(v) in (int, float, bool) and math.isfinite(v) for v in gcn.values()))):
        raise ValueError(f"preprocessing must be {{'gcn': {{{', '.join(sorted(GCN_KEYS))}: numbers}}}}, "
                         f"got {pre!r:.100}")
    d = math.prod(shape)
    members = {f"param/{k}": npzfile.Member(s) for k, s in architecture_shapes(meta["architecture"]).items()}
    if meta["version"] == VERSION:  # (a version-2 file's are in its ZCA file)
        members.update(_zca_members(d, required=False))
    return members


def _finite(path, name, array, dtype):
    with np.errstate(over="ignore"):  # checked after the cast: a float64 weight beyond float32's range is inf
        out = array.astype(dtype)
    if not np.isfinite(out).all():
        raise ModelFileError(path, f"array {name} is not finite floating-point data as {np.dtype(dtype)}")
    return out


def _read_zca_file(path, meta, model_bytes):
    """The ZCA arrays of the ZCA file that the version-2 model file `path` names, read beside it and checked."""
    name, digest = meta["zca_file"]["name"], meta["zca_file"]["sha256"]  # (checked by _model_members)
    zca_path = path.parent / name  # (a plain name: this folder only; a symbolic link of that name is followed)
    if not zca_path.is_file():
        raise ModelFileError(path, f"its ZCA matrix is in {name}, which is not beside it: copy {name} along with it")
    try:  # within what the model file's arrays left of the bound on one load
        zca, _ = npzfile.load(zca_path, "ZCA file", ModelFileError, _zca_file_reader(math.prod(meta["input_shape"])),
                              max_bytes=npzfile.MAX_BYTES - model_bytes)
    except ModelFileError as e:
        raise ModelFileError(path, f"its ZCA file {name}: {e.problem}") from None
    if zca_digest(zca) != digest:
        raise ModelFileError(path, f"{zca_path} is not the ZCA file it was saved with (SHA-256 of its arrays differs)")
    return zca


def read_model(path):
    """(net, meta, zca_mean, zca_matrix) of a model file written by save_model / train.py, validated.

    Everything in the file is checked before anything is built from it (see npzfile.load);
    any problem raises ModelFileError naming the file. The network is on the CPU, in eval mode.
    """
    path = Path(path)
    if not path.exists() and path.stem in PRETRAINED:
        raise FileNotFoundError(f"no model file at {path}; the pretrained model of that name loads from any folder "
                                f"with engine.pretrained({path.stem!r}) (or the name alone in the commands)")
    arrays, meta = npzfile.load(path, "model file", ModelFileError, _model_members)
    if meta["version"] == VERSION_ZCA_FILE:
        arrays.update(_read_zca_file(path, meta, sum(a.nbytes for a in arrays.values())))
    if "zca_matrix" in arrays and "zca_matrix_packed" in arrays:
        raise ModelFileError(path, "holds the ZCA matrix twice (zca_matrix and zca_matrix_packed)")
    if ("zca_mean" in arrays) != ("zca_matrix" in arrays or "zca_matrix_packed" in arrays):
        raise ModelFileError(path, "holds only one of the ZCA mean and matrix")
    try:
        net = build_architecture(meta["architecture"])
    except ValueError as e:
        raise ModelFileError(path, str(e)) from None
    net.load_params({k: _finite(path, k, arrays[f"param/{k}"], v.dtype) for k, v in net.params.items()})
    shape = (1, *meta["input_shape"])
    try:
        for name, layer in net.children:  # bounded sizes first, then the layers' own checks on one blank image
            shape = layer.output_shape(shape)
            if min(shape[1:], default=1) < 1 or math.prod(shape) > MAX_ACTIVATION:
                raise ValueError(f"layer {name} would output {shape[1:]} per image")
        net.eval().forward(np.zeros((1, *meta["input_shape"]), net.dtype))
    except (TypeError, ValueError) as e:
        raise ModelFileError(path, f"input shape {meta['input_shape']} does not fit the architecture ({e})") from None
    if shape != (1, len(meta["classes"])):
        raise ModelFileError(path, f"the network gives {shape[1:]} outputs for {len(meta['classes'])} classes")
    zca_mean = zca_matrix = None
    if "zca_mean" in arrays:
        zca_mean = _finite(path, "zca_mean", arrays["zca_mean"], np.float32)
        if "zca_matrix" in arrays:
            zca_matrix = _finite(path, "zca_matrix", arrays["zca_matrix"], np.float32)
        else:  # the size was checked against the input shape before anything was read
            packed = _finite(path, "zca_matrix_packed", arrays.pop("zca_matrix_packed"), np.float32)
            zca_matrix = unpack_upper(packed, len(zca_mean))
    return net, meta, zca_mean, zca_matrix
