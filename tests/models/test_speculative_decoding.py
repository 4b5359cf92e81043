"""Speculative decoding on a tiny random Llama: lossless verification (greedy output identical to decoding without
speculation, seeded sampling identical, unseeded sampling with the target's distribution), for n-gram and draft-model
proposers, under batching, chunked prefill, prefix hits and preemption; nothing leaks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tokenmill import LLM, SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
         "disable_by_batch_size": 64}
SELF_DRAFT = {"method": "draft_model", "num_speculative_tokens": 3, "disable_by_batch_size": 64}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    gen = torch.Generator().manual_seed(5)
    motif = torch.randint(3, 40000, (6,), generator=gen).tolist()
    shared = torch.randint(3, 40000, (24,), generator=gen).tolist()
    prompts = [motif * 4, shared + motif * 2, shared + torch.randint(3, 40000, (13,), generator=gen).tolist()]
    prompts += [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (5, 33)]
    plain = LLM(dtype="float32", model=path, block_size=8, kv_cache_memory=32 << 20)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    return path, prompts, expected, plain


def _llm(path: str, spec: dict, **engine_args) -> LLM:
    engine_args.setdefault("kv_cache_memory", 32 << 20)
    return LLM(dtype="float32", model=path, block_size=8, speculative_config=spec, **engine_args)


def _token_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.engine.core.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


def _stats(llm: LLM):
    return llm.engine.core.governor.stats


@pytest.mark.parametrize("spec", [NGRAM, {**SELF_DRAFT, "quantization": "none"}, {**SELF_DRAFT, "quantization": "int4"}],
                         ids=["ngram", "self-draft", "int4-self-draft"])
def test_greedy_output_is_identical(setup, spec: dict) -> None:
    path, prompts, expected, _ = setup
    spec = {**spec, "model": path} if spec["method"] == "draft_model" else spec
    llm = _llm(path, spec)
    assert _token_ids(llm, prompts, GREEDY) == expected
    stats = _stats(llm)
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    if spec.get("quantization") == "none":  # the draft is the target: every draft is accepted
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_self_draft_shares_the_targets_cache(setup, quantization: str) -> None:
    """A self-draft reads and writes the target's K/V cache: no blocks of its own (the same number of blocks as
    without speculation, from the same memory), no prefill, no state kept across steps."""
    path, prompts, expected, plain = setup
    llm = _llm(path, {**SELF_DRAFT, "model": path + "/", "quantization": quantization})  # the same checkpoint
    target, proposer = llm.engine.core.worker, llm.engine.core.worker.proposer
    assert proposer.shares_target_kv
    assert all(d[0] is t[0] and d[1] is t[1] for d, t in zip(proposer.runner.kv_caches, target.runner.kv_caches))
    assert target.num_blocks == plain.engine.core.worker.num_blocks
    assert _token_ids(llm, prompts, GREEDY) == expected
    assert not proposer.states
    assert _stats(llm).num_accepted_tokens > 0


def test_another_model_drafts_with_its_own_cache(setup, tiny_checkpoint) -> None:
    """A draft of other weights (a different checkpoint of the same vocabulary) keeps K/V of its own, prefilled with
    the target's prompt steps; the output is still the target's."""
    path, prompts, expected, _ = setup
    llm = _llm(path, {**SELF_DRAFT, "model": str(tiny_checkpoint("mistral"))})
    proposer = llm.engine.core.worker.proposer
    assert not proposer.shares_target_kv
    assert proposer.runner.kv_caches[0][0] is not llm.engine.core.worker.runner.kv_caches[0][0]
    assert _token_ids(llm, prompts, GREEDY) == expected
    assert _stats(llm).num_draft_tokens > 0
    _assert_all_blocks_free(llm)


def test_one_request_at_a_time_and_metrics(setup) -> None:
    path, prompts, expected, _ = setup
    llm = _llm(path, NGRAM)
    outputs = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    repeating = outputs[0].metrics  # the motif prompt: its own tokens predict it
    assert repeating.num_draft_tokens > 0 and 0 < repeating.num_accepted_tokens <= repeating.num_draft_tokens
    assert sum(o.metrics.num_accepted_tokens for o in outputs) == _stats(llm).num_accepted_tokens


@pytest.mark.parametrize("engine_args", [
    {"max_num_batched_tokens": 7},  # chunked prefill, and draft slots cut by the budget
    {"num_blocks": 14, "max_num_batched_tokens": 32, "enable_prefix_caching": False},  # preemption
], ids=["chunked", "preemption"])
def test_under_chunked_prefill_and_preemption(setup, engine_args: dict) -> None:
    path, prompts, expected, _ = setup
    engine_args.setdefault("kv_cache_memory", None)
    llm = _llm(path, {**SELF_DRAFT, "model": path, "quantization": "int4"}, **engine_args)
    assert _token_ids(llm, prompts, GREEDY) == expected
    if "num_blocks" in engine_args:
        assert llm.engine.core.scheduler.num_preemptions_total > 0
    _assert_all_blocks_free(llm)


def test_prefix_hits(setup) -> None:
    path, prompts, expected, _ = setup
    llm = _llm(path, {**SELF_DRAFT, "model": path, "quantization": "int4"})
    first = _token_ids(llm, prompts[1:2], GREEDY)
    rest = llm.generate(prompts[2:3] + prompts[1:2], GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in rest] == [24, 32]  # the shared blocks, then the whole repeated prompt
    assert first + [o.outputs[0].token_ids for o in rest] == expected[1:3] + expected[1:2]
    _assert_all_blocks_free(llm)


def test_logprobs_match_decoding_without_speculation(setup) -> None:
    path, prompts, _, plain = setup
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    want = plain.generate(prompts, params, use_tqdm=False)
    got = _llm(path, NGRAM).generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for wp, gp in zip(w.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert wp.keys() == gp.keys()
            for token, lp in wp.items():
                assert gp[token].logprob == pytest.approx(lp.logprob, abs=1e-4)
                assert gp[token].rank == lp.rank


def test_seeded_sampling_gives_the_same_tokens(setup) -> None:
    """Each position samples from the target with that position's own seeded noise, as without speculation."""
    path, prompts, _, plain = setup
    params = [SamplingParams(temperature=0.8, top_k=5, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True,
                             repetition_penalty=1.1 if i % 2 else 1.0) for i in range(len(prompts))]
    llm = _llm(path, {**SELF_DRAFT, "model": path, "quantization": "int4"})
    assert _token_ids(llm, prompts, params) == [o.outputs[0].token_ids for o in
                                                 plain.generate(prompts, params, use_tqdm=False)]
    assert _stats(llm).num_accepted_tokens > 0


