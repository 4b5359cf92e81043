"""Bad input is rejected with a ValueError naming the field, and the engine keeps serving."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(model=str(tiny_checkpoint("llama")), max_model_len=128, kv_cache_memory=16 << 20)


GOOD = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize(
    "make_call, field",
    [
        (lambda llm: llm.generate("", GOOD, use_tqdm=False), "prompt"),
        (lambda llm: llm.generate([[]], GOOD, use_tqdm=False), "prompt"),
        (lambda llm: llm.generate("hi", SamplingParams(max_tokens=0), use_tqdm=False), "max_tokens"),
        (lambda llm: llm.generate("hi", SamplingParams(temperature=-0.5), use_tqdm=False), "temperature"),
        (lambda llm: llm.generate("hi", SamplingParams(top_p=0.0), use_tqdm=False), "top_p"),
        (lambda llm: llm.generate("hi", SamplingParams(top_p=1.5), use_tqdm=False), "top_p"),
        (lambda llm: llm.generate("hi", SamplingParams(stop=123), use_tqdm=False), "stop"),
        (lambda llm: llm.generate("hi", SamplingParams(stop=["ok", 5]), use_tqdm=False), "stop"),
        (lambda llm: llm.generate([[5] * 200], GOOD, use_tqdm=False), "max_model_len"),
        (lambda llm: llm.generate([[10**9]], GOOD, use_tqdm=False), "token ids"),
        (lambda llm: llm.generate("hi", SamplingParams(logprobs=10**9), use_tqdm=False), "logprobs"),
        (lambda llm: llm.chat([], GOOD, use_tqdm=False), "messages"),
    ],
)
def test_bad_input_then_engine_still_serves(llm: LLM, make_call, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_call(llm)
    out = llm.generate("The next request", GOOD, use_tqdm=False)[0]
    assert out.finished and len(out.outputs[0].token_ids) == 4
    assert not llm.engine.has_unfinished_requests()
    kv = llm.engine.core.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_bad_request_in_a_batch_rejects_the_batch_cleanly(llm: LLM) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(["fine", "also fine"], [GOOD, SamplingParams(max_tokens=-1)], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    outs = llm.generate(["fine", "also fine"], GOOD, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_failing_step_fails_its_requests_not_the_engine(llm: LLM, monkeypatch) -> None:
    runner = llm.engine.core.runner
    real_execute = runner.execute
    calls = {"n": 0}

    def fail_once(scheduled):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel failure")
        return real_execute(scheduled)

    monkeypatch.setattr(runner, "execute", fail_once)
    failed = llm.generate(["one", "two"], GOOD, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in failed] == ["error", "error"]
    out = llm.generate("after the failure", GOOD, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 4
    kv = llm.engine.core.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
