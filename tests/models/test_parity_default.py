"""Greedy parity with HF transformers (fp32) on the real default model, SmolLM2-135M-Instruct."""

from __future__ import annotations

from typing import Any

import pytest

from tests.models.utils import check_outputs_equal, hf_greedy
from tokenmill import LLM, SamplingParams
from tokenmill.bench.throughput import build_hf_model

MAX_TOKENS = 32

PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old woodcutter who",
    "List three colours:",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a famous physicist and one of their discoveries, briefly."}],
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    tok = llm.tokenizer
    ids = [tok.encode(p) for p in PLAIN_PROMPTS]
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids.append(tok.encode(text, add_special_tokens=False))
    return ids


@pytest.fixture(scope="module")
def hf_expected(default_loaded: Any, prompts: list[list[int]]) -> list[tuple[list[int], str]]:
    model = build_hf_model(default_loaded)
    return [(ids, text) for ids, text, _ in hf_greedy(model, default_loaded.tokenizer, prompts, MAX_TOKENS)]


PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_batched_matches_hf(llm: LLM, prompts: list[list[int]], hf_expected) -> None:
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
    check_outputs_equal(
        outputs_0=hf_expected, outputs_1=[(o.outputs[0].token_ids, o.outputs[0].text) for o in outputs],
        name_0="hf", name_1="tokenmill-batched",
    )


def test_one_at_a_time_matches_hf(llm: LLM, prompts: list[list[int]], hf_expected) -> None:
    outputs = [llm.generate([p], PARAMS, use_tqdm=False)[0] for p in prompts]
    check_outputs_equal(
        outputs_0=hf_expected, outputs_1=[(o.outputs[0].token_ids, o.outputs[0].text) for o in outputs],
        name_0="hf", name_1="tokenmill-single",
    )


def test_chat_api_uses_template(llm: LLM, prompts: list[list[int]], hf_expected) -> None:
    outputs = llm.chat(CHATS, PARAMS, use_tqdm=False)
    n_plain = len(PLAIN_PROMPTS)
    for out, ids, (ref_ids, ref_text) in zip(outputs, prompts[n_plain:], hf_expected[n_plain:]):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == ref_ids
        assert out.outputs[0].text == ref_text
