"""Engine death and hangs: when the engine loop dies (an exception outside a step's per-request handling) or stops
making progress (the watchdog, --engine-watchdog-s), every open request ends with an error (streams: a final error
event; others: a 503 OpenAI-style body), /health answers 503 and `tokenmill serve` exits with status 70 so that a
supervisor restarts it; the same when a data-parallel replica hangs. (A step that fails only its own requests, the
engine going on: tests/server/test_errors_and_lifecycle.py::test_engine_failure_fails_only_that_request.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.e2e.served import serving, stream_outcome
from tests.server.conftest import free_port, small_engine, uvicorn_in_thread
from tokenmill.engine import async_engine as async_engine_module
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.engine_loop import inject_fault
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.entrypoints.openai.context import ServerContext
from tokenmill.entrypoints.openai.launcher import ENGINE_DIED_EXIT_CODE, FAULT_ENV, GracefulServer
from tokenmill.entrypoints.openai.server import build_app
from tokenmill.loader import load_model

LONG_STREAM = {"prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def tiny_loaded(tiny_checkpoint: Any) -> Any:
    return load_model(tiny_checkpoint("llama"))


@contextmanager
def _serve(engine: LLMEngine, watchdog_s: float) -> Iterator[tuple[str, AsyncEngine, GracefulServer, threading.Thread]]:
    """Like conftest.run_server, with a watchdog, and with the server and its thread exposed: a dead engine stops
    the server by itself."""
    async_engine = AsyncEngine(engine, metrics=EngineMetrics("m"), watchdog_s=watchdog_s)
    port = free_port()
    config = uvicorn.Config(build_app(ServerContext(async_engine, "m")), host="127.0.0.1", port=port,
                            log_level="warning", timeout_graceful_shutdown=5)
    server = GracefulServer(config, async_engine, drain_timeout=1.0)
    with uvicorn_in_thread(server) as thread:
        yield f"http://127.0.0.1:{port}", async_engine, server, thread


def _post_in_thread(url: str, results: list[httpx.Response]) -> threading.Thread:
    body = {"prompt": [8, 9], "max_tokens": 480, "ignore_eos": True}
    thread = threading.Thread(target=lambda: results.append(httpx.post(url, json=body, timeout=60)))
    thread.start()
    return thread


def _wait_in_flight(async_engine: AsyncEngine, count: int) -> None:
    deadline = time.monotonic() + 30
    while async_engine.num_in_flight < count:
        assert time.monotonic() < deadline, "the requests never reached the engine"
        time.sleep(0.01)


def _assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    return body


def _run_until_fault(base: str, async_engine: AsyncEngine, fault: threading.Event) -> tuple[list[str], httpx.Response]:
    """A streaming and a non-streaming request in flight when `fault` is set; returns the stream's data lines after
    its first chunk, and the other's response."""
    results: list[httpx.Response] = []
    with httpx.stream("POST", base + "/v1/completions", json=LONG_STREAM, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        poster = _post_in_thread(base + "/v1/completions", results)
        _wait_in_flight(async_engine, 2)
        fault.set()
        rest = [line for line in lines if line.startswith("data:")]
    poster.join(timeout=60)
    return rest, results[0]


def _assert_dead_server(base: str, server: GracefulServer, thread: threading.Thread, rest: list[str],
                        other: httpx.Response) -> None:
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][5:])["error"]
    assert error["code"] == 503 and error["type"] == "EngineDeadError", error
    assert _assert_openai_error(other, 503)["type"] == "ServiceUnavailableError"
    health = httpx.get(base + "/health", timeout=5)  # the server stays up DEATH_GRACE_S after the death
    assert "the engine stopped" in _assert_openai_error(health, 503)["message"]
    refused = httpx.post(base + "/v1/completions", json={"prompt": [5], "max_tokens": 2}, timeout=10)
    _assert_openai_error(refused, 503)
    thread.join(timeout=30)  # the server stops by itself
    assert not thread.is_alive() and server.engine_died


def test_a_loop_that_dies_fails_open_requests_and_stops_the_server(tiny_loaded: Any) -> None:
    engine = small_engine(tiny_loaded)
    fault = threading.Event()
    has_unfinished = engine.has_unfinished_requests

    def broken_loop_check() -> bool:  # called by the loop between steps, outside any per-request handling
        if fault.is_set():
            raise RuntimeError("injected engine-loop failure")
        return has_unfinished()

    engine.has_unfinished_requests = broken_loop_check  # type: ignore[method-assign]
    with _serve(engine, watchdog_s=0.0) as (base, async_engine, server, thread):
        rest, other = _run_until_fault(base, async_engine, fault)
        assert "injected engine-loop failure" in str(async_engine.dead_error)
        _assert_dead_server(base, server, thread, rest, other)


