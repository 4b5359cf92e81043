"""Selects Triton's interpreter for tokenmill's kernels on machines without CUDA.

Triton decides interpreted-or-compiled per kernel when the kernel is defined, from TRITON_INTERPRET,
and so do the helpers in triton.language (tl.sum, tl.max, ...) when triton is first imported: both
must happen in the same mode. tests/conftest.py calls this before any test module is collected, so
triton's first import and tokenmill's kernel modules happen in interpreted mode; the variable is
then restored, so nothing else in the session (or its subprocesses) sees it.
"""

from __future__ import annotations

import os


def select_interpreter_if_no_cuda() -> None:
    import importlib.util
    import sys

    import torch

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return  # triton is a dev extra; on a GPU the kernels compile
    if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        return  # too late to choose (tests/kernels/conftest.py then says so)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.experimental.gluon  # noqa: F401  (imported lazily at launch; it checks the mode)
        import triton.language  # noqa: F401

        import tokenmill.attention.triton_backend  # noqa: F401
        import tokenmill.kernels.triton.activation  # noqa: F401
        import tokenmill.kernels.triton.fp8_gemm  # noqa: F401
        import tokenmill.kernels.triton.rmsnorm  # noqa: F401
        import tokenmill.kernels.triton.rope_kv  # noqa: F401
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
