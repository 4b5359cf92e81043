"""Admission, errors, auth, engine failures and shutdown of the server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import LiveServer, free_port, run_server, small_engine


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    return body


@pytest.mark.parametrize(("payload", "param"), [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "hi", "suffix": "tail"}, "suffix"),
    ({"max_tokens": 3}, "prompt"),
])
def test_completion_validation_is_400_naming_the_field(server: LiveServer, payload: dict, param: str) -> None:
    response = httpx.post(server.v1 + "/completions", json=payload, headers=server.headers())
    body = _error(response, 400)
    assert body["param"] == param, body


def test_chat_validation_and_context_length(server: LiveServer) -> None:
    url, headers = server.v1 + "/chat/completions", server.headers()
    assert _error(httpx.post(url, json={"messages": []}, headers=headers), 400)["param"] == "messages"
    bad_role = {"messages": [{"role": "wizard", "content": "x"}]}
    assert _error(httpx.post(url, json=bad_role, headers=headers), 400)["param"].startswith("messages")
    tools = {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
    assert _error(httpx.post(url, json=tools, headers=headers), 400)["param"] == "tools"
    too_long = {"prompt": "word " * (server.engine.max_model_len + 10), "max_tokens": 4}
    body = _error(httpx.post(server.v1 + "/completions", json=too_long, headers=headers), 400)
    assert "context length" in body["message"] and body["param"] == "prompt"
    over = {"prompt": "hi", "max_tokens": server.engine.max_model_len}
    assert _error(httpx.post(server.v1 + "/completions", json=over, headers=headers), 400)["param"] == "max_tokens"
    not_json = httpx.post(url, content=b"{nope", headers={**headers, "Content-Type": "application/json"})
    assert "not valid JSON" in _error(not_json, 400)["message"]
    assert _error(httpx.post(url, json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
                             headers=headers), 404)["param"] == "model"
    server.wait_idle()


def test_openai_client_raises_bad_request(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model_name, prompt="hi", temperature=5.0, top_p=2.0)
    assert info.value.body["param"] == "top_p"


def test_api_key_required_except_health(server: LiveServer) -> None:
    for path in ("/v1/models", "/tokenize"):
        response = httpx.request("GET" if path.endswith("models") else "POST", server.base_url + path,
                                 json={"prompt": "x"})
        assert _error(response, 401)["type"] == "AuthenticationError"
    wrong = httpx.get(server.v1 + "/models", headers={"Authorization": "Bearer nope"})
    _error(wrong, 401)
    assert httpx.get(server.base_url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0).models.list()


@pytest.fixture(scope="module")
def tiny_loaded(tiny_checkpoint: Any) -> Any:
    from tokenmill.loader import load_model

    return load_model(tiny_checkpoint("llama"))


def test_queue_full_is_429_with_retry_after(tiny_loaded: Any) -> None:
    engine = small_engine(tiny_loaded, max_num_seqs=1)
    with run_server(engine, max_queue=2) as live:
        body = {"model": live.model_name, "prompt": [5, 6, 7], "max_tokens": 300, "ignore_eos": True}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(http.post(live.v1 + "/completions", json=body) for _ in range(8)))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and 429 in statuses, statuses
        for r in responses:
            if r.status_code == 429:
                assert r.headers["Retry-After"] and _error(r, 429)["type"] == "RateLimitError"
        live.wait_idle()


def test_engine_failure_fails_only_that_request(tiny_loaded: Any) -> None:
    engine = small_engine(tiny_loaded)
    runner = engine.core.runner
    original = runner.execute
    poison = 4242

    def execute(scheduled: Any) -> Any:
        if any(poison in s.token_ids for s in scheduled):
            raise RuntimeError("injected kernel failure")
        return original(scheduled)

    runner.execute = execute
    with run_server(engine) as live:
        url = live.v1 + "/completions"
        bad = httpx.post(url, json={"prompt": [5, poison, 7], "max_tokens": 4}, timeout=60)
        assert _error(bad, 500)["type"] == "InternalServerError"
        with httpx.stream("POST", url, json={"prompt": [5, poison], "max_tokens": 4, "stream": True},
                          timeout=60) as streamed:
            events = [line for line in streamed.iter_lines() if line.startswith("data:")]
        assert "error" in json.loads(events[-2][5:]) and events[-1] == "data: [DONE]"
        good = httpx.post(url, json={"prompt": [5, 6, 7], "max_tokens": 4}, timeout=60)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
        assert live.metric("tokenmill:request_success_total", 'finished_reason="error"') == 2
        live.wait_idle()


def test_sigterm_aborts_in_flight_requests_and_exits_cleanly(tiny_checkpoint: Any, tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--model", str(tiny_checkpoint("llama")),
           "--port", str(port), "--drain-timeout", "1", "--num-blocks", "256"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert first
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        final = json.loads(rest[-2][5:])
        assert final["choices"][0]["finish_reason"] in ("abort", "length")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_startup_objects_are_frozen_out_of_the_collector() -> None:
    """`tokenmill serve` freezes what start-up built, so no later collection rescans it."""
    import gc

    from tokenmill.entrypoints.openai.launcher import freeze_startup_objects

    survivor = [object()]
    try:
        frozen = freeze_startup_objects()
        # Other threads left by earlier tests may free frozen objects meanwhile, which lowers the count.
        assert 0 < gc.get_freeze_count() <= frozen
        assert not any(obj is survivor for obj in gc.get_objects())  # frozen objects are not tracked anymore
    finally:
        gc.unfreeze()
    assert any(obj is survivor for obj in gc.get_objects())
