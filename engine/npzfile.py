"""The engine's file format for checkpoints and model files: an .npz of arrays plus a JSON document.

Written with allow_pickle=False through a temporary file, fsync and a rename (an
interruption never leaves a half-written file; a failed write removes its temporary
file). Read without numpy's loader and never with pickles: the format's reader
(`members`) names every member it accepts with its shape and dtype kind, and each
member's npy header is read and checked against that, against the zip directory's
size for it and against a total bound, before any array is allocated. Nothing else in
the file is read, so a hostile file is refused at the cost of its headers.

A compressed file (save(..., compress=True)) stores each numeric array of more than one
byte per value byte-shuffled before deflating it: a uint8 member of shape (itemsize, n)
whose row i holds byte i of every value, so that the exponent bytes of weights, which
vary little, compress apart from their mantissas, which hardly compress at all (a float32
checkpoint shrinks to 84% of its size instead of 92%: docs/results.md, "Checkpoints"). The JSON document names those members with
their dtype and shape under SHUFFLED; `load` checks the entry against the format's
reader and the member's header against the entry, and returns the arrays as written.
numpy's own loader sees the uint8 rows, never wrong values.
"""
import json
import re
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

MAX_BYTES = 2 << 30        # all arrays of one file together
MAX_META_BYTES = 16 << 20  # the JSON document (a string array of 4-byte characters)
MAX_META_DEPTH = 64        # nesting of its arrays and objects (Python's decoder recurses per level)
MAX_MEMBERS = 100_000
SHUFFLED = "byte_shuffled"  # the JSON document's entry {member: [dtype, shape]} of a compressed file's shuffled members
SHUFFLE_DTYPES = {f"<{k}{n}" for k in "fiu" for n in (2, 4, 8)}
MAX_NDIM = 32


class FileFormatError(ValueError):
    """A file of the engine is missing, unreadable or inconsistent: `path` and `problem`, one line."""

    what = "file"

    def __init__(self, path, problem):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class Member(NamedTuple):
    """What a format expects of one array: its shape (None: any), dtype kinds, and whether it must be present."""
    shape: Optional[tuple] = None
    kinds: str = "f"
    required: bool = True


def save(path, arrays, meta, compress=False):
    """Write `arrays` (name -> array) and `meta` (JSON-able, stored as the string array 'meta') atomically.

    compress=True byte-shuffles each numeric array of more than one byte per value (see the module's
    docstring) and deflates every member (numpy's savez_compressed); `load` reads either, with the
    same checks: a deflated member's header and the zip directory's size for it are checked before
    its data is inflated, and exactly that many bytes are inflated.
    """
    if SHUFFLED in meta:
        raise ValueError(f"{SHUFFLED!r} is the file format's own entry of the JSON document")
    if compress:
        arrays, table = dict(arrays), {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if f"<{a.dtype.kind}{a.dtype.itemsize}" in SHUFFLE_DTYPES:
                table[name], arrays[name] = _shuffle(a)
        meta = dict(meta, **{SHUFFLED: table})
    savez = np.savez_compressed if compress else np.savez
    return _write_atomic(path, lambda f: savez(f, **arrays, meta=np.array(json.dumps(meta))))


def write_text_atomic(path, text):
    """Replace the text file `path` by `text` atomically (as `save`)."""
    return _write_atomic(path, lambda f: f.write(text.encode()))


def _write_atomic(path, write):
    """write(f) into a temporary file beside `path`, fsync, rename; on any failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk, an interrupt: leave nothing behind
        raise
    return path


def _header(f, name, member, limit):
    """Read the npy header of member `name` from `f`; (shape, fortran, dtype); refuse what `member` excludes."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"npy version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f, max_header_size=10000)
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in member.kinds or dtype.itemsize == 0:
        raise _Refused(f"array {name} has dtype {dtype}; expected {_kinds(member.kinds)}")
    if member.shape is not None and tuple(shape) != tuple(member.shape):
        raise _Refused(f"array {name} has shape {tuple(shape)}, expected {tuple(member.shape)}")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > limit:
        raise _Refused(f"array {name} of shape {tuple(shape)} ({nbytes} bytes) exceeds the limit of {limit} bytes")
    return shape, fortran, dtype, nbytes


