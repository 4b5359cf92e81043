"""LLM.generate takes vLLM's prompt dicts beside plain texts and token-id lists, refuses bad dicts with a
ValueError that says what is wrong, and refuses texts too long for the context before tokenizing them."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.entrypoints.llm import LLM as LLMClass

TEXT = "The capital of France is"


@pytest.mark.parametrize(("prompts", "expected"), [
    ({"prompt": TEXT}, [TEXT]),
    ({"prompt_token_ids": [1, 2, 3]}, [[1, 2, 3]]),
    ([{"prompt": TEXT}, {"prompt_token_ids": (4, 5)}], [TEXT, [4, 5]]),
    ([TEXT, [7, 8], {"prompt_token_ids": [9]}, {"prompt": "x"}], [TEXT, [7, 8], [9], "x"]),
    ([1, 2, 3], [[1, 2, 3]]),
    (TEXT, [TEXT]),
])
def test_prompt_forms(prompts: Any, expected: list) -> None:
    assert LLMClass._as_prompt_list(prompts) == expected


@pytest.mark.parametrize(("prompts", "message"), [
    ({"text": TEXT}, r"prompt: unsupported key\(s\) \['text'\]"),
    ({"prompt": TEXT, "multi_modal_data": {}}, r"unsupported key\(s\) \['multi_modal_data'\]"),
    ({}, "exactly one of 'prompt'"),
    ({"prompt": TEXT, "prompt_token_ids": [1]}, "exactly one of 'prompt'"),
    ([TEXT, {"prompt": 5}], r"prompts\[1\]: 'prompt' must be a string, got int"),
    ([{"prompt_token_ids": "1 2 3"}], "'prompt_token_ids' must be a list of token ids"),
    ([{"prompt_token_ids": [1, 2.5]}], "'prompt_token_ids' must be a list of token ids"),
    ([{"prompt_token_ids": [True]}], "'prompt_token_ids' must be a list of token ids"),
])
def test_bad_prompt_dicts_say_what_is_wrong(prompts: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLMClass._as_prompt_list(prompts)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", num_blocks=64)


def test_dicts_generate_what_plain_prompts_do(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6)
    ids = llm.tokenizer.encode(TEXT)
    plain = llm.generate([TEXT, ids], params, use_tqdm=False)
    dicts = llm.generate([{"prompt": TEXT}, {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert dicts[0].prompt == TEXT and dicts[1].prompt is None and dicts[1].prompt_token_ids == ids
    single = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert single[0].outputs[0].token_ids == plain[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt token ids must be integers"):
        llm.generate({"prompt_token_ids": [10**9]}, params, use_tqdm=False)


def test_text_too_long_for_the_context_is_refused_before_tokenizing(llm: LLM) -> None:
    huge = "word " * (llm.engine.max_model_len * 100)
    with pytest.raises(ValueError, match=r"prompts\[1\]: .*maximum context length"):
        llm.generate(["hi", huge], SamplingParams(max_tokens=1), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