def test_a_request_the_dead_engine_never_accepted_gets_503(tiny_loaded: Any) -> None:
    """The engine loop dies while adding a request (before it answers the add): the caller waiting for acceptance
    gets 503 at once, not a hang until shutdown cancels it (a 500; seen under load in the full suite)."""
    engine = small_engine(tiny_loaded)

    def dying_add(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected failure while adding")

    engine.add_request = dying_add  # type: ignore[method-assign]
    with _serve(engine, watchdog_s=0.0) as (base, async_engine, server, thread):
        response = httpx.post(base + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}, timeout=30)
        assert _assert_openai_error(response, 503)["type"] == "ServiceUnavailableError"
        assert "injected failure while adding" in str(async_engine.dead_error)
        thread.join(timeout=30)
        assert not thread.is_alive() and server.engine_died


def test_a_hung_step_trips_the_watchdog(tiny_loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(async_engine_module, "HUNG_JOIN_S", 0.2)  # shutdown leaves the stuck thread behind sooner
    engine = small_engine(tiny_loaded)
    fault, release = threading.Event(), threading.Event()
    step = engine.step

    def hanging_step() -> Any:
        if fault.is_set():
            release.wait(60)  # stuck, as a kernel that never returns, until the test ends
        return step()

    engine.step = hanging_step  # type: ignore[method-assign]
    watchdog_s = 0.5
    try:
        with _serve(engine, watchdog_s=watchdog_s) as (base, async_engine, server, thread):
            start = time.monotonic()
            rest, other = _run_until_fault(base, async_engine, fault)
            assert time.monotonic() - start >= watchdog_s
            assert "made no progress" in str(async_engine.dead_error)
            _assert_dead_server(base, server, thread, rest, other)
    finally:
        release.set()


def test_an_idle_engine_is_not_hung(tiny_loaded: Any) -> None:
    """The watchdog counts only time with requests in flight: a server idle for longer than its bound, then busy
    with steps shorter than it, stays up."""
    engine = small_engine(tiny_loaded)
    with _serve(engine, watchdog_s=0.3) as (base, async_engine, server, _):
        time.sleep(1.0)
        for _ in range(3):
            response = httpx.post(base + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 8}, timeout=60)
            assert response.status_code == 200
        assert async_engine.is_alive and not server.engine_died


def test_fault_hook_is_inert_unless_set_and_rejects_bad_specs(tiny_loaded: Any) -> None:
    engine = small_engine(tiny_loaded)
    step = engine.step
    inject_fault(engine, None)
    inject_fault(engine, "")
    assert engine.step == step
    with pytest.raises(ValueError, match="hang_step_after:N"):
        inject_fault(engine, "hang:3")


@pytest.mark.parametrize(("fault", "extra"), [
    ("die_after:3", []),
    ("hang_step_after:3", ["--engine-watchdog-s", "1"]),
    ("hang_step_after:3", ["--engine-watchdog-s", "1", "--data-parallel-size", "2", "--kv-cache-memory",
                           str(32 << 20)]),
], ids=["loop-dies", "step-hangs", "replica-hangs"])
def test_serve_exits_with_status_70_after_an_engine_fault(tiny_checkpoint: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, fault: str,
                                                          extra: list[str]) -> None:
    monkeypatch.setenv(FAULT_ENV, fault)  # the test hook, read by `tokenmill serve` (engine_loop.inject_fault)
    args = ["--model", str(tiny_checkpoint("llama")), "--dtype", "float32", "--max-model-len", "512", *extra]
    with serving(args, tmp_path / "server.log") as server:
        assert stream_outcome(server.base_url, LONG_STREAM) in ("error", "cut")
        try:  # /health says 503 until the server is gone
            _assert_openai_error(httpx.get(server.base_url + "/health", timeout=5), 503)
        except httpx.HTTPError:
            pass
        assert server.proc.wait(timeout=60) == ENGINE_DIED_EXIT_CODE, server.log_tail()
    assert "fault injection (a test hook)" in server.log_tail(100_000)