def _kinds(kinds):
    names = dict(f="floating-point", i="integer", u="unsigned integer", b="boolean", U="string")
    return " or ".join(names[k] for k in kinds)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_depth(text):
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings do not count),
    in one pass without recursion, so a hostile document is measured before a decoder descends into it."""
    bare = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8", "replace"), np.uint8)
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


class _Refused(Exception):
    """A member the format does not accept (a problem stated as is, not as corruption)."""


def read_exact(f, shape, dtype=np.uint8, fortran=False):
    """The rest of stream `f` as an array of `shape`: exactly that many bytes, read in place, then the end.

    EOFError when the stream ends early, ValueError when data follows (a header that lies either way);
    memory is the array's, whatever the stream holds.
    """
    dtype = np.dtype(dtype)
    out = np.empty(math.prod(shape), dtype=dtype)
    view, done, nbytes = memoryview(out).cast("B"), 0, out.nbytes
    while done < nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise EOFError(f"{nbytes - done} of {nbytes} bytes missing")
        done += n
    if f.read(1):
        raise ValueError(f"more data than the {nbytes} bytes its header declares")
    return out.reshape(shape[::-1]).T if fortran else out.reshape(shape)


def load(path, what, error, members, max_bytes=MAX_BYTES):
    """(arrays without 'meta', meta) from `path`, read safely; any problem raises `error(path, problem)`.

    `members(meta, names)` (the format's reader; `names`: the file's array names) returns
    {name: Member} of the arrays it accepts, or raises ValueError with the problem. Members not named, missing required members and
    arrays whose header disagrees (shape, dtype, size in the zip directory, total above
    `max_bytes`) are refused before any array data is read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > MAX_MEMBERS:
                raise _Refused(f"{len(infos)} members, more than {MAX_MEMBERS}")
            names = [i.filename[:-4] if i.filename.endswith(".npy") else i.filename for i in infos]
            if len(set(names)) != len(names):
                raise _Refused("duplicate members")
            info = dict(zip(names, infos))
            if "meta" not in info:
                raise _Refused(f"not a flatnet {what} (no 'meta')")
            text = str(_member(z, info["meta"], "meta", Member((), "U"), MAX_META_BYTES))
            if json_depth(text) > MAX_META_DEPTH:
                raise _Refused(f"its JSON document nests deeper than {MAX_META_DEPTH} levels")
            meta = json.loads(text)
            if not isinstance(meta, dict):
                raise _Refused(f"not a flatnet {what}")
            table = meta.pop(SHUFFLED, {})
            try:
                spec = members(meta, [n for n in names if n != "meta"])
            except (ValueError, TypeError, KeyError) as e:
                raise _Refused(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}") from None
            shuffled = _shuffled(table, spec)
            stored = dict(spec)  # what each member's npy header must say
            for k, (dtype, shape) in shuffled.items():
                stored[k] = Member((dtype.itemsize, math.prod(shape)), "u", spec[k].required)
            unexpected = sorted(set(names) - set(spec) - {"meta"})
            missing = sorted(k for k, m in spec.items() if m.required and k not in info)
            if unexpected or missing:
                raise _Refused(f"arrays do not match the {what}'s contents (missing {missing[:10]}"
                               f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                               f"{' ...' if len(unexpected) > 10 else ''})")
            headers, total = {}, 0
            for k in sorted(set(spec) & set(info)):
                with z.open(info[k]) as f:
                    shape, fortran, dtype, nbytes = _header(f, k, stored[k], max_bytes - total)
                    if k in shuffled and (dtype != np.uint8 or fortran):
                        raise _Refused(f"byte-shuffled array {k} is stored as {dtype}"
                                       f"{' (Fortran order)' if fortran else ''}, not uint8 rows")
                    if f.tell() + nbytes != info[k].file_size:
                        raise ValueError(f"array {k}: header declares {nbytes} bytes of data, the zip "
                                         f"directory {info[k].file_size - f.tell()}")
                total += nbytes
                headers[k] = shape, fortran, dtype, nbytes
            arrays = {}
            for k, h in headers.items():  # every header agrees: now the data
                with z.open(info[k]) as f:
                    _header(f, k, stored[k], h[3])
                    arrays[k] = read_exact(f, h[0], h[2], h[1])
                if k in shuffled:
                    arrays[k] = _unshuffle(arrays[k], *shuffled[k])
    except _Refused as e:
        raise error(path, str(e)) from None
    except Exception as e:  # anything else a corrupt file makes zipfile, numpy's header parser or json raise
        raise error(path, f"truncated or corrupt {what} ({type(e).__name__}: {e})") from None
    return arrays, meta


def _shuffled(table, spec):
    """{name: (dtype, shape)} of the byte-shuffled members the JSON document's `table` names, checked against `spec`."""
    if not isinstance(table, dict):
        raise _Refused(f"{SHUFFLED} must map array names to [dtype, shape]")
    out = {}
    for name, entry in table.items():
        if name not in spec:
            raise _Refused(f"{SHUFFLED} names {name!r:.100}, which is not one of the file's arrays")
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and entry[0] in SHUFFLE_DTYPES and isinstance(entry[1], list) and len(entry[1]) <= MAX_NDIM
                and all(type(n) is int and n >= 0 for n in entry[1])
                and math.prod(n for n in entry[1] if n) < 1 << 63):  # (what numpy can index, even when empty)
            raise _Refused(f"{SHUFFLED} entry of {name}: {entry!r:.100} is not [dtype, shape] of a numeric array")
        dtype, shape = np.dtype(entry[0]), tuple(entry[1])
        member = spec[name]
        if dtype.kind not in member.kinds:
            raise _Refused(f"array {name} has dtype {dtype}; expected {_kinds(member.kinds)}")
        if member.shape is not None and shape != tuple(member.shape):
            raise _Refused(f"array {name} has shape {shape}, expected {tuple(member.shape)}")
        out[name] = dtype, shape
    return out


def _shuffle(a):
    """([dtype, shape], rows) of `a`: its little-endian dtype and shape, and the (itemsize, n) uint8 rows of its bytes."""
    a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # (0-d stays 0-d)
    return [a.dtype.str, list(a.shape)], np.ascontiguousarray(a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T)


def _unshuffle(rows, dtype, shape):
    """The array of `dtype` and `shape` whose values' bytes are the (itemsize, n) uint8 `rows`."""
    out = np.empty(math.prod(shape), dtype=dtype)
    out.view(np.uint8).reshape(-1, dtype.itemsize)[...] = rows.T
    return out.reshape(shape)


def _member(z, info, name, member, limit):
    with z.open(info) as f:
        shape, fortran, dtype, _ = _header(f, name, member, limit)
        return read_exact(f, shape, dtype, fortran)


def check_writable_folder(folder):
    """Create `folder` if needed and prove it writable with a probe file; the problem as OSError otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
    os.close(fd)
    os.unlink(probe)


def check_writable_file(path):
    """Raise OSError with the reason when `path` cannot be written (its folder missing or read-only, a folder)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {parent} does not exist")
    check_writable_folder(parent)
