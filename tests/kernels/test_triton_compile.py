"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked on the CPU with Triton's bundled
ptxas, so a kernel that only the interpreter accepts fails here rather than on the device machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernel tests compile every kernel for real")
def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/kernels/aot_compile.py")], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == 23, proc.stdout
    # Stack bytes mean register spills to local memory: a tile size too large for its kernel.
    assert proc.stdout.count("stack 0 B") == 23, proc.stdout
