"""Request limits with clear errors: body size (413, declared or chunked), n, logprobs, and prompts refused by
their length before they are tokenized."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from tests.server.conftest import LiveServer
from tokenmill.entrypoints.openai.body_limit import BodyLimitMiddleware
from tokenmill.entrypoints.openai.inputs import RequestLimits, completion_params
from tokenmill.entrypoints.openai.protocol import CompletionRequest
from tokenmill.entrypoints.prompt_limits import text_too_long, token_bound

MiB = 1 << 20


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    return body


# -- body size -------------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_before_parsing(server: LiveServer) -> None:
    body = json.dumps({"prompt": "x" * (16 * MiB + 10), "max_tokens": 1}).encode()
    headers = {**server.headers(), "Content-Type": "application/json"}
    error = _error(httpx.post(server.v1 + "/completions", content=body, headers=headers, timeout=60), 413)
    assert "--max-request-bytes" in error["message"] and str(16 * MiB) in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for start in range(0, len(body), MiB):
            yield body[start:start + MiB]

    error = _error(httpx.post(server.v1 + "/completions", content=chunks(), headers=headers, timeout=60), 413)
    assert "--max-request-bytes" in error["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200


def _echo_app(max_bytes: int) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    return app


@pytest.mark.parametrize("chunked", [False, True])
def test_body_limit_middleware_edges(chunked: bool) -> None:
    async def post(size: int) -> httpx.Response:
        payload = b"a" * size

        async def pieces() -> Any:
            for start in range(0, size, 7):
                yield payload[start:start + 7]

        transport = httpx.ASGITransport(app=_echo_app(100))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/echo", content=pieces() if chunked else payload)

    assert asyncio.run(post(100)).json() == {"size": 100}  # the limit itself is allowed
    assert asyncio.run(post(0)).json() == {"size": 0}
    assert _error(asyncio.run(post(101)), 413)["type"] == "RequestTooLargeError"


# -- n and logprobs --------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "payload", "param"), [
    ("/completions", {"prompt": "hi", "n": 17}, "n"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
    ("/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
])
def test_n_and_logprobs_limits(server: LiveServer, path: str, payload: dict, param: str) -> None:
    body = _error(httpx.post(server.v1 + path, json={**payload, "max_tokens": 1}, headers=server.headers()), 400)
    assert body["param"] == param and f"--max-{param.removeprefix('top_')}" in body["message"]


def test_limits_at_their_bound_are_served(server: LiveServer) -> None:
    done = httpx.post(server.v1 + "/completions", headers=server.headers(), timeout=120,
                      json={"prompt": "hi", "n": 16, "logprobs": 20, "max_tokens": 1}).json()
    assert len(done["choices"]) == 16 and len(done["choices"][0]["logprobs"]["top_logprobs"][0]) >= 20
    server.wait_idle()


def test_custom_limits_apply() -> None:
    limits = RequestLimits(max_n=2, max_logprobs=3)
    assert completion_params(CompletionRequest(prompt="x", n=2, logprobs=3), limits=limits).n == 2
    with pytest.raises(ValueError, match="n must be at most 2"):
        completion_params(CompletionRequest(prompt="x", n=3), limits=limits)
    with pytest.raises(ValueError, match="logprobs must be between 0 and 3"):
        completion_params(CompletionRequest(prompt="x", logprobs=4), limits=limits)
    with pytest.raises(ValueError, match="max_n"):
        RequestLimits(max_n=0)


# -- prompts too long by their length alone --------------------------------------------------------
def test_huge_prompt_is_refused_without_tokenizing(server: LiveServer) -> None:
    text = "All work and no play makes Jack a dull boy. " * (8 * MiB // 44)
    start = time.perf_counter()
    body = _error(httpx.post(server.v1 + "/completions", headers=server.headers(), timeout=60,
                             json={"prompt": text, "max_tokens": 1}), 400)
    assert body["param"] == "prompt" and "context length" in body["message"]
    chat = _error(httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=60,
                             json={"messages": [{"role": "user", "content": text}], "max_tokens": 1}), 400)
    assert chat["param"] == "messages" and "context length" in chat["message"]
    # Tokenizing this text takes ~5 s on a 2-core machine; refusing both by length takes a fraction of it.
    assert time.perf_counter() - start < 3.0
    server.wait_idle()


def test_length_bound_is_sound_for_the_default_tokenizer(server: LiveServer) -> None:
    tokenizer = server.engine.tokenizer
    bound = token_bound(tokenizer)
    assert bound is not None and bound.max_bytes >= max(len(t) for t in tokenizer.get_vocab()) // 2
    pieces = ["a", "  ", "\n    ", " " * 80, "hello", "é", "日本語", "\x04", "\U00050000", "🙂", "<|im_start|>",
              "\t\t"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 200)))
        assert bound.min_tokens(text) <= len(tokenizer.encode(text, add_special_tokens=False)), repr(text)
    # A text just long enough to be refused does tokenize to at least max_model_len tokens.
    max_model_len = 64
    spaces = " " * (bound.max_bytes * (max_model_len - 1) + 1)  # runs of spaces are this vocabulary's longest tokens
    assert text_too_long(spaces, bound, max_model_len) is not None
    assert len(tokenizer.encode(spaces)) >= max_model_len
    assert text_too_long(spaces[:-1], bound, max_model_len) is None
