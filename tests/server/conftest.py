"""Live servers for the server tests: uvicorn in a background thread of the test process, so tests can
look inside the engine (KV blocks, scheduler) while talking HTTP to it like any client."""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.entrypoints.openai.context import ServerContext
from tokenmill.entrypoints.openai.launcher import GracefulServer, freeze_startup_objects
from tokenmill.entrypoints.openai.server import build_app

API_KEY = "test-key"
MODEL_NAME = "smollm2-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    engine: LLMEngine
    async_engine: AsyncEngine
    api_key: str | None
    model_name: str

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the engine holds no request and no KV block."""
        kv = self.engine.core.kv_cache_manager
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.engine.has_unfinished_requests() and self.async_engine.num_in_flight == 0 \
                    and kv.num_free_blocks == kv.num_blocks:
                return
            time.sleep(0.02)
        raise AssertionError(
            f"engine not idle: {len(self.engine.output_processor.requests)} requests, "
            f"{kv.num_blocks - kv.num_free_blocks} of {kv.num_blocks} KV blocks held"
        )

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.base_url + "/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{") and labels in line:
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@contextmanager
def uvicorn_in_thread(server: uvicorn.Server, name: str = "test-uvicorn") -> Iterator[threading.Thread]:
    """Runs `server` in a daemon thread of the test process until it has started; stops it on leaving (it may
    have stopped by itself meanwhile, as GracefulServer does when its engine dies)."""
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "test server did not stop"


@contextmanager
def run_server(engine: LLMEngine, *, api_key: str | None = None, max_queue: int | None = None,
               model_name: str = MODEL_NAME) -> Iterator[LiveServer]:
    async_engine = AsyncEngine(engine, max_queue=max_queue, metrics=EngineMetrics(model_name))
    app = build_app(ServerContext(async_engine, model_name, api_key=api_key))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
    # As the launcher does once the server is built: here the heap is the whole test session's (every earlier
    # test's models and modules, millions of objects), and one full collection of it holds the GIL, which the
    # server's threads share with the test process, for ~0.25 s per 3M objects (measured): a possible cause of
    # /metrics taking 280 ms in CI (test_event_loop's bound is 250; the likelier one, the tokenizer's GIL-held free
    # of a huge Encoding, is gone: loader/tokenizer.py).
    freeze_startup_objects()
    try:
        with uvicorn_in_thread(GracefulServer(config, async_engine, drain_timeout=1.0)):
            yield LiveServer(f"http://127.0.0.1:{port}", engine, async_engine, api_key, model_name)
    finally:
        gc.unfreeze()  # what later tests drop must be collectable again


def small_engine(loaded: Any, **kwargs: Any) -> LLMEngine:
    kwargs.setdefault("dtype", "float32")  # HF parity; the machine-dependent default has its own tests
    config = EngineConfig.from_kwargs(num_blocks=kwargs.pop("num_blocks", 512), **kwargs)
    return LLMEngine(config, loaded)


@pytest.fixture(scope="module")
def engine(default_loaded: Any) -> LLMEngine:
    """The default model behind the shared server (tests may read its state, never step it)."""
    return small_engine(default_loaded)


@pytest.fixture(scope="module")
def server(engine: LLMEngine) -> Iterator[LiveServer]:
    with run_server(engine, api_key=API_KEY) as live:
        yield live
