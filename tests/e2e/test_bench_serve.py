"""`tokenmill bench serve` against a tiny fake OpenAI-compatible streaming server run in this process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request  # module level: the route annotations are resolved from here
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.bench.serve import (
    ServeBenchConfig,
    ServerError,
    arrival_delays,
    benchmark,
    load_default_tokenizer,
    random_requests,
)
from tokenmill.bench.serve_metrics import parse_goodput, parse_percentiles

MODEL = "fake-model"


@dataclass
class FakeBehaviour:
    """How the fake server answers; the k-th request (1-based, in arrival order) is slow when
    k % slow_every == 0 and gets HTTP 500 when k % fail_every == 0."""

    slow_every: int = 0
    slow_s: float = 0.6
    fail_every: int = 0
    send_usage: bool = True
    token_gap_s: float = 0.002
    bodies: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0


def _chunk(chat: bool, text: str | None, finish: str | None = None) -> str:
    if chat:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = "text_completion"
    return "data: " + json.dumps({"id": "x", "object": obj, "model": MODEL, "choices": [choice]}) + "\n\n"


def _make_app(behaviour: FakeBehaviour) -> Any:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def generate(request: Request, chat: bool) -> Any:
        body = await request.json()
        behaviour.bodies.append(body)
        behaviour.count += 1
        k, b = behaviour.count, behaviour
        if b.fail_every and k % b.fail_every == 0:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        n = int(body["max_tokens"])

        async def stream() -> Any:
            if b.slow_every and k % b.slow_every == 0:
                await asyncio.sleep(b.slow_s)
            if chat:  # like vLLM and OpenAI: a role chunk with empty content comes first
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) + "\n\n"
            yield ": keep-alive comment\n\n"
            for i in range(n):
                await asyncio.sleep(b.token_gap_s)
                yield _chunk(chat, f" t{i}")
            yield _chunk(chat, None, finish="length")
            if b.send_usage and (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server() -> Any:
    import uvicorn

    behaviour = FakeBehaviour()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_make_app(behaviour), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{port}", behaviour
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def server(fake_server: Any) -> Any:
    url, behaviour = fake_server
    behaviour.__init__()  # a fresh behaviour (and request counter) per test; the app keeps the object
    return url, behaviour


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve-bench-tokenizer")
    tokenizer.save_pretrained(path)
    return path


def _run(url: str, tokenizer: Any, **kwargs: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {"base_url": url, "num_prompts": 6, "input_len": 24, "output_len": 5}
    return benchmark(ServeBenchConfig(**(defaults | kwargs)), tokenizer=tokenizer)


def test_completions_all_complete_with_exact_counts(server: Any, tokenizer: Any) -> None:
    url, behaviour = server
    report = _run(url, tokenizer, output_len_range=(2, 7), max_concurrency=3, percentiles=[50, 90, 99])
    assert report["completed"] == 6 and report["failed"] == 0 and report["errors"] == [], report["errors"]
    requested = [b["max_tokens"] for b in behaviour.bodies]
    assert all(2 <= n <= 7 for n in requested)
    assert report["total_output_tokens"] == sum(requested)
    assert sorted(r["output_tokens"] for r in report["requests"]) == sorted(requested)
    assert all(r["usage_reported"] for r in report["requests"])
    # Prompts have exactly the requested length in tokens.
    assert all(r["prompt_len"] == 24 for r in report["requests"])
    assert report["total_input_tokens"] == 6 * 24
    for r in report["requests"]:
        assert 0 < r["ttft_ms"] < r["e2el_ms"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert report[f"p50_{name}_ms"] <= report[f"p90_{name}_ms"] <= report[f"p99_{name}_ms"]
        assert report[f"mean_{name}_ms"] > 0 and report[f"std_{name}_ms"] >= 0
    assert report["mean_ttft_ms"] < report["mean_e2el_ms"]
    assert report["request_throughput"] > 0 and report["output_throughput"] > 0
    assert report["total_token_throughput"] > report["output_throughput"]


def test_request_body_asks_for_exact_greedy_streamed_output(server: Any, tokenizer: Any) -> None:
    url, behaviour = server
    _run(url, tokenizer, num_prompts=2, output_len=3, request_rate=100.0, extra_body={"top_k": 1})
    for body in behaviour.bodies:
        assert body["model"] == MODEL and body["max_tokens"] == body["min_tokens"] == 3
        assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["top_k"] == 1
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert isinstance(body["prompt"], str)


def test_chat_endpoint(server: Any, tokenizer: Any) -> None:
    url, behaviour = server
    report = _run(url + "/v1", tokenizer, endpoint="/v1/chat/completions", num_prompts=4, output_len=4)
    assert report["completed"] == 4 and report["total_output_tokens"] == 16
    assert all(body["messages"][0]["role"] == "user" for body in behaviour.bodies)
    # The empty role chunk is not the first token: each request has 4 content chunks -> 3 gaps.
    assert all(r["ttft_ms"] < r["e2el_ms"] for r in report["requests"])
    assert report["median_itl_ms"] is not None


def test_output_tokens_counted_from_chunks_without_usage(server: Any, tokenizer: Any) -> None:
    url, behaviour = server
    behaviour.send_usage = False
    report = _run(url, tokenizer, num_prompts=3, output_len=6)
    assert report["completed"] == 3 and report["total_output_tokens"] == 18
    assert not any(r["usage_reported"] for r in report["requests"])


def test_goodput_counts_only_requests_within_slo(server: Any, tokenizer: Any) -> None:
    url, behaviour = server
    behaviour.slow_every = 2  # requests 2, 4, 6, 8 wait 0.6 s before their first token
    report = _run(url, tokenizer, num_prompts=8, output_len=3, goodput_slos_ms=parse_goodput(["ttft:300"]))
    assert report["completed"] == 8
    assert report["good_completed"] == 4
    assert report["request_goodput"] == pytest.approx(4 / report["duration"])
    assert report["p99_ttft_ms"] >= 600


def test_http_500_counts_as_failed(server: Any, tokenizer: Any) -> None:
    url, behaviour = server
    behaviour.fail_every = 3
    report = _run(url, tokenizer, num_prompts=6, output_len=2)
    assert report["completed"] == 4 and report["failed"] == 2
    assert len(report["errors"]) == 2 and all(e.startswith("HTTP 500") and "boom" in e for e in report["errors"])
    assert report["total_output_tokens"] == 8


def test_unreachable_server_raises_server_error(tokenizer: Any) -> None:
    with pytest.raises(ServerError, match="cannot reach the server"):
        _run(f"http://127.0.0.1:{_free_port()}", tokenizer)


def test_arrival_delays() -> None:
    assert arrival_delays(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    delays = arrival_delays(4001, 20.0, 1.0, 0)
    assert delays[0] == 0.0 and delays == sorted(delays)
    assert delays[-1] / 4000 == pytest.approx(1 / 20.0, rel=0.1)
    assert arrival_delays(50, 5.0, 0.5, 3) == arrival_delays(50, 5.0, 0.5, 3)


def test_shared_prefix_prompts(tokenizer: Any) -> None:
    config = ServeBenchConfig(num_prompts=6, input_len=20, prefix_len=50, num_prefixes=2)
    requests = random_requests(tokenizer, config, 6, 0)
    ids = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in requests]
    assert [r.prompt_len for r in requests] == [len(i) for i in ids]
    assert all(68 <= len(i) <= 72 for i in ids)
    assert ids[0][:45] == ids[2][:45] == ids[4][:45] and ids[1][:45] == ids[3][:45]
    assert ids[0][:45] != ids[1][:45] and ids[0][50:] != ids[2][50:]
    with pytest.raises(ValueError, match="num_prefixes"):
        ServeBenchConfig(prefix_len=10, num_prefixes=0)


@pytest.mark.parametrize("items", [["ttft"], ["foo:3"], ["ttft:x"], ["e2el:-1"]])
def test_bad_goodput(items: list[str]) -> None:
    with pytest.raises(ValueError):
        parse_goodput(items)


def test_percentiles_parse() -> None:
    assert parse_percentiles("99,50,90") == [50.0, 90.0, 99.0]
    with pytest.raises(ValueError):
        parse_percentiles("0,50")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "bench", "serve", *args],
        check=False, capture_output=True, text=True, timeout=120,
    )


def test_cli_writes_json_and_prints_table(server: Any, tokenizer_dir: Path, tmp_path: Path) -> None:
    url, behaviour = server
    out = tmp_path / "serve.json"
    result = _cli(
        "--base-url", url, "--tokenizer", str(tokenizer_dir), "--num-prompts", "5", "--input-len-range", "8:20",
        "--output-len", "4", "--max-concurrency", "2", "--request-rate", "200", "--warmup", "1",
        "--goodput", "ttft:5000", "e2el:10000", "--percentiles", "50,90,99.9", "--output-json", str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "Serving Benchmark Result" in result.stdout and "P99.9 TTFT (ms)" in result.stdout
    assert len(behaviour.bodies) == 6  # one warmup request + five timed ones
    report = json.loads(out.read_text())
    expected_keys = {
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
        "request_goodput", "output_throughput", "total_token_throughput", "errors", "requests", "config", "model",
    }
    for name in ("ttft", "tpot", "itl", "e2el"):
        expected_keys |= {f"{s}_{name}_ms" for s in ("mean", "median", "std", "p50", "p90", "p99.9")}
    assert expected_keys <= set(report)
    assert report["completed"] == 5 and report["total_output_tokens"] == 20 and report["good_completed"] == 5
    assert all(8 <= r["prompt_len"] <= 20 for r in report["requests"])
    assert report["model"] == MODEL and "api_key" not in report["config"]


def test_cli_unreachable_server_is_one_line_error() -> None:
    result = _cli("--base-url", f"http://127.0.0.1:{_free_port()}", "--num-prompts", "1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the server"), result.stderr
