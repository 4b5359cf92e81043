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
