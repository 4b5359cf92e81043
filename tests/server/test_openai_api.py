"""The official `openai` client (sync and async) against a live tokenmill server on the default model."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import LiveServer
from tokenmill import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline_greedy() -> dict[str, str]:
    llm = LLM(dtype="float32", num_blocks=256)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}


def test_models_lists_the_served_model(client: openai.OpenAI, server: LiveServer) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_name]


def test_completion_greedy_equals_offline(client: openai.OpenAI, offline_greedy: dict[str, str]) -> None:
    for prompt in PROMPTS:
        result = client.completions.create(model="smollm2-test", prompt=prompt, max_tokens=24, temperature=0)
        assert result.choices[0].text == offline_greedy[prompt]
        assert result.choices[0].finish_reason in ("length", "stop")
        assert result.usage.completion_tokens <= 24 and result.usage.prompt_tokens > 0


def test_completion_batch_of_prompts_and_token_prompt(client: openai.OpenAI, offline_greedy: dict[str, str],
                                                     server: LiveServer) -> None:
    result = client.completions.create(model="smollm2-test", prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.index for c in result.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in result.choices] == [offline_greedy[p] for p in PROMPTS]
    ids = server.engine.tokenizer.encode(PROMPTS[0])
    by_ids = client.completions.create(model="smollm2-test", prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == offline_greedy[PROMPTS[0]]


def test_streaming_completion_matches_non_streaming(client: openai.OpenAI, offline_greedy: dict[str, str]) -> None:
    stream = client.completions.create(model="smollm2-test", prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline_greedy[PROMPTS[2]]
    assert len([c for c in chunks if c.choices]) > 3  # token by token, not one buffered blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_chat_streaming_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    full = client.chat.completions.create(model="smollm2-test", messages=messages, max_tokens=20, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    stream = client.chat.completions.create(model="smollm2-test", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    # A multi-turn conversation with an assistant turn goes through the template too.
    turns = messages + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    again = client.chat.completions.create(model="smollm2-test", messages=turns, max_completion_tokens=8)
    assert again.usage.prompt_tokens > full.usage.prompt_tokens and again.usage.completion_tokens <= 8


def test_n_samples_and_seed_reproducibility(client: openai.OpenAI) -> None:
    kwargs = dict(model="smollm2-test", prompt="My favourite animal is", max_tokens=12, temperature=1.0, top_p=0.95)
    first = client.completions.create(n=3, seed=11, **kwargs)
    second = client.completions.create(n=3, seed=11, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # the samples differ from each other
    other = client.completions.create(n=3, seed=12, **kwargs)
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    chat = dict(model="smollm2-test", messages=[{"role": "user", "content": "Tell me a word."}], max_tokens=8,
                temperature=1.0)
    a = client.chat.completions.create(seed=5, n=2, **chat)
    b = client.chat.completions.create(seed=5, n=2, **chat)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_stop_strings(client: openai.OpenAI, offline_greedy: dict[str, str]) -> None:
    reference = offline_greedy[PROMPTS[1]]
    stop = reference.strip().split()[1]  # a word the greedy output is known to contain
    result = client.completions.create(model="smollm2-test", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                       stop=[stop])
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert reference.startswith(choice.text)
    assert choice.model_extra["stop_reason"] == stop


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    result = client.completions.create(model="smollm2-test", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                       logprobs=3)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == result.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and logprob <= 0.0
        assert top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset)
    echoed = client.completions.create(model="smollm2-test", prompt=PROMPTS[0], max_tokens=2, temperature=0,
                                       logprobs=1, echo=True)
    elp = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith(PROMPTS[0])
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert len(elp.tokens) == echoed.usage.prompt_tokens + 2


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="smollm2-test", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2,
    )
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_concurrent_streams_share_engine_steps(server: LiveServer, offline_greedy: dict[str, str]) -> None:
    client = openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=300)
    multi_before = _steps_with_several_requests(server)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model="smollm2-test", prompt=prompt, max_tokens=24,
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    texts = asyncio.run(main())
    assert texts == [offline_greedy[p] for p in prompts]
    assert _steps_with_several_requests(server) > multi_before
    server.wait_idle()


def _steps_with_several_requests(server: LiveServer) -> float:
    """Engine steps that computed two or more requests together (from the step histogram)."""
    total = server.metric("tokenmill:step_num_requests_count")
    single = server.metric("tokenmill:step_num_requests_bucket", 'le="1.0"')
    return total - single


def test_disconnect_mid_stream_aborts_and_frees_blocks(server: LiveServer) -> None:
    aborted_before = server.metric("tokenmill:request_success_total", 'finished_reason="abort"')
    body = {"model": "smollm2-test", "prompt": "Count: one, two, three,", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.v1 + "/completions", json=body, headers=server.headers()) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [line for _, line in zip(range(10), lines) if line.startswith("data:")]
            assert received
            assert server.engine.has_unfinished_requests()
    server.wait_idle(timeout=10)
    assert server.metric("tokenmill:request_success_total", 'finished_reason="abort"') == aborted_before + 1


def test_tokenize_detokenize_version_health(server: LiveServer) -> None:
    headers = server.headers()
    tok = httpx.post(server.base_url + "/tokenize", json={"prompt": "Hello world"}, headers=headers).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == server.engine.max_model_len
    text = httpx.post(server.base_url + "/detokenize", json={"tokens": tok["tokens"]}, headers=headers).json()
    assert text["prompt"].endswith("Hello world")
    chat = httpx.post(server.base_url + "/tokenize", headers=headers,
                      json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tok["count"]
    assert httpx.get(server.base_url + "/version").json()["version"]
    assert httpx.get(server.base_url + "/health").status_code == 200  # open without the key


def test_metrics_exposes_vllm_style_families(server: LiveServer) -> None:
    text = httpx.get(server.base_url + "/metrics").text
    for family in ("time_to_first_token_seconds", "request_time_per_output_token_seconds",
                   "inter_token_latency_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                   "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                   "generation_tokens_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                   "num_preemptions_total", "request_success_total"):
        assert f"tokenmill:{family}" in text, family
    assert server.metric("tokenmill:generation_tokens_total") > 0
    assert server.metric("tokenmill:time_to_first_token_seconds_count") > 0
