"""On-disk cache of converted models: content-keyed directories, published atomically.

Layout under the cache root (`cache_dir` argument, else `$XDG_CACHE_HOME/tokenmill`, else
`~/.cache/tokenmill`):

    gguf/<sha256 of the file>-v<format>/   an HF-style directory (config.json, model.safetensors,
                                           tokenizer files, generation_config.json, tokenmill.json)
    stamps/<hash of path+size+mtime+inode>  the content sha256 of a file seen before

Key: the sha256 of the whole source file, so two files share an entry exactly when their bytes are
equal, whatever their names. Hashing is ~1 GB/s here (0.1 s for the 98 MB default model, seconds for
multi-GB files), so the hash is remembered in a stamp keyed by (real path, size, mtime_ns, inode,
device): a warm load costs one stat and one small read. Rewriting a file changes its mtime, which
misses the stamp and re-hashes; only a rewrite that forges the old mtime, size and inode would be
missed. The format version in the entry name invalidates entries when the conversion changes.

Publishing: an entry is built in a sibling temp directory, its files fsynced, then renamed into place.
rename(2) is atomic and fails when the target exists, so readers see either no entry or a complete
one; a concurrent builder that loses the race discards its copy; an interrupted build leaves only a
`.tmp-*` directory, removed by a later build once it is a day old.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CACHE_FORMAT_VERSION = 1
_STALE_TMP_SECONDS = 24 * 3600


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tokenmill")


def resolve_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()


def file_sha256(path: str, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(path: str, cache_root: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime, inode) stamp."""
    st = os.stat(path)
    identity = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}"
    stamp = cache_root / "stamps" / hashlib.sha256(identity.encode()).hexdigest()[:40]
    try:
        known = stamp.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = file_sha256(path)
    try:
        _write_text_atomic(stamp, digest)
    except OSError:  # read-only cache: hash every time
        pass
    return digest


def gguf_entry(path: str, cache_root: Path) -> Path:
    """The cache directory that holds (or will hold) the HF conversion of the GGUF file at `path`."""
    return cache_root / "gguf" / f"{content_key(path, cache_root)}-v{CACHE_FORMAT_VERSION}"


def build_atomically(final_dir: Path, build: Callable[[Path], None]) -> Path:
    """Create `final_dir` by running `build(tmp_dir)` and renaming; a no-op if it already exists."""
    if final_dir.is_dir():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(final_dir.parent)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        build(tmp_dir)
        _fsync_tree(tmp_dir)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not final_dir.is_dir():  # not a lost race: a real error
                raise
        _fsync_dir(final_dir.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def remove_entry(entry_dir: Path) -> None:
    """Drop a (corrupt) entry: rename it away first so no reader sees it half-deleted."""
    trash = entry_dir.with_name(f".tmp-trash-{entry_dir.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(entry_dir, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_tmp_dirs(parent: Path) -> None:
    now = time.time()
    for path in parent.glob(".tmp-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
