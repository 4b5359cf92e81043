"""A plain `pip install tokenmill` has no triton (a dev extra): the CPU engine must run without it."""

from __future__ import annotations

import subprocess
import sys

# Makes `import triton` fail as it does where triton is not installed, then runs the CLI.
_NO_TRITON = """
import sys
sys.modules["triton"] = None  # any import of triton now raises ImportError
from tokenmill.entrypoints.cli import main
sys.argv = ["tokenmill", "--log-level", "WARNING", *sys.argv[1:]]
sys.exit(main())
"""


def test_generate_runs_without_triton(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint("llama"))
    result = subprocess.run(
        [sys.executable, "-c", _NO_TRITON, "generate", "--model", path, "--device", "cpu", "--max-tokens", "4", "Hi"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no text generated"
    assert "triton" not in result.stderr.lower(), result.stderr


def test_triton_backend_without_triton_is_a_clear_error(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint("llama"))
    result = subprocess.run(
        [sys.executable, "-c", _NO_TRITON, "generate", "--model", path, "--attention-backend", "triton", "x"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0
    assert "needs the triton package" in result.stderr