def test_sampled_output_has_the_targets_distribution(setup) -> None:
    """Unseeded samples of the first tokens, with and without speculation: the empirical distributions of the token
    triples agree within a total-variation distance that sampling noise alone stays under at this size (two plain
    engines of different seeds: 0.05-0.10 at 600 samples, 0.025 at 4000; with speculation the same)."""
    path, _, _, plain = setup
    prompt = [17, 230, 4411, 17, 230, 4411, 17, 230]
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=4, ignore_eos=True)
    num_samples = 1000
    spec_llm = _llm(path, {**SELF_DRAFT, "model": path, "quantization": "int4", "num_speculative_tokens": 2,
                           "disable_by_batch_size": 1024})

    def triples(llm: LLM) -> Counter:
        outs = llm.generate([prompt] * num_samples, params, use_tqdm=False)
        return Counter(tuple(o.outputs[0].token_ids[1:4]) for o in outs)

    with_spec, without = triples(spec_llm), triples(plain)
    stats = _stats(spec_llm)
    assert stats.num_draft_tokens > num_samples  # drafts were verified (not all accepted: sampling at T = 1)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    tv = 0.5 * sum(abs(with_spec[k] - without[k]) for k in set(with_spec) | set(without)) / num_samples
    assert tv < 0.12, (tv, with_spec.most_common(4), without.most_common(4))
