"""engine/openmp_pool.py: the caller's libgomp pool is released and rebuilt on demand, and torch keeps
computing the same results on the releasing thread and on another thread afterwards."""

from __future__ import annotations

import threading

import pytest
import torch

from tokenmill.engine.openmp_pool import _loaded_libgomp, release_openmp_pool


def _product() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 384, generator=gen)
    return a @ b  # large enough for a parallel region


@pytest.mark.skipif(_loaded_libgomp() is None, reason="torch without libgomp (no OpenMP pool to release)")
def test_release_then_compute_on_both_threads() -> None:
    expected = _product()  # this thread now owns a pool
    assert release_openmp_pool()
    assert release_openmp_pool()  # nothing left to free: still succeeds
    torch.testing.assert_close(_product(), expected, rtol=0, atol=0)  # the pool is rebuilt on demand
    results: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: results.append(_product()))
    worker.start()
    worker.join()
    torch.testing.assert_close(results[0], expected, rtol=0, atol=0)
    assert release_openmp_pool()


@pytest.mark.parametrize("preset, expected", [(None, "10000"), ("250", "250")])
def test_importing_tokenmill_shortens_the_openmp_spin_unless_set(preset: str | None, expected: str) -> None:
    """`import tokenmill` sets GOMP_SPINCOUNT before torch loads libgomp, keeping a value the user set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    code = "import os, tokenmill; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
