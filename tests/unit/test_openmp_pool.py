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
