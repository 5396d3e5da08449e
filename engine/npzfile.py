"""The engine's file format for checkpoints and model files: an .npz of arrays plus a JSON document.

Written with allow_pickle=False through a temporary file, fsync and a rename (an
interruption never leaves a half-written file); read with allow_pickle=False, so
loading never executes anything from the file.
"""
import json
import os
import zipfile
from pathlib import Path

import numpy as np


def save(path, arrays, meta):
    """Write `arrays` (name -> array) and `meta` (JSON-able, stored as the string array 'meta') atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays, meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path, what, error=ValueError):
    """(arrays without 'meta', meta) from `path`; a missing, truncated or corrupt file raises `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = str(z["meta"]) if "meta" in z.files else None
            arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(raw) if raw is not None else None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise error(f"{path}: truncated or corrupt {what} ({type(e).__name__}: {e})") from None
    if raw is None:
        raise error(f"{path}: not a flatnet {what} (no 'meta')")
    if not isinstance(meta, dict):
        raise error(f"{path}: not a flatnet {what}")
    return arrays, meta
