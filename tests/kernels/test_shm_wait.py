"""The shared-memory collectives' wait for a rank (kernels/cpu/shm_all_reduce.h's shm_wait): a rank whose process has
ended fails the call at once, a zombie not yet reaped included (a rank the engine spawned is its child, and the
thread that would reap it may be the one waiting); a live rank that never arrives fails it at the timeout."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from tokenmill.distributed import shm_all_reduce

CAPACITY = 16


def _all_reduce_with_peer(pid: int, timeout_s: float) -> tuple[int, float]:
    """Rank 0 of 2 all-reduces over a fresh segment whose rank 1 is process pid and never arrives: (code, seconds)."""
    lib = shm_all_reduce._lib()
    if lib is None:
        pytest.skip("no C compiler here")
    segment = torch.zeros(lib.tm_shm_segment_bytes(2, CAPACITY), dtype=torch.uint8)
    segment[64 + 8 : 64 + 16] = torch.tensor(list(pid.to_bytes(8, "little")), dtype=torch.uint8)
    x = torch.ones(CAPACITY)
    start = time.monotonic()
    code = lib.tm_shm_all_reduce(segment.data_ptr(), 0, 2, CAPACITY, x.data_ptr(), CAPACITY, 1, timeout_s)
    return code, time.monotonic() - start


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_a_dead_unreaped_rank_fails_the_wait_at_once() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    child = subprocess.Popen(["sleep", "60"])
    try:
        child.kill()
        deadline = time.monotonic() + 10
        while _state(child.pid) != "Z" and time.monotonic() < deadline:  # dead, not reaped: kill(pid, 0) succeeds
            time.sleep(0.01)
        assert _state(child.pid) == "Z"
        code, seconds = _all_reduce_with_peer(child.pid, timeout_s=30.0)
        assert code == 3 and seconds < 5.0
    finally:
        child.wait()


def test_a_live_rank_that_never_arrives_times_out() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        code, seconds = _all_reduce_with_peer(child.pid, timeout_s=0.3)
        assert code == 2 and seconds >= 0.3
    finally:
        child.kill()
        child.wait()
