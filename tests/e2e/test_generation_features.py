"""End-to-end sampling features through LLM.generate on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(dtype="float32", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=32 << 20)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(3, 40000, (37,), generator=torch.Generator().manual_seed(3)).tolist()


def test_seeded_sampling_independent_of_batch(llm: LLM, prompt: list[int]) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=10, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True)
    batch = llm.generate([prompt[:5], prompt, prompt[3:]], [others, seeded, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_n_samples_share_prompt_blocks(llm: LLM, prompt: list[int]) -> None:
    kv = llm.engine.core.kv_cache_manager
    kv.reset_prefix_cache()
    hits_before = kv.prefix_cache_hits
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    # Samples 1 and 2 take the prompt's 4 full blocks (32 tokens) from sample 0.
    assert kv.prefix_cache_hits - hits_before == 2 * 32
    assert kv.num_free_blocks == kv.num_blocks


def test_stop_token_ids_and_min_tokens(llm: LLM, prompt: list[int]) -> None:
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    ids = greedy[0].outputs[0].token_ids
    stop_at = ids[3]
    first = ids.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    later = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=8, stop_token_ids=[stop_at]),
                         use_tqdm=False)[0].outputs[0]
    assert len(later.token_ids) == 8 and later.finish_reason == "length"


def test_stop_string(llm: LLM, prompt: list[int]) -> None:
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    text = full[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "degenerate text for this test"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole", "chunked"])
def test_prompt_logprobs_match_hf(llm: LLM, prompt: list[int], tiny_checkpoint, chunk: int | None) -> None:
    """Every prompt position, also when the prompt is prefilled in chunks of 16 tokens over 3 steps."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], dim=-1)
    if chunk is not None:
        llm = LLM(dtype="float32", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=32 << 20,
                  max_num_batched_tokens=chunk, enable_chunked_prefill=True)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        top3 = ref[pos - 1].topk(3).indices.tolist()
        assert set(top3) <= set(entry)


def test_timings_and_finish_reasons(llm: LLM, prompt: list[int]) -> None:
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    assert out.outputs[0].finish_reason == "length"
    assert m.first_token_time is not None and m.finished_time is not None
    assert 0 <= m.time_to_first_token <= m.e2e_latency
