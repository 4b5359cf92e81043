"""Every C kernel compiles for the x86 CPU families the engine meets, not only for the one running the tests: the
build uses -march=native, so code behind an ISA this machine lacks (AMX tiles, AVX512-BF16) or one it has on top
(AVX2-only fallbacks under AVX-512) is otherwise never compiled here. A call to a function that exists only under
another ISA's #if is an error (GCC 14 makes implicit declarations errors; older ones only warn, and the kernel
would then fail to build on that CPU and the engine fall back to torch)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from tokenmill.kernels.cpu import build

SOURCES = sorted(Path(build.__file__).parent.glob("*.c"))
# AVX2 + FMA (Zen 2/3, Haswell and later); AVX-512 with VNNI, no BF16 (Ice Lake); AVX512-BF16/FP16 and AMX (Sapphire
# Rapids).
TARGETS = ["x86-64-v3", "icelake-server", "sapphirerapids"]


def _compiler_or_skip() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 targets only")
    compiler = build._compiler()
    if compiler is None:
        pytest.skip("no C compiler here")
    return compiler


@pytest.mark.parametrize("target", TARGETS)
def test_every_kernel_compiles_for_the_target(target: str, tmp_path: Path) -> None:
    compiler = _compiler_or_skip()
    flags = [f for f in build.CFLAGS if f not in ("-march=native", "-shared", "-O3")]
    known = subprocess.run([compiler, f"-march={target}", "-x", "c", "-c", "-", "-o", str(tmp_path / "probe.o")],
                           check=False, input="int x;", capture_output=True, text=True)
    if known.returncode != 0:
        pytest.skip(f"{compiler} does not know -march={target}")
    failures = []
    for source in SOURCES:
        # -O1: inlining (and with it the always_inline target checks) happens, in a fraction of -O3's time.
        result = subprocess.run([compiler, "-O1", f"-march={target}", *flags, "-Werror=implicit-function-declaration",
                                 "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")],
                                check=False, capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{source.name}:\n{result.stderr[-2000:]}")
    assert not failures, "\n".join(failures)


def test_a_new_build_removes_builds_not_loaded_for_a_month(tmp_path: Path) -> None:
    """A load marks its build as used (its mtime); a build made after a month without loads of another is that
    build's end, while builds loaded within the month stay."""
    import os
    import sys
    import time

    _compiler_or_skip()
    cache = tmp_path / "tokenmill" / "kernels"
    cache.mkdir(parents=True)
    old = time.time() - (build.STALE_BUILD_DAYS + 1) * 86400
    stale, recent = cache / "layer_ops-0000000000000000.so", cache / "f32_gemm-1111111111111111.so"
    for path, when in ((stale, old), (recent, time.time() - 86400)):
        path.write_bytes(b"")
        os.utime(path, (when, when))
    script = ("from tokenmill.kernels.cpu.build import load_kernel_library; "
              "assert load_kernel_library('layer_ops') is not None")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    built = [p for p in cache.glob("layer_ops-*.so") if p != stale]
    assert len(built) == 1 and not stale.exists() and recent.exists()
    # Loading the existing build again refreshes its time; pruning spares it.
    os.utime(built[0], (old, old))
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    assert built[0].stat().st_mtime > old + 86400
    assert build.prune_stale_builds(cache) == []
