"""Per-request telemetry: usage.prompt_tokens_details.cached_tokens in every response (streamed usage chunks
included) and, with "return_timings": true, the request's queue, prefill and decode time, preemptions and
speculative acceptance."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME, LiveServer, run_server, small_engine

# Several KV blocks long (block_size 16), so a repeat hits the prefix cache.
LONG_PROMPT = "Telemetry check: " + " ".join(f"item {i} is number {i * 7 % 13};" for i in range(40))
TIMED = {"return_timings": True}
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


def _check_timings(timings: dict[str, Any], *, speculative: bool = False) -> None:
    for phase in ("queue_time", "prefill_time", "decode_time", "time_to_first_token", "e2e_latency"):
        assert timings[phase] is not None and timings[phase] >= 0, (phase, timings)
    assert timings["time_to_first_token"] <= timings["e2e_latency"]
    # Equal for one prompt; over several, each phase spans from the earliest start to the latest end.
    assert timings["queue_time"] + timings["prefill_time"] >= timings["time_to_first_token"] - 1e-9
    assert timings["num_preemptions"] >= 0
    if speculative:
        assert 0 < timings["num_accepted_tokens"] <= timings["num_draft_tokens"]
        assert timings["acceptance_rate"] == pytest.approx(timings["num_accepted_tokens"] / timings["num_draft_tokens"])
    else:
        assert timings["num_draft_tokens"] is timings["num_accepted_tokens"] is timings["acceptance_rate"] is None


def test_cached_tokens_in_every_response(client: openai.OpenAI, server: LiveServer) -> None:
    first = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT + " a", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT + " a", max_tokens=2, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0
    stream = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT + " a", max_tokens=2, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens == cached
    messages = [{"role": "user", "content": LONG_PROMPT}]
    chat = [client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2) for _ in range(2)]
    assert chat[0].usage.prompt_tokens_details.cached_tokens == 0 < chat[1].usage.prompt_tokens_details.cached_tokens
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[0].prompt_tokens_details.cached_tokens == chat[1].usage.prompt_tokens_details.cached_tokens
    server.wait_idle()


def test_timings_only_when_asked(client: openai.OpenAI, server: LiveServer) -> None:
    plain = httpx.post(server.v1 + "/completions", headers=server.headers(),
                       json={"prompt": "Hello", "max_tokens": 3}).json()
    assert "timings" not in plain
    done = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=5, temperature=0,
                                     extra_body=TIMED)
    _check_timings(done.model_extra["timings"])
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, extra_body=TIMED)
    _check_timings(chat.model_extra["timings"])
    two = client.completions.create(model=MODEL_NAME, prompt=["One", "Two"], max_tokens=3, n=2, extra_body=TIMED)
    assert len(two.choices) == 4
    _check_timings(two.model_extra["timings"])  # the two prompts' phases together


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_timings_in_the_last_chunk(client: openai.OpenAI, include_usage: bool) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": include_usage}, extra_body=TIMED)
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and (last.usage is not None) == include_usage
    _check_timings(last.model_extra["timings"])
    assert all((c.model_extra or {}).get("timings") is None for c in chunks[:-1])
    completion = list(client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, stream=True,
                                                extra_body=TIMED))
    _check_timings(completion[-1].model_extra["timings"])


def test_timings_count_preemptions(default_loaded: Any) -> None:
    # 16 blocks of 16 tokens cannot hold 4 requests of ~20 + 80 tokens at once: some are preempted and resumed.
    with run_server(small_engine(default_loaded, num_blocks=16)) as live:
        client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=300)

        def one(i: int) -> dict[str, Any]:
            done = client.completions.create(model=MODEL_NAME, prompt=f"Story number {i}: once upon a time there",
                                             max_tokens=80, temperature=0, extra_body={**TIMED, "ignore_eos": True})
            assert done.choices[0].finish_reason == "length"
            return done.model_extra["timings"]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            all_timings = list(pool.map(one, range(4)))
        live.wait_idle()
        for timings in all_timings:
            _check_timings(timings)
        total = sum(t["num_preemptions"] for t in all_timings)
        assert total > 0
        assert total == live.metric("tokenmill:num_preemptions_total")


def test_timings_report_speculative_acceptance(default_loaded: Any) -> None:
    prompt = "one two three four five one two three four five one two three four five one two three"
    with run_server(small_engine(default_loaded, speculative_config=NGRAM)) as live:
        client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
        done = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0,
                                         extra_body=TIMED)
        _check_timings(done.model_extra["timings"], speculative=True)
