"""An OpenAI-compatible server run as a subprocess for a benchmark: `tokenmill serve`, `vllm serve` or
llama.cpp's `llama-server`, started on a free port, waited on until `GET /health` answers 200, and
always stopped (SIGTERM, then SIGKILL) when the benchmark leaves it, on errors and Ctrl-C too.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass
class ServerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    startup_s: float = 0.0

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.proc.pid, "base_url": self.base_url, "startup_s": self.startup_s,
                "returncode": self.proc.returncode, "stopped": self.proc.returncode is not None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(server: ServerProcess, timeout_s: float) -> None:
    """Returns once /health answers 200 (llama-server answers 503 while it loads); raises with the
    server's log tail if it exits first or is not healthy within timeout_s."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                server.startup_s = time.perf_counter() - start
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not healthy after {timeout_s:.0f} s:\n{server.log_tail()}")


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM (servers drain and exit); SIGKILL if it is still there after timeout_s, or if anything
    (a Ctrl-C) interrupts the wait. Not SIGINT: a shell starts background jobs with SIGINT ignored,
    and their children inherit that."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def running_server(name: str, cmd: list[str], port: int, log_path: Path, env: Mapping[str, str] | None = None,
                   startup_timeout_s: float = 300.0) -> Iterator[ServerProcess]:
    """cmd must make the server listen on 127.0.0.1:port; its stdout and stderr go to log_path."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None)
    server = ServerProcess(name, proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        stop_server(proc)
