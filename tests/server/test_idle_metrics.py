"""/metrics tells the truth on an idle server: the gauges (running, waiting, KV-cache usage) follow every change of
the engine's state (aborts, failed steps, going idle), not only engine steps."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from tests.server.conftest import LiveServer, run_server, small_engine
from tokenmill.loader import load_model

GAUGES = ("tokenmill:num_requests_running", "tokenmill:num_requests_waiting", "tokenmill:kv_cache_usage_perc")
NUM_STREAMS = 12


@pytest.fixture(scope="module")
def tiny_loaded(tiny_checkpoint: Any) -> Any:
    return load_model(tiny_checkpoint("llama"))


def _slow_steps(engine: Any, delay_s: float) -> None:
    """Each engine step takes at least delay_s, so the streams are still running when their clients leave."""
    step = engine.step

    def slow_step() -> Any:
        time.sleep(delay_s)
        return step()

    engine.step = slow_step


def _gauges(live: LiveServer) -> dict[str, float]:
    return {name: live.metric(name) for name in GAUGES}


def _wait_gauges_zero(live: LiveServer, deadline_s: float = 2.0) -> dict[str, float]:
    """Polls /metrics (sending no request) until every gauge reads 0; returns the last reading."""
    deadline = time.monotonic() + deadline_s
    while True:
        gauges = _gauges(live)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.05)


def test_gauges_fall_to_zero_after_clients_drop_their_streams(tiny_loaded: Any) -> None:
    engine = small_engine(tiny_loaded, max_num_seqs=NUM_STREAMS // 2)  # half run, half wait
    _slow_steps(engine, 0.005)
    with run_server(engine) as live:
        body = {"prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True, "stream": True}
        with ExitStack() as streams:
            http = streams.enter_context(httpx.Client(base_url=live.v1, timeout=60))
            responses = [streams.enter_context(http.stream("POST", "/completions", json=body))
                         for _ in range(NUM_STREAMS)]
            assert all(r.status_code == 200 for r in responses)
            first = next(line for line in responses[0].iter_lines() if line.startswith("data:"))
            assert "text" in json.loads(first[5:])["choices"][0]  # generating (the later half still waits)
            busy = _gauges(live)
            assert busy["tokenmill:num_requests_running"] > 0 and busy["tokenmill:kv_cache_usage_perc"] > 0, busy
            assert busy["tokenmill:num_requests_waiting"] > 0, busy
        # Every client is gone mid-stream; nothing else is sent to the server.
        gauges = _wait_gauges_zero(live)
        assert not any(gauges.values()), gauges
        assert live.metric("tokenmill:request_success_total", 'finished_reason="abort"') == NUM_STREAMS
        live.wait_idle()


def test_gauges_fall_to_zero_after_a_failed_step(tiny_loaded: Any) -> None:
    engine = small_engine(tiny_loaded)
    processor = engine.output_processor
    process_outputs = processor.process_outputs
    calls = {"n": 0}

    def failing_process_outputs(outputs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # past the prompt: requests run and hold KV blocks
            raise RuntimeError("injected output-processing failure")
        return process_outputs(outputs)

    processor.process_outputs = failing_process_outputs
    with run_server(engine) as live:
        response = httpx.post(live.v1 + "/completions", json={"prompt": [5, 6, 7], "max_tokens": 8}, timeout=60)
        assert response.status_code == 500, response.text
        gauges = _wait_gauges_zero(live)
        assert not any(gauges.values()), gauges
        ok = httpx.post(live.v1 + "/completions", json={"prompt": [5, 6, 7], "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
        live.wait_idle()
