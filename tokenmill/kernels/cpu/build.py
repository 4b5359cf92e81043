"""Compiles a C kernel of this package once per machine and loads it with ctypes.

The shared object is cached under ~/.cache/tokenmill/kernels (or $XDG_CACHE_HOME), named by a hash
of the source and every header beside it (the sources include them), the flags, the compiler's
version and the CPU's feature flags: `-march=native` code is only reused on the CPU it was built for. Builds are atomic (compile to a temporary file, rename), so
concurrent processes at worst build twice. No compiler, or a failing build, yields None and the
caller keeps its torch path; the reason is logged once. Each load touches its build, and each new build removes the
builds no process loaded for STALE_BUILD_DAYS.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("tokenmill")

# -ffast-math lets the compiler vectorize the float reductions and expf (glibc's libmvec); the kernels
# never see inf/nan by construction (only valid positions are read).
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC")
# Extra compiler flags for A/B runs of the kernels (e.g. "-mno-avx512vnni" builds the AVX2 int8 tiles on a VNNI
# CPU); part of the cache key like the others. Not for production use.
EXTRA_CFLAGS_ENV = "TOKENMILL_KERNEL_CFLAGS"


def _cflags() -> tuple[str, ...]:
    return CFLAGS + tuple(os.environ.get(EXTRA_CFLAGS_ENV, "").split())


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenmill" / "kernels"


def cpu_flags() -> str:
    """This CPU's /proc/cpuinfo flags line ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def _compiler_version(compiler: str) -> str:
    """Part of the cache key; asked once per process, not once per kernel library."""
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout


@functools.cache
def kernel_sources_digest() -> str:
    """A digest of every C source and header here and of the flags: part of the execution plan's key, so that
    changed kernels are timed again."""
    sources = sorted(Path(__file__).parent.glob("*.[ch]"))
    text = "\0".join([*(f"{p.name}\0{p.read_text()}" for p in sources), *_cflags()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def load_kernel_library(name: str) -> ctypes.CDLL | None:
    """`name`.c beside this file, built for this machine; None when it cannot be built."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: the CPU %s kernel is off, using the torch path", name)
        return None
    try:
        version = _compiler_version(compiler)
        headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
        key = hashlib.sha256(
            "\0".join([source.read_text(), *headers, *_cflags(), version, cpu_flags()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"{name}-{key}.so"
        if target.exists():
            _mark_used(target)
        else:
            _compile(compiler, source, target)
            prune_stale_builds(target.parent)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        logger.warning("building the CPU %s kernel failed, using the torch path: %s", name, detail)
        return None


# A build no process has loaded for this long is removed when another build is made (an upgrade's or another
# compiler's leave theirs behind otherwise: every source change is a new file). A process still running one keeps
# its mapping; a process that needs it again builds it again.
STALE_BUILD_DAYS = 30


def _mark_used(build: Path) -> None:
    """Records a load in the build's modification time (what prune_stale_builds reads); a read-only cache keeps
    its times."""
    try:
        os.utime(build)
    except OSError:
        pass


def prune_stale_builds(directory: Path, max_age_s: float = STALE_BUILD_DAYS * 86400.0) -> list[Path]:
    """Removes the kernel builds (*.so) in directory not loaded for max_age_s seconds; returns them."""
    cutoff = time.time() - max_age_s
    removed = []
    for build in directory.glob("*.so"):
        try:
            if build.stat().st_mtime < cutoff:
                build.unlink()
                removed.append(build)
        except OSError:  # gone already (another process pruned it), or not ours to remove
            continue
    return removed


def _compile(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_cflags(), "-o", tmp, str(source), "-lm"], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
