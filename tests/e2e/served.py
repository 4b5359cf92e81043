"""`tokenmill serve` as a child process for the end-to-end tests that kill or signal its processes: started in its
own process group (as a shell starts a foreground job, so a Ctrl-C reaches every process of the group), healthy
before the test talks to it (tokenmill.bench.server_process.wait_healthy), killed at the end if the test left it
running. Plus /proc helpers to check that no process of it outlives it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tokenmill.bench.server_process import ServerProcess, free_port, wait_healthy


@contextmanager
def serving(args: list[str], log_path: Path, startup_timeout_s: float = 240.0) -> Iterator[ServerProcess]:
    """`tokenmill serve --port P *args`, healthy; its output goes to log_path."""
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess("tokenmill", proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child no one reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def spawned_children(pid: int) -> list[int]:
    """The child processes multiprocessing spawned (tensor-parallel ranks, data-parallel replicas)."""
    return [c for c in children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def stream_outcome(base_url: str, body: dict[str, Any], on_first_chunk: Callable[[], None] | None = None) -> str:
    """Streams a completion of `body` (stream: true); on_first_chunk runs at its first data chunk (a test's fault).
    Returns how the stream ended: "error" (an error event), "done" ([DONE]) or "cut" (the connection broke)."""
    try:
        with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and on_first_chunk is not None:
                    on_first_chunk()
                    on_first_chunk = None
                if '"error"' in line:
                    return "error"
                if line == "data: [DONE]":
                    return "done"
    except httpx.HTTPError:
        pass
    return "cut"
