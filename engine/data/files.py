"""Where the data files are: the data folder, downloads from the official locations, and the error every
data problem raises."""
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

DATA_ENV = "FLATNET_DATA"


class DatasetError(RuntimeError):
    """A data file is missing, truncated, corrupt or not in the expected format."""


def default_data_dir():
    """$FLATNET_DATA, else ~/.cache/flatnet/data (or $XDG_CACHE_HOME/flatnet/data)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flatnet" / "data"


def download(url, dest, md5, progress=True):
    """Fetch `url` to `dest` through a temporary file, check its MD5, then rename atomically.

    A failed download leaves nothing behind: neither a partial file nor the folders it created.
    """
    dest = Path(dest)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    digest = hashlib.md5()
    done = False
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}")
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                digest.update(block)
                if bar:
                    bar.update(len(block))
            if bar:
                bar.close()
        if digest.hexdigest() != md5:
            raise DatasetError(f"{url}: MD5 {digest.hexdigest()} does not match the published {md5}")
        os.replace(tmp, dest)
        done = True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not done:
            for d in created:
                try:
                    d.rmdir()
                except OSError:  # not empty (another process wrote there) or already gone
                    break
    return dest


def fetch_or_explain(candidates, what, data_dir, download_ok):
    """Try each (url, dest, md5); raise a DatasetError naming the files and the folder when all fail."""
    errors = []
    if download_ok:
        for url, dest, md5 in candidates:
            try:
                return download(url, dest, md5)
            except Exception as e:  # network down, 404, bad checksum: try the next, then explain
                errors.append(f"{url}: {e}")
    if not download_ok:
        raise DatasetError(f"{what} not found in {data_dir}. Put the official files there (or pass --data-dir / "
                           f"set {DATA_ENV}), or pass --download to fetch them from their official location")
    raise DatasetError(
        f"{what} not found in {data_dir} and could not be downloaded ({'; '.join(errors)}). "
        f"Put the official files there (or pass --data-dir / set {DATA_ENV}): {what}"
    )
