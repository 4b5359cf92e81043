"""Triton kernel tests run compiled on a CUDA GPU and in Triton's interpreter on the CPU (selected by
tests/conftest.py through tests/kernels/triton_mode.py before anything imports triton)."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    import tokenmill.kernels.triton

    if not tokenmill.kernels.triton.INTERPRET:
        raise RuntimeError(
            "tokenmill.kernels.triton was imported before tests/kernels/triton_mode.py could select Triton's "
            "interpreter (tests/conftest.py calls it first); without CUDA, set TRITON_INTERPRET=1"
        )


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
