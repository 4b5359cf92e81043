"""The same greedy output (equal to HF) under chunked prefill, prefix hits, preemption and max_num_seqs."""

from __future__ import annotations

import pytest
import torch

from tests.models.utils import hf_greedy
from tokenmill import LLM, SamplingParams

MAX_TOKENS = 12
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint("llama")
    gen = torch.Generator().manual_seed(11)
    shared = torch.randint(3, 40000, (40,), generator=gen).tolist()  # 5 full blocks of 8
    prompts = [shared + torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (3, 9, 20)]
    prompts += [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (2, 30, 57)]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [ids for ids, _, _ in hf_greedy(hf_model, AutoTokenizer.from_pretrained(path), prompts, MAX_TOKENS)]
    return str(path), prompts, expected


def _run(path: str, prompts: list[list[int]], **engine_args) -> tuple[LLM, list[list[int]]]:
    llm = LLM(dtype="float32", model=path, block_size=8, **engine_args)
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


def _assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.engine.core.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_chunked_prefill(setup) -> None:
    path, prompts, expected = setup
    llm, got = _run(path, prompts, max_num_batched_tokens=7, kv_cache_memory=16 << 20)
    assert got == expected
    _assert_all_blocks_free(llm)


def test_prefix_hits(setup) -> None:
    path, prompts, expected = setup
    llm = LLM(dtype="float32", model=path, block_size=8, kv_cache_memory=16 << 20)
    # First the request that fills the cache, then the two that share its 40-token prefix.
    first = llm.generate([prompts[0]], PARAMS, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    rest = llm.generate(prompts[1:3], PARAMS, use_tqdm=False)
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == expected[:3]
    assert [o.num_cached_tokens for o in rest] == [40, 40]
    assert llm.engine.core.kv_cache_manager.prefix_cache_hits >= 80
    _assert_all_blocks_free(llm)


def test_preemption(setup) -> None:
    path, prompts, expected = setup
    # 14 blocks of 8 tokens cannot hold the six requests (up to 9 blocks each) that small steps admit.
    llm, got = _run(path, prompts, num_blocks=14, max_num_batched_tokens=32, enable_prefix_caching=False)
    assert got == expected
    assert llm.engine.core.scheduler.num_preemptions_total > 0
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("max_num_seqs", [1, 2, 64])
def test_max_num_seqs(setup, max_num_seqs: int) -> None:
    path, prompts, expected = setup
    llm, got = _run(path, prompts, max_num_seqs=max_num_seqs, kv_cache_memory=16 << 20)
    assert got == expected
    _assert_all_blocks_free(llm)
